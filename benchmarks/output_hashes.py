"""Record or compare sha256 of qdqsurgeon's outputs on the shared models ("no change in outputs").

A performance change must leave every output byte-identical. Run once on the old code with
``--record FILE`` and once on the new code with ``--compare FILE``; both run the CLI of whatever
``qdqsurgeon`` the interpreter imports (set ``PYTHONPATH`` to choose a checkout)::

    PYTHONPATH=/work/main python benchmarks/output_hashes.py --record /tmp/main.json
    PYTHONPATH=.          python benchmarks/output_hashes.py --compare /tmp/main.json

Cases: PTQ of every model in ``shared/models/fp32`` with random calibration (seed 0, fixed in the
tool), PTQ with real photos for the image classifiers, ``--weights int8``, the bundled example, and
the fix path on every model in ``shared/models/qdq``. Exit 1 when a hash differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_SHARED = BENCH_DIR.parent.parent / "shared"
CLI = "import sys; from qdqsurgeon.cli import main; sys.argv[0] = 'qdqsurgeon'; main()"
IMAGENET = "size=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,scale=1/255,order=RGB,layout=NCHW,resize=crop"


def cases(shared: Path) -> list[tuple[str, list[str]]]:
    """(name, CLI arguments with IN placeholder first) for every case."""
    fp32 = shared / "models" / "fp32"
    qdq = shared / "models" / "qdq"
    images = str(shared / "models" / "images")
    out: list[tuple[str, list[str]]] = []
    for p in sorted(fp32.glob("*.onnx")):
        extra = ["--opset", "13"] if p.stem == "resnet18_cifar10" else []
        out.append((f"ptq-random/{p.stem}", [str(p), "--calib-random", "2", *extra]))
    out.append(("ptq-int8/yolov8n_320", [str(fp32 / "yolov8n_320.onnx"), "--calib-random", "2", "--weights", "int8"]))
    out.append(("ptq-images/efficientnet_lite0", [str(fp32 / "efficientnet_lite0.onnx"), "--calib", images,
                                                  "--preprocess", IMAGENET]))
    out.append(("ptq-images-entropy/mobilenetv2_bottleneck", [str(fp32 / "mobilenetv2_bottleneck.onnx"), "--calib", images,
                                                             "--preprocess", IMAGENET, "--method", "entropy"]))
    out.append(("ptq-example", ["--example"]))
    for p in sorted(qdq.glob("*.onnx")):
        out.append((f"fix/{p.stem}", [str(p)]))
    return out


def run_case(args: list[str], tmp: Path, name: str) -> dict[str, str | int]:
    dst = tmp / (name.replace("/", "__") + ".onnx")
    report = tmp / (name.replace("/", "__") + ".json")
    if args[0] == "--example":
        cmd = ["optimize", "--example", str(dst)]
    else:
        cmd = ["optimize", args[0], str(dst), *args[1:]]
    cmd += ["-q", "--allow-regression", "--report", str(report)]
    proc = subprocess.run([sys.executable, "-c", CLI, *cmd], capture_output=True, text=True)
    result: dict[str, str | int] = {"exit": proc.returncode}
    if dst.exists():
        result["sha256"] = hashlib.sha256(dst.read_bytes()).hexdigest()
        data = dst.with_suffix(".onnx.data")
        if data.exists():
            result["data_sha256"] = hashlib.sha256(data.read_bytes()).hexdigest()
    if report.exists():
        payload = json.loads(report.read_text())
        # the change log (not timings) must be the same too
        result["changes_sha256"] = hashlib.sha256(json.dumps(payload.get("changes"), sort_keys=True).encode()).hexdigest()
        # the whole report but its timings and temporary paths: analyses, summary, regressions
        rest = {k: v for k, v in payload.items() if k not in ("timing_s", "input", "output")}
        result["report_sha256"] = hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()
    if proc.returncode:
        result["stderr"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--record", type=Path, help="write the hashes to this JSON file")
    group.add_argument("--compare", type=Path, help="compare with hashes recorded earlier")
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--only", default=None, help="substring filter on case names")
    a = ap.parse_args()
    import qdqsurgeon

    print(f"qdqsurgeon from {Path(qdqsurgeon.__file__).parent}", flush=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="qdq-hashes-") as tmp:
        for name, args in cases(a.shared):
            if a.only and a.only not in name:
                continue
            results[name] = run_case(args, Path(tmp), name)
            print(f"{name:50s} {results[name]}", flush=True)
    if a.record:
        a.record.write_text(json.dumps(results, indent=2, sort_keys=True))
        return 0
    old = json.loads(a.compare.read_text())
    differ = [n for n in results if results[n] != old.get(n)]
    for n in differ:
        print(f"DIFFERS {n}: before {old.get(n)} now {results[n]}")
    print(f"{len(results) - len(differ)} of {len(results)} cases identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

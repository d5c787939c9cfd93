"""Helpers for the TensorRT-integration tests: paths of the engine dumps, tiny dumps and ONNX models."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

# ../shared beside the repository (tests/trt/conftest.py → parents[2] is the repo root).
SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
ENGINES = SHARED / "models" / "engines"
MOBILENET = ENGINES / "trex_mobilenet_v2_a100"
MB_QAT = MOBILENET / "mobilenet.qat.onnx.engine.graph.json"
MB_QAT_PROFILE = MOBILENET / "mobilenet.qat.onnx.engine.profile.json"
MB_RES = MOBILENET / "mobilenet_v2_residuals.qat.onnx.engine.graph.json"
MB_RES_PROFILE = MOBILENET / "mobilenet_v2_residuals.qat.onnx.engine.profile.json"


@pytest.fixture(scope="session")
def engines() -> Path:
    if not ENGINES.is_dir():
        pytest.skip(f"engine dumps not found at {ENGINES} (the shared folder beside the repo)")
    return ENGINES


def raw(path: Path) -> Any:
    """The dump as plain JSON, for figures computed independently of the parser."""
    return json.loads(path.read_text())


def write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj))
    return path


def tensor(name: str, fmt: str, **extra: Any) -> dict[str, Any]:
    return {"Name": name, "Dimensions": [1, 8, 4, 4], "Format/Datatype": fmt, **extra}


def layer(name: str, ltype: str, inputs: list[dict], outputs: list[dict], **extra: Any) -> dict[str, Any]:
    return {"Name": name, "LayerType": ltype, "Inputs": inputs, "Outputs": outputs, **extra}


def qdq_conv_model(path: Path, *, bad_op: bool = False) -> Path:
    """x → Q → DQ → Conv(W~) → Relu → y, opset 17; node names chosen to be mapped (E4)."""
    w = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w, "conv.weight"),
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
        numpy_helper.from_array(np.full((8,), 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros((8,), np.int8), "w_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="QuantizeLinear_1"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"], name="DequantizeLinear_2"),
        helper.make_node("QuantizeLinear", ["conv.weight", "w_scale", "w_zp"], ["wq"], name="QuantizeLinear_3", axis=0),
        helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zp"], ["wd"], name="DequantizeLinear_4", axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["c"], name="Conv_5", pads=[1, 1, 1, 1]),
        helper.make_node("NoSuchOp" if bad_op else "Relu", ["c"], ["y"], name="Relu_6"),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if not bad_op:
        onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path

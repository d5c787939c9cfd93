"""2:4 sparsity in engines: ``build --sparsity`` and the engine report's sparse-layer counts (issue 16).

The published dumps we have were built without sparsity (``HasSparseWeights: 0`` everywhere, no
sparse tactic), so the counting is tested on a small synthetic dump in the TensorRT 10 layout; the
build itself needs TensorRT and a GPU and skips here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from qdqsurgeon.cli import cli
from qdqsurgeon.trt.report import engine_report

ENGINES = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "engines"
MISSING = "TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU)"


def _conv(name: str, tactic: str, has_sparse: int) -> dict:
    return {
        "Name": name, "LayerType": "CaskConvolution", "ParameterType": "Convolution",
        "Inputs": [{"Name": f"{name}_in", "Dimensions": [1, 64, 56, 56], "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
        "Outputs": [{"Name": f"{name}_out", "Dimensions": [1, 64, 56, 56], "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
        "Kernel": [3, 3], "OutMaps": 64, "Groups": 1, "Weights": {"Type": "Int8", "Count": 36864},
        "HasSparseWeights": has_sparse, "TacticName": tactic, "Metadata": f"[ONNX Layer: {name}]",
    }


def _dump(path: Path) -> Path:
    layers = [
        _conv("conv_sparse", "sm80_xmma_fprop_sparse_conv_interleaved_i8i8_i8i32_f32_nchw_vect_c_32kcrs_vect_c_32_tilesize128x128x128", 1),
        _conv("conv_eligible_dense", "sm80_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32_nchw_vect_c_32kcrs_vect_c_32", 1),
        _conv("conv_dense", "sm80_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32_nchw_vect_c_32kcrs_vect_c_32", 0),
    ]
    path.write_text(json.dumps({"Layers": layers, "Bindings": ["conv_sparse_in", "conv_dense_out"]}))
    return path


def test_report_counts_sparse_weights_and_sparse_kernels(tmp_path):
    rep = engine_report(_dump(tmp_path / "layers.json"))
    assert rep.sparse_weight_layers == 2 and rep.sparse_kernel_layers == ["conv_sparse"]
    d = rep.to_dict()
    assert d["sparse_weight_layers"] == 2 and d["sparse_kernel_layers"] == 1
    assert "2:4 sparsity: 2 layer(s) with 2:4 weights, 1 running sparse kernels" in rep.to_text()


def test_real_dumps_built_without_sparsity_show_none():
    dump = ENGINES / "trex_mobilenet_v2_a100" / "mobilenet.qat.onnx.engine.graph.json"
    if not dump.exists():
        pytest.skip(f"{dump} not found")
    rep = engine_report(dump)
    assert rep.sparse_weight_layers == 0 and rep.sparse_kernel_layers == []
    assert "2:4 sparsity" not in rep.to_text()
    names_only = ENGINES / "detr_implicit_int8_names_only" / "detr-layer-info.json"
    if names_only.exists():
        assert engine_report(names_only).sparse_kernel_layers is None  # names-only dumps cannot tell


def test_build_sparsity_without_tensorrt_exits_3(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # blocks the import; fakes nothing
    model = Path(__file__).resolve().parents[2] / "fixtures" / "digits_cnn_sparse24.onnx"
    res = CliRunner().invoke(cli, ["build", str(model), "--engine", str(tmp_path / "m.plan"), "--sparsity"])
    assert res.exit_code == 3 and res.stderr.strip() == f"error: {MISSING}"
    assert not (tmp_path / "m.plan").exists()


@pytest.mark.tensorrt
def test_tensorrt_build_with_sparsity(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs an NVIDIA GPU)")
    import onnx

    from qdqsurgeon import build_ranges, optimize, save
    from qdqsurgeon.trt.build import build_engine

    src = onnx.load(Path(__file__).resolve().parents[2] / "fixtures" / "digits_cnn_sparse24.onnx")
    int8 = optimize(src, ranges=build_ranges(src, calib_random=8, progress=False)).model
    path = save(int8, tmp_path / "m.onnx")
    res = build_engine(path, tmp_path / "m.plan", layer_info=tmp_path / "m.layers.json", sparsity=True,
                       shapes={"image": (32, 1, 8, 8)}, workspace_mb=256)
    assert res.sparsity and res.engine_bytes > 0
    rep = engine_report(tmp_path / "m.layers.json")
    assert rep.sparse_weight_layers is not None  # TensorRT decides whether a sparse kernel wins (S6)

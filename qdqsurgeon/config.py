"""Typed configuration for passes. The CLI maps its flags onto a :class:`Config`; no pass reads globals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["Config"]


@dataclass
class Config:
    """Options shared by the passes (each pass reads only the fields it documents)."""

    # insert-qdq (P1, F1, V3)
    weights: str = "float"  # "float": W -> Q -> DQ;  "int8": int8 initializer -> DQ
    exclude: list[str] = field(default_factory=list)  # regexes over node names
    exclude_ops: list[str] = field(default_factory=list)
    exclude_hook: Callable[[Any], bool] | None = None  # API only: called with each weighted gs.Node; True keeps it float
    # MatMul between two activations: None quantizes the two GEMMs of each attention block (INT8 MHA
    # fusion, NVIDIA/TensorRT#3243) and leaves other batch GEMMs float; True quantizes every one; False none.
    quantize_bmm: bool | None = None
    convtranspose_axis: int | None = 1  # None: per-tensor weights (target TRT unknown)
    # P11: Convs with small, misaligned channel counts stay float unless this is set
    quantize_small_convs: bool = False
    # The TensorRT release placement targets, (major, minor); None: the newest the rules describe
    # (trt_rules.NEWEST_VERSION). Version-dependent rules: trt_rules.VERSIONED_RULES.
    trt_version: tuple[int, int] | None = None
    # placement
    # P4-P6: "max" (the union of every tied tensor's calibrated range), "scales" (the largest scale the
    # tensors' pairs already have: a pair carried back across a Concat keeps the Concat output's range)
    # or "output" (the consumer's scale)
    align: str = "max"
    keep_output_layers: bool = False  # P9
    # bias-correction (PTQ with real calibration data only, where a held-out check on that data finds it helps;
    # see README "Bias correction"): INT8 layers' float biases absorb the mean output shift of their own weight
    # rounding (V4: biases stay float in TensorRT)
    # None: the default (passes.bias_correction.DEFAULT_ON); True: asked for (said so when impossible); False: off
    bias_correction: bool | None = None
    # whose activation rounding it corrects too, besides the weight rounding: "none" (default), "input" (layers
    # reading a network input, where the INT8 model's input is the float model's) or "all" (every INT8 layer,
    # measured on the float model's inputs)
    bias_correction_rounding: str = "none"
    # the held-out check: calibration batch i is in fold i mod k; the correction is applied only if, fitted on the
    # other folds, it improves the model's outputs on each fold's batches (worst-output SQNR summed over them).
    # 1: no check, the correction as measured on all the data
    bias_correction_folds: int = 8
    float16: bool = False  # P10
    io_float16: bool = False
    sensitive_ops: list[str] = field(default_factory=lambda: ["LayerNormalization", "Softmax"])
    # fix path
    weights_fix: str = "keep"  # "keep" int8 weights as they are, or "float"
    # A zero scale (V1) that is not a dead weight channel is bad input, refused unless this is set:
    # then normalize-qdq gives it MIN_SCALE (the tensor dequantizes to about 0, as it does now).
    repair_zero_scales: bool = False

    def __post_init__(self) -> None:
        if self.weights not in ("float", "int8"):
            raise ValueError(f"weights must be 'float' or 'int8', not {self.weights!r}")
        if self.bias_correction_rounding not in ("input", "all", "none"):
            raise ValueError(f"bias_correction_rounding must be 'input', 'all' or 'none', not {self.bias_correction_rounding!r}")
        if int(self.bias_correction_folds) < 1:
            raise ValueError(f"bias_correction_folds must be >= 1, not {self.bias_correction_folds!r}")
        self.bias_correction_folds = int(self.bias_correction_folds)
        if self.align not in ("max", "scales", "output"):
            raise ValueError(f"align must be 'max', 'scales' or 'output', not {self.align!r}")

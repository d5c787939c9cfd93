"""Static model of TensorRT's explicit-quantization processing: predict the engine from the ONNX.

TensorRT cannot run everywhere qdqsurgeon does, so this module simulates what its builder does
with Q/DQ nodes (``trt-rules.md`` §3) and reports what the engine will contain: which weighted
ops run INT8 and with which output precision, the INT8 share of the MACs, and every Q/DQ that
stays a standalone Quantize/Dequantize (Reformat, ``Origin: "QDQ"``) layer, with the rule that
leaves it unfused.

The simulation runs on a private copy of the graph, in TensorRT's order:

1. Q/DQ on constants are weights (F1), never layers. Identical Qs (or DQs) on one tensor merge
   into one (P6).
2. DQs move forward and Qs backward across commuting ops (:func:`trt_rules.commutes`). A Q moves
   back only when it is the only reader of the op's output (C1); ops with ``equal_scales``
   (Concat) take a DQ forward only when all input scales agree (P4). ``DQ(s)→Q(s)`` cancels;
   ``DQ(s1)→Q(s2)`` stays as a requantize layer (E3).
3. Fusion: a weighted op is INT8 when its activation and weight come from DQs (F1); its epilogue
   chain (BN, bias Add, ReLU/Clip/..., SiLU, one residual Add) fuses (F3, F5, F10). The chain writes
   INT8 only when its end tensor is read by a single Q (F2, C1, P2) and, with a residual Add, the
   skip operand comes from a DQ (F5); otherwise it writes float and the skip DQ stays standalone
   (section 5, ``DequantizeLinear_291``). Other quantizable ops run INT8 only fully wrapped (P7).
4. What is left is standalone: every Q not absorbed by its producer (a graph input is always one,
   P10), every DQ with a reader that cannot take INT8.

All op knowledge comes from :mod:`qdqsurgeon.trt_rules`; nothing here lists op types.

The model lives in three files, one per concept: :mod:`.simulate` (steps 1-2), :mod:`.fuse`
(step 3) and :mod:`.predict` (step 4, the report and :func:`predict`).
"""

from .predict import (FLOAT, INT8_FLOAT, INT8_INT8, Kernel, StandaloneLayer, TrtPrediction, WeightedOpPrediction,
                      predict, weighted_op_macs)

__all__ = ["Kernel", "StandaloneLayer", "WeightedOpPrediction", "TrtPrediction", "predict", "weighted_op_macs",
           "INT8_INT8", "INT8_FLOAT", "FLOAT"]

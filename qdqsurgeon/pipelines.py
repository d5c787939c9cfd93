"""Named pipelines: ordered lists of pass names.

Why the PTQ order is what it is:

0. ``remove-identity`` bypasses Identity nodes (exact; TensorRT removes them too), so they split no
   conv chain for the passes or the analysis (F3). It runs once, like insertion.
1. ``insert-qdq`` puts Q/DQ on every weighted op's inputs (P1): the starting point.
2. ``exclude-output-layers`` runs next so that every later pass sees the final set of quantized
   consumers; run later, the residual and pooling passes would add Q/DQ feeding layers that end
   up float, leaving half-quantized ops behind (P9, P7).
3. ``quantize-residual`` adds the skip-input pairs (P3); they join fan-out groups, so it runs
   before scales are aligned.
4. ``align-scales`` makes tied tensors agree (P4-P6); only then do all readers of a commuting
   op agree, which ...
5. ... ``move-qdq`` needs to carry pairs back to the producers (C1), so conv outputs become INT8.
6. ``quantize-pooling`` wraps GAP/Resize/pointwise ops whose outputs the moves made quantized,
   and unwraps half-quantized ones (P7). The pairs it adds can join tied groups, so
   ``align-scales`` and ``move-qdq`` run once more after it (both are idempotent).
7. ``remove-misplaced-qdq`` fixes Pad/bias/output placements any earlier pass may have left (P8, V4).
8. Cleanup: ``fold-qdq-pairs`` removes DQ->Q round trips that moves created, ``dedupe-qdq``
   merges identical pairs (C1, P6), ``remove-unused-domains`` drops opset imports no node uses
   (on PTQ too, so that the fix pipeline finds nothing to do on a PTQ output).
9. ``bias-correction`` (PTQ with real calibration data) runs once the placement is final: it
   corrects each INT8 layer's float bias for the mean shift its own rounding causes (V4), which
   depends on which layers ended up INT8 and with which scales.
10. ``float16-regions`` (only with ``--float16``) runs last, on the final placement: it decides
   which DQs emit FP16 from where the Q/DQ ended up (P10); a no-op otherwise.

A named pipeline repeats, from its first pass after insertion, until no pass changes anything:
a late pass can open work for an earlier one (``move-qdq`` carries a pair back across a MaxPool, so
the SE-style Mul before it now has INT8 neighbours and ``quantize-pooling`` wraps it). Insertion
(``RUN_ONCE``) is not repeated: it would re-quantize the layers ``exclude-output-layers`` keeps float.
The passes of ``RUN_LAST`` at a pipeline's end run once, after that fixpoint: they read the final
placement, and changing a float bias or a DQ's output type opens no work for the others.

``--requantize`` runs ``remove-qdq`` alone first, calibrates the float model it recovers, then
the PTQ pipeline. The fix pipeline is the same as PTQ without insertion: the model's own Q/DQ are normalized first, and
``remove-misplaced-qdq`` also runs right after normalization, so that Q/DQ splitting conv
epilogue chains (onnxruntime's placement) is gone before residuals and scales are examined.
"""

from __future__ import annotations

__all__ = ["PIPELINES", "CLEANUP", "PLACEMENT", "RUN_ONCE", "RUN_LAST", "BASELINES"]

CLEANUP: tuple[str, ...] = ("fold-qdq-pairs", "dedupe-qdq", "remove-unused-domains")
RUN_ONCE: frozenset[str] = frozenset({"remove-identity", "insert-qdq"})
RUN_LAST: frozenset[str] = frozenset({"bias-correction", "float16-regions"})
PLACEMENT: tuple[str, ...] = (
    "exclude-output-layers",
    "quantize-residual",
    "align-scales",
    "move-qdq",
    "quantize-pooling",
    "align-scales",
    "move-qdq",
    "remove-misplaced-qdq",
)

PIPELINES: dict[str, tuple[str, ...]] = {
    "cleanup": CLEANUP,
    "ptq": ("remove-identity", "insert-qdq", *PLACEMENT, *CLEANUP, "bias-correction", "float16-regions"),
    "fix": ("remove-identity", "normalize-qdq", "remove-misplaced-qdq", *PLACEMENT, *CLEANUP, "float16-regions"),
    "insert-only": ("remove-identity", "insert-qdq", *CLEANUP),
    "repair-only": ("remove-identity", "normalize-qdq", *CLEANUP),
}

#: The plainer pipeline each named pipeline must not be worse than (by the static TensorRT model:
#: validity problems, then standalone Q/DQ). ``optimize`` runs it too and keeps it when it wins:
#: PTQ against the naive insert-only placement, fix against the input's own placement repaired
#: only where TensorRT would reject it (never worse than what the user brought, issue 12).
BASELINES: dict[str, str] = {"ptq": "insert-only", "fix": "repair-only"}

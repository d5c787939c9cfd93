"""Built-in passes. The tuple :data:`BUILTIN_PASSES` is the one place they are listed."""

from __future__ import annotations

from .base import Instrument, Pass, PassContext, PassManager, PassResult, PipelineResult, TimingInstrument, VerifyInstrument
from .fold_qdq_pairs import FoldQdqPairs
from .dedupe_qdq import DedupeQdq
from .insert_qdq import InsertQdq
from .normalize_qdq import NormalizeQdq
from .strip_qdq import RemoveQdq
from .exclude_output_layers import ExcludeOutputLayers
from .quantize_residual import QuantizeResidual
from .align_scales import AlignScales
from .move_qdq import MoveQdq
from .quantize_pooling import QuantizePooling
from .remove_misplaced_qdq import RemoveMisplacedQdq
from .float16_regions import Float16Regions
from .remove_unused_domains import RemoveUnusedDomains
from .remove_identity import RemoveIdentity
from .bias_correction import BiasCorrection

__all__ = [
    "BUILTIN_PASSES",
    "Instrument",
    "Pass",
    "PassContext",
    "PassManager",
    "PassResult",
    "PipelineResult",
    "TimingInstrument",
    "VerifyInstrument",
]

BUILTIN_PASSES: tuple[type[Pass], ...] = (
    InsertQdq,
    NormalizeQdq,
    RemoveQdq,
    ExcludeOutputLayers,
    QuantizeResidual,
    AlignScales,
    MoveQdq,
    QuantizePooling,
    RemoveMisplacedQdq,
    Float16Regions,
    FoldQdqPairs,
    DedupeQdq,
    RemoveUnusedDomains,
    RemoveIdentity,
    BiasCorrection,
)

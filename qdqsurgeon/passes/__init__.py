"""Built-in passes. The tuple :data:`BUILTIN_PASSES` is the one place they are listed."""

from __future__ import annotations

from .base import Instrument, Pass, PassContext, PassManager, PassResult, PipelineResult, TimingInstrument, VerifyInstrument
from .fold_qdq_pairs import FoldQdqPairs
from .dedupe_qdq import DedupeQdq
from .insert_qdq import InsertQdq

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
    FoldQdqPairs,
    DedupeQdq,
)

"""Named pipelines: ordered lists of pass names (the order is part of the design, see comments)."""

from __future__ import annotations

__all__ = ["PIPELINES", "CLEANUP"]

# Cleanup runs last in every pipeline: earlier passes leave shareable or cancelling pairs behind.
CLEANUP: tuple[str, ...] = ("fold-qdq-pairs", "dedupe-qdq")

PIPELINES: dict[str, tuple[str, ...]] = {
    "cleanup": CLEANUP,
    "ptq": ("insert-qdq", *CLEANUP),
    "fix": CLEANUP,
}

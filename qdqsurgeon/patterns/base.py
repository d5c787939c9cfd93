"""Patterns (in the manner of MLIR's rewrite patterns and the onnxscript rewriter).

A :class:`Pattern` is anchored on root op types and has a benefit (priority). ``match`` is pure
and returns a :class:`Match` or a falsy :class:`NoMatch` carrying the reason; ``rewrite`` edits
only through the rewriter. Keeping the two apart gives dry runs (:meth:`PatternPass.plan`) and
"why did this not fire" answers for free.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import onnx_graphsurgeon as gs

from ..errors import ModelError, QdqError
from ..passes.base import Pass, PassContext
from ..rewriter import Rewriter

__all__ = ["Match", "NoMatch", "Pattern", "PatternPass", "PlanEntry"]

logger = logging.getLogger(__name__)


@dataclass
class Match:
    """A successful match: the root node and whatever the rewrite needs."""

    node: gs.Node
    captures: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return True

    def __getitem__(self, key: str) -> Any:
        return self.captures[key]


@dataclass
class NoMatch:
    """A failed match and why it failed."""

    reason: str

    def __bool__(self) -> bool:
        return False


class Pattern(ABC):
    """A local rewrite anchored on ``root_ops`` (empty: any op)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    root_ops: ClassVar[tuple[str, ...]] = ()
    benefit: ClassVar[int] = 1
    rule: ClassVar[str] = ""

    @abstractmethod
    def match(self, node: gs.Node, ctx: PassContext) -> Match | NoMatch:
        """Decide, without editing anything, whether the pattern applies at ``node``."""

    @abstractmethod
    def rewrite(self, match: Match, rw: Rewriter) -> None:
        """Apply the rewrite for ``match`` through ``rw``."""


@dataclass
class PlanEntry:
    pattern: str
    node: str
    result: Match | NoMatch

    @property
    def fires(self) -> bool:
        return bool(self.result)


class PatternPass(Pass):
    """Runs a set of patterns to a fixpoint, the highest benefit first at each node."""

    def __init__(self, patterns: Sequence[Pattern], *, name: str | None = None, summary: str | None = None,
                 max_iterations: int = 64) -> None:
        if not patterns:
            raise ValueError("a PatternPass needs at least one pattern")
        self.patterns = sorted(patterns, key=lambda p: -p.benefit)
        self.name = name or (self.patterns[0].name if len(self.patterns) == 1 else "patterns")  # type: ignore[misc]
        self.summary = summary or self.patterns[0].summary  # type: ignore[misc]
        self.rules = tuple(sorted({p.rule for p in self.patterns if p.rule}))  # type: ignore[misc]
        self.max_iterations = max_iterations

    def _candidates(self, node: gs.Node) -> list[Pattern]:
        return [p for p in self.patterns if not p.root_ops or node.op in p.root_ops]

    def run(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext) -> None:
        for _ in range(self.max_iterations):
            fired = False
            for node in list(graph.nodes):
                if rw.is_removed(node):
                    continue
                for pattern in self._candidates(node):
                    try:
                        m = pattern.match(node, ctx)
                        if m:
                            with rw.rule(pattern.rule):
                                pattern.rewrite(m, rw)
                    except QdqError:
                        raise
                    except Exception as exc:  # name the pattern: user patterns run here too
                        raise ModelError(f"pattern {pattern.name} failed at node {node.name}: {type(exc).__name__}: {exc}") from exc
                    if m:
                        fired = True
                        break
            if not fired:
                return
            rw.cleanup()
        logger.warning("%s: patterns still firing after %d sweeps", self.name, self.max_iterations)

    def plan(self, graph: gs.Graph, ctx: PassContext | None = None) -> list[PlanEntry]:
        """Dry run: every (pattern, root node) pair with its match or failure reason."""
        ctx = ctx or PassContext()
        return [PlanEntry(p.name, n.name, p.match(n, ctx)) for n in graph.nodes for p in self._candidates(n)]

"""One matcher for engine layers, keyed on the ONNX nodes they contain (issue 13 item 4).

Used by ``engine-diff`` (two dumps, or a dump and a static prediction) and by the agreement
benchmark. Layer names change between builds of differently placed models (``Conv_12`` in one
export is ``Conv_9`` in the next, and every Q/DQ name moves), but what a layer runs does not, so
layers are matched in three rounds:

1. the same set of ONNX names (node and weight-initializer names, as the layer name or metadata
   lists them): the same ONNX model on both sides;
2. the most names in common once Q/DQ node names are set aside: weight initializers
   (``features.3.conv.2.weight``) and compute nodes survive a re-export or a Q/DQ change
   (exporter-numbered names such as ``Conv_546`` count a tenth: the number moves between exports);
3. data flow: an unmatched layer whose producer (or consumer) is matched pairs with the unmatched
   layer of the same category in the same place on the other side, repeated until nothing moves.
   This pairs the weightless layers (a Pooling, a standalone Quantize after a matched conv).
4. order, only when names matched fewer than half the layers (a prediction for a reconstruction
   of the model a dump was built from, with other names): the unmatched layers' category sequences (compute / qdq / reformat) in graph order
   are aligned (difflib) and equal runs pair up.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["MatchUnit", "Matching", "match_units"]

_QDQ_NAME = re.compile(r"(Quantize|Dequantize|QuantLinear|DequantLinear|QuantizeLinear|DequantizeLinear)", re.I)
#: Exporter-numbered node names (``Conv_546``): the number is a position in one export, so the same
#: name can mean another node in the next; they count a tenth of a descriptive name.
_NUMBERED = re.compile(r"^[A-Za-z]+_\d+$")


def _weight(name: str) -> float:
    return 0.1 if _NUMBERED.match(name) else 1.0


@dataclass(frozen=True)
class MatchUnit:
    """A layer as the matcher sees it: its ONNX names, category and the tensors it reads and writes."""

    name: str
    names: frozenset[str]
    category: str  # "compute", "qdq", "reformat", ...
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    @property
    def stable_names(self) -> frozenset[str]:
        """The names that survive a Q/DQ change: everything but Q/DQ node names."""
        return frozenset(n for n in self.names if not _QDQ_NAME.search(n))


@dataclass
class Matching:
    """Index pairs (a, b) of matched units, and the unmatched ones on each side, each list in order."""

    pairs: list[tuple[int, int]] = field(default_factory=list)
    only_a: list[int] = field(default_factory=list)
    only_b: list[int] = field(default_factory=list)
    how: dict[tuple[int, int], str] = field(default_factory=dict)  # pair -> "names" | "stable names" | "data flow"


def _producers(units: Sequence[MatchUnit]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, u in enumerate(units):
        for t in u.outputs:
            out.setdefault(t, i)
    return out


def _consumers(units: Sequence[MatchUnit]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        for t in u.inputs:
            out.setdefault(t, []).append(i)
    return out


def match_units(a: Sequence[MatchUnit], b: Sequence[MatchUnit]) -> Matching:
    """Match ``a``'s units to ``b``'s (one to one); see the module docstring for the rounds."""
    a_to_b: dict[int, int] = {}
    b_to_a: dict[int, int] = {}
    how: dict[tuple[int, int], str] = {}

    def pair(i: int, j: int, why: str) -> None:
        a_to_b[i], b_to_a[j] = j, i
        how[(i, j)] = why

    # Round 1: identical name sets.
    exact: dict[frozenset[str], list[int]] = {}
    for j, u in enumerate(b):
        if u.names:
            exact.setdefault(u.names, []).append(j)
    for i, u in enumerate(a):
        for j in exact.get(u.names, []) if u.names else []:
            if j not in b_to_a:
                pair(i, j, "names")
                break
    # Round 2: most stable names in common (greedy, best overlap first).
    index: dict[str, list[int]] = {}
    for j, u in enumerate(b):
        if j not in b_to_a:
            for n in u.stable_names:
                index.setdefault(n, []).append(j)
    scored: list[tuple[float, int, int]] = []
    for i, u in enumerate(a):
        if i in a_to_b:
            continue
        counts: dict[int, float] = {}
        for n in u.stable_names:
            for j in index.get(n, []):
                counts[j] = counts.get(j, 0.0) + _weight(n)
        scored.extend((-c, i, j) for j, c in counts.items())
    for _, i, j in sorted(scored):
        if i not in a_to_b and j not in b_to_a:
            pair(i, j, "stable names")
    # Round 3: data flow, from matched neighbours to unmatched ones of the same category.
    prod_a, prod_b = _producers(a), _producers(b)
    cons_a, cons_b = _consumers(a), _consumers(b)
    moved = True
    while moved:
        moved = False
        for i, u in enumerate(a):
            if i in a_to_b:
                continue
            candidates: list[int] = []
            for t in u.inputs[:1]:  # the layer after a matched producer
                p = prod_a.get(t)
                if p is not None and p in a_to_b:
                    for out in b[a_to_b[p]].outputs:
                        candidates += cons_b.get(out, [])
            for t in u.outputs[:1]:  # the layer before a matched consumer
                for c in cons_a.get(t, []):
                    if c in a_to_b:
                        for inp in b[a_to_b[c]].inputs:
                            if inp in prod_b:
                                candidates.append(prod_b[inp])
            for j in candidates:
                if j not in b_to_a and b[j].category == u.category:
                    pair(i, j, "data flow")
                    moved = True
                    break
    if 2 * len(a_to_b) < min(len(a), len(b)):
        # Round 4: the names say too little: align the unmatched units' categories in graph order.
        ia = [i for i in range(len(a)) if i not in a_to_b]
        jb = [j for j in range(len(b)) if j not in b_to_a]
        seq = difflib.SequenceMatcher(None, [a[i].category for i in ia], [b[j].category for j in jb], autojunk=False)
        for block in seq.get_matching_blocks():
            for k in range(block.size):
                pair(ia[block.a + k], jb[block.b + k], "order")
    pairs = sorted(a_to_b.items())
    return Matching(pairs, [i for i in range(len(a)) if i not in a_to_b], [j for j in range(len(b)) if j not in b_to_a],
                    {p: how[p] for p in pairs})

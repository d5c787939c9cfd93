"""remove-unused-domains: opset imports that no node uses are dropped, on every path.

Before → after::

    opset_import: ai.onnx 17, ai.onnx.ml 2, com.microsoft 1   →   opset_import: ai.onnx 17
    (no node of ai.onnx.ml or com.microsoft, in the graph or any subgraph)

Exact: an import no node refers to changes nothing a runtime computes. onnxruntime's quantizer and
TFLite converters leave such imports behind. It runs in the cleanup of every pipeline, not only
when repairing, so that optimizing a model's PTQ output again finds nothing left to do.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..rewriter import Rewriter
from .base import Pass, PassContext

__all__ = ["RemoveUnusedDomains", "drop_unused_domains"]


def drop_unused_domains(graph: gs.Graph, rw: Rewriter) -> None:
    """Drop imports of operator domains that no node (subgraphs included) uses; the default domain stays."""
    if not graph.import_domains:
        return
    used = {n.domain or "" for n in graph.nodes}
    for sub in graph.subgraphs(recursive=True):
        used |= {n.domain or "" for n in sub.nodes}
    keep, dropped = [], []
    for imp in graph.import_domains:
        (keep if imp.domain in ("", "ai.onnx") or imp.domain in used else dropped).append(imp)
    if dropped:
        graph.import_domains = keep
        rw.log("opset", "<model>", "unused opset imports removed: "
               + ", ".join(f"{d.domain} v{d.version}" for d in dropped), rule="opset")


class RemoveUnusedDomains(Pass):
    """Drop opset imports no node uses."""

    name = "remove-unused-domains"
    edits_through_rewriter = True
    summary = "Opset imports that no node uses are dropped"
    rules = ("opset",)

    def run(self, graph: gs.Graph, rw: Rewriter, ctx: PassContext) -> None:
        drop_unused_domains(graph, rw)

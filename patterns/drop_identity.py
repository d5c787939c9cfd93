"""Example user pattern file for ``qdqsurgeon optimize --patterns patterns/``.

A pattern file exposes ``PATTERNS`` (and/or ``PASSES``). This one removes Identity nodes that
exporters leave between layers: they hide Conv→BN→ReLU chains and Q/DQ pairs from other
patterns. Before → after: ``a ─ Identity ─ b`` → ``a ─ b``; exact (Identity copies its input).
Identity nodes that write a graph output keep the output's name (the rewriter renames the
upstream tensor), and Identity on a graph input is kept.
"""

from __future__ import annotations

from qdqsurgeon import Match, NoMatch, Pattern


class DropIdentity(Pattern):
    name = "drop-identity"
    summary = "Remove Identity nodes between layers (example user pattern)"
    root_ops = ("Identity",)
    rule = "-"

    def match(self, node, ctx):
        src = node.inputs[0]
        if not src.inputs:
            return NoMatch(f"{node.name}: reads a graph input or a constant")
        return Match(node)

    def rewrite(self, match, rw):
        rw.bypass(match.node, detail="Identity is a copy")


PATTERNS = [DropIdentity()]

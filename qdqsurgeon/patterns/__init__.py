"""Pattern contract and built-in patterns (listed once in :data:`BUILTIN_PATTERNS`)."""

from __future__ import annotations

from .base import Match, NoMatch, Pattern, PatternPass

__all__ = ["BUILTIN_PATTERNS", "Match", "NoMatch", "Pattern", "PatternPass"]

BUILTIN_PATTERNS: tuple[type[Pattern], ...] = ()

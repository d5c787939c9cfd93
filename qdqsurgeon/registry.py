"""Name → pass lookup for the CLI and the API: built-ins, user files and entry points.

A :class:`Registry` is an ordinary object (not a global mutated at import time), so tests build
a fresh one. User files are Python files exposing ``PATTERNS`` (patterns or pattern classes)
and/or ``PASSES`` (passes or pass classes); an installed package can contribute the same
through the ``qdqsurgeon.patterns`` entry-point group.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import inspect
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import UsageError
from .passes.base import Pass
from .patterns.base import Pattern, PatternPass

__all__ = ["Entry", "Registry", "ENTRY_POINT_GROUP"]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "qdqsurgeon.patterns"


@dataclass(frozen=True)
class Entry:
    name: str
    summary: str
    origin: str  # "builtin", "file:<path>" or "entry-point:<name>"
    kind: str  # "pass" or "pattern"
    rules: tuple[str, ...]
    factory: Callable[[], Pass]


class Registry:
    """Maps pass names to factories."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    @classmethod
    def builtin(cls) -> "Registry":
        from .passes import BUILTIN_PASSES
        from .patterns import BUILTIN_PATTERNS

        reg = cls()
        for p in BUILTIN_PASSES:
            reg.add_pass(p, origin="builtin")
        for pat in BUILTIN_PATTERNS:
            reg.add_pattern(pat, origin="builtin")
        return reg

    # -- adding ------------------------------------------------------------------------------
    def _add(self, entry: Entry, replace: bool) -> None:
        if entry.name in self._entries and not replace:
            raise UsageError(f"pass name '{entry.name}' from {entry.origin} is already taken by {self._entries[entry.name].origin}")
        if not entry.name:
            raise UsageError(f"a pass or pattern from {entry.origin} has no name")
        self._entries[entry.name] = entry

    def add_pass(self, obj: type[Pass] | Pass, *, origin: str = "builtin", replace: bool = False) -> Entry:
        if inspect.isclass(obj):
            if not issubclass(obj, Pass):
                raise UsageError(f"{obj!r} from {origin} is not a qdqsurgeon Pass")
            factory: Callable[[], Pass] = obj
            proto = obj
        elif isinstance(obj, Pass):
            factory, proto = (lambda o=obj: o), obj
        else:
            raise UsageError(f"{obj!r} from {origin} is not a qdqsurgeon Pass")
        entry = Entry(proto.name, proto.summary, origin, "pass", tuple(proto.rules), factory)
        self._add(entry, replace)
        return entry

    def add_pattern(self, obj: type[Pattern] | Pattern, *, origin: str = "builtin", replace: bool = False) -> Entry:
        try:
            pattern = obj() if inspect.isclass(obj) else obj
        except TypeError as exc:  # e.g. an abstract Pattern without match/rewrite
            raise UsageError(f"{origin}: cannot create pattern {obj!r}: {exc}") from None
        if not isinstance(pattern, Pattern):
            raise UsageError(f"{obj!r} from {origin} is not a qdqsurgeon Pattern")
        entry = Entry(pattern.name, pattern.summary, origin, "pattern", (pattern.rule,) if pattern.rule else (),
                      lambda p=pattern: PatternPass([p]))
        self._add(entry, replace)
        return entry

    def add_module_objects(self, module: Any, origin: str) -> list[Entry]:
        patterns = getattr(module, "PATTERNS", None)
        passes = getattr(module, "PASSES", None)
        if patterns is None and passes is None:
            raise UsageError(f"{origin[5:] if origin.startswith('file:') else origin}: defines neither PATTERNS nor PASSES")
        added = [self.add_pattern(p, origin=origin) for p in _as_list(patterns, origin)]
        added += [self.add_pass(p, origin=origin) for p in _as_list(passes, origin)]
        return added

    def load_path(self, path: str | Path) -> list[Entry]:
        """Load a user pattern file, or every ``*.py`` file of a folder (sorted by name)."""
        p = Path(path)
        if not p.exists():
            raise UsageError("no such pattern file or folder", path=str(p))
        files = sorted(p.glob("*.py")) if p.is_dir() else [p]
        if p.is_dir() and not files:
            raise UsageError("no .py files in pattern folder", path=str(p))
        added: list[Entry] = []
        for f in files:
            added += self.add_module_objects(_import_file(f), origin=f"file:{f}")
        return added

    def load_entry_points(self) -> list[Entry]:
        added: list[Entry] = []
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
            except Exception as exc:
                logger.warning("cannot load entry point %s: %s", ep.name, exc)
                continue
            origin = f"entry-point:{ep.name}"
            if inspect.ismodule(obj):
                added += self.add_module_objects(obj, origin)
            elif inspect.isclass(obj) and issubclass(obj, Pattern) or isinstance(obj, Pattern):
                added.append(self.add_pattern(obj, origin=origin))
            else:
                added.append(self.add_pass(obj, origin=origin))
        return added

    # -- lookup ------------------------------------------------------------------------------
    def create(self, name: str) -> Pass:
        try:
            return self._entries[name].factory()
        except KeyError:
            raise UsageError(f"unknown pass '{name}' (known: {', '.join(sorted(self._entries))})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def entry(self, name: str) -> Entry:
        return self._entries[name]


def _as_list(objs: Any, origin: str) -> list[Any]:
    if objs is None:
        return []
    if isinstance(objs, (list, tuple)):
        return list(objs)
    raise UsageError(f"{origin}: PATTERNS/PASSES must be a list or tuple")


def _import_file(path: Path) -> Any:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    mod_name = f"qdqsurgeon_user_{path.stem}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise UsageError("cannot import pattern file", path=str(path))
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # a user file calling sys.exit must not pick our exit code
        raise UsageError(f"error while importing pattern file: {type(exc).__name__}: {exc}", path=str(path)) from exc
    sys.modules[mod_name] = module
    return module


def resolve(registry: Registry, names: Iterable[str]) -> list[Pass]:
    return [registry.create(n) for n in names]

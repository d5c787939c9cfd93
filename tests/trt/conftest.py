"""Fixtures for tests/trt (helpers live in trt_helpers.py, a uniquely named module)."""

from __future__ import annotations

from trt_helpers import engines  # noqa: F401  (re-exported fixture)

"""Exceptions that the CLI turns into one line on stderr and an exit code.

Anything raised as a :class:`QdqError` is an expected failure (bad input, a model TensorRT
cannot take, a missing optional dependency); everything else is a bug and is reported as
an internal error.
"""

from __future__ import annotations

__all__ = [
    "QdqError",
    "UsageError",
    "ModelError",
    "DataError",
    "TensorRTMissingError",
    "EXIT_OK",
    "EXIT_MODEL",
    "EXIT_USAGE",
    "EXIT_NO_TENSORRT",
]

EXIT_OK = 0
EXIT_MODEL = 1
EXIT_USAGE = 2
EXIT_NO_TENSORRT = 3


class QdqError(Exception):
    """An expected failure with a user-facing one-line message."""

    exit_code: int = EXIT_MODEL

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class UsageError(QdqError):
    """The command line or the arguments of an API call are wrong (exit 2)."""

    exit_code = EXIT_USAGE


class ModelError(QdqError):
    """The model cannot be read, is invalid, or cannot be processed (exit 1)."""

    exit_code = EXIT_MODEL


class DataError(QdqError):
    """Calibration or evaluation data is missing, malformed or does not fit the model (exit 2)."""

    exit_code = EXIT_USAGE


class TensorRTMissingError(QdqError):
    """The TensorRT Python package is not importable (exit 3)."""

    exit_code = EXIT_NO_TENSORRT

    def __init__(self, message: str = "TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU)") -> None:
        super().__init__(message)

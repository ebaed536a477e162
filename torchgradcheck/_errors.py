"""Exception and warning classes: one root, each subclass also a builtin a caller would catch."""

from __future__ import annotations

from typing import Any

__all__ = [
    "GradcheckWarning",
    "GradientMismatchError",
    "InvalidArgumentError",
    "InvalidArgumentTypeError",
    "TorchGradcheckError",
]


class TorchGradcheckError(Exception):
    """Root of every error raised by torchgradcheck."""


class InvalidArgumentError(TorchGradcheckError, ValueError):
    """An argument has the right type but a value that cannot be checked; the message says the fix."""


class InvalidArgumentTypeError(TorchGradcheckError, TypeError):
    """An argument has the wrong type; the message names it and what was expected."""


class GradientMismatchError(TorchGradcheckError, AssertionError):
    """Analytical and numerical gradients disagree; ``.report`` holds the full `Report`."""

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


class GradcheckWarning(UserWarning):
    """A check will run, but its verdict may mislead (e.g. low precision, no signal)."""


for _cls in (
    TorchGradcheckError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    GradientMismatchError,
    GradcheckWarning,
):
    _cls.__module__ = "torchgradcheck"

"""Validation of the options shared by the verify_* calls: every bad value names itself and the fix."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ._compare import DTYPE_DEFAULTS
from ._errors import InvalidArgumentError, InvalidArgumentTypeError

__all__ = ["ENGINES", "reject_unknown", "resolve_tolerances", "validate_common"]

ENGINES = ("auto", "vmap", "loop")


def reject_unknown(call: str, unknown: dict[str, Any], known: Iterable[str]) -> None:
    """Unknown keyword options are an error, never ignored; suggest the nearest known name."""
    if not unknown:
        return
    name = sorted(unknown)[0]
    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f" Did you mean {close[0]}=?" if close else ""
    raise InvalidArgumentTypeError(
        f"{call}: unknown option {name}={unknown[name]!r}.{hint} Valid options are {sorted(known)}."
    )


def _number(call: str, name: str, value: Any, positive: bool, fix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentTypeError(
            f"{call}: expected a number for {name}= but got {value!r} (type={type(value).__name__}); {fix}."
        )
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        need = "> 0" if positive else ">= 0"
        raise InvalidArgumentError(f"{call}: {name}={value!r} must be finite and {need}; {fix}.")
    return value


_EPS_FIX = "pass a relative step such as eps=1e-6, or leave eps unset for the per-dtype default"
_RTOL_FIX = "pass e.g. rtol=1e-3 to loosen the check, or leave rtol unset for the per-dtype default"
_ATOL_FIX = "pass e.g. atol=1e-8 to loosen the check, or leave atol at its default 0"


def validate_common(call: str, *, eps: Any, rtol: Any, atol: Any, dtype: Any, seed: Any, engine: Any) -> None:
    """Raise InvalidArgumentError / InvalidArgumentTypeError for the first bad option, naming the fix."""
    if eps is not None:
        _number(call, "eps", eps, positive=True, fix=_EPS_FIX)
        if eps >= 1:
            raise InvalidArgumentError(f"{call}: eps={eps!r} is a relative step and must be < 1; {_EPS_FIX}.")
    if rtol is not None:
        _number(call, "rtol", rtol, positive=False, fix=_RTOL_FIX)
    _number(call, "atol", atol, positive=False, fix=_ATOL_FIX)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype in DTYPE_DEFAULTS):
        raise InvalidArgumentError(
            f"{call}: dtype={dtype!r} is not supported; use one of "
            f"{[str(d) for d in DTYPE_DEFAULTS]}, or dtype=None to keep the tensors' own dtype."
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidArgumentTypeError(f"{call}: seed={seed!r} must be an int, e.g. seed=0.")
    if engine not in ENGINES:
        raise InvalidArgumentError(f"{call}: unknown engine={engine!r}; valid options are {list(ENGINES)}.")


def resolve_tolerances(dtype: torch.dtype, eps: float | None, rtol: float | None) -> tuple[float, float]:
    """The per-dtype defaults for whatever the user left unset."""
    row = DTYPE_DEFAULTS[dtype]
    return (row.eps if eps is None else float(eps)), (row.rtol if rtol is None else float(rtol))


def validate_patterns(call: str, params: Any) -> Sequence[str] | None:
    if params is None:
        return None
    if isinstance(params, str):
        return [params]
    if isinstance(params, (list, tuple)) and all(isinstance(p, str) for p in params):
        if not params:
            raise InvalidArgumentError(
                f"{call}: params={params!r} selects nothing; pass parameter names or glob patterns "
                "(e.g. params=['encoder.*']), or leave params=None to check every trainable parameter."
            )
        return list(params)
    raise InvalidArgumentTypeError(
        f"{call}: params= takes parameter names or glob patterns (a str or a list of str), got {params!r}."
    )

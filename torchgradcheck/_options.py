"""The options shared by the verify_* calls: one frozen `CheckOptions`, built and validated by `check_options`.

Every bad value names itself and the fix. Each entry point validates only its own extra options
(``params=``, ``placement=``, ``second_order=``, ...) and calls `check_options` for the shared ones.
To add a shared option: a field of `CheckOptions`, a line in `check_options`, a keyword of the
three ``verify_*`` (passed through), and, if it shows in the report, a key in `CheckOptions.to_dict`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch

from ._compare import DTYPE_DEFAULTS
from ._errors import InvalidArgumentError, InvalidArgumentTypeError
from ._types import ENGINES, MODES, EngineName, Mode

__all__ = ["ENGINES", "CheckOptions", "check_options", "reject_unknown", "resolve_tolerances", "validate_common"]


@dataclass(frozen=True)
class CheckOptions:
    """The shared options of one check. `Report.options` holds the resolved copy (`resolve`).

    Before `resolve`, ``eps``/``rtol`` may be None (per-dtype default) and ``dtype`` None (keep the
    tensors' own); after it, they are the values the check used and ``device`` is set.
    """

    dtype: Any = None  # torch.dtype | None
    mode: Mode = "auto"
    budget: float = 3.0
    seed: int = 0
    eps: float | None = None
    rtol: float | None = None
    atol: float = 0.0
    engine: EngineName = "auto"
    progress: bool | None = None
    device: str = ""
    extra: tuple[tuple[str, Any], ...] = ()  # an entry point's own facts for the report (ranks=2, split=True)

    def resolve(self, work_dtype: torch.dtype, device: torch.device | str, **extra: Any) -> CheckOptions:
        """The options as the check ran: per-dtype defaults filled in, the device and extra facts recorded."""
        dtype = self.dtype or work_dtype
        eps, rtol = resolve_tolerances(dtype, self.eps, self.rtol)
        return replace(
            self, dtype=dtype, eps=eps, rtol=rtol, device=str(device), extra=self.extra + tuple(extra.items())
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly, in the order `str(report)` prints them (``budget`` only where it mattered)."""
        out: dict[str, Any] = {
            "dtype": str(self.dtype).replace("torch.", "") if self.dtype is not None else None,
            "device": self.device,
            "eps": self.eps,
            "rtol": self.rtol,
            "atol": self.atol,
            "seed": self.seed,
            "mode": self.mode,
        }
        if self.mode == "auto":
            out["budget"] = self.budget
        out.update(self.extra)
        return out

    # Read-only mapping access, so ``report.options["dtype"]`` keeps working.
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(self.to_dict().items())


def check_options(
    call: str,
    *,
    dtype: Any = None,
    mode: Any = "auto",
    budget: Any = 3.0,
    seed: Any = 0,
    eps: Any = None,
    rtol: Any = None,
    atol: Any = 0.0,
    engine: Any = "auto",
    progress: Any = None,
) -> CheckOptions:
    """THE validation of the shared options; errors start with `call` (the public name, e.g. "verify_module")."""
    validate_common(call, eps=eps, rtol=rtol, atol=atol, dtype=dtype, seed=seed, engine=engine)
    if mode not in MODES:
        raise InvalidArgumentError(f"{call}: unknown mode={mode!r}; valid options are {list(MODES)}.")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise InvalidArgumentError(f"{call}: budget={budget!r} must be a number of seconds > 0.")
    if progress is not None and not isinstance(progress, bool):
        raise InvalidArgumentTypeError(f"{call}: progress= must be True, False or None, got {progress!r}.")
    return CheckOptions(
        dtype=dtype,
        mode=cast(Mode, mode),
        budget=float(budget),
        seed=seed,
        eps=None if eps is None else float(eps),
        rtol=None if rtol is None else float(rtol),
        atol=float(atol),
        engine=cast(EngineName, engine),
        progress=progress,
    )


# The options every verify_* accepts (the fields of CheckOptions a caller sets); each entry point adds its own.
SHARED_OPTIONS = ("dtype", "mode", "budget", "seed", "eps", "rtol", "atol", "engine", "progress")


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

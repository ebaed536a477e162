"""One tensor, start to end: perturb its elements, compare with autograd, summarise.

This is the pipeline's middle, shared by `verify_module` and `verify_function`:
noise estimate (`_noise`) -> first pass (`_finite_diff`) -> tolerance (`_compare`) -> second look at
the failures -> a `TensorResult` (`_report`). `measure` checks every element, or the subset
``index`` (sampled mode, or the elements a failed directional probe narrowed down to).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._compare import Judgement, first_tolerance, judge_second_look, refine_failures, relative_error
from ._engines import Engine
from ._finite_diff import first_pass, second_look
from ._noise import estimate_noise, unit_roundoff
from ._params import Target
from ._report import ElementErrors, ElementResult, TensorResult

__all__ = ["Settings", "TensorCheck", "measure", "noise_level", "summarise"]

WORST_SHOWN = 5
INCONCLUSIVE_SHARE = 0.5  # more than this share of elements at kinks: no verdict for the tensor
# Power: a tensor is "ok" only if a backward wrong by 1/POWER (10 %) would have failed in at least one
# of its elements, i.e. max |numerical| / tol >= POWER; otherwise it is "weak" (README, "Power").
POWER = 10.0


@dataclass(frozen=True)
class Settings:
    eps: float
    rtol: float
    atol: float


@dataclass
class TensorCheck:
    """The raw outcome for the checked elements of one tensor, before it becomes a `TensorResult`."""

    analytical: torch.Tensor  # at the checked elements
    numerical: torch.Tensor
    tolerance: torch.Tensor
    kink: torch.Tensor
    sigma: float
    index: torch.Tensor | None = None  # flat indices of the checked elements; None: all, in order


def noise_level(engine: Engine, target: Target, loss0: torch.Tensor, floor: float, generator: torch.Generator) -> float:
    """Measured noise of the loss while moving `target`, floored by ``u*|L|`` and any known nondeterminism."""
    u = unit_roundoff(target.tensor.dtype)
    return max(estimate_noise(engine, target, generator), u * abs(float(loss0)), floor)


def measure(
    engine: Engine,
    target: Target,
    analytical: torch.Tensor,
    loss0: torch.Tensor,
    floor: float,
    settings: Settings,
    generator: torch.Generator,
    *,
    index: torch.Tensor | None = None,
    sigma: float | None = None,
    agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TensorCheck:
    """Numerical gradient at the elements `index` (default all) of `target`, judged against `analytical`.

    `analytical` is the flat float64 gradient of the whole tensor; `sigma` the noise level if already
    known; `agree` merges the first pass's failure mask across processes (so that every rank of a
    distributed check takes the same second look, in lockstep).
    """
    if sigma is None:
        sigma = noise_level(engine, target, loss0, floor, generator)
    full = index is None and target.skip is None
    if index is None:
        index = target.checkable
    a = analytical[index]
    first = first_pass(engine, target, index, settings.eps)
    numerical = first.derivative
    tolerance = first_tolerance(numerical, first.span, sigma, settings.rtol, settings.atol)

    def look(where: torch.Tensor) -> Judgement:
        extra = second_look(engine, target, first, where, loss0)
        return judge_second_look(
            a[where],
            first.derivative[where],
            first.h[where],
            first.span[where],
            extra.values,
            extra.wide,
            sigma,
            settings.rtol,
            settings.atol,
            wider=extra.wider,
        )

    judged = refine_failures(a, numerical, tolerance, look, agree)
    numerical, tolerance, kink = judged.numerical, judged.tolerance, judged.kink
    return TensorCheck(a, numerical, tolerance, kink, sigma, None if full else index)


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(x) for x in torch.unravel_index(torch.tensor(flat), shape)) if shape else ()


def summarise(
    target: Target, check: TensorCheck, has_grad: bool, *, coverage: str = "full", extra_failure: str = ""
) -> TensorResult:
    """Turn the element-wise outcome into a verdict for the tensor.

    `extra_failure` marks the tensor failed for a reason found outside the element checks (a failed
    directional probe that could not be narrowed to elements); it becomes the note.
    """
    a, n, tol, kink = check.analytical, check.numerical, check.tolerance, check.kink
    flat_index = check.index.tolist() if check.index is not None else None
    err = (a - n).abs()
    err = torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))
    judged = ~kink
    over = (err > tol) & judged
    failed = int(over.sum())
    score = torch.where(judged, err / tol.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(err))
    k = min(WORST_SHOWN, score.numel())
    top = torch.topk(score, k).indices.tolist() if k else []
    shape = target.shape

    def where(i: int) -> tuple[int, ...]:
        return _unravel(flat_index[i] if flat_index is not None else i, shape)

    worst = tuple(
        ElementResult(
            index=where(i),
            numerical=float(n[i]),
            analytical=float(a[i]),
            abs_error=float(err[i]),
            tolerance=float(tol[i]),
        )
        for i in top
        if bool(judged[i])
    )
    kink_index = tuple(where(i) for i in kink.nonzero().flatten().tolist())
    rel = relative_error(a[judged], n[judged])
    quiet = bool((a.abs() <= tol).all()) and bool((n.abs() <= tol).all())
    status, note = _status(has_grad, failed, extra_failure, judged.numel(), len(kink_index), quiet)
    power = power_of(n, tol, judged)
    if status == "ok" and power < POWER:
        status, note = "weak", _weak_note(power)
    if target.skip_note:
        note = f"{note}; {target.skip_note}" if note else target.skip_note
    return TensorResult(
        name=target.name,
        shape=shape,
        status=status,
        relative_error=rel,
        max_abs_error=float(err[judged].max()) if bool(judged.any()) else None,
        checked=int(judged.sum()),
        failed=failed,
        worst=worst,
        not_differentiable=kink_index,
        noise=check.sigma,
        kind=target.kind,
        note=note,
        coverage=coverage,
        norms=(float(a[judged].norm()), float(n[judged].norm())),
        power=power if bool(judged.any()) else None,
        errors=_element_errors(err, tol, kink, check.index, target.tensor.numel()),
    )


def _status(has_grad: bool, failed: int, extra_failure: str, judged: int, kinks: int, quiet: bool) -> tuple[str, str]:
    """The status of one tensor and its note, from the counts `summarise` found."""
    if not has_grad:
        if failed or extra_failure:
            return "no gradient", (
                ".grad is None after backward, but the loss depends on this tensor: something cuts it off "
                "(.detach(), torch.no_grad(), .data)"
            )
        return "unused", ".grad is None after backward and the loss does not depend on it"
    if failed or extra_failure:
        return "mismatch", extra_failure
    if judged and kinks > INCONCLUSIVE_SHARE * judged:
        return "inconclusive", f"{kinks} of {judged} elements sit at kinks; too few left to judge this tensor"
    return ("zero" if quiet else "ok"), ""


def power_of(n: torch.Tensor, tol: torch.Tensor, judged: torch.Tensor) -> float:
    """``max |numerical| / tol`` over the judged elements (0 if none).

    A backward wrong by more than ``1 / power`` (uniformly) fails in at least one element.
    """
    if not bool(judged.any()):
        return 0.0
    return float((n.abs() / tol.clamp(min=torch.finfo(torch.float64).tiny))[judged].max())


def _weak_note(power: float) -> str:
    return (
        f"weak: the tolerance is not small next to the gradient (largest |numerical| / tol = {power:.2g}, "
        f"below {POWER:g}): only a backward more than {1 / max(power, 1e-300):.0%} wrong could fail here"
    )


KEEP_ELEMENTS = 1_000_000  # per-element errors are kept for pictures only up to this many elements (8 MB)


def _element_errors(
    err: torch.Tensor, tol: torch.Tensor, kink: torch.Tensor, index: torch.Tensor | None, numel: int
) -> ElementErrors | None:
    """Every element's |a - n| and tolerance for `Report.plot`; NaN where an element was not checked."""
    if numel > KEEP_ELEMENTS:
        return None
    if index is not None:  # a subset was checked: scatter it into full-size arrays
        full = torch.full((numel,), math.nan, dtype=err.dtype, device=err.device)
        err, tol = full.index_put((index,), err), full.index_put((index,), tol)
        kink = torch.zeros(numel, dtype=torch.bool, device=kink.device).index_put((index,), kink)
    return ElementErrors(err.float().cpu().numpy(), tol.float().cpu().numpy(), kink.cpu().numpy())

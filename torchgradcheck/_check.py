"""One tensor, start to end: perturb every element, compare with autograd, summarise.

This is the pipeline's middle, shared by `verify_module` and `verify_function`:
noise estimate (`_noise`) -> first pass (`_finite_diff`) -> tolerance (`_compare`) -> second look at
the failures -> a `ParameterResult` (`_report`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._compare import first_tolerance, judge_second_look, relative_error
from ._engines import Engine
from ._finite_diff import first_pass, second_look
from ._noise import estimate_noise, unit_roundoff
from ._params import Target
from ._report import ElementErrors, ElementResult, ParameterResult

__all__ = ["Settings", "TensorCheck", "measure", "summarise"]

WORST_SHOWN = 5
INCONCLUSIVE_SHARE = 0.5  # more than this share of elements at kinks: no verdict for the tensor


@dataclass(frozen=True)
class Settings:
    eps: float
    rtol: float
    atol: float


@dataclass
class TensorCheck:
    """The raw outcome for one tensor, before it becomes a `ParameterResult`."""

    analytical: torch.Tensor
    numerical: torch.Tensor
    tolerance: torch.Tensor
    kink: torch.Tensor
    sigma: float


def measure(engine: Engine, target: Target, analytical: torch.Tensor, loss0: torch.Tensor, floor: float,
            settings: Settings, generator: torch.Generator) -> TensorCheck:
    """Numerical gradient of every element of `target`, judged against `analytical` (flat, float64)."""
    u = unit_roundoff(target.tensor.dtype)
    sigma = max(estimate_noise(engine, target, generator), u * abs(float(loss0)), floor)
    index = torch.arange(target.tensor.numel(), device=target.tensor.device)
    first = first_pass(engine, target, index, settings.eps)
    numerical = first.derivative
    tolerance = first_tolerance(numerical, first.span, sigma, settings.rtol, settings.atol)
    bad = ~((analytical - numerical).abs() <= tolerance)  # NaN counts as bad
    kink = torch.zeros_like(bad)
    if bool(bad.any()):
        where = bad.nonzero().flatten()
        look = second_look(engine, target, first, where, loss0)
        j = judge_second_look(
            analytical[where], numerical[where], first.h[where], first.span[where],
            look.values, look.wide, sigma, settings.rtol, settings.atol,
        )
        numerical = numerical.clone()
        tolerance = tolerance.clone()
        numerical[where] = j.numerical
        tolerance[where] = j.tolerance
        kink[where] = j.kink
    return TensorCheck(analytical, numerical, tolerance, kink, sigma)


def summarise(target: Target, check: TensorCheck, has_grad: bool) -> ParameterResult:
    """Turn the element-wise outcome into a verdict for the tensor."""
    a, n, tol, kink = check.analytical, check.numerical, check.tolerance, check.kink
    err = (a - n).abs()
    err = torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))
    judged = ~kink
    over = (err > tol) & judged
    failed = int(over.sum())
    score = torch.where(judged, err / tol.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(err))
    k = min(WORST_SHOWN, score.numel())
    top = torch.topk(score, k).indices.tolist() if k else []
    shape = target.shape
    worst = tuple(
        ElementResult(
            index=tuple(int(i) for i in torch.unravel_index(torch.tensor(i), shape)) if shape else (),
            numerical=float(n[i]), analytical=float(a[i]), abs_error=float(err[i]), tolerance=float(tol[i]),
        )
        for i in top
        if bool(judged[i])
    )
    kinks = kink.nonzero().flatten().tolist()
    kink_index = tuple(tuple(int(x) for x in torch.unravel_index(torch.tensor(i), shape)) if shape else () for i in kinks)
    rel = relative_error(a[judged], n[judged])
    quiet = bool((a.abs() <= tol).all()) and bool((n.abs() <= tol).all())
    note = ""
    if not has_grad:
        status = "no gradient" if failed else "unused"
        note = (
            ".grad is None after backward, but the loss depends on this tensor: something cuts it off "
            "(.detach(), torch.no_grad(), .data)"
            if failed
            else ".grad is None after backward and the loss does not depend on it"
        )
    elif failed:
        status = "mismatch"
    elif judged.numel() and len(kinks) > INCONCLUSIVE_SHARE * judged.numel():
        status = "inconclusive"
        note = f"{len(kinks)} of {judged.numel()} elements sit at kinks; too few left to judge this tensor"
    elif quiet:
        status = "zero"
    else:
        status = "ok"
    return ParameterResult(
        name=target.name, shape=shape, status=status, relative_error=rel,
        max_abs_error=float(err[judged].max()) if bool(judged.any()) else None,
        checked=int(judged.sum()), failed=failed, worst=worst, not_differentiable=kink_index,
        noise=check.sigma, kind=target.kind, note=note, errors=_element_errors(err, tol, kink),
    )


KEEP_ELEMENTS = 1_000_000  # per-element errors are kept for pictures only up to this many elements (8 MB)


def _element_errors(err: torch.Tensor, tol: torch.Tensor, kink: torch.Tensor) -> ElementErrors | None:
    if err.numel() > KEEP_ELEMENTS:
        return None
    return ElementErrors(err.float().cpu().numpy(), tol.float().cpu().numpy(), kink.cpu().numpy())

"""The tolerance model: how far apart may autograd and finite differences be, element by element?

An element fails only if ``|a - n|`` exceeds its own tolerance

    tol = atol + rtol * |n| + NOISE_SIGMAS * sqrt(2) * sigma / span      (first pass)

where ``sigma`` is the measured noise of the loss (`_noise`), ``span = 2h`` the distance between the
evaluated points, and ``rtol`` a per-dtype floor from `DTYPE_DEFAULTS`. The noise term is what a
fixed ``atol`` gets wrong in both directions: it grows with cancellation (a loss offset by 1e6) and
shrinks with tiny gradients (1e-8), so neither false alarms nor blind spots follow from scale.

Elements over tolerance get a second look at ``+-2h`` (`_finite_diff.second_look`), then:

* five points ``-2h..2h`` that no cubic fits beyond noise, by a misfit large enough to explain the
  disagreement, mean the loss has a kink inside the step (ReLU at 0, ``max`` with ties): the element
  is "not differentiable here", excluded from the verdict and listed;
* otherwise the Richardson value ``(4 D(h) - D(2h)) / 3`` replaces ``D(h)``, and the estimated
  truncation error ``|D(h) - D(2h)| / 3`` joins the tolerance. A real bug survives this; truncation
  error of a strongly curved but correct loss does not.
* Where the loss is C1 but not C2 inside the step (``x*|x|`` at 0, ELU(1) at 0, ``special.i1e`` at 0,
  Huber at its boundary), the second derivative jumps by some J and ``D(h)`` carries an O(h) error,
  about ``J h / 4``. Then ``D(h) - D(2h)`` is linear in h, not quadratic: the Richardson step above
  assumes h^2 and under-estimates the error by 2x. A third step tells them apart: the ratio
  ``(D(2h) - D(4h)) / (D(h) - D(2h))`` is 4 for O(h^2) convergence and 2 for O(h). Where it is
  nearer 2 (below `LINEAR_RATIO`), the linear extrapolation ``2 D(h) - D(2h)`` replaces ``D(h)``
  (it removes the O(h) term) and ``|D(h) - D(2h)|``, the whole O(h) error of ``D(h)``, joins the
  tolerance. A wrong slope of 2 % at such a point is still 1e4 times over it.

The relative error ``||a - n|| / (||a|| + ||n||)`` is computed and reported, never used to decide:
over N elements it dilutes a one-element bug by about ``1/sqrt(N)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "DTYPE_DEFAULTS",
    "NOISE_SIGMAS",
    "DtypeDefaults",
    "Judgement",
    "first_tolerance",
    "judge_second_look",
    "refine_failures",
    "quartic_misfit",
    "relative_error",
]

NOISE_SIGMAS = 10.0  # the noise term sits this many standard deviations out
KINK_SIGMAS = 10.0  # a quartic misfit this far above noise is a kink ...
KINK_SHARE = 0.05  # ... if it also explains at least this share of the disagreement
# (D(2h) - D(4h)) / (D(h) - D(2h)) is 4 for O(h^2) and 2 for O(h) convergence; below the geometric
# middle (2.83) it is taken as O(h) (a C1-but-not-C2 point). Above LINEAR_RATIO_MIN too: a ratio near 1
# or negative is noise, not convergence.
LINEAR_RATIO = 2.0**1.5
LINEAR_RATIO_MIN = 1.25


@dataclass(frozen=True)
class DtypeDefaults:
    eps: float  # relative step, about u^(1/3): balances truncation (h^2) against rounding (u/h)
    rtol: float  # floor of the relative tolerance


# One row per dtype (the table jax keeps in default_gradient_tolerance). eps = (2u)^(1/3), rounded.
DTYPE_DEFAULTS: dict[torch.dtype, DtypeDefaults] = {
    torch.float64: DtypeDefaults(eps=6e-6, rtol=1e-6),
    torch.float32: DtypeDefaults(eps=5e-3, rtol=1e-3),
    torch.float16: DtypeDefaults(eps=1e-1, rtol=1e-2),
    torch.bfloat16: DtypeDefaults(eps=2e-1, rtol=5e-2),
}


def first_tolerance(
    numerical: torch.Tensor, span: torch.Tensor, sigma: float, rtol: float, atol: float
) -> torch.Tensor:
    """Per-element tolerance of the first pass (see the module docstring)."""
    return atol + rtol * numerical.abs() + NOISE_SIGMAS * math.sqrt(2.0) * sigma / span


# Least-squares fits on x = -2, -1, 0, 1, 2 split the five values into orthogonal parts: constant,
# linear, quadratic, cubic and quartic. The cubic part is exactly -4h (D(h) - D(2h)): it is the
# truncation error that Richardson removes, and a smooth loss has plenty of it when strongly curved.
# Only the quartic part (about h^4 times the 4th derivative for a smooth loss) is left to reveal a
# kink: a slope jump J at the centre puts about 0.24 J h there. (It is blind to a kink at exactly
# 2/3 of a step off centre.)
_CUBIC = torch.tensor([-1.0, 2.0, 0.0, -2.0, 1.0], dtype=torch.float64)
_QUARTIC = torch.tensor([1.0, -4.0, 6.0, -4.0, 1.0], dtype=torch.float64)


def quartic_misfit(values: torch.Tensor) -> torch.Tensor:
    """The part of five equally spaced values that no cubic explains (the kink signal), per row."""
    return (values @ _QUARTIC.to(values.device)).abs() / math.sqrt(70.0)


@dataclass
class Judgement:
    numerical: torch.Tensor  # refined derivative
    tolerance: torch.Tensor
    kink: torch.Tensor  # bool: not differentiable within the step (or not finite there)


def judge_second_look(
    analytical: torch.Tensor,
    first_derivative: torch.Tensor,
    h: torch.Tensor,
    span: torch.Tensor,
    values: torch.Tensor,
    wide: torch.Tensor,
    sigma: float | torch.Tensor,
    rtol: float,
    atol: float,
    *,
    rtol_scale: torch.Tensor | None = None,
    atol_scale: torch.Tensor | None = None,
    wider: torch.Tensor | None = None,
) -> Judgement:
    """Refine and re-judge the elements that failed the first pass (all arguments restricted to them).

    THE second look, for elements, directions and function rows alike. ``values`` are the five
    losses at ``-2h..2h``, ``wide`` the difference with step ``2h``, ``wider`` (when evaluated) the one
    with step ``4h``: it tells O(h) from O(h^2) convergence (C1-but-not-C2 points, module docstring);
    without it the convergence is taken as quadratic. The rtol term scales with ``|refined|`` unless
    `rtol_scale` is given (a probe: ``||g|| ||D||``); the atol term is `atol` times `atol_scale` when
    given (a probe: ``sum |D|``).
    """
    refined = (4.0 * first_derivative - wide) / 3.0
    truncation = (first_derivative - wide).abs() / 3.0
    noise = 1.5 * NOISE_SIGMAS * math.sqrt(2.0) * sigma / span
    if wider is not None:
        near, far = first_derivative - wide, wide - wider
        ratio = far / torch.where(near == 0, torch.ones_like(near), near)
        linear = (near.abs() > noise) & (ratio > LINEAR_RATIO_MIN) & (ratio < LINEAR_RATIO)
        # 2 D(h) - D(2h) carries sqrt(4 + 1/4) ~ 2.1x the noise of D(h); 1.5 x 2 keeps the margin above.
        refined = torch.where(linear, 2.0 * first_derivative - wide, refined)
        truncation = torch.where(linear, near.abs(), truncation)
        noise = torch.where(linear, 2.0 * noise, noise)
    relative = refined.abs() if rtol_scale is None else rtol_scale
    absolute = atol if atol_scale is None else atol * atol_scale
    tolerance = absolute + rtol * relative + noise + truncation
    misfit = quartic_misfit(values)
    disagreement = (analytical - first_derivative).abs()
    kink = (misfit > KINK_SIGMAS * math.sqrt(2.0) * sigma) & (misfit >= KINK_SHARE * h * disagreement)
    kink |= ~torch.isfinite(values).all(dim=1)
    refined = torch.where(torch.isfinite(refined), refined, first_derivative)
    return Judgement(numerical=refined, tolerance=tolerance, kink=kink)


def refine_failures(
    analytical: torch.Tensor,
    numerical: torch.Tensor,
    tolerance: torch.Tensor,
    look: Callable[[torch.Tensor], Judgement],
    agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Judgement:
    """THE loop "first pass, second look, scatter back", for elements, directions and function rows.

    The rows over `tolerance` (NaN counts as over) are merged across processes by `agree` (if given),
    handed to ``look(where)`` (which takes the second look at those rows and returns its `Judgement`),
    and its refined value, tolerance and kink flag are scattered back into full-size copies.
    """
    bad = ~((analytical - numerical).abs() <= tolerance)
    if agree is not None:
        bad = agree(bad)
    kink = torch.zeros_like(bad)
    if bool(bad.any()):
        where = bad.nonzero().flatten()
        j = look(where)
        numerical, tolerance = numerical.clone(), tolerance.clone()
        numerical[where], tolerance[where], kink[where] = j.numerical, j.tolerance, j.kink
    return Judgement(numerical=numerical, tolerance=tolerance, kink=kink)


def relative_error(analytical: torch.Tensor, numerical: torch.Tensor) -> float:
    """``||a - n|| / (||a|| + ||n||)``, 0 when both are zero."""
    a = analytical.to(torch.float64)
    n = numerical.to(torch.float64)
    denom = float(a.norm() + n.norm())
    return 0.0 if denom == 0.0 else float((a - n).norm()) / denom

"""Central differences with exactly representable, magnitude-relative steps.

For element ``i`` with value ``t``, the nominal step is ``h = eps * max(1, |t|)``; the points used
are ``t + h`` and ``t - h`` rounded to the working dtype, and the divisor is the distance between
the points actually evaluated (``(t + h) - (t - h)``), so no rounding of the step itself enters the
derivative. `first_pass` costs two evaluations per element. `second_look` adds the points at
``t +- 2h`` for the few elements that failed the first pass: with the unperturbed loss they make five
equally spaced points, which give a truncation estimate, a Richardson-refined derivative, and a
non-differentiability (kink) test (see `_compare`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._engines import Engine
from ._params import Target

__all__ = ["FirstPass", "SecondLook", "first_pass", "nominal_steps", "second_look"]


def nominal_steps(base: torch.Tensor, eps: float) -> torch.Tensor:
    """``eps * max(1, |t|)`` elementwise, in float64."""
    return eps * base.to(torch.float64).abs().clamp(min=1.0)


def _points(base: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t + h, t - h)`` rounded to the working dtype."""
    return (base.to(torch.float64) + h).to(base.dtype), (base.to(torch.float64) - h).to(base.dtype)


@dataclass
class FirstPass:
    index: torch.Tensor  # flat element indices (long, on the target's device)
    h: torch.Tensor  # nominal step per element (float64)
    span: torch.Tensor  # (t + h) - (t - h) as evaluated, float64
    plus: torch.Tensor
    minus: torch.Tensor

    @property
    def derivative(self) -> torch.Tensor:
        return (self.plus - self.minus) / self.span


def first_pass(engine: Engine, target: Target, index: torch.Tensor, eps: float) -> FirstPass:
    """Two-sided differences for the elements `index` of `target`."""
    base = target.flat[index]
    h = nominal_steps(base, eps)
    up, down = _points(base, h)
    span = up.to(torch.float64) - down.to(torch.float64)
    plus = engine.losses(target, index, up)
    minus = engine.losses(target, index, down)
    return FirstPass(index=index, h=h, span=span, plus=plus, minus=minus)


@dataclass
class SecondLook:
    """Five points per element at about -2h, -h, 0, h, 2h, plus the step-2h and step-4h differences."""

    values: torch.Tensor  # (k, 5) losses
    wide: torch.Tensor  # central difference with step 2h
    wider: torch.Tensor | None = None  # central difference with step 4h (tells O(h) from O(h^2) convergence)


def second_look(
    engine: Engine, target: Target, first: FirstPass, where: torch.Tensor, loss0: torch.Tensor
) -> SecondLook:
    """Evaluate ``t +- 2h`` and ``t +- 4h`` for the elements ``first.index[where]``."""
    index = first.index[where]
    base = target.flat[index]
    up2, down2 = _points(base, 2 * first.h[where])
    span2 = up2.to(torch.float64) - down2.to(torch.float64)
    plus2 = engine.losses(target, index, up2)
    minus2 = engine.losses(target, index, down2)
    up4, down4 = _points(base, 4 * first.h[where])
    span4 = up4.to(torch.float64) - down4.to(torch.float64)
    plus4 = engine.losses(target, index, up4)
    minus4 = engine.losses(target, index, down4)
    center = loss0.to(torch.float64).expand(len(index))
    values = torch.stack([minus2, first.minus[where], center, first.plus[where], plus2], dim=1)
    return SecondLook(values=values, wide=(plus2 - minus2) / span2, wider=(plus4 - minus4) / span4)

"""How noisy is the loss? Measured, not assumed.

Rounding makes every evaluated loss ``L~ = L + e`` with a small error ``e``; central differences
divide the difference of two such errors by ``2h``, so the noise of the loss sets the absolute
tolerance of each element. The loss's own magnitude (``u * |L|``) underestimates it whenever the
loss is a small difference of large terms, so we measure it with the ECNoise idea of Moré & Wild
(2011): evaluate the loss at ``m + 1`` equally spaced points along a random direction, with steps so
small that the smooth part of the loss is a low-degree polynomial there; the ``k``-th differences
then contain only noise, and ``sigma_k^2 = mean((Delta^k L)^2) * (k!)^2 / (2k)!`` estimates its variance
(the largest over orders 3..6 is kept).
"""

from __future__ import annotations

import math

import torch

from ._engines import Engine
from ._params import Target

__all__ = ["NOISE_POINTS", "estimate_noise", "noise_from_samples", "noise_per_column", "unit_roundoff"]

NOISE_POINTS = 18  # evaluations per target tensor: two runs of 9
_ORDERS = (3, 4, 5, 6)  # difference orders that see noise only


def unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2


def noise_per_column(values: torch.Tensor) -> torch.Tensor:
    """The ECNoise estimate for each column of `values` (equally spaced points x series)."""
    diffs = values.to(torch.float64)
    best = torch.zeros(values.shape[1:], dtype=torch.float64, device=values.device)
    for k in range(1, max(_ORDERS) + 1):
        diffs = diffs[1:] - diffs[:-1]
        if k in _ORDERS and diffs.shape[0] > 0:
            gamma = math.factorial(k) ** 2 / math.factorial(2 * k)
            best = torch.maximum(best, torch.sqrt(gamma * (diffs**2).mean(0)))
    return best


def noise_from_samples(values: torch.Tensor) -> float:
    """The ECNoise estimate of the noise standard deviation from equally spaced samples."""
    return float(noise_per_column(values.reshape(-1, 1))[0])


def estimate_noise(engine: Engine, target: Target, generator: torch.Generator) -> float:
    """Standard deviation of the rounding noise of the loss, near the point, moving `target`.

    Two runs of ``NOISE_POINTS // 2`` points, at ``t = 1..m`` along one random direction and at
    ``t = -1..-m`` along another, never at ``t = 0``: a kink exactly at the point (a ReLU unit whose
    pre-activation is exactly 0) then lies outside both runs instead of posing as noise. The smaller
    estimate is kept, so one accidental kink inside a run cannot blind the check either.
    """
    base = target.flat
    u = unit_roundoff(base.dtype)
    step = 1e-2 * math.sqrt(u)  # relative; small enough that 3rd differences of the smooth part vanish
    scale = base.to(torch.float64).abs().clamp(min=1.0) * step
    m = NOISE_POINTS // 2
    rows = []
    for sign in (1.0, -1.0):
        signs = torch.randint(0, 2, (base.numel(),), generator=generator).to(base.device, torch.float64) * 2 - 1
        offsets = sign * torch.arange(1, m + 1, device=base.device, dtype=torch.float64)
        rows.append(offsets[:, None] * (signs * scale)[None, :])
    values = engine.losses_along(target, torch.cat(rows).to(base.dtype))
    if not bool(torch.isfinite(values).all()):
        return math.inf
    return min(noise_from_samples(values[:m]), noise_from_samples(values[m:]))

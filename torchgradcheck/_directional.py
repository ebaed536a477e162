"""Random-direction probes: a whole tensor checked in two evaluations per direction.

A probe moves every element of a tensor at once, ``t -> t +- D`` with ``D_i = r_i * eps *
max(1, |t_i|) / sqrt(m)`` (``r_i`` = +-1 at random over the ``m`` elements probed), and compares the
central difference ``(L(t + D) - L(t - D)) / 2`` with autograd's ``g . D``. Two choices make this
sharp where torch's fast mode is blind:

* the discrepancy is judged against ``||g|| * ||D||`` (Cauchy-Schwarz) times a tolerance that comes
  from the measured noise, about 1e-9 relative in float64 (`DIRECTIONAL_RTOL`), not against a
  ``|g . D|`` that can be tiny by chance, and not with an ``atol`` scaled by sqrt(n*m);
* +-1 components never vanish, so a single wrong element always moves the discrepancy.

A failed probe says which tensor, not which element: `narrow` bisects the tensor with probes
restricted to halves until small groups of suspects remain, which `_measure.measure` then checks
element by element so the report still names ``fc1.weight[3, 7]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._compare import NOISE_SIGMAS, Judgement, judge_second_look, refine_failures
from ._engines import Engine
from ._measure import Settings
from ._params import Target

__all__ = ["DIRECTIONAL_RTOL", "ProbeResult", "narrow", "probe", "random_directions"]

# Relative tolerance of a probe, in units of ||g|| * ||D||: above the rounding of g . D and the
# truncation of the difference at the default step, far below a one-element bug in 1e6 elements.
DIRECTIONAL_RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}
LEAF_SIZE = 32  # bisection stops at groups this small ...
MAX_BRANCHES = 8  # ... and gives up splitting when the failure is this widespread


def random_directions(
    target: Target, count: int, eps: float, generator: torch.Generator, support: torch.Tensor | None = None
) -> torch.Tensor:
    """``count`` perturbations of `target` (rows), nonzero only on `support` (flat indices; default all)."""
    base = target.flat
    n = base.numel()
    support = target.checkable if support is None else support
    m = support.numel()
    signs = torch.randint(0, 2, (count, m), generator=generator).to(base.device, torch.float64) * 2 - 1
    steps = eps * base[support].to(torch.float64).abs().clamp(min=1.0) / math.sqrt(max(m, 1))
    deltas = torch.zeros(count, n, dtype=torch.float64, device=base.device)
    deltas[:, support] = signs * steps
    return deltas


@dataclass
class ProbeResult:
    numerical: torch.Tensor  # (L(t+D) - L(t-D)) / 2, refined where a second look was taken
    analytical: torch.Tensor  # g . D
    tolerance: torch.Tensor
    scale: torch.Tensor  # ||g|| * ||D||
    kink: torch.Tensor  # the loss is not smooth along this direction within the step

    @property
    def failed(self) -> torch.Tensor:
        return ~((self.analytical - self.numerical).abs() <= self.tolerance) & ~self.kink

    @property
    def discrepancy(self) -> torch.Tensor:
        """|g.D - numerical| / (||g|| ||D||): the normalised error of each direction."""
        return (self.analytical - self.numerical).abs() / self.scale.clamp(min=torch.finfo(torch.float64).tiny)


def _evaluated_steps(target: Target, deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The steps actually taken after rounding to the working dtype: ``(t + D) - t`` and ``t - (t - D)``."""
    base = target.flat.to(torch.float64)
    up = (base + deltas).to(target.flat.dtype).to(torch.float64) - base
    down = base - (base - deltas).to(target.flat.dtype).to(torch.float64)
    return up, down


def probe(
    engine: Engine,
    target: Target,
    analytical: torch.Tensor,
    loss0: torch.Tensor,
    sigma: float,
    settings: Settings,
    deltas: torch.Tensor,
) -> ProbeResult:
    """Judge autograd along each row of `deltas` (see the module docstring); failures get a second look."""
    dtype = target.flat.dtype
    up, down = _evaluated_steps(target, deltas)
    plus = engine.losses_along(target, up.to(dtype))
    minus = engine.losses_along(target, (-down).to(dtype))
    step = (up + down) / 2
    numerical = (plus - minus) / 2
    ana = step @ analytical
    scale = analytical.norm() * step.norm(dim=1)
    rtol = DIRECTIONAL_RTOL[dtype]
    noise = NOISE_SIGMAS * math.sqrt(2.0) * sigma / 2
    tolerance = rtol * scale + noise + settings.atol * step.abs().sum(dim=1)

    def look(where: torch.Tensor) -> Judgement:
        up2, down2 = _evaluated_steps(target, 2 * deltas[where])
        plus2 = engine.losses_along(target, up2.to(dtype))
        minus2 = engine.losses_along(target, (-down2).to(dtype))
        values = torch.stack([minus2, minus[where], loss0.expand(len(where)), plus[where], plus2], dim=1)
        two = torch.full((len(where),), 2.0, dtype=torch.float64, device=values.device)
        j = judge_second_look(
            ana[where],
            numerical[where],
            two / 2,  # in units of the direction: h = 1, span = 2
            two,
            values,
            (plus2 - minus2) / 4,
            sigma,
            rtol,
            settings.atol,
            rtol_scale=scale[where],
            atol_scale=step[where].abs().sum(dim=1),
        )
        j.kink &= torch.isfinite(values).all(dim=1)  # a probe that hits NaN/Inf fails; it is no kink
        return j

    judged = refine_failures(ana, numerical, tolerance, look)
    return ProbeResult(judged.numerical, ana, judged.tolerance, scale, judged.kink)


def narrow(
    engine: Engine,
    target: Target,
    analytical: torch.Tensor,
    loss0: torch.Tensor,
    sigma: float,
    settings: Settings,
    generator: torch.Generator,
    directions: int = 2,
) -> torch.Tensor:
    """Flat indices of suspects: bisect with probes restricted to halves, keep the failing halves."""
    groups = [target.checkable]
    suspects: list[torch.Tensor] = []
    while groups:
        if len(groups) > MAX_BRANCHES:  # widespread: every group fails; elements sampled from them will too
            suspects.extend(g[torch.randperm(len(g), generator=generator)[:LEAF_SIZE].to(g.device)] for g in groups)
            break
        next_groups = []
        for group in groups:
            if group.numel() <= LEAF_SIZE:
                suspects.append(group)
                continue
            half = group.numel() // 2
            for part in (group[:half], group[half:]):
                deltas = random_directions(target, directions, settings.eps, generator, support=part)
                if bool(probe(engine, target, analytical, loss0, sigma, settings, deltas).failed.any()):
                    next_groups.append(part)
        groups = next_groups
    return torch.cat(suspects) if suspects else torch.zeros(0, dtype=torch.long, device=target.flat.device)

"""Modes: how much of each tensor to check, and the plan that keeps ``mode="auto"`` within budget.

* ``"full"``: every element (two evaluations each).
* ``"sampled"``: `SAMPLED` elements per tensor: always those with the largest ``|g|``, plus random ones.
* ``"directional"``: `DIRECTIONS` random-direction probes per tensor (`_directional`), cost independent
  of the tensor's size; a failed probe is narrowed down to elements before reporting.
* ``"auto"``: full for every tensor whose full check fits the time budget (cheapest first), directional
  + sampled for the rest. Every tensor is always covered; the report states the coverage of each.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ._directional import narrow, probe, random_directions
from ._engines import Engine
from ._measure import Settings, TensorCheck, measure, noise_level, summarise
from ._noise import NOISE_POINTS
from ._params import Target
from ._report import TensorResult
from ._types import MODES

__all__ = ["DIRECTIONS", "MODES", "SAMPLED", "TensorJob", "check_tensor", "plan"]

DIRECTIONS = 16
SAMPLED = 32
TOP_GRADIENTS = 4  # of the sampled elements, this many are the largest |g|


@dataclass
class TensorJob:
    """One tensor to check, with what the plan needs to know about it."""

    target: Target
    analytical: torch.Tensor  # flat float64 (zeros when .grad is None)
    has_grad: bool
    sigma: float = 0.0
    seconds_per_eval: float = 0.0
    mode: str = "full"

    @property
    def numel(self) -> int:
        return self.target.tensor.numel()

    def cost(self, mode: str) -> int:
        """Planned evaluations in `mode` (without second looks, which only failures need)."""
        if mode == "full":
            return 2 * self.numel
        cheap = 2 * min(SAMPLED, self.numel) + 2 * DIRECTIONS
        return cheap if mode == "auto" else (2 * min(SAMPLED, self.numel) if mode == "sampled" else 2 * DIRECTIONS)


def measure_noise(
    engine: Engine, job: TensorJob, loss0: torch.Tensor, floor: float, generator: torch.Generator
) -> None:
    """Noise level of the loss for this tensor; timing it also prices one evaluation for the plan."""
    start = time.perf_counter()
    job.sigma = noise_level(engine, job.target, loss0, floor, generator)
    if job.target.tensor.is_cuda:
        torch.cuda.synchronize(job.target.tensor.device)
    job.seconds_per_eval = (time.perf_counter() - start) / NOISE_POINTS


def plan(jobs: Sequence[TensorJob], mode: str, budget: float) -> None:
    """Set ``job.mode`` for every job: `mode` itself, or for "auto" the cheapest full checks that fit."""
    if mode != "auto":
        for job in jobs:
            job.mode = mode
        return
    for job in jobs:
        job.mode = "cheap" if job.numel > SAMPLED else "full"
    spent = sum(j.cost("auto" if j.mode == "cheap" else "full") * j.seconds_per_eval for j in jobs)
    for job in sorted(jobs, key=lambda j: j.cost("full") * j.seconds_per_eval):
        if job.mode == "full":
            continue
        extra = (job.cost("full") - job.cost("auto")) * job.seconds_per_eval
        if spent + extra <= budget:
            job.mode = "full"
            spent += extra


def _sample(job: TensorJob, generator: torch.Generator) -> torch.Tensor:
    """The `TOP_GRADIENTS` elements with the largest |g|, then random ones, `SAMPLED` in all."""
    allowed = job.target.checkable
    n = allowed.numel()
    top = torch.topk(job.analytical[allowed].abs(), min(TOP_GRADIENTS, n)).indices
    chosen = dict.fromkeys(allowed[top].tolist())
    for i in allowed[torch.randperm(n, generator=generator)[: SAMPLED + TOP_GRADIENTS].to(allowed.device)].tolist():
        if len(chosen) >= min(SAMPLED, n):
            break
        chosen.setdefault(i)
    return torch.tensor(sorted(chosen), dtype=torch.long, device=job.target.tensor.device)


def check_tensor(
    engine: Engine, job: TensorJob, loss0: torch.Tensor, floor: float, settings: Settings, generator: torch.Generator
) -> TensorResult:
    """Check one tensor in its planned mode and summarise it."""
    args = (engine, job.target, job.analytical, loss0, floor, settings, generator)
    if job.mode == "full":
        check = measure(*args, sigma=job.sigma)
        return summarise(job.target, check, job.has_grad)
    parts: list[torch.Tensor] = []
    coverage: list[str] = []
    extra = ""
    if job.mode in ("sampled", "cheap"):
        parts.append(_sample(job, generator))
        coverage.append(f"{len(parts[-1])} elems")
    if job.mode in ("directional", "cheap"):
        deltas = random_directions(job.target, DIRECTIONS, settings.eps, generator)
        result = probe(engine, job.target, job.analytical, loss0, job.sigma, settings, deltas)
        coverage.insert(0, f"{DIRECTIONS} dirs")
        failed = int(result.failed.sum())
        if failed:
            worst = float(result.discrepancy[result.failed].max())
            extra = (
                f"{failed} of {DIRECTIONS} random directions disagree (worst normalised discrepancy "
                f"{worst:.1e}); no single element could be blamed"
            )
            parts.append(narrow(engine, job.target, job.analytical, loss0, job.sigma, settings, generator))
            coverage.append(f"{len(parts[-1])} narrowed")
    index = torch.unique(torch.cat(parts)) if parts else torch.zeros(0, dtype=torch.long)
    if index.numel():
        check = measure(*args, index=index.to(job.target.tensor.device), sigma=job.sigma)
    else:
        empty = torch.zeros(0, dtype=torch.float64, device=job.target.tensor.device)
        check = TensorCheck(empty, empty, empty, empty.bool(), job.sigma, index=index)
    text = "full" if index.numel() == job.target.checkable.numel() else " + ".join(coverage) + f" / {job.numel:,}"
    result = summarise(job.target, check, job.has_grad, coverage=text, extra_failure=extra)
    if result.failed and extra and job.has_grad:  # the elements carry the evidence; the probe note is redundant
        result = replace(result, note="")
    if result.status == "zero" and job.mode == "directional" and not extra:
        result = replace(result, status="ok")  # no element checked: the probes passed
    return result

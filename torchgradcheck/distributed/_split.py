"""``split=True``: a sharded check of a replicated model; each rank evaluates a slice of every tensor."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .._batch import Objective
from .._compare import relative_error
from .._engines import LoopEngine, choose_engine
from .._errors import InvalidArgumentError
from .._measure import Settings, TensorCheck, measure, summarise
from .._params import Lent, Target
from .._report import TensorResult
from ._collectives import (
    CALL,
    Tick,
    agree_on_errors,
    all_gather_padded,
    analytical,
    comm_device,
    rank_and_size,
    reduced,
    same_bound,
    target_generator,
)

__all__ = ["run_split"]


def run_split(
    lent: Lent,
    objective: Objective,
    targets: list[Target],
    settings: Settings,
    seed: int,
    engine_name: str,
    group: Any,
    notes: list[str],
    tick: Tick,
) -> tuple[list[TensorResult], int, float, str]:
    """Sharded check of a replicated model: each rank evaluates a slice of every tensor's elements."""
    loss0, grads = analytical(lent, objective, targets, seed)
    theirs = _rank0_values(loss0, grads, targets, group)
    loss0 = theirs[0].to(loss0.device)
    loop = LoopEngine(lent, objective, seed, tick)
    message, error, engine_used, local = None, None, "loop", []
    try:
        local = _my_slices(loop, targets, theirs, loss0, settings, seed, engine_name, group, notes)
        engine_used = local.pop()
    except Exception as exc:  # agreed on below: a rank that stops early must not leave the others waiting
        message, error = f"{type(exc).__name__}: {exc}", exc
    agree_on_errors(message, group, error)
    gathered = all_gather_padded(torch.cat(local), group)
    has_grad = [grads[t.name] is not None for t in targets]
    results, overall = _assemble(gathered, targets, theirs, has_grad, group)
    busiest = int(max(float(g[0]) for g in gathered))
    notes.append(
        f"split: the elements of every tensor were divided among {len(gathered)} ranks (at most {busiest:,} "
        "evaluations per rank); every rank holds this report"
    )
    return results, int(sum(float(g[0]) for g in gathered)), overall, engine_used


def _rank0_values(
    loss0: torch.Tensor, grads: dict[str, torch.Tensor | None], targets: list[Target], group: Any
) -> torch.Tensor:
    """Rank 0's loss and flat gradients (one CPU float64 vector), after checking every rank has the same.

    Every rank judges rank 0's gradients, so every rank reaches the same verdict; the model must
    really be replicated, which shows as (nearly) identical losses and gradients.
    """
    flat = [grads[t.name] for t in targets]
    mine = torch.cat(
        [loss0.reshape(1).cpu()]
        + [
            g.cpu() if g is not None else torch.zeros(t.tensor.numel(), dtype=torch.float64)
            for g, t in zip(flat, targets)
        ]
    )
    theirs = mine.to(comm_device(group)).clone()
    dist.broadcast(theirs, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    theirs = theirs.cpu()
    gap = reduced(torch.tensor([float((theirs - mine).abs().max())]), dist.ReduceOp.MAX, group)
    if float(gap[0]) > same_bound(mine, targets[0].tensor.dtype if targets else torch.float64):
        raise InvalidArgumentError(
            f"{CALL}: split=True needs the same model and batch on every rank, but the loss or gradients differ "
            f"across ranks by up to {float(gap[0]):.2e}; seed the model's initialisation identically on every "
            "rank, or use split=False (with placement=) for a distributed model."
        )
    return theirs


def _my_slices(
    loop: LoopEngine,
    targets: list[Target],
    theirs: torch.Tensor,
    loss0: torch.Tensor,
    settings: Settings,
    seed: int,
    engine_name: str,
    group: Any,
    notes: list[str],
) -> list[Any]:
    """This rank's slice of every tensor, measured: [header, payload..., engine name] (the name popped off).

    The header holds the evaluations and each tensor's noise level; the payload is numerical,
    tolerance and kink of each slice, in order.
    """
    rank, size = rank_and_size(group)
    _, nondet = loop.loss_twice()
    engines = choose_engine(CALL, loop, targets[0] if targets else None, loss0, nondet, engine_name, notes)
    payload: list[torch.Tensor] = []
    sigmas: list[float] = []
    offset = 1
    for k, t in enumerate(targets):
        n = t.tensor.numel()
        a = theirs[offset : offset + n].to(t.tensor.device)
        offset += n
        index = torch.tensor_split(torch.arange(n, device=t.tensor.device), size)[rank]
        check = engines.run(
            t.name,
            lambda e, t=t, a=a, k=k, index=index: measure(
                e, t, a, loss0, nondet, settings, target_generator(seed, k), index=index
            ),
        )
        sigmas.append(check.sigma)
        payload += [check.numerical, check.tolerance, check.kink.to(torch.float64)]
    header = torch.tensor([float(engines.evaluations), *sigmas], dtype=torch.float64)
    return [header, *(p.detach().to("cpu", torch.float64) for p in payload), engines.name]


def _assemble(
    gathered: list[torch.Tensor], targets: list[Target], theirs: torch.Tensor, has_grad: list[bool], group: Any
) -> tuple[list[TensorResult], float]:
    """Every rank's slices put back together into one result per tensor, and the overall relative error."""
    _, size = rank_and_size(group)
    results: list[TensorResult] = []
    all_a, all_n = [], []
    offset = 1
    cursors = [1 + len(targets)] * size
    for k, t in enumerate(targets):
        n = t.tensor.numel()
        a = theirs[offset : offset + n].to(t.tensor.device)
        offset += n
        parts: list[list[torch.Tensor]] = [[], [], []]
        for r in range(size):
            m = len(torch.tensor_split(torch.arange(n), size)[r])
            for j in range(3):
                parts[j].append(gathered[r][cursors[r] : cursors[r] + m])
                cursors[r] += m
        numerical, tolerance, kink = (torch.cat(p).to(t.tensor.device) for p in parts)
        sigma = max(float(g[1 + k]) for g in gathered)
        results.append(summarise(t, TensorCheck(a, numerical, tolerance, kink.bool(), sigma), has_grad[k]))
        all_a.append(a[~kink.bool()])
        all_n.append(numerical[~kink.bool()])
    overall = relative_error(torch.cat(all_a), torch.cat(all_n)) if all_a else 0.0
    return results, overall

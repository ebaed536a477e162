"""Collective helpers of the distributed checks: ranks, reductions, agreed errors, the shared names.

The bottom of `distributed/`: imports torch.distributed and the core (`_check`, `_noise`), never
`_split`, `_placement` or `_verify`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .. import _check
from .._batch import Objective
from .._errors import InvalidArgumentError
from .._noise import unit_roundoff
from .._params import Lent, Target

__all__ = [
    "CALL",
    "PLACEMENTS",
    "RankError",
    "Tick",
    "agree_on_errors",
    "all_gather_padded",
    "analytical",
    "comm_device",
    "rank_and_size",
    "reduced",
    "same_bound",
    "spread",
    "target_generator",
    "work_device",
]

CALL = "verify_distributed(model, loss_fn, batch)"
PLACEMENTS = ("replicated", "sharded")
# Replicated values (loss, gradients) may differ across ranks by this many units of roundoff
# (relative to the largest magnitude) before they count as different: reduction order only.
SAME_ULPS = 1e3
Tick = Callable[[int], None]


class RankError(InvalidArgumentError):
    """Internal: raised on every rank with the same message when a rank's check went wrong."""


def rank_and_size(group: Any) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def comm_device(group: Any) -> torch.device:
    """Where collective payloads live: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduced(values: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    """An all-reduced float64 copy of `values` (on the communication device, returned on `values`' device)."""
    out = values.detach().to(comm_device(group), torch.float64).clone()
    dist.all_reduce(out, op=op, group=group)
    return out.to(values.device)


def spread(values: torch.Tensor, group: Any) -> torch.Tensor:
    """Elementwise max minus min of `values` across ranks (float64)."""
    return reduced(values, dist.ReduceOp.MAX, group) - reduced(values, dist.ReduceOp.MIN, group)


def same_bound(values: torch.Tensor, dtype: torch.dtype) -> float:
    """How far two replicas of `values` may drift apart from rounding alone."""
    scale = float(values.abs().max()) if values.numel() else 0.0
    return SAME_ULPS * unit_roundoff(dtype) * scale


def agree_on_errors(message: str | None, group: Any, error: BaseException | None = None) -> None:
    """Collective: if any rank failed, every rank raises.

    A rank that failed raises its own exception `error` unchanged (the model's RuntimeError stays a
    RuntimeError, as in `verify_module`); the others raise `RankError` naming the first failing rank
    and its `message`, so that no rank is left waiting in a collective.
    """
    _, size = rank_and_size(group)
    flag = reduced(torch.tensor([0.0 if message is None else 1.0]), dist.ReduceOp.MAX, group)
    if float(flag[0]) == 0.0:
        return
    messages: list[Any] = [None] * size
    dist.all_gather_object(messages, message, group=group)
    if error is not None:
        raise error
    first = next((r, m) for r, m in enumerate(messages) if m is not None)
    raise RankError(f"{CALL}: on rank {first[0]}: {first[1]}")


def analytical(
    lent: Lent, objective: Objective, targets: list[Target], seed: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """`_check.analytical` (collectives included in the forward and backward), errors naming this call."""
    return _check.analytical(lent, objective, targets, seed, CALL)


def target_generator(seed: int, k: int) -> torch.Generator:
    """The noise-direction generator of the k-th target: the same on every rank, whatever ran before."""
    return torch.Generator().manual_seed(seed * 1_000_003 + k)


def all_gather_padded(local: torch.Tensor, group: Any) -> list[torch.Tensor]:
    """``all_gather`` of 1-d float64 tensors whose lengths may differ by rank."""
    _, size = rank_and_size(group)
    device = comm_device(group)
    lengths = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(size)]
    dist.all_gather(lengths, torch.tensor([float(local.numel())], dtype=torch.float64, device=device), group=group)
    width = int(max(float(n[0]) for n in lengths))
    padded = torch.zeros(width, dtype=torch.float64, device=device)
    padded[: local.numel()] = local.to(device)
    out = [torch.empty(width, dtype=torch.float64, device=device) for _ in range(size)]
    dist.all_gather(out, padded, group=group)
    return [o[: int(n[0])].cpu() for o, n in zip(out, lengths)]


def work_device(targets: list[Target]) -> torch.device:
    return targets[0].tensor.device if targets else torch.device("cpu")

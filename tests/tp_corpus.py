"""Tensor-parallel corpus: Megatron-style layers with planted collective bugs, and their correct twins.

Every factory is called on every rank as ``factory(rank, world)`` and returns
``(model, loss_fn, batch, placement)``. The full weights come from one fixed seed on every rank and
each rank keeps its shard, so the replicated parts (bias of the row-parallel layer, the batch) are
identical everywhere. `TP_BUGS` must fail with default options (``inputs=True``), `TP_CORRECT` must
pass; `DDP_BUGS` / `DDP_CORRECT` likewise for DistributedDataParallel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

D_IN, HIDDEN, D_OUT, BATCH = 6, 8, 4, 5

# The two conjugate regions of Megatron-LM (mpu/mappings.py). `bug` replaces the correct backward.


class _CopyToParallel(torch.autograd.Function):
    """Forward: identity (the replicated input enters the parallel region). Backward: all-reduce."""

    @staticmethod
    def forward(ctx, x, missing_all_reduce):
        ctx.missing = missing_all_reduce
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if not ctx.missing:
            g = g.clone()
            dist.all_reduce(g)
        return g, None


class _ReduceFromParallel(torch.autograd.Function):
    """Forward: all-reduce the partial sums. Backward: identity."""

    @staticmethod
    def forward(ctx, x, spurious_all_reduce):
        ctx.spurious = spurious_all_reduce
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, g):
        if ctx.spurious:
            g = g.clone()
            dist.all_reduce(g)
        return g, None


def _full(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class ColumnParallelLinear(nn.Module):
    """``y = x @ W.T + b`` with W split by output rows: each rank holds ``n_out / world`` rows."""

    def __init__(self, n_in: int, n_out: int, rank: int, world: int, missing_all_reduce: bool = False):
        super().__init__()
        rows = slice(rank * n_out // world, (rank + 1) * n_out // world)
        self.weight = nn.Parameter(_full(n_out, n_in, seed=1)[rows].clone() / n_in**0.5)
        self.bias = nn.Parameter(_full(n_out, seed=2)[rows].clone())
        self.missing = missing_all_reduce

    def forward(self, x):
        return F.linear(_CopyToParallel.apply(x, self.missing), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """``y = x @ W.T + b`` with W split by input columns (x arrives sharded); the bias is replicated."""

    def __init__(self, n_in: int, n_out: int, rank: int, world: int, spurious_all_reduce: bool = False):
        super().__init__()
        cols = slice(rank * n_in // world, (rank + 1) * n_in // world)
        self.weight = nn.Parameter(_full(n_out, n_in, seed=3)[:, cols].clone() / n_in**0.5)
        self.bias = nn.Parameter(_full(n_out, seed=4))
        self.spurious = spurious_all_reduce

    def forward(self, x):
        return _ReduceFromParallel.apply(F.linear(x, self.weight), self.spurious) + self.bias


class ParallelMLP(nn.Module):
    """Column-parallel -> tanh (-> replicated gain) -> row-parallel, as in a Megatron transformer MLP."""

    def __init__(self, rank: int, world: int, missing: bool = False, spurious: bool = False, gain: str | None = None):
        super().__init__()
        self.fc1 = ColumnParallelLinear(D_IN, HIDDEN, rank, world, missing)
        self.fc2 = RowParallelLinear(HIDDEN, D_OUT, rank, world, spurious)
        self.gain = None
        if gain is not None:  # a replicated parameter used inside the parallel region
            self.gain = nn.Parameter(1.0 + 0.1 * _full(1, seed=5))
            if gain == "reduced":  # its gradient is a partial sum per rank: all-reduce it (Megatron's SP norms)
                self.gain.register_hook(_all_reduced)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        if self.gain is not None:
            h = h * self.gain
        return self.fc2(h)


def _all_reduced(g: torch.Tensor) -> torch.Tensor:
    g = g.clone()
    dist.all_reduce(g)
    return g


PLACEMENT = {"fc1.*": "sharded", "fc2.weight": "sharded"}  # fc2.bias and the batch: replicated


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return _full(BATCH, D_IN, seed=6), _full(BATCH, D_OUT, seed=7)


def tp_mlp(rank: int, world: int, **bugs) -> tuple:
    return ParallelMLP(rank, world, **bugs), nn.MSELoss(), _batch(), PLACEMENT


def missing_all_reduce_copy_backward(rank: int, world: int) -> tuple:
    """The copy-to-parallel backward forgets its all-reduce: only the input gradient is wrong."""
    return tp_mlp(rank, world, missing=True)


def spurious_all_reduce_reduce_backward(rank: int, world: int) -> tuple:
    """The reduce-from-parallel backward all-reduces again: every upstream gradient is multiplied by world."""
    return tp_mlp(rank, world, spurious=True)


def replicated_gain_not_reduced(rank: int, world: int) -> tuple:
    """A replicated gain inside the parallel region keeps its per-rank partial gradient (no all-reduce)."""
    return tp_mlp(rank, world, gain="partial")


def replicated_gain_reduced(rank: int, world: int) -> tuple:
    return tp_mlp(rank, world, gain="reduced")


class ShardedInputLinear(nn.Module):
    """A row-parallel layer fed by a sharded input (each rank holds its own feature columns of the batch)."""

    def __init__(self, rank: int, world: int):
        super().__init__()
        self.fc = RowParallelLinear(D_IN, D_OUT, rank, world)

    def forward(self, x):
        return torch.tanh(self.fc(x))


def sharded_input(rank: int, world: int) -> tuple:
    """The input is sharded too: each rank perturbs its own columns of it while the others follow."""
    x, y = _batch()
    cols = slice(rank * D_IN // world, (rank + 1) * D_IN // world)
    placement = {"fc.weight": "sharded", "batch[0]": "sharded"}
    return ShardedInputLinear(rank, world), nn.MSELoss(), (x[:, cols].clone(), y), placement


TP_BUGS: dict[str, Callable[[int, int], tuple]] = {
    "missing_all_reduce_copy_backward": missing_all_reduce_copy_backward,
    "spurious_all_reduce_reduce_backward": spurious_all_reduce_reduce_backward,
    "replicated_gain_not_reduced": replicated_gain_not_reduced,
}

TP_CORRECT: dict[str, Callable[[int, int], tuple]] = {
    "tp_mlp": tp_mlp,
    "replicated_gain_reduced": replicated_gain_reduced,
    "sharded_input": sharded_input,
}

# ---------------------------------------------------------------------------------------------- DDP


def _sum_instead_of_mean(state, bucket):
    """A DDP communication hook that sums the ranks' gradients and forgets to divide by the world size."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def ddp_mlp(rank: int, world: int, hook=None) -> tuple:
    """The same float64 MLP on every rank (one seed), each rank with its own batch: data parallel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, 7), nn.Tanh(), nn.Linear(7, D_OUT)).double()
    ddp = nn.parallel.DistributedDataParallel(model)
    if hook is not None:
        ddp.register_comm_hook(None, hook)
    batch = (_full(BATCH, D_IN, seed=10 + rank), _full(BATCH, D_OUT, seed=20 + rank))
    return ddp, nn.MSELoss(), batch, None


def ddp_sum_hook(rank: int, world: int) -> tuple:
    """DDP whose comm hook sums instead of averaging: gradients are `world` times too large."""
    return ddp_mlp(rank, world, _sum_instead_of_mean)


def ddp_batchnorm(rank: int, world: int) -> tuple:
    """Train-mode BatchNorm under DDP: buffers broadcast from rank 0 at every forward, stats per rank's batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, D_OUT)).double()
    batch = (_full(BATCH, D_IN, seed=10 + rank), _full(BATCH, D_OUT, seed=20 + rank))
    return nn.parallel.DistributedDataParallel(model), nn.MSELoss(), batch, None


DDP_BUGS: dict[str, Callable[[int, int], tuple]] = {"ddp_sum_hook": ddp_sum_hook}
DDP_CORRECT: dict[str, Callable[[int, int], tuple]] = {"ddp_mlp": ddp_mlp, "ddp_batchnorm": ddp_batchnorm}

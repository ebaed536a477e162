"""verify_distributed(placement=...): a Megatron-style tensor-parallel MLP on 2 ranks.

With torchrun: ``torchrun --standalone --nproc-per-node 2 examples/distributed_tp.py``. Run as a plain
script, it starts the 2 gloo ranks itself (CPU). The layers follow Megatron-LM's ``mpu/layers.py`` and
``mpu/mappings.py`` (copy to / reduce from the tensor-parallel region).
"""

# example: slow (starts 2 processes)
# torchrun --standalone --nproc-per-node 2 examples/distributed_tp.py

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from torchgradcheck import verify_distributed


class CopyToParallel(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce (each rank holds a partial input gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g


class ReduceFromParallel(torch.autograd.Function):
    """Forward: all-reduce the partial sums. Backward: identity."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, g):
        return g


def _full(*shape: int, seed: int) -> torch.Tensor:
    """The same full tensor on every rank (each rank then keeps its shard)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class ParallelMLP(nn.Module):
    """Column-parallel Linear -> tanh -> row-parallel Linear; each rank builds its own shards."""

    def __init__(self, rank: int, world: int, d_in: int = 6, hidden: int = 8, d_out: int = 4) -> None:
        super().__init__()
        rows = slice(rank * hidden // world, (rank + 1) * hidden // world)
        self.fc1 = nn.Linear(d_in, hidden // world).double()
        self.fc2 = nn.Linear(hidden // world, d_out).double()
        with torch.no_grad():
            self.fc1.weight.copy_(_full(hidden, d_in, seed=1)[rows])
            self.fc1.bias.copy_(_full(hidden, seed=2)[rows])
            self.fc2.weight.copy_(_full(d_out, hidden, seed=3)[:, rows])
            self.fc2.bias.copy_(_full(d_out, seed=4))  # replicated

    def forward(self, x):
        h = torch.tanh(self.fc1(CopyToParallel.apply(x)))
        return ReduceFromParallel.apply(F.linear(h, self.fc2.weight)) + self.fc2.bias


def _rank(rank: int, world: int, init: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        passed = check(rank, world)
    finally:
        dist.destroy_process_group()
    if not passed:
        sys.exit(1)


def check(rank: int, world: int) -> bool:
    model = ParallelMLP(rank, world)  # each rank builds its own shards
    x, y = _full(5, 6, seed=6), _full(5, 4, seed=7)  # replicated batch
    report = verify_distributed(
        model, nn.MSELoss(), (x, y), inputs=True, placement={"fc1.*": "sharded", "fc2.weight": "sharded"}
    )
    if rank == 0:
        print(report, flush=True)
    return report.passed


if __name__ == "__main__":
    if "RANK" in os.environ:  # started by torchrun
        _rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_rank, args=(2, f"file://{tmp}/pg"), nprocs=2)

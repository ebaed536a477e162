"""verify_distributed(split=True): a replicated model checked by 2 ranks, each taking a slice of the elements.

With torchrun: ``torchrun --standalone --nproc-per-node 2 examples/distributed_split.py``. Run as a plain
script, it starts the 2 gloo ranks itself (CPU).
"""

# example: slow (starts 2 processes)
# torchrun --standalone --nproc-per-node 2 examples/distributed_split.py

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from torchgradcheck import verify_distributed


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
    torch.manual_seed(0)  # the same model and batch on every rank
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    report = verify_distributed(model, nn.CrossEntropyLoss(), (x, y), split=True)
    if rank == 0:
        print(report, flush=True)
    return report.passed


if __name__ == "__main__":
    if "RANK" in os.environ:  # started by torchrun
        _rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_rank, args=(2, f"file://{tmp}/pg"), nprocs=2)

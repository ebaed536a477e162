"""DTensor models under verify_distributed: tensor parallel and FSDP2, no placement= needed.

# example: not-run-by-test-examples (needs 2 processes; tests/test_dtensor.py runs it under torchrun)

Run:  torchrun --standalone --nproc-per-node 2 examples/distributed_dtensor.py
"""

import datetime

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from torchgradcheck import verify_distributed

torch.set_num_threads(1)
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))


def mlp() -> nn.Sequential:
    torch.manual_seed(0)  # the same global weights on every rank
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()


# Tensor parallel: the same batch on every rank; 0.* is Shard(0), 2.weight Shard(1), 2.bias Replicate().
tp = parallelize_module(mlp(), mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
g = torch.Generator().manual_seed(1)  # the same batch on every rank
x, y = torch.randn(5, 6, dtype=torch.float64, generator=g), torch.randn(5, 4, dtype=torch.float64, generator=g)
report = verify_distributed(tp, nn.MSELoss(), (x, y))
if rank == 1:  # a bug on one rank only: rank 1 scales its shard's gradient by 1.02
    tp[0].weight.register_hook(lambda g: g * 1.02)
buggy = verify_distributed(tp, nn.MSELoss(), (x, y))

# FSDP2: every parameter is Shard(0); each rank has its own batch, the objective is the mean of the ranks' losses.
fsdp = mlp()
fully_shard(fsdp[0], mesh=mesh)
fully_shard(fsdp[2], mesh=mesh)
fully_shard(fsdp, mesh=mesh)
g = torch.Generator().manual_seed(100 + rank)  # a different batch on every rank
batch = (torch.randn(5, 6, dtype=torch.float64, generator=g), torch.randn(5, 4, dtype=torch.float64, generator=g))
fsdp_report = verify_distributed(fsdp, nn.MSELoss(), batch)

if rank == 0:  # every rank holds the same reports
    print(report, buggy, fsdp_report, sep="\n\n")
dist.barrier()
dist.destroy_process_group()

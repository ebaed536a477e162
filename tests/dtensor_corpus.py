"""DTensor corpus: tensor parallel (``parallelize_module``) and FSDP2 (``fully_shard``) models, correct and buggy.

Every factory is called on every rank as ``factory(rank, world)`` after ``init_process_group("gloo")``
and returns ``(model, loss_fn, batch)``; the model is float64 and its parameters are DTensors on a
1-D CPU mesh, so ``verify_distributed(model, loss_fn, batch)`` needs no ``placement=``.

* Tensor parallel: the same weights (one seed) and the same batch on every rank; ``ColwiseParallel``
  shards the first Linear by rows (``Shard(0)``), ``RowwiseParallel`` the second by columns
  (``Shard(1)``) with a replicated bias (``Replicate()``); the loss is replicated.
* FSDP2: the same weights, a different batch per rank (data parallel); every parameter is
  ``Shard(0)``, 7 hidden units over 2 ranks makes the shards uneven (4 and 3 rows).

`*_BUGS` must fail with default options, `*_CORRECT` must pass. Each bug names where it lives.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

D_IN, HIDDEN, D_OUT, BATCH = 6, 8, 4, 5
FSDP_HIDDEN = 7  # uneven over 2 ranks


def _full(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _mesh(world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def _mlp(hidden: int) -> nn.Sequential:
    torch.manual_seed(0)  # the same global weights on every rank
    return nn.Sequential(nn.Linear(D_IN, hidden), nn.Tanh(), nn.Linear(hidden, D_OUT)).double()


class _ScaledBackward(torch.autograd.Function):
    """Identity forward; the backward scales the gradient (a planted bug when ``scale != 1``)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class _Scaled(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return _ScaledBackward.apply(x, self.scale)


class _TanhWrongBackward(torch.autograd.Function):
    """tanh whose hand-written backward uses ``1 - y`` instead of ``1 - y**2`` (a classic slip)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y)


class _WrongTanh(nn.Module):
    def forward(self, x):
        return _TanhWrongBackward.apply(x)


# ------------------------------------------------------------------------------------ tensor parallel


def _tp_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return _full(BATCH, D_IN, seed=6), _full(BATCH, D_OUT, seed=7)


def tp_mlp(rank: int, world: int, activation: nn.Module | None = None) -> tuple:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = _mlp(HIDDEN)
    if activation is not None:
        model[1] = activation
    parallelize_module(model, _mesh(world), {"0": ColwiseParallel(), "2": RowwiseParallel()})
    return model, nn.MSELoss(), _tp_batch()


def tp_dtensor_output(rank: int, world: int) -> tuple:
    """The last layer keeps its output a DTensor (use_local_output=False): the loss is a DTensor too."""
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model, mesh = _mlp(HIDDEN), _mesh(world)
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel(use_local_output=False)})
    x, y = _tp_batch()
    return model, nn.MSELoss(), (x, distribute_tensor(y, mesh, [Replicate()]))


def tp_rank1_scales_its_shard_gradient(rank: int, world: int) -> tuple:
    """Rank 1 scales the gradient of its shard of 0.weight by 1.02 (a hook on that rank only)."""
    model, loss_fn, batch = tp_mlp(rank, world)
    if rank == 1:
        model[0].weight.register_hook(lambda g: g * 1.02)
    return model, loss_fn, batch


def tp_wrong_activation_backward(rank: int, world: int) -> tuple:
    """The activation inside the parallel region has a wrong hand-written backward, on every rank."""
    return tp_mlp(rank, world, activation=_WrongTanh())


# -------------------------------------------------------------------------------------------- FSDP2


def _fsdp_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _full(BATCH, D_IN, seed=10 + rank), _full(BATCH, D_OUT, seed=20 + rank)


def fsdp_mlp(rank: int, world: int, scale: float = 1.0, nested: bool = True) -> tuple:
    from torch.distributed.fsdp import fully_shard

    model = _mlp(FSDP_HIDDEN)
    model.insert(2, _Scaled(scale))  # on every rank, so that the names agree: 0.* and 3.*
    mesh = _mesh(world)
    if nested:
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[-1], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, nn.MSELoss(), _fsdp_batch(rank)


def fsdp_root_only(rank: int, world: int) -> tuple:
    """One fully_shard on the root: its parameters stay unsharded after a forward unless resharded."""
    return fsdp_mlp(rank, world, nested=False)


def fsdp_gradient_summed(rank: int, world: int) -> tuple:
    """The reduce-scatter sums the ranks' gradients (divide factor 1) instead of averaging them."""
    from torch.distributed.fsdp import FSDPModule

    model, loss_fn, batch = fsdp_mlp(rank, world)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
    return model, loss_fn, batch


def fsdp_bug_on_rank1_path(rank: int, world: int) -> tuple:
    """Only rank 1's forward has a layer whose backward is 2 % off: a check on rank 0's data alone passes."""
    return fsdp_mlp(rank, world, scale=1.02 if rank == 1 else 1.0)


def fsdp_rank1_scales_its_shard_gradient(rank: int, world: int) -> tuple:
    """Rank 1 scales its shard of 0.weight's (reduce-scattered) gradient by 1.02 after accumulation."""
    model, loss_fn, batch = fsdp_mlp(rank, world)
    if rank == 1:

        def scale(param: torch.Tensor) -> None:
            with torch.no_grad():
                param.grad.mul_(1.02)

        model[0].weight.register_post_accumulate_grad_hook(scale)
    return model, loss_fn, batch


TP_CORRECT: dict[str, Callable[[int, int], tuple]] = {"tp_mlp": tp_mlp, "tp_dtensor_output": tp_dtensor_output}
TP_BUGS: dict[str, Callable[[int, int], tuple]] = {
    "tp_rank1_scales_its_shard_gradient": tp_rank1_scales_its_shard_gradient,
    "tp_wrong_activation_backward": tp_wrong_activation_backward,
}
FSDP_CORRECT: dict[str, Callable[[int, int], tuple]] = {"fsdp_mlp": fsdp_mlp, "fsdp_root_only": fsdp_root_only}
FSDP_BUGS: dict[str, Callable[[int, int], tuple]] = {
    "fsdp_gradient_summed": fsdp_gradient_summed,
    "fsdp_bug_on_rank1_path": fsdp_bug_on_rank1_path,
    "fsdp_rank1_scales_its_shard_gradient": fsdp_rank1_scales_its_shard_gradient,
}

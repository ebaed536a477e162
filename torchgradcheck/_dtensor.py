"""DTensor parameters under `verify_distributed`: tensor parallel (``parallelize_module``) and FSDP2 (``fully_shard``).

A DTensor parameter says where its elements live (its ``placements`` on a ``device_mesh``), so no
``placement=`` is needed:

* ``Replicate()`` everywhere: the same tensor on every rank, perturbed identically on all of them
  (the "replicated" placement of `_placement`);
* ``Shard(d)`` on every mesh dimension: each rank holds its own block of the global tensor; each rank
  in turn perturbs the elements of its block while the others follow (the "sharded" placement). The
  block of every rank is mapped back to global indices, so the report shows one result per
  parameter, with global indices (``0.weight[11, 3]``) and the ranks that own failing elements.

The shards are checked **in place**, in their own dtype: a DTensor's local tensor is the storage its
collectives read (FSDP2 all-gathers from the sharded parameter's storage before every forward), so
the check perturbs that storage and copies the saved values back afterwards, bit for bit.

FSDP2 leaves the root module's parameters unsharded after a forward without backward, so that the
next forward would not all-gather again: `reshard` after every evaluation puts every ``FSDPModule``
back to its sharded state, where the next forward sees the perturbed shard.

Only names already imported are looked up (``sys.modules``): a model holding DTensors has imported
them, and a model without them must not pay for the import.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ._check import TensorCheck

__all__ = [
    "assemble",
    "dtensor_placement",
    "fsdp_modules",
    "global_index",
    "is_dtensor",
    "local_grad",
    "local_tensor",
    "reshard",
]


def is_dtensor(tensor: Any) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    cls = getattr(module, "DTensor", None)
    return cls is not None and isinstance(tensor, cls)


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that ``fully_shard`` (FSDP2) has wrapped."""
    module = sys.modules.get("torch.distributed.fsdp._fully_shard._fully_shard")
    cls = getattr(module, "FSDPModule", None)
    return [] if cls is None else [m for m in model.modules() if isinstance(m, cls)]


def reshard(modules: Sequence[nn.Module]) -> None:
    """Put every FSDP2 module back to its sharded parameters (the root keeps them unsharded after a forward)."""
    for m in modules:
        m.reshard()  # type: ignore[operator]


def dtensor_placement(name: str, param: Any) -> str | None:
    """ "sharded" (Shard on every mesh dimension) or "replicated" (Replicate on every one); None if unsupported.

    A mix (a shard replicated over another mesh dimension, as in HSDP) or a Partial placement has no
    single owner per element: the caller raises.
    """
    from torch.distributed.tensor import Replicate, Shard

    kinds = {type(p) for p in param.placements}
    if kinds == {Replicate}:
        return "replicated"
    if kinds == {Shard}:
        return "sharded"
    return None


def local_tensor(param: Any) -> torch.Tensor:
    """The storage of this rank's block (perturbed in place): a detached alias of the local tensor."""
    return param._local_tensor.detach()


def local_grad(param: Any, grad: Any) -> torch.Tensor | None:
    """This rank's block of `grad`, laid out like the parameter's own block, as a flat float64 copy."""
    if grad is None:
        return None
    if is_dtensor(grad):
        if tuple(grad.placements) != tuple(param.placements):  # a Partial gradient, say: reduce it first
            grad = grad.redistribute(param.device_mesh, param.placements)
        grad = grad._local_tensor
    return grad.detach().to(torch.float64).reshape(-1).clone()


def global_index(param: Any) -> torch.Tensor:
    """The flat global index of every element of this rank's block, in the block's (row-major) order."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    every = torch.arange(param.numel()).reshape(tuple(param.shape))
    block = every[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
    return block.reshape(-1).clone()


def assemble(numel: int, blocks: Sequence[tuple[torch.Tensor, TensorCheck | None]]) -> tuple[TensorCheck, torch.Tensor]:
    """One `TensorCheck` over the whole (global) tensor from every rank's block, and the owning rank of each element.

    `blocks[r]` is rank r's ``(global_index, check of its block)``; a rank with an empty block has
    no check. Every element must be owned by exactly one rank.
    """
    from ._check import TensorCheck

    owner = torch.full((numel,), -1, dtype=torch.int64)
    fields = {k: torch.zeros(numel, dtype=torch.float64) for k in ("analytical", "numerical", "tolerance")}
    kink = torch.zeros(numel, dtype=torch.bool)
    sigma = 0.0
    for rank, (index, check) in enumerate(blocks):
        if check is None or index.numel() == 0:
            continue
        if bool((owner[index] >= 0).any()):
            raise AssertionError("two ranks own the same element of a sharded DTensor")
        owner[index] = rank
        for k, values in fields.items():
            values[index] = getattr(check, k).detach().to("cpu", torch.float64)
        kink[index] = check.kink.cpu()
        sigma = max(sigma, check.sigma)
    if bool((owner < 0).any()):
        raise AssertionError("an element of a sharded DTensor is owned by no rank")
    return TensorCheck(fields["analytical"], fields["numerical"], fields["tolerance"], kink, sigma), owner


def owners_note(placements: Any, size: int, over: torch.Tensor, owner: torch.Tensor) -> str:
    """Where the tensor lives, and on which rank(s) its failing elements are."""
    if not bool(over.any()):
        return ""
    where = f"DTensor {', '.join(map(repr, placements))} over {size} ranks"
    ranks = sorted({int(r) for r in owner[over].tolist()})
    per_rank = ", ".join(f"rank {r}: {int((owner[over] == r).sum())}" for r in ranks)
    only = " only" if len(ranks) < size else ""
    plural = "s" if len(ranks) > 1 else ""
    return f"{where}; failing elements on rank{plural} {', '.join(map(str, ranks))}{only} ({per_rank})"

"""DTensor models in lockstep: tensor parallel (``parallelize_module``) and FSDP2 (``fully_shard``).

A DTensor parameter says where its elements live (its ``placements`` on a ``device_mesh``), so no
``placement=`` is needed:

* ``Replicate()`` everywhere: the same tensor on every rank, perturbed identically on all of them
  (the "replicated" placement of `_placement`);
* ``Shard(d)`` on every mesh dimension: each rank holds its own block of the global tensor; each rank
  in turn perturbs the elements of its block while the others follow (the "sharded" placement). The
  block of every rank is mapped back to global indices (`global_index`), and `global_result` makes
  one result per parameter, with global indices (``0.weight[11, 3]``) and the ranks that own the
  failing elements.

The blocks are perturbed in place (`.._dtensor`), in the model's own dtype (`dtensor_dtype`).
FSDP2 is data parallel: the objective is the mean of the ranks' losses, as for DDP. FSDP2 leaves the
root module's parameters unsharded after a forward without backward, so that the next forward would
not all-gather the perturbed shard: `reshard` after every evaluation puts every ``FSDPModule`` back.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._batch import Objective
from .._dtensor import is_dtensor, local_tensor
from .._errors import InvalidArgumentError
from .._measure import TensorCheck, summarise
from .._params import Target
from .._report import TensorResult
from ._collectives import CALL

__all__ = [
    "GlobalLoss",
    "dtensor_dtype",
    "dtensor_placements",
    "fsdp_modules",
    "global_result",
    "reshard",
    "shard_block",
]

Block = tuple[torch.Tensor, "TensorCheck | None", bool]  # global indices of a rank's elements, its check, has .grad


class GlobalLoss(Objective):
    """The objective, a DTensor loss (a model whose output stays a DTensor) replaced by its full value."""

    def __init__(self, inner: Objective) -> None:
        super().__init__(inner.loss_fn, inner.batch, inner.forward)
        self.inner = inner
        self.needs_grad = inner.needs_grad

    def __call__(self, model: Any) -> Any:
        loss = self.inner(model)
        return loss.full_tensor() if is_dtensor(loss) else loss


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that ``fully_shard`` (FSDP2) has wrapped."""
    module = sys.modules.get("torch.distributed.fsdp._fully_shard._fully_shard")
    cls = getattr(module, "FSDPModule", None)
    return [] if cls is None else [m for m in model.modules() if isinstance(m, cls)]


def reshard(modules: Sequence[nn.Module]) -> None:
    """Put every FSDP2 module back to its sharded parameters (the root keeps them unsharded after a forward)."""
    for m in modules:
        m.reshard()  # type: ignore[operator]


def dtensor_dtype(model: nn.Module, dtype: torch.dtype | None, split: bool) -> tuple[torch.dtype | None, str | None]:
    """The checking dtype of a model with DTensor parameters, and a warning when it is not `dtype`.

    The blocks are checked in place, so in their own dtype: a model in another dtype than `dtype`
    is checked in its own (``dtype=None``), and the report says so.
    """
    dtensors = [(n, p) for n, p in model.named_parameters() if is_dtensor(p)]
    if not dtensors:
        return dtype, None
    if split:
        raise InvalidArgumentError(
            f"{CALL}: split=True is for a replicated model without collectives in its forward, but "
            f"{dtensors[0][0]} is a DTensor (tensor parallel or FSDP2): use split=False."
        )
    for name, p in dtensors:
        if not local_tensor(p).is_contiguous():
            raise InvalidArgumentError(
                f"{CALL}: {name} is a DTensor whose local shard is not contiguous (strides "
                f"{local_tensor(p).stride()}); the check perturbs the shard in place and needs it contiguous."
            )
    other = sorted({str(p.dtype).replace("torch.", "") for _, p in dtensors if dtype is not None and p.dtype != dtype})
    if not other:
        return dtype, None
    return None, (
        f"checked in the model's own dtype ({', '.join(other)}), not {str(dtype).replace('torch.', '')}: DTensor "
        "shards are checked in place, where their collectives read them, so they are not converted, and the "
        "tolerances follow that dtype's noise. For a float64 check, convert the model before sharding it "
        "(model.double() before parallelize_module / fully_shard)."
    )


def dtensor_placements(dtensors: dict[str, Any], placement: Any) -> dict[str, str]:
    """Every DTensor parameter's placement, read from it ("sharded" | "replicated"); placement= may not name one."""
    from torch.distributed.tensor import Replicate, Shard

    if isinstance(placement, Mapping):
        for pattern in placement:
            named = [n for n in dtensors if n == pattern or fnmatch.fnmatchcase(n, str(pattern))]
            if named:
                raise InvalidArgumentError(
                    f"{CALL}: placement key {pattern!r} names the DTensor parameter {named[0]}, whose placements "
                    f"{tuple(dtensors[named[0]].placements)} are read from it; leave it out of placement= "
                    "(placement= is for plain-tensor parameters and inputs)."
                )
    out = {}
    for name, param in dtensors.items():
        kinds = {type(p) for p in param.placements}  # exact types: _StridedShard (FSDP + TP) is not a plain Shard
        if kinds not in ({Replicate}, {Shard}):
            raise InvalidArgumentError(
                f"{CALL}: {name} is a DTensor with placements {tuple(param.placements)}; the check supports Shard "
                "on every mesh dimension (each rank owns its block) or Replicate on every one, not a mix (HSDP's "
                "replicated shards, FSDP + TP) nor Partial: check it on a 1-D mesh."
            )
        out[name] = "replicated" if kinds == {Replicate} else "sharded"
    return out


def global_index(param: Any) -> torch.Tensor:
    """The flat global index of every element of this rank's block, in the block's (row-major) order."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    every = torch.arange(param.numel()).reshape(tuple(param.shape))
    return every[tuple(slice(o, o + s) for o, s in zip(offset, shape))].reshape(-1).clone()


def shard_block(t: Target, check: TensorCheck | None, has_grad: bool) -> Block:
    """This rank's block of a sharded DTensor, on the CPU, ready to be gathered."""
    if check is not None:
        check = dataclasses.replace(
            check,
            analytical=check.analytical.detach().cpu(),
            numerical=check.numerical.detach().cpu(),
            tolerance=check.tolerance.detach().cpu(),
            kink=check.kink.cpu(),
            index=None if check.index is None else check.index.cpu(),
        )
    return global_index(t.param), check, has_grad


def _assemble(numel: int, blocks: Sequence[Block]) -> tuple[TensorCheck, torch.Tensor]:
    """One `TensorCheck` over the global tensor from every rank's block, and the owning rank of each element."""
    owner = torch.full((numel,), -1, dtype=torch.int64)
    fields = {k: torch.zeros(numel, dtype=torch.float64) for k in ("analytical", "numerical", "tolerance")}
    kink = torch.zeros(numel, dtype=torch.bool)
    sigma = 0.0
    for rank, (index, check, _) in enumerate(blocks):
        if check is None or index.numel() == 0:
            continue
        if bool((owner[index] >= 0).any()):
            raise AssertionError("two ranks own the same element of a sharded DTensor")
        owner[index] = rank
        for k, values in fields.items():
            values[index] = getattr(check, k).to(torch.float64)
        kink[index] = check.kink
        sigma = max(sigma, check.sigma)
    if bool((owner < 0).any()):
        raise AssertionError("an element of a sharded DTensor is owned by no rank")
    return TensorCheck(fields["analytical"], fields["numerical"], fields["tolerance"], kink, sigma), owner


def global_result(t: Target, blocks: list[Block]) -> TensorResult:
    """One result over the global tensor of a sharded DTensor; its note names the ranks owning failing elements."""
    param: Any = t.param
    check, owner = _assemble(param.numel(), blocks)
    whole = Target(t.name, torch.empty(tuple(param.shape), dtype=t.tensor.dtype), kind=t.kind, param=param)
    res = summarise(whole, check, any(has for _, _, has in blocks))
    over = ~((check.analytical - check.numerical).abs() <= check.tolerance) & ~check.kink  # NaN counts as over
    if not bool(over.any()):
        return res
    ranks = sorted({int(r) for r in owner[over].tolist()})
    counts = ", ".join(f"rank {r}: {int((owner[over] == r).sum())}" for r in ranks)
    where = (
        f"DTensor {', '.join(map(repr, param.placements))} over {len(blocks)} ranks; failing elements on "
        f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
        f"{' only' if len(ranks) < len(blocks) else ''} ({counts})"
    )
    return dataclasses.replace(res, note="; ".join(n for n in (res.note, where) if n))

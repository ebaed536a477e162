"""DTensor parameters, the low-level part: recognise them, reach their local block and its gradient.

A DTensor parameter (tensor parallel with ``parallelize_module``, FSDP2 with ``fully_shard``) is
checked **in place**: its local tensor is the storage its collectives read (FSDP2 all-gathers from
the sharded parameter's storage before every forward), so `_params.lend_model` keeps it, perturbs
that storage and copies the saved values back afterwards, bit for bit. Swapping ``.data`` is not an
option: ``copy_`` between a plain tensor and a DTensor raises "mixed torch.Tensor and DTensor", and
``param.data = other`` does not even change a DTensor's local tensor.

Only names already imported are looked up (``sys.modules``): a model holding DTensors has imported
them, and a model without them must not pay for the import. The distributed part (placements,
global indices, FSDP2) is `distributed._dtensor`.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

__all__ = ["is_dtensor", "local_grad", "local_tensor"]


def is_dtensor(tensor: Any) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    cls = getattr(module, "DTensor", None)
    return cls is not None and isinstance(tensor, cls)


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

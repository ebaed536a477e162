"""Test helpers: a full snapshot of everything a check must leave as it was."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def _bits(t: torch.Tensor) -> tuple:
    if hasattr(t, "placements") and hasattr(t, "_local_tensor"):  # a DTensor: its placements and this rank's shard
        local = t._local_tensor
        return ("dtensor", str(t.placements), tuple(t.shape), id(local), local.data_ptr(), _bits(local))
    t = t.detach()
    if t.is_sparse:
        t = t.coalesce()
        return ("sparse", _bits(t.indices()), _bits(t.values()))
    return (str(t.dtype), tuple(t.shape), t.stride(), str(t.device), t.cpu().contiguous().numpy().tobytes())


@dataclass
class Snapshot:
    items: dict[str, Any]


def snapshot(model: nn.Module) -> Snapshot:
    """Parameter values/identity/dtype/device/requires_grad/.grad, buffers, flags, hooks, global state."""
    items: dict[str, Any] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        items[f"param:{name}"] = (
            id(p),
            p.data_ptr(),
            p.requires_grad,
            _bits(p),
            None if p.grad is None else (id(p.grad), _bits(p.grad)),
            tuple(getattr(p, "_backward_hooks", None) or {}),
            tuple(getattr(p, "_post_accumulate_grad_hooks", None) or {}),
        )
    for mname, module in model.named_modules():
        items[f"module:{mname}"] = (
            id(module),
            module.training,
            tuple(module._forward_hooks),
            tuple(module._forward_pre_hooks),
            tuple(module._backward_hooks),
            tuple(module._backward_pre_hooks),
            tuple(module._parameters),
            tuple(module._buffers),
        )
        for bname, buf in module._buffers.items():
            items[f"buffer:{mname}.{bname}"] = None if buf is None else (id(buf), buf.data_ptr(), _bits(buf))
    items["rng"] = _bits(torch.get_rng_state())
    items["default_dtype"] = torch.get_default_dtype()
    items["grad_enabled"] = torch.is_grad_enabled()
    return Snapshot(items)


def assert_unchanged(before: Snapshot, model: nn.Module) -> None:
    after = snapshot(model)
    changed = [k for k in before.items.keys() | after.items.keys() if before.items.get(k) != after.items.get(k)]
    assert not changed, f"the check changed: {sorted(changed)}"

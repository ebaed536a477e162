"""Checks made before the model runs: the batch's leaves and the model's device.

A leaf the check can't handle (a string, a generator, a numpy array, ...) would otherwise reach the
model and fail there, or worse, be passed through silently while ``inputs=True`` checks nothing. So
each leaf is validated first, and the error names its path (``batch[0][2]``) and the fix. Plain
Python scalars, ``None``, dtypes and devices pass: they are ordinary arguments.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["BadLeafError", "bad_leaves", "meta_tensors"]

_PLAIN = (type(None), bool, int, float, complex, torch.dtype, torch.device, torch.Tensor)


class BadLeafError(TypeError):
    """Internal: a batch leaf the check can't handle; the message says which and the fix."""


def _fix(leaf: Any) -> str:
    kind = type(leaf)
    module = kind.__module__.split(".")[0]
    if module == "numpy":
        return "convert it with torch.from_numpy(...), or pass forward=lambda model, batch: loss"
    if isinstance(leaf, (str, bytes)):
        return "strings can't be checked: bind it in the model or the loss, or pass forward=lambda model, batch: loss"
    if inspect.isgenerator(leaf) or hasattr(leaf, "__next__"):
        return (
            "an iterator is used up by the first evaluation: materialise it (a tuple of tensors, or "
            "torch.stack), or pass forward=lambda model, batch: loss"
        )
    return (
        "pass tensors (in tuples, lists or dicts) and plain Python scalars, or pass forward=lambda model, batch: loss"
    )


def bad_leaves(batch: Any, path: str = "batch") -> None:
    """Raise `BadLeafError` for the first leaf of `batch` that is not a tensor or a plain Python value."""
    leaves, _ = pytree.tree_flatten_with_path(batch)
    for key, leaf in leaves:
        if isinstance(leaf, _PLAIN):
            continue
        kind = type(leaf)
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        raise BadLeafError(f"{path}{pytree.keystr(key)} is a {name}, not a tensor; {_fix(leaf)}")


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of the model's parameters and buffers on the meta device (they hold no data)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [name for name, t in named if t is not None and t.is_meta]

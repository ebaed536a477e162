"""The objective: how ``(model, loss_fn, batch)`` becomes a scalar loss, and the batch's own tensors.

Conventions (documented in `verify_module`):

* ``Tensor``                  -> ``loss_fn(model(batch))``
* ``dict``                    -> ``loss_fn(model(**batch))``
* ``(inputs,)``               -> as ``inputs`` alone
* ``(inputs, target)``        -> ``loss_fn(model(inputs), target)``; ``inputs`` that is a tuple/list
  is unpacked as positional arguments, a dict as keyword arguments; ``target=None`` means no target.
* ``forward=fn``              -> ``fn(model, batch)`` returns the loss; anything goes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from ._params import Target

__all__ = ["Objective", "convert_batch", "input_targets"]


# The complex dtype that holds a real checking dtype's precision.
_COMPLEX = {
    torch.float64: torch.complex128,
    torch.float32: torch.complex64,
    torch.complex128: torch.complex128,
    torch.complex64: torch.complex64,
}


class BatchError(ValueError):
    """Internal: a fact about the batch; `_verify` adds the call and the fix."""


def convert_batch(batch: Any, dtype: torch.dtype | None, path: str = "batch") -> Any:
    """Copy the batch, floating tensors in `dtype`. Never touches the caller's tensors.

    NaN/Inf elements are kept (masks holding -inf, inputs meant for nansum): they are never perturbed,
    and only a non-finite loss at the unperturbed point is an error (`check_loss`).

    Containers are walked with ``torch.utils._pytree`` (tuples, lists, dicts, namedtuples and every
    registered container), rebuilt with their own types.
    """
    return pytree.tree_map_with_path(lambda key, leaf: _convert_leaf(leaf, dtype, path + pytree.keystr(key)), batch)


def _convert_leaf(batch: Any, dtype: torch.dtype | None, path: str) -> Any:
    if not isinstance(batch, torch.Tensor):
        return batch
    if batch.is_floating_point() or batch.is_complex():
        target = dtype or batch.dtype
        if batch.is_complex():  # complex stays complex: casting to a real dtype would drop the imaginary part
            target = _COMPLEX.get(target, batch.dtype)
        with torch.inference_mode(False):  # a normal tensor, even if the caller is in inference mode
            return batch.detach().to(dtype=target, copy=True).contiguous()
    if batch.is_inference():  # made under torch.inference_mode(): autograd may not save it, so copy it
        with torch.inference_mode(False):
            return batch.clone()
    return batch


def _paths(batch: Any, path: str, keep: Callable[[torch.Tensor], bool]) -> list[str]:
    leaves, _ = pytree.tree_flatten_with_path(batch)
    return [path + pytree.keystr(k) for k, t in leaves if isinstance(t, torch.Tensor) and keep(t)]


def non_finite_paths(batch: Any, path: str = "batch") -> list[str]:
    """Paths of the batch's floating tensors holding NaN or Inf elements (for the error on a non-finite loss)."""
    return _paths(
        batch, path, lambda t: (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())
    )


def integer_paths(batch: Any, path: str = "batch") -> list[str]:
    """Paths of the batch's integer tensors (indices are fine; fed to a float layer they are an error)."""
    return _paths(batch, path, lambda t: not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool))


def input_targets(batch: Any, path: str = "batch") -> list[Target]:
    """The floating tensors of a converted batch, as targets to perturb (``inputs=True``), named by path."""
    return [
        Target(path + pytree.keystr(key), leaf, kind="input", param=leaf)
        for key, leaf in pytree.tree_flatten_with_path(batch)[0]
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
    ]


def _call(model: Callable[..., Any], inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)) and not hasattr(inputs, "_fields"):
        return model(*inputs)
    return model(inputs)


class Objective:
    """``loss(model_like)`` for one batch, following the conventions above."""

    def __init__(
        self,
        loss_fn: Callable[..., Any] | None,
        batch: Any,
        forward: Callable[[Any, Any], Any] | None,
    ) -> None:
        self.loss_fn = loss_fn
        self.batch = batch
        self.forward = forward
        # The loss differentiates inside (torch.autograd.grad(..., create_graph=True), as physics-informed
        # and gradient-penalty losses do): every evaluation then runs with grad enabled.
        self.needs_grad = False
        if forward is None and batch is None:
            raise BatchError("no batch was given (batch=None); pass the model's inputs, e.g. (x, y) or x")
        if forward is None and isinstance(batch, (tuple, list)) and not hasattr(batch, "_fields"):
            if len(batch) not in (1, 2):
                raise BatchError(
                    f"batch is a {type(batch).__name__} of {len(batch)} items; expected a Tensor, a "
                    "dict, (inputs,) or (inputs, target)"
                )

    def __call__(self, model: Callable[..., Any]) -> Any:
        batch = self.batch
        if self.forward is not None:
            return self.forward(model, batch)
        assert self.loss_fn is not None
        if isinstance(batch, (tuple, list)) and not hasattr(batch, "_fields"):
            inputs = batch[0]
            target = batch[1] if len(batch) == 2 else None
            out = _call(model, inputs)
            return self.loss_fn(out) if target is None else self.loss_fn(out, target)
        return self.loss_fn(_call(model, batch))


def check_loss(loss: Any) -> torch.Tensor:
    """Return `loss` if it is a real, finite, 0-dim floating tensor; raise BatchError otherwise."""
    if isinstance(loss, (float, int)) and not isinstance(loss, bool):
        raise BatchError(
            f"the loss is a Python {type(loss).__name__} ({loss!r}), which carries no gradient; "
            "return the tensor itself (no .item())"
        )
    if not isinstance(loss, torch.Tensor):
        raise BatchError(f"the loss is a {type(loss).__name__}, not a torch.Tensor")
    if loss.dim() != 0:
        raise BatchError(
            f"the loss has shape {tuple(loss.shape)}, not a scalar; reduce it yourself "
            "(e.g. reduction='mean' or .sum()) so the check tests the loss you train with"
        )
    if loss.is_complex() or not loss.is_floating_point():
        raise BatchError(f"the loss has dtype {loss.dtype}; it must be a real floating scalar")
    if not bool(torch.isfinite(loss)):
        raise BatchError(f"the loss is {loss.item()} (not finite) at the unperturbed point")
    return loss


def module_is_lazy(model: nn.Module) -> bool:
    return any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())

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

    NaN/Inf elements are kept (masks with -inf, nansum inputs): they are never perturbed, and only a
    non-finite loss at the unperturbed point is an error (`check_loss`).
    """
    if isinstance(batch, torch.Tensor):
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
    if isinstance(batch, dict):
        return {k: convert_batch(v, dtype, f"{path}[{k!r}]") for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        items = [convert_batch(v, dtype, f"{path}[{i}]") for i, v in enumerate(batch)]
        if hasattr(batch, "_fields"):  # namedtuple
            return type(batch)(*items)
        return type(batch)(items)
    return batch


def non_finite_paths(batch: Any, path: str = "batch") -> list[str]:
    """Paths of the batch's floating tensors holding NaN or Inf elements (for the error on a non-finite loss)."""
    if isinstance(batch, torch.Tensor):
        bad = (batch.is_floating_point() or batch.is_complex()) and not bool(torch.isfinite(batch).all())
        return [path] if bad else []
    if isinstance(batch, dict):
        return [p for k, v in batch.items() for p in non_finite_paths(v, f"{path}[{k!r}]")]
    if isinstance(batch, (tuple, list)):
        return [p for i, v in enumerate(batch) for p in non_finite_paths(v, f"{path}[{i}]")]
    return []


def integer_paths(batch: Any, path: str = "batch") -> list[str]:
    """Paths of the batch's integer tensors (indices are fine; fed to a float layer they are an error)."""
    if isinstance(batch, torch.Tensor):
        return [] if batch.is_floating_point() or batch.is_complex() or batch.dtype == torch.bool else [path]
    if isinstance(batch, dict):
        return [p for k, v in batch.items() for p in integer_paths(v, f"{path}[{k!r}]")]
    if isinstance(batch, (tuple, list)):
        return [p for i, v in enumerate(batch) for p in integer_paths(v, f"{path}[{i}]")]
    return []


def input_targets(batch: Any, path: str = "batch") -> list[Target]:
    """The floating tensors of a converted batch, as targets to perturb (``inputs=True``)."""
    found: list[Target] = []
    if isinstance(batch, torch.Tensor):
        if batch.is_floating_point():
            found.append(Target(path, batch, kind="input", param=batch))
    elif isinstance(batch, dict):
        for k, v in batch.items():
            found.extend(input_targets(v, f"{path}[{k!r}]"))
    elif isinstance(batch, (tuple, list)):
        for i, v in enumerate(batch):
            found.extend(input_targets(v, f"{path}[{i}]"))
    return found


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

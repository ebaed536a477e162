"""Parameters: the user's own Parameter objects, lent to the check and handed back bit-exactly.

The analytical side must be exactly what ``loss.backward()`` writes into ``.grad`` of the user's
parameters, with their tensor hooks, module hooks and custom Functions. So the check keeps the
user's Parameter objects (identity, hooks, requires_grad) and swaps only their ``.data`` for a
private, contiguous copy in the checking dtype. The original storages are never written to, so
restoring is re-pointing ``.data`` at them: bit-exact, and safe at any point of an interruption.

Buffers are swapped for private copies in the module's ``_buffers`` dict and reset from a pristine
copy before every evaluation (BatchNorm statistics, counters), so no evaluation sees another's
side effects and the user's buffers never drift.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ._dtensor import is_dtensor, local_tensor

__all__ = ["Lent", "Target", "lend_model", "parameter_names", "select_parameters"]


@dataclass(eq=False)
class Target:
    """One tensor whose elements get perturbed: a parameter, or a floating tensor of the batch."""

    name: str
    tensor: torch.Tensor  # the private working copy; contiguous, in the checking dtype
    kind: str = "parameter"  # "parameter" | "input"
    param: torch.Tensor | None = None  # the user's Parameter (or our input leaf) that receives .grad
    # Elements never perturbed nor judged (flat bool mask; None: none), and why, for the report:
    # non-finite values (NaN/Inf inputs, as nansum expects) and rows torch zeroes by design (padding_idx).
    skip: torch.Tensor | None = None
    skip_note: str = ""

    @property
    def flat(self) -> torch.Tensor:
        return self.tensor.view(-1)

    @property
    def checkable(self) -> torch.Tensor:
        """Flat indices of the elements that may be perturbed (all but `skip`)."""
        every = torch.arange(self.tensor.numel(), device=self.tensor.device)
        return every if self.skip is None else every[~self.skip.view(-1)]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)


@dataclass(eq=False)
class _Saved:
    param: nn.Parameter
    data: torch.Tensor
    grad: torch.Tensor | None
    requires_grad: bool


@dataclass(eq=False)
class Lent:
    """The model while it is lent to the check: working copies plus everything needed to give it back."""

    model: nn.Module
    dtype: torch.dtype | None
    saved_params: list[_Saved] = field(default_factory=list)
    saved_buffers: list[tuple[nn.Module, str, torch.Tensor]] = field(default_factory=list)
    working_buffers: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    training: list[tuple[nn.Module, bool]] = field(default_factory=list)
    # DTensor parameters are checked in place (their collectives read their own storage): the local
    # tensor and a copy of its values, written back on restore
    saved_local: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def reset_buffers(self) -> None:
        """Put every buffer back to its value at the start of the check (before each evaluation)."""
        with torch.no_grad():
            for module, name, working, pristine in self.working_buffers:
                module._buffers[name] = working
                working.copy_(pristine)

    def clear_grads(self) -> None:
        for saved in self.saved_params:
            saved.param.grad = None

    def restore(self) -> None:
        """Hand everything back; idempotent and safe to call from ``finally``."""
        for saved in self.saved_params:
            saved.param.grad = None
            if not is_dtensor(saved.param):
                saved.param.data = saved.data
            saved.param.grad = saved.grad
            saved.param.requires_grad_(saved.requires_grad)
        with torch.no_grad():
            for local, values in self.saved_local:
                local.copy_(values)
        for module, name, original in self.saved_buffers:
            module._buffers[name] = original
        for module, mode in self.training:
            module.training = mode


def _working_copy(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    target_dtype = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
    if is_dtensor(tensor):  # a DTensor buffer: a DTensor copy (copy_ into a plain tensor would mix the two)
        return tensor.detach().to(target_dtype).clone()
    out = torch.empty(tensor.shape, dtype=target_dtype, device=tensor.device)
    with torch.no_grad():
        out.copy_(tensor.detach())
    return out


@contextlib.contextmanager
def lend_model(model: nn.Module, dtype: torch.dtype | None) -> Iterator[Lent]:
    """Swap in private working copies (in `dtype`, or the own dtype if None); restore on exit."""
    lent = Lent(model=model, dtype=dtype)
    lent.training = [(m, m.training) for m in model.modules()]
    try:
        seen: set[int] = set()
        for _, param in model.named_parameters(remove_duplicate=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            lent.saved_params.append(_Saved(param, param.data, param.grad, param.requires_grad))
            param.grad = None
            if is_dtensor(param):
                local = local_tensor(param)
                lent.saved_local.append((local, local.clone()))
            else:
                param.data = _working_copy(param.data, dtype)
        copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for module in model.modules():
            for name, buf in list(module._buffers.items()):
                if buf is None:
                    continue
                lent.saved_buffers.append((module, name, buf))
                if id(buf) not in copies:  # a buffer shared by two modules stays shared
                    working = _working_copy(buf, dtype)
                    copies[id(buf)] = (working, working.clone())
                working, pristine = copies[id(buf)]
                module._buffers[name] = working
                lent.working_buffers.append((module, name, working, pristine))
        yield lent
    finally:
        lent.restore()


def parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name of every parameter, keyed by ``id``: a tied parameter has several."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def select_parameters(
    model: nn.Module, patterns: Sequence[str] | None
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, str]]]:
    """Trainable floating parameters (first name of tied ones) and the skipped ones with a reason.

    A pattern selects a tied parameter if it matches any of its names (``head.weight`` tied to
    ``embedding.weight`` is selected by either); the parameter is reported under its first name.
    """
    checked: list[tuple[str, nn.Parameter]] = []
    skipped: list[tuple[str, str]] = []
    aliases = parameter_names(model)
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        if not (param.is_floating_point() or param.is_complex()):
            skipped.append((name, "not floating"))
        elif not param.requires_grad:
            skipped.append((name, "frozen"))
        elif param.is_complex():
            skipped.append((name, "complex (not supported)"))
        elif patterns is not None and not any(
            fnmatch.fnmatchcase(alias, p) for alias in aliases[id(param)] for p in patterns
        ):
            skipped.append((name, "not selected by params="))
        else:
            checked.append((name, param))
    return checked, skipped


def unmatched_patterns(model: nn.Module, patterns: Sequence[str] | None) -> list[str]:
    """The `patterns` that match no parameter name (every alias of a tied parameter counts)."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    return [p for p in patterns or () if not any(fnmatch.fnmatchcase(n, p) for n in names)]


def dense_grad(grad: torch.Tensor | None) -> torch.Tensor | None:
    """A gradient as a flat float64 copy (sparse COO gradients densified); None stays None."""
    if grad is None:
        return None
    if grad.is_sparse:
        grad = grad.to_dense()
    return grad.detach().to(torch.float64).reshape(-1).clone()

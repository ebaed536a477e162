"""torch.compile'd models in ``verify_module``: which side is compiled, and the one forward comparison.

``torch.compile(model)`` returns an ``OptimizedModule`` that holds the user's module as ``_orig_mod``
(its parameters are the same objects, named ``_orig_mod.0.weight``). The check splits the two:

* the **numerical side** runs on the eager module ``_orig_mod``: every perturbed forward is plain
  eager code (vmap works, nothing is recompiled per perturbation or per vmap chunk);
* the **analytical side** is one forward and backward through the compiled module: the gradients
  the user trains with, so a wrong Inductor kernel or a custom Function whose backward is wrong as
  traced under compile fails the check;
* parameters are named as the eager module names them (``0.weight``);
* the compiled forward is compared once with the eager forward at the unperturbed point, before
  anything else; a difference beyond the agreement slack of the engines (``1e4·u·|L| + 10·nondet``,
  as for vmap) is a row of its own, status ``compiled forward differs``, which fails the check, and
  the gradients are not compared (finite differences of the eager forward would not be differences
  of what the compiled model computes).

Only the checking dtype changes the compiled module's guards, so the check costs one compile (in
float64; none with ``dtype=None`` once the user has run the model). ``torch._dynamo`` is never
imported here: if it is not loaded, no model can be an ``OptimizedModule``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._batch import Objective, check_loss
from ._engines import LoopEngine
from ._params import Lent
from ._report import TensorResult
from ._state import reseed

__all__ = ["Compiled", "compare_forward", "eager_calls", "no_donated_buffers", "split_compiled"]


class _CompiledCall:
    """A module compiled in place (``model.compile()``) seen from outside: calls go through its compiled
    call, attributes to the module (a ``forward=`` may use them)."""

    def __init__(self, module: nn.Module, impl: Any) -> None:
        self._module, self._impl = module, impl

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._impl(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


@dataclass(frozen=True)
class Compiled:
    """A compiled model taken apart: what runs compiled, and the eager module behind it."""

    compiled: Any  # what the user trains with; the analytical side runs through it
    eager: nn.Module  # ``compiled._orig_mod`` (or the module compiled in place): numerical side, names
    backend: str
    in_place: Any = None  # the compiled call of ``model.compile()``, set aside while checking

    def forward_differs(self, lent: Lent, objective: Objective, seed: int) -> TensorResult | None:
        """The failing ``compiled forward`` row if the compiled forward (grad enabled, as in training)
        and the eager forward give different losses at the unperturbed point, else None."""
        engine = LoopEngine(lent, objective, seed)
        eager_loss, nondet = engine.loss_twice()
        with torch.enable_grad():
            lent.reset_buffers()
            reseed(seed)
            compiled_loss = check_loss(objective(self.compiled)).detach().to(torch.float64)
        return compare_forward(compiled_loss, eager_loss, nondet)

    def note(self) -> str:
        how = "model.compile()" if self.in_place is not None else f"torch.compile (backend={self.backend})"
        return (
            f"{how}: the autograd side is the compiled module's backward "
            "(what you train with); the numerical side runs the eager module (_orig_mod); the compiled "
            "forward was compared with the eager one at the unperturbed point"
        )


def split_compiled(model: Any) -> Compiled | None:
    """``Compiled`` for ``torch.compile(model)`` or a ``model.compile()``'d module, None for anything else."""
    in_place = getattr(model, "_compiled_call_impl", None) if isinstance(model, nn.Module) else None
    if in_place is not None:
        return Compiled(compiled=_CompiledCall(model, in_place), eager=model, backend="", in_place=in_place)
    frames = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(frames, "OptimizedModule", None)
    if optimized is None or not isinstance(model, optimized):
        return None
    eager = model._orig_mod
    if not isinstance(eager, nn.Module):  # torch.compile of a plain function wrapped oddly: not ours
        return None
    return Compiled(compiled=model, eager=eager, backend=_backend_name(model))


@contextlib.contextmanager
def eager_calls(compiled: Compiled | None) -> Iterator[None]:
    """While checking, a ``model.compile()``'d module runs eagerly when called (its compiled call is put
    back on exit, whatever happens); the analytical side calls the compiled one through `_CompiledCall`."""
    if compiled is None or compiled.in_place is None:
        yield
        return
    compiled.eager._compiled_call_impl = None
    try:
        yield
    finally:
        compiled.eager._compiled_call_impl = compiled.in_place


@contextlib.contextmanager
def no_donated_buffers() -> Iterator[None]:
    """Graphs compiled inside keep their backward's buffers (AOTAutograd's ``donated_buffer`` off).

    With donated buffers (Inductor's default), a compiled backward frees saved tensors it reuses and
    refuses ``retain_graph=True``, which the accumulation check needs (a second backward through the
    same graph). Off, the compiled backward computes the same values, with a little more memory.
    """
    from torch._functorch import config

    if not hasattr(config, "donated_buffer"):
        yield
        return
    with config.patch(donated_buffer=False):
        yield


def _backend_name(model: Any) -> str:
    """The backend's name (``inductor``, ``aot_eager``), best effort through dynamo's wrappers."""
    obj = getattr(getattr(model, "dynamo_ctx", None), "callback", None)
    for _ in range(6):
        if obj is None:
            break
        for attr in ("_compiler_name", "compiler_name"):
            name = getattr(obj, attr, None)
            if isinstance(name, str):
                return name
        obj = getattr(obj, "_torchdynamo_orig_backend", None)
    return "custom"


def compare_forward(compiled_loss: torch.Tensor, eager_loss: torch.Tensor, nondet: float) -> TensorResult | None:
    """A failing ``compiled forward`` row when the two unperturbed losses differ beyond the slack, else None."""
    a, n = float(compiled_loss), float(eager_loss)
    u = float(torch.finfo(eager_loss.dtype).eps) / 2
    slack = 1e4 * u * max(abs(a), abs(n)) + 10 * nondet
    diff = abs(a - n)
    if diff <= slack:
        return None
    return TensorResult(
        name="compiled forward",
        shape=(),
        status="compiled forward differs",
        note=(
            f"the compiled forward gives loss {a!r} and the eager forward {n!r} at the same point "
            f"(|diff| {diff:.2e} > {slack:.2e}, the slack of rounding and measured nondeterminism): the "
            "compiled model computes something else than the eager one (a graph-break or guard issue, "
            "a backend bug, or code that branches on torch.compiler.is_compiling())"
        ),
    )

"""``after_steps=k``: check a few optimizer steps away from the initial point, never stepping the model.

At initialisation, a zero-initialised layer (LoRA's ``B = 0``, a zero-init residual branch) makes the
gradient of everything upstream exactly 0 on both sides, so nothing about those tensors is tested.
A few optimizer steps bring them to life. The steps run on the *lent* model: the user's Parameter
objects hold private working copies (float64 by default) for the duration of the check, so the
optimizer moves those copies and the user's own storages are never written; everything is handed
back bit-exactly afterwards (`_params.lend_model`). Buffers are reset to their initial values
before every forward, as in every evaluation of the check.

The default optimizer is plain SGD with a learning rate chosen so that the loss goes down: the first
guess predicts a 10 % decrease of the loss from the gradient (``lr = 0.1 |L| / |g|^2``), and it is
halved until the first step lowers the loss. ``optimizer=lambda params: torch.optim.Adam(params, lr=1e-2)``
uses yours instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ._batch import Objective, check_loss
from ._errors import InvalidArgumentTypeError
from ._params import Lent
from ._state import reseed

__all__ = ["take_steps"]

HALVINGS = 40  # at most this many halvings of the learning rate before giving up on a descent step
RESTARTS = 5  # at most this many restarts with lr / 4 when the k steps end above the initial loss


def _loss_and_grad(lent: Lent, objective: Objective, params: list[torch.nn.Parameter], seed: int) -> float:
    lent.reset_buffers()
    reseed(seed)
    for p in params:
        p.grad = None
    with torch.enable_grad():
        loss = check_loss(objective(lent.model))
        loss.backward()
    return float(loss.detach())


def _loss(lent: Lent, objective: Objective, seed: int) -> float:
    lent.reset_buffers()
    reseed(seed)
    with torch.enable_grad():  # a loss may differentiate inside (torch.autograd.grad)
        return float(check_loss(objective(lent.model)).detach())


def take_steps(
    lent: Lent,
    objective: Objective,
    steps: int,
    optimizer: Callable[[list[torch.nn.Parameter]], Any] | None,
    seed: int,
    call: str,
) -> str:
    """Take `steps` optimizer steps on the lent model's trainable parameters; return a note saying how."""
    params = [s.param for s in lent.saved_params if s.requires_grad and s.param.is_floating_point()]
    try:
        if optimizer is not None:
            first, last, name = _user_steps(lent, objective, params, optimizer, steps, seed, call)
            how = f"{steps} step(s) of {name} (optimizer=)"
        else:
            first, last, lr = _sgd_steps(lent, objective, params, steps, seed)
            how = f"{steps} SGD step(s) (lr={lr:.3g}, chosen so that the loss goes down)"
    finally:
        lent.clear_grads()
    dtype = str(params[0].dtype).replace("torch.", "") if params else "float64"
    return (
        f"checked after {how} on a private {dtype} copy of the parameters: loss {first:.6g} -> {last:.6g}; "
        "the model itself was not stepped"
    )


def _user_steps(
    lent: Lent,
    objective: Objective,
    params: list[torch.nn.Parameter],
    factory: Callable[[list[torch.nn.Parameter]], Any],
    steps: int,
    seed: int,
    call: str,
) -> tuple[float, float, str]:
    opt = factory(params)
    if not (callable(getattr(opt, "step", None)) and callable(getattr(opt, "zero_grad", None))):
        raise InvalidArgumentTypeError(
            f"{call}: optimizer= must return an optimizer (with .step() and .zero_grad()) built on the "
            f"parameters it is given, got {type(opt).__name__}; e.g. "
            "optimizer=lambda params: torch.optim.SGD(params, lr=0.1)."
        )
    first = None
    for _ in range(steps):
        loss = _loss_and_grad(lent, objective, params, seed)
        first = loss if first is None else first
        opt.step()
    last = _loss(lent, objective, seed)
    return float(first if first is not None else last), last, type(opt).__name__


def _sgd_steps(
    lent: Lent, objective: Objective, params: list[torch.nn.Parameter], steps: int, seed: int
) -> tuple[float, float, float]:
    """SGD from the initial point; the learning rate is halved until the first step lowers the loss,
    and quartered (restarting from the initial point) while `steps` steps end higher than they began."""
    loss0 = _loss_and_grad(lent, objective, params, seed)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
    norm2 = float(sum((g.to(torch.float64) ** 2).sum() for g in grads))
    start = [p.detach().clone() for p in params]
    lr = 0.1 * max(abs(loss0), 1e-12) / norm2 if norm2 > 0 else 0.0
    for _ in range(HALVINGS if lr > 0 else 0):
        _set(params, start, grads, lr)
        if _loss(lent, objective, seed) < loss0:
            break
        lr /= 2
    else:
        _set(params, start, grads, 0.0)
        return loss0, loss0, 0.0
    for _ in range(RESTARTS):
        _set(params, start, grads, lr)
        for _ in range(steps - 1):
            _loss_and_grad(lent, objective, params, seed)
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.sub_(p.grad, alpha=lr)
        last = _loss(lent, objective, seed)
        if math.isfinite(last) and last < loss0:
            break
        lr /= 4
    return loss0, last, lr


def _set(params: list[torch.nn.Parameter], start: list[torch.Tensor], grads: list[torch.Tensor], lr: float) -> None:
    """Parameters at ``start - lr * grads`` (one SGD step from the initial point)."""
    with torch.no_grad():
        for p, s, g in zip(params, start, grads):
            p.copy_(s - lr * g)

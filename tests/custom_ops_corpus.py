"""`torch.library.custom_op` + `register_autograd` operators, each correct and with a buggy twin.

None registers a forward-mode formula, as almost no custom op does: the checker must note
"forward mode unavailable", never compare a zero tangent. Registered once, at import, under the
namespace ``tgc_corpus``. `CORRECT` / `BUGGY` map a name to a factory of ``(fn, args, kwargs)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Case = tuple[Callable[..., Any], tuple, dict]
NS = "tgc_corpus"


def _leaf(*shape: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)


def _op(name: str, fn: Callable[..., Any]) -> Any:
    return torch.library.custom_op(f"{NS}::{name}", mutates_args=())(fn)


# sin: one input --------------------------------------------------------------------------------


def _sin(x: Tensor) -> Tensor:
    return torch.sin(x)


def _sin_bug(x: Tensor) -> Tensor:
    return torch.sin(x)


sin = _op("sin", _sin)
sin_bug = _op("sin_bug", _sin_bug)


def _save_x(ctx: Any, inputs: tuple, output: Any) -> None:
    ctx.save_for_backward(inputs[0])


sin.register_autograd(lambda ctx, g: g * ctx.saved_tensors[0].cos(), setup_context=_save_x)
sin_bug.register_autograd(lambda ctx, g: -g * ctx.saved_tensors[0].cos(), setup_context=_save_x)  # BUG: sign


# linear: three inputs --------------------------------------------------------------------------


def _linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return x @ w.T + b


def _linear_bug(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return x @ w.T + b


linear = _op("linear", _linear)
linear_bug = _op("linear_bug", _linear_bug)


def _save_xw(ctx: Any, inputs: tuple, output: Any) -> None:
    ctx.save_for_backward(inputs[0], inputs[1])


def _linear_backward(ctx: Any, g: Tensor) -> tuple:
    x, w = ctx.saved_tensors
    return g @ w, g.T @ x, g.sum(0)


def _linear_backward_bug(ctx: Any, g: Tensor) -> tuple:
    x, w = ctx.saved_tensors
    return g @ w, g.T @ x, g.mean(0)  # BUG: mean instead of sum over the batch


linear.register_autograd(_linear_backward, setup_context=_save_xw)
linear_bug.register_autograd(_linear_backward_bug, setup_context=_save_xw)


# scaled tanh: a float argument -----------------------------------------------------------------


def _scaled_tanh(x: Tensor, scale: float) -> Tensor:
    return torch.tanh(scale * x)


def _scaled_tanh_bug(x: Tensor, scale: float) -> Tensor:
    return torch.tanh(scale * x)


scaled_tanh = _op("scaled_tanh", _scaled_tanh)
scaled_tanh_bug = _op("scaled_tanh_bug", _scaled_tanh_bug)


def _save_out_scale(ctx: Any, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(output)
    ctx.scale = inputs[1]


scaled_tanh.register_autograd(
    lambda ctx, g: (g * ctx.scale * (1 - ctx.saved_tensors[0] ** 2), None), setup_context=_save_out_scale
)
scaled_tanh_bug.register_autograd(
    lambda ctx, g: (g * (1 - ctx.saved_tensors[0] ** 2), None),  # BUG: the scale forgotten
    setup_context=_save_out_scale,
)


# sincos: two outputs ---------------------------------------------------------------------------


def _sincos(x: Tensor) -> tuple[Tensor, Tensor]:
    return torch.sin(x), torch.cos(x)


def _sincos_bug(x: Tensor) -> tuple[Tensor, Tensor]:
    return torch.sin(x), torch.cos(x)


sincos = _op("sincos", _sincos)
sincos_bug = _op("sincos_bug", _sincos_bug)


def _sincos_backward(ctx: Any, gs: Tensor, gc: Tensor) -> Tensor:
    (x,) = ctx.saved_tensors
    return gs * x.cos() - gc * x.sin()


def _sincos_backward_bug(ctx: Any, gs: Tensor, gc: Tensor) -> Tensor:
    (x,) = ctx.saved_tensors
    return gs * x.cos()  # BUG: the gradient of the second output ignored


sincos.register_autograd(_sincos_backward, setup_context=_save_x)
sincos_bug.register_autograd(_sincos_backward_bug, setup_context=_save_x)


# square whose backward calls another custom op without autograd (no second order) --------------


def _twice(x: Tensor, g: Tensor) -> Tensor:
    return 2 * x * g


twice = _op("twice", _twice)  # no register_autograd: its own derivative is not implemented


def _square(x: Tensor) -> Tensor:
    return x * x


def _square_bug(x: Tensor) -> Tensor:
    return x * x


square = _op("square", _square)
square_bug = _op("square_bug", _square_bug)
square.register_autograd(lambda ctx, g: twice(ctx.saved_tensors[0], g), setup_context=_save_x)
square_bug.register_autograd(
    lambda ctx, g: twice(ctx.saved_tensors[0], g) * 0.99,
    setup_context=_save_x,  # BUG: 1 % low
)


CORRECT: dict[str, Callable[[], Case]] = {
    "sin": lambda: (sin, (_leaf(3, 4, seed=1),), {}),
    "linear": lambda: (linear, (_leaf(4, 3, seed=2), _leaf(5, 3, seed=3), _leaf(5, seed=4)), {}),
    "scaled_tanh": lambda: (scaled_tanh, (_leaf(3, 4, seed=5), 0.7), {}),
    "sincos": lambda: (sincos, (_leaf(6, seed=6),), {}),
    "square_backward_op": lambda: (square, (_leaf(2, 3, seed=7),), {}),
}
BUGGY: dict[str, Callable[[], Case]] = {
    "sin": lambda: (sin_bug, (_leaf(3, 4, seed=1),), {}),
    "linear": lambda: (linear_bug, (_leaf(4, 3, seed=2), _leaf(5, 3, seed=3), _leaf(5, seed=4)), {}),
    "scaled_tanh": lambda: (scaled_tanh_bug, (_leaf(3, 4, seed=5), 0.7), {}),
    "sincos": lambda: (sincos_bug, (_leaf(6, seed=6),), {}),
    "square_backward_op": lambda: (square_bug, (_leaf(2, 3, seed=7),), {}),
}

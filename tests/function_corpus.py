"""The verify_function corpus: planted-bug autograd.Functions, each with a correct twin.

Every factory returns ``(fn, args, kwargs)`` for ``verify_function(fn, *args, **kwargs)``. Every
`BUGS` entry must fail and every `CORRECT` entry pass with default options; `TWINS` maps each bug to
its correct twin. The caller's tensors must be bit-identical after every check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable

Case = tuple[Callable[..., Any], tuple, dict]


def _leaf(*shape: int, dtype: torch.dtype = torch.float64, positive: bool = False) -> torch.Tensor:
    t = torch.randn(*shape, dtype=dtype)
    if positive:
        t = t.abs() + 0.5
    return t.requires_grad_(True)


# ------------------------------------------------------------------------------------ linear family


class Linear(torch.autograd.Function):
    """``x @ w.T + b`` with a hand-written backward; `bug` names the planted mistake (None: correct)."""

    @staticmethod
    def forward(ctx, x, w, b, bug):
        ctx.save_for_backward(x, w)
        ctx.bug = bug
        return x @ w.T + b

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx, gw, gb = g @ w, g.T @ x, g.sum(0)
        if ctx.bug == "scale":
            gx = 0.5 * gx
        elif ctx.bug == "sign":
            gw = -gw
        elif ctx.bug == "transposed":  # square w: the shape is right, the values are not
            gw = (g.T @ x).T
        elif ctx.bug == "broadcast_axis":  # square g: reduces over the output axis instead of the batch
            gb = g.sum(1)
        elif ctx.bug == "one_element":
            gw = gw.clone()
            gw[3, 1] = gw[3, 1] * 1.01
        elif ctx.bug == "relative_1e-5":
            gx = gx * (1 + 1e-5)
        elif ctx.bug == "float32_grad":  # right values, wrong dtype: autograd casts it back silently
            gw = gw.float()
        return gx, gw, gb, None


def linear(bug: str | None = None) -> Case:
    """A square 5x5 layer on a batch of 5: transposed and wrong-axis gradients keep their shapes."""
    return Linear.apply, (_leaf(5, 5), _leaf(5, 5), _leaf(5), bug), {}


# ------------------------------------------------------------------------------------ others


class Mul(torch.autograd.Function):
    """``a * b`` for two same-shape inputs."""

    @staticmethod
    def forward(ctx, a, b, swap):
        ctx.save_for_backward(a, b)
        ctx.swap = swap
        return a * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        ga, gb = g * b, g * a
        return (gb, ga, None) if ctx.swap else (ga, gb, None)


class Smooth(torch.autograd.Function):
    """``y[i] = x[i-1] + 2 x[i] + x[i+1]`` with zero padding; the bug wraps around at the edges."""

    @staticmethod
    def forward(ctx, x, wrap):
        ctx.wrap = wrap
        p = torch.nn.functional.pad(x, (1, 1))
        return p[:-2] + 2 * x + p[2:]

    @staticmethod
    def backward(ctx, g):
        if ctx.wrap:
            return 2 * g + torch.roll(g, 1) + torch.roll(g, -1), None
        p = torch.nn.functional.pad(g, (1, 1))
        return 2 * g + p[:-2] + p[2:], None


class Branch(torch.autograd.Function):
    """``x**2`` for x > 0, ``0.1 x`` otherwise; the bug drops the factor 2 in the x > 0 branch only."""

    @staticmethod
    def forward(ctx, x, bug):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return torch.where(x > 0, x * x, 0.1 * x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        slope = x if ctx.bug else 2 * x
        return g * torch.where(x > 0, slope, torch.full_like(x, 0.1)), None


class Cube(torch.autograd.Function):
    """``x**3``; the bug detaches the saved input: first derivatives right, second derivatives zero."""

    @staticmethod
    def forward(ctx, x, bug):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if ctx.bug:
            x = x.detach()
        return 3 * g * x**2, None


class SinCos(torch.autograd.Function):
    """Two outputs ``(sin x, cos x)``; the bug ignores the gradient of the second one."""

    @staticmethod
    def forward(ctx, x, bug):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return torch.sin(x), torch.cos(x)

    @staticmethod
    def backward(ctx, g_sin, g_cos):
        (x,) = ctx.saved_tensors
        if ctx.bug:
            return g_sin * torch.cos(x), None
        return g_sin * torch.cos(x) - g_cos * torch.sin(x), None


class RawMatmul(torch.autograd.Function):
    """``x @ w``; the bug reads x's memory as if it were contiguous (as a C kernel using data_ptr would)."""

    @staticmethod
    def forward(ctx, x, w, bug):
        ctx.save_for_backward(x, w)
        ctx.bug = bug
        return x @ w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        raw = x.as_strided(x.shape, (x.shape[1], 1)) if ctx.bug else x
        return g @ w.T, raw.T @ g, None


_CACHE: dict[str, torch.Tensor] = {}


class CachedSquare(torch.autograd.Function):
    """``x**2``; the bug accumulates into a module-level buffer that is never zeroed: the first backward
    is right, every later one is off (stale state, a nondeterministic backward)."""

    @staticmethod
    def forward(ctx, x, bug):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        grad = 2 * g * x
        if ctx.bug:
            buf = _CACHE.get("buf")
            if buf is None or buf.shape != grad.shape:
                buf = _CACHE["buf"] = torch.zeros_like(grad)
            out = grad + buf
            buf += 1e-3 * grad.detach()
            return out, None
        return grad, None


class Tanh(torch.autograd.Function):
    """``tanh(x * scale)`` with a backward and a jvp; `bug` breaks one of them."""

    @staticmethod
    def forward(ctx, x, scale, bug):
        y = torch.tanh(x * scale)
        ctx.save_for_backward(y)
        ctx.y, ctx.scale, ctx.bug = y.detach(), scale, bug  # ctx.y: for jvp
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        scale = 2.0 if ctx.bug == "ignores_scale" else ctx.scale
        return g * scale * (1 - y * y), None, None

    @staticmethod
    def jvp(ctx, tx, _scale, _bug):
        y = ctx.y
        slope = 1 - y.abs() if ctx.bug == "jvp" else 1 - y * y
        return tx * ctx.scale * slope


def scaled_tanh(x: torch.Tensor, *, scale: float = 2.0, bug: str | None = None) -> torch.Tensor:
    """A function built on a Function, with keyword arguments (passed through by verify_function)."""
    return Tanh.apply(x, scale, bug)


class Exp(torch.autograd.Function):
    """``exp(x)``; the bug returns the local derivative without multiplying by grad_output."""

    @staticmethod
    def forward(ctx, x, bug):
        y = torch.exp(x)
        ctx.save_for_backward(y)
        ctx.bug = bug
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return (y if ctx.bug else g * y), None


class OnceSquare(torch.autograd.Function):
    """``x**2`` with a correct backward marked @once_differentiable: second order is skipped with a note."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * g * x


# --------------------------------------------------------------------------------- the corpus


def swapped(swap: bool = True) -> Case:
    return Mul.apply, (_leaf(4, 3), _leaf(4, 3), swap), {}


def edges(wrap: bool = True) -> Case:
    return Smooth.apply, (_leaf(12), wrap), {}


def branch(bug: bool = True) -> Case:
    return Branch.apply, (_leaf(20), bug), {}


def second_derivative(bug: bool = True) -> Case:
    """Second order is a warning by default (issue 9, B6): this case asks for it in the verdict."""
    return Cube.apply, (_leaf(6), bug), {"second_order": True}


def ignored_output(bug: bool = True) -> Case:
    return SinCos.apply, (_leaf(3, 4), bug), {}


def noncontiguous_assumption(bug: bool = True) -> Case:
    return RawMatmul.apply, (_leaf(4, 4), _leaf(4, 3), bug), {}


def stale_buffer(bug: bool = True) -> Case:
    _CACHE.clear()
    return CachedSquare.apply, (_leaf(5), bug), {}


def ignored_grad_output(bug: bool = True) -> Case:
    return Exp.apply, (_leaf(7), bug), {}


def ignored_keyword(bug: str | None = "ignores_scale") -> Case:
    """``scale=3.0`` passed as a keyword; the backward uses the default 2.0."""
    return scaled_tanh, (_leaf(6),), {"scale": 3.0, "bug": bug}


def wrong_jvp(bug: str | None = "jvp") -> Case:
    return scaled_tanh, (_leaf(6),), {"scale": 1.5, "bug": bug}


BUGS: dict[str, Callable[[], Case]] = {
    "wrong_scale": lambda: linear("scale"),
    "wrong_sign": lambda: linear("sign"),
    "transposed_matmul_grad": lambda: linear("transposed"),
    "swapped_grads": swapped,
    "broadcast_wrong_axis": lambda: linear("broadcast_axis"),
    "wrong_at_edges": edges,
    "wrong_in_one_branch": branch,
    "relative_1e-5": lambda: linear("relative_1e-5"),
    "one_element": lambda: linear("one_element"),
    "second_derivative_only": second_derivative,
    "ignored_output_grad": ignored_output,
    # our own
    "float32_grad": lambda: linear("float32_grad"),
    "noncontiguous_assumption": noncontiguous_assumption,
    "stale_buffer": stale_buffer,
    "ignored_keyword": ignored_keyword,
    "ignored_grad_output": ignored_grad_output,
    "wrong_jvp": wrong_jvp,
}


def plain_ops() -> Case:
    """No custom Function at all: built-in ops, a float32 caller tensor, an integer and a None argument."""

    def fn(x, idx, w, unused=None):
        return torch.tanh(x[idx] @ w).sum(0) if unused is None else x

    return fn, (_leaf(6, 4, dtype=torch.float32), torch.tensor([0, 2, 5]), _leaf(4, 3)), {}


def expanded_input() -> Case:
    """An expanded (overlapping-memory) input: checked as a contiguous copy, with a note."""
    base = _leaf(1, 4)
    return (lambda x, y: x * y.sin()), (base.expand(3, 4), _leaf(3, 4)), {}


def once_differentiable_square() -> Case:
    return OnceSquare.apply, (_leaf(5),), {}


CORRECT: dict[str, Callable[[], Case]] = {
    "linear": linear,
    "mul": lambda: swapped(False),
    "smooth": lambda: edges(False),
    "branch": lambda: branch(False),
    "cube": lambda: second_derivative(False),
    "sincos": lambda: ignored_output(False),
    "raw_matmul": lambda: noncontiguous_assumption(False),
    "cached_square": lambda: stale_buffer(False),
    "exp": lambda: ignored_grad_output(False),
    "scaled_tanh": lambda: ignored_keyword(None),
    "plain_ops": plain_ops,
    "once_differentiable": once_differentiable_square,
    "expanded_input": expanded_input,
}

TWINS: dict[str, str] = {
    "wrong_scale": "linear",
    "wrong_sign": "linear",
    "transposed_matmul_grad": "linear",
    "swapped_grads": "mul",
    "broadcast_wrong_axis": "linear",
    "wrong_at_edges": "smooth",
    "wrong_in_one_branch": "branch",
    "relative_1e-5": "linear",
    "one_element": "linear",
    "second_derivative_only": "cube",
    "ignored_output_grad": "sincos",
    "float32_grad": "linear",
    "noncontiguous_assumption": "raw_matmul",
    "stale_buffer": "cached_square",
    "ignored_keyword": "scaled_tanh",
    "wrong_jvp": "scaled_tanh",
    "ignored_grad_output": "exp",
}

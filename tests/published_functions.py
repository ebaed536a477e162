"""Hand-written autograd.Functions from public repositories, each with a buggy twin planted here.

The math of every ``forward``/``backward`` is copied from the repository and file named in its
comment (rewritten to the style of this project: ``saved_variables`` -> ``saved_tensors``, names
shortened); only the twins' single planted mistake (marked ``# BUG``) is ours. None of the
originals is marked ``@once_differentiable``, so their second derivatives are whatever autograd
makes of their backward: right for some, wrong or impossible for others (a warning, never a
failure, by default).

`CORRECT` maps a name to a factory of ``(fn, args, kwargs)``: the original, which must pass.
`BUGGY` maps the same name to its twin, which must fail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd import Function

Case = tuple[Callable[..., Any], tuple, dict]


def _leaf(*shape: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).requires_grad_(True)


# ------------------------------------------------------------------------------ timm (5 Functions)
# huggingface/pytorch-image-models, timm/layers/activations_me.py: "memory-efficient" activations
# whose backward recomputes from the saved input.


class TimmSwish(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.mul(torch.sigmoid(x))

    @staticmethod
    def backward(ctx, g):
        x = ctx.saved_tensors[0]
        s = torch.sigmoid(x)
        return g * (s * (1 + x * (1 - s)))


class TimmSwishBug(TimmSwish):
    @staticmethod
    def backward(ctx, g):
        x = ctx.saved_tensors[0]
        s = torch.sigmoid(x)
        return g * (s * (1 + x * (1 + s)))  # BUG: sign inside the product rule


class TimmMish(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.mul(torch.tanh(F.softplus(x)))

    @staticmethod
    def backward(ctx, g):
        x = ctx.saved_tensors[0]
        s = torch.sigmoid(x)
        t = F.softplus(x).tanh()
        return g.mul(t + x * s * (1 - t * t))


class TimmMishBug(TimmMish):
    @staticmethod
    def backward(ctx, g):
        x = ctx.saved_tensors[0]
        s = torch.sigmoid(x)
        t = F.softplus(x).tanh()
        return g.mul(t + x * s * (1 - t))  # BUG: tanh' = 1 - t**2, not 1 - t


class TimmHardSigmoid(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x + 3).clamp(min=0, max=6).div(6.0)

    @staticmethod
    def backward(ctx, g):
        x = ctx.saved_tensors[0]
        m = torch.ones_like(x) * ((x >= -3.0) & (x <= 3.0)) / 6.0
        return g * m


class TimmHardSigmoidBug(TimmHardSigmoid):
    @staticmethod
    def backward(ctx, g):
        x = ctx.saved_tensors[0]
        m = torch.ones_like(x) * ((x >= -3.0) & (x <= 3.0)) / 3.0  # BUG: slope 1/3
        return g * m


class TimmHardSwish(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * (x + 3).clamp(min=0, max=6).div(6.0)

    @staticmethod
    def backward(ctx, g):
        x = ctx.saved_tensors[0]
        m = torch.ones_like(x) * (x >= 3.0)
        m = torch.where((x >= -3.0) & (x <= 3.0), x / 3.0 + 0.5, m)
        return g * m


class TimmHardSwishBug(TimmHardSwish):
    @staticmethod
    def backward(ctx, g):
        x = ctx.saved_tensors[0]
        m = torch.ones_like(x) * (x >= 3.0)
        m = torch.where((x >= -3.0) & (x <= 3.0), x / 6.0 + 0.5, m)  # BUG: x/6
        return g * m


class TimmHardMish(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 0.5 * x * (x + 2).clamp(min=0, max=2)

    @staticmethod
    def backward(ctx, g):
        x = ctx.saved_tensors[0]
        m = torch.ones_like(x) * (x >= -2.0)
        m = torch.where((x >= -2.0) & (x <= 0.0), x + 1.0, m)
        return g * m


class TimmHardMishBug(TimmHardMish):
    @staticmethod
    def backward(ctx, g):
        x = ctx.saved_tensors[0]
        m = torch.ones_like(x) * (x >= -2.0)
        m = torch.where((x >= -2.0) & (x <= 0.0), x + 0.5, m)  # BUG: x + 0.5
        return g * m


# --------------------------------------------------------------------------- other swish variants


class SavedOutputSwish(Function):
    """leesharkey/deep_attractor_network, lib/custom_components/custom_swish_activation.py (saves its output)."""

    @staticmethod
    def forward(ctx, i):
        result = i * i.sigmoid()
        ctx.save_for_backward(result, i)
        return result

    @staticmethod
    def backward(ctx, g):
        result, i = ctx.saved_tensors
        s = i.sigmoid()
        return g * (result + s * (1 - result))


class SavedOutputSwishBug(SavedOutputSwish):
    @staticmethod
    def backward(ctx, g):
        result, i = ctx.saved_tensors
        s = i.sigmoid()
        return g * (result + s * (1 - i))  # BUG: 1 - i instead of 1 - result


_SIGMOID = torch.nn.Sigmoid()


class ModuleSigmoidSwish(Function):
    """Ynakatsuka/birdclef-2021, src/kvt/models/layers/swish.py (sigmoid as an nn.Module)."""

    @staticmethod
    def forward(ctx, i):
        ctx.save_for_backward(i)
        return i * _SIGMOID(i)

    @staticmethod
    def backward(ctx, g):
        i = ctx.saved_tensors[0]
        s = _SIGMOID(i)
        return g * (s * (1 + i * (1 - s)))


class ModuleSigmoidSwishBug(ModuleSigmoidSwish):
    @staticmethod
    def backward(ctx, g):
        i = ctx.saved_tensors[0]
        s = _SIGMOID(i)
        return g * (s * (1 + i * (1 - s))) * 1.02  # BUG: 2 % too large


@torch.jit.script
def _swish_jit_fwd(x):
    return x * torch.sigmoid(x)


@torch.jit.script
def _swish_jit_bwd(x, grad_output):
    s = torch.sigmoid(x)
    return grad_output * (s * (1 + x * (1 - s)))


class JitSwish(Function):
    """yimaverickxia/e3nn_little, e3nn_little/util/swish.py (TorchScript kernels inside a Function)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _swish_jit_fwd(x)

    @staticmethod
    def backward(ctx, g):
        x = ctx.saved_tensors[0]
        return _swish_jit_bwd(x, g)


class JitSwishBug(JitSwish):
    @staticmethod
    def backward(ctx, g):
        x = ctx.saved_tensors[0]
        return _swish_jit_bwd(x, g) + 0.01 * g  # BUG: a stray term


class ModuleSoftplusMish(Function):
    """nathanjpaek/kb-pilot, KernelBench/KernelBench/level9/33_Mish.py (softplus as an nn.Module)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.mul(torch.tanh(torch.nn.Softplus()(x)))

    @staticmethod
    def backward(ctx, g):
        x = ctx.saved_tensors[0]
        s = torch.sigmoid(x)
        t = torch.nn.Softplus()(x).tanh()
        return g.mul(t + x * s * (1 - t * t))


class ModuleSoftplusMishBug(ModuleSoftplusMish):
    @staticmethod
    def backward(ctx, g):
        x = ctx.saved_tensors[0]
        s = torch.sigmoid(x)
        t = torch.nn.Softplus()(x).tanh()
        return g.mul(t + s * (1 - t * t))  # BUG: the factor x dropped


# ------------------------------------------------------------------------------- deep-spin/entmax
# deep-spin/entmax, entmax/activations.py: sparse softmax variants; ``dim`` is a non-tensor argument.


def _make_ix_like(x: torch.Tensor, dim: int) -> torch.Tensor:
    d = x.size(dim)
    rho = torch.arange(1, d + 1, device=x.device, dtype=x.dtype)
    view = [1] * x.dim()
    view[0] = -1
    return rho.view(view).transpose(0, dim)


def _threshold_and_support(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    srt, _ = torch.sort(x, descending=True, dim=dim)
    cumsum = srt.cumsum(dim) - 1
    rhos = _make_ix_like(x, dim)
    support = rhos * srt > cumsum
    size = support.sum(dim=dim).unsqueeze(dim)
    tau = cumsum.gather(dim, size - 1)
    tau /= size.to(x.dtype)
    return tau, size


class Sparsemax(Function):
    @staticmethod
    def forward(ctx, x, dim=0):
        ctx.dim = dim
        max_val, _ = x.max(dim=dim, keepdim=True)
        x = x - max_val
        tau, supp_size = _threshold_and_support(x, dim=dim)
        output = torch.clamp(x - tau, min=0)
        ctx.save_for_backward(supp_size, output)
        return output

    @staticmethod
    def backward(ctx, g):
        supp_size, output = ctx.saved_tensors
        dim = ctx.dim
        gi = g.clone()
        gi[output == 0] = 0
        v_hat = gi.sum(dim=dim) / supp_size.to(output.dtype).squeeze()
        v_hat = v_hat.unsqueeze(dim)
        gi = torch.where(output != 0, gi - v_hat, gi)
        return gi, None


class SparsemaxBug(Sparsemax):
    @staticmethod
    def backward(ctx, g):
        _supp_size, output = ctx.saved_tensors
        gi = g.clone()
        gi[output == 0] = 0  # BUG: the projection (- v_hat on the support) is missing
        return gi, None


def _tsallis_threshold_and_support(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    srt, _ = torch.sort(x, descending=True, dim=dim)
    rho = _make_ix_like(x, dim)
    mean = srt.cumsum(dim) / rho
    mean_sq = (srt**2).cumsum(dim) / rho
    ss = rho * (mean_sq - mean**2)
    delta = (1 - ss) / rho
    tau = mean - torch.sqrt(torch.clamp(delta, 0))
    size = (tau <= srt).sum(dim).unsqueeze(dim)
    return tau.gather(dim, size - 1), size


class Entmax15(Function):
    @staticmethod
    def forward(ctx, x, dim=0):
        ctx.dim = dim
        max_val, _ = x.max(dim=dim, keepdim=True)
        x = (x - max_val) / 2
        tau_star, _ = _tsallis_threshold_and_support(x, dim)
        y = torch.clamp(x - tau_star, min=0) ** 2
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        gppr = y.sqrt()
        dx = dy * gppr
        q = dx.sum(ctx.dim) / gppr.sum(ctx.dim)
        q = q.unsqueeze(ctx.dim)
        dx -= q * gppr
        return dx, None


class Entmax15Bug(Entmax15):
    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        gppr = y.sqrt()
        dx = dy * gppr
        q = dx.sum(ctx.dim) / gppr.sum(ctx.dim)
        q = q.unsqueeze(ctx.dim)
        dx -= q  # BUG: q * gppr
        return dx, None


# ----------------------------------------------------------------------------- tutorials and docs


class LegendrePolynomial3(Function):
    """pytorch/tutorials, beginner_source/examples_autograd/polynomial_custom_function.py."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 0.5 * (5 * x**3 - 3 * x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 1.5 * (5 * x**2 - 1)


class LegendrePolynomial3Bug(LegendrePolynomial3):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 1.5 * (5 * x**2 - 3)  # BUG: constant of P3' copied from P3


class DocsLinear(Function):
    """pytorch/pytorch, docs/source/notes/extending.rst: ``LinearFunction`` (setup_context style)."""

    @staticmethod
    def forward(x, weight, bias):
        out = x.mm(weight.t())
        if bias is not None:
            out += bias.unsqueeze(0).expand_as(out)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight, bias = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = g.mm(weight)
        if ctx.needs_input_grad[1]:
            gw = g.t().mm(x)
        if bias is not None and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


class DocsLinearBug(DocsLinear):
    @staticmethod
    def backward(ctx, g):
        x, weight, _bias = ctx.saved_tensors
        return g.mm(weight.t()), g.t().mm(x), g.sum(0)  # BUG: weight transposed (square: shapes agree)


class DocsMulConstant(Function):
    """pytorch/pytorch, docs/source/notes/extending.rst: ``MulConstant`` (a non-tensor argument)."""

    @staticmethod
    def forward(tensor, constant):
        return tensor * constant

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, constant = inputs
        ctx.constant = constant

    @staticmethod
    def backward(ctx, g):
        return g * ctx.constant, None


class DocsMulConstantBug(DocsMulConstant):
    @staticmethod
    def backward(ctx, g):
        return g, None  # BUG: the constant forgotten (as in several copies of this example online)


class DocsExp(Function):
    """pytorch/pytorch, torch/autograd/function.py: the ``Exp`` example of the Function docstring."""

    @staticmethod
    def forward(ctx, i):
        result = i.exp()
        ctx.save_for_backward(result)
        return result

    @staticmethod
    def backward(ctx, g):
        (result,) = ctx.saved_tensors
        return g * result


class DocsExpBug(DocsExp):
    @staticmethod
    def backward(ctx, g):
        (result,) = ctx.saved_tensors
        return g * result.clamp(max=2.0)  # BUG: clamped where the output exceeds 2


# -------------------------------------------------------------------------------- jeffdshen/ml-kata


class KataSoftmax(Function):
    """jeffdshen/ml-kata, kata08/sol/softmax.py."""

    @staticmethod
    def forward(ctx, x):
        x = x.exp()
        x = x / x.sum(dim=-1, keepdim=True)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        square = (z.unsqueeze(-1) @ (z.unsqueeze(-2) @ g.unsqueeze(-1))).squeeze(-1)
        return g * z - square


class KataSoftmaxBug(KataSoftmax):
    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        square = (z.unsqueeze(-1) @ (z.unsqueeze(-2) @ g.unsqueeze(-1))).squeeze(-1)
        return g * z - 0.5 * square  # BUG: half the off-diagonal term


class KataCrossEntropy(Function):
    """jeffdshen/ml-kata, kata01/sol/cross_entropy.py (integer targets, in-place scatter in backward)."""

    @staticmethod
    def forward(ctx, inputs, targets):
        x = inputs - inputs.max(dim=-1, keepdim=True)[0]
        x = torch.log(torch.exp(x).sum(dim=-1, keepdim=True)) - x
        x = torch.gather(x, -1, targets.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(inputs, targets)
        return x

    @staticmethod
    def backward(ctx, g):
        inputs, targets = ctx.saved_tensors
        x = inputs - inputs.max(dim=-1, keepdim=True)[0]
        x = torch.exp(x)
        x = x / x.sum(dim=-1, keepdim=True)
        targets = targets.unsqueeze(-1)
        x.scatter_add_(-1, targets, -torch.ones_like(targets, dtype=x.dtype))
        return g.unsqueeze(-1) * x, None


class KataCrossEntropyBug(KataCrossEntropy):
    @staticmethod
    def backward(ctx, g):
        inputs, _targets = ctx.saved_tensors
        x = inputs - inputs.max(dim=-1, keepdim=True)[0]
        x = torch.exp(x)
        x = x / x.sum(dim=-1, keepdim=True)  # BUG: the -1 at the target class is missing
        return g.unsqueeze(-1) * x, None


# ---------------------------------------------------------------------------------- gumbel sigmoid


def _gumbel(x: torch.Tensor, eps: float = 1e-20) -> torch.Tensor:
    return -torch.log(-torch.log(torch.rand_like(x) + eps) + eps)


class GumbelSigmoid(Function):
    """tosfaq/deep-object-reid, torchreid/ops/gumbel_sigmoid.py (random noise inside the forward)."""

    @staticmethod
    def forward(ctx, log_prob, t=1.0, forward_hard_map=False):
        values = log_prob + _gumbel(log_prob) - _gumbel(log_prob)
        scale = 1.0 / t
        soft_map = torch.sigmoid(scale * values)
        ctx.save_for_backward(soft_map)
        ctx.scale = scale
        if forward_hard_map:
            return (values > 0.0).to(log_prob.dtype)
        return soft_map

    @staticmethod
    def backward(ctx, g):
        (soft_map,) = ctx.saved_tensors
        return ctx.scale * soft_map * (1.0 - soft_map) * g, None, None


class GumbelSigmoidBug(GumbelSigmoid):
    @staticmethod
    def backward(ctx, g):
        (soft_map,) = ctx.saved_tensors
        return soft_map * (1.0 - soft_map) * g, None, None  # BUG: the temperature's 1/t forgotten


# -------------------------------------------------------------------------------------- the corpus


def _unary(cls: type[Function], seed: int, shape: tuple[int, ...] = (4, 5), scale: float = 1.5) -> Case:
    return cls.apply, (_leaf(*shape, seed=seed, scale=scale),), {}


def _sparse(cls: type[Function], seed: int) -> Case:
    # 2 rows of 6 logits along dim=1, spread so that several entries are in the support
    return cls.apply, (_leaf(3, 6, seed=seed, scale=0.6), 1), {}


def _linear(cls: type[Function], seed: int) -> Case:
    return cls.apply, (_leaf(4, 5, seed=seed), _leaf(5, 5, seed=seed + 1), _leaf(5, seed=seed + 2)), {}


def _mul_constant(cls: type[Function], seed: int) -> Case:
    return cls.apply, (_leaf(3, 4, seed=seed), 2.5), {}


def _cross_entropy(cls: type[Function], seed: int) -> Case:
    targets = torch.tensor([0, 3, 1, 4])
    return cls.apply, (_leaf(4, 5, seed=seed), targets), {}


def _gumbel_sigmoid(cls: type[Function], seed: int) -> Case:
    return cls.apply, (_leaf(3, 4, seed=seed), 0.5), {}


_PAIRS: dict[str, tuple[type[Function], type[Function], Callable[[type[Function], int], Case]]] = {
    "timm_swish": (TimmSwish, TimmSwishBug, _unary),
    "timm_mish": (TimmMish, TimmMishBug, _unary),
    "timm_hard_sigmoid": (TimmHardSigmoid, TimmHardSigmoidBug, _unary),
    "timm_hard_swish": (TimmHardSwish, TimmHardSwishBug, _unary),
    "timm_hard_mish": (TimmHardMish, TimmHardMishBug, _unary),
    "saved_output_swish": (SavedOutputSwish, SavedOutputSwishBug, _unary),
    "module_sigmoid_swish": (ModuleSigmoidSwish, ModuleSigmoidSwishBug, _unary),
    "jit_swish": (JitSwish, JitSwishBug, _unary),
    "module_softplus_mish": (ModuleSoftplusMish, ModuleSoftplusMishBug, _unary),
    "entmax_sparsemax": (Sparsemax, SparsemaxBug, _sparse),
    "entmax15": (Entmax15, Entmax15Bug, _sparse),
    "legendre_p3": (LegendrePolynomial3, LegendrePolynomial3Bug, _unary),
    "docs_linear": (DocsLinear, DocsLinearBug, _linear),
    "docs_mul_constant": (DocsMulConstant, DocsMulConstantBug, _mul_constant),
    "docs_exp": (DocsExp, DocsExpBug, _unary),
    "kata_softmax": (KataSoftmax, KataSoftmaxBug, _unary),
    "kata_cross_entropy": (KataCrossEntropy, KataCrossEntropyBug, _cross_entropy),
    "gumbel_sigmoid": (GumbelSigmoid, GumbelSigmoidBug, _gumbel_sigmoid),
}


def _factory(cls: type[Function], make: Callable[[type[Function], int], Case], seed: int) -> Callable[[], Case]:
    return lambda: make(cls, seed)


CORRECT: dict[str, Callable[[], Case]] = {
    name: _factory(good, make, 10 * i) for i, (name, (good, _, make)) in enumerate(_PAIRS.items())
}
BUGGY: dict[str, Callable[[], Case]] = {
    name: _factory(bad, make, 10 * i) for i, (name, (_, bad, make)) in enumerate(_PAIRS.items())
}

"""Awkward real-world models (issue 9): each correct model must pass, each buggy twin must fail.

A case is a factory returning a `Case`: the `verify_module` arguments plus what must happen. The buggy
twins plant a 2 % (or 2x) error in one backward at the same place as the awkward pattern, with
`WrongGrad` (identity forward, scaled backward) or a hand-written Function.

Provenance: the patterns are PyTorch's own modules (`nn.MultiheadAttention`, `nn.Embedding` with
`padding_idx`, `nn.GRU`/`nn.LSTM`, `torch.nn.utils.parametrizations.weight_norm`, `nn.HuberLoss`,
`nn.ELU`, `torch.special.i1e`); the LoRA layout follows microsoft/LoRA `loralib/layers.py`
(`lora_B` initialised to zero).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Case:
    model: nn.Module
    loss_fn: Any
    batch: Any
    kwargs: dict[str, Any] = field(default_factory=dict)
    expect: str = "pass"  # "pass" | "fail"


class WrongGrad(torch.autograd.Function):
    """Identity forward; the backward scales the incoming gradient by `factor` (a planted bug)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, factor):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.factor = inputs[1]

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def wrong(x: torch.Tensor, factor: float | None) -> torch.Tensor:
    return x if factor is None else WrongGrad.apply(x, factor)


# ------------------------------------------------------------------------------ models


class LayerNormFinal(nn.Module):
    """Linear -> LayerNorm, loss out.pow(2).mean(): the Linear's gradients sit at the noise floor."""

    def __init__(self, bug: float | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.bug = bug

    def forward(self, x):
        return wrong(self.ln(self.fc(x)), self.bug)


def layernorm_final(bug=None):
    torch.manual_seed(0)
    model = LayerNormFinal(bug)
    with torch.no_grad():
        model.ln.weight.uniform_(0.5, 1.5)
        model.ln.bias.uniform_(-0.5, 0.5)
    return Case(model, lambda out: out.pow(2).mean(), (torch.randn(5, 6),), expect="fail" if bug else "pass")


class NoiseFloorLayerNorm(nn.Module):
    """Linear -> tanh -> Linear (large) -> LayerNorm without affine, loss out.pow(2).mean() ~ constant.

    The loss barely depends on the parameters (only through LayerNorm's eps): every gradient sits at
    the noise floor, so the check has little power (a 19 % error could pass): the correct model is
    "not passed, nothing tested with power"; a 2x wrong backward is still over the tolerance and fails.
    """

    def __init__(self, bug: float | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8, bias=False)
        self.ln = nn.LayerNorm(8, elementwise_affine=False)
        self.bug = bug

    def forward(self, x):
        return self.ln(self.fc2(wrong(torch.tanh(self.fc1(x)), self.bug)))


def layernorm_noise_floor(bug=None):
    torch.manual_seed(0)
    model = NoiseFloorLayerNorm(bug)
    with torch.no_grad():
        model.fc2.weight.mul_(1000)
    expect = "fail" if bug else "no power"
    return Case(model, lambda out: out.pow(2).mean(), (torch.randn(5, 6),), {"mode": "full"}, expect=expect)


class MaskedAttention(nn.Module):
    def __init__(self, bug: float | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)
        self.bug = bug

    def forward(self, x, attn_mask, key_padding_mask):
        h, _ = self.attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False)
        return self.out(wrong(h, self.bug))


def attention_masks(bug=None):
    """Causal and key-padding masks as float tensors with -inf entries, both in the batch."""
    torch.manual_seed(0)
    model = MaskedAttention(bug)
    x = torch.randn(2, 5, 8)
    causal = torch.triu(torch.full((5, 5), float("-inf")), diagonal=1)
    pad = torch.zeros(2, 5)
    pad[1, 3:] = float("-inf")  # float key-padding mask (the same type as attn_mask)
    y = torch.randn(2, 5, 3)
    return Case(model, nn.MSELoss(), ((x, causal, pad), y), expect="fail" if bug else "pass")


class PaddedEmbedding(nn.Module):
    def __init__(self, bug: float | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, padding_idx=0)
        self.fc = nn.Linear(4, 2)
        self.bug = bug

    def forward(self, idx):
        return self.fc(wrong(self.emb(idx), self.bug).mean(1))


def embedding_padding_idx(bug=None):
    """nn.Embedding(padding_idx=0): torch leaves the padding row's gradient at zero by design."""
    torch.manual_seed(0)
    idx = torch.tensor([[0, 3, 5, 0], [2, 0, 1, 7]])
    return Case(PaddedEmbedding(bug), nn.MSELoss(), (idx, torch.randn(2, 2)), expect="fail" if bug else "pass")


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module], bug: float | None = None) -> None:
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)
        self.bug = bug

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(wrong(out[:, -1], self.bug))


def gru(bug=None):
    torch.manual_seed(0)
    return Case(Recurrent(nn.GRU, bug), nn.MSELoss(), (torch.randn(2, 4, 3), torch.randn(2, 2)), expect=_e(bug))


def lstm(bug=None):
    torch.manual_seed(0)
    return Case(Recurrent(nn.LSTM, bug), nn.MSELoss(), (torch.randn(2, 4, 3), torch.randn(2, 2)), expect=_e(bug))


class WeightNormed(nn.Module):
    def __init__(self, bug: float | None = None) -> None:
        super().__init__()
        self.fc = torch.nn.utils.parametrizations.weight_norm(nn.Linear(5, 4))
        self.head = nn.Linear(4, 2)
        self.bug = bug

    def forward(self, x):
        return self.head(torch.tanh(wrong(self.fc(x), self.bug)))


def weight_norm(bug=None):
    torch.manual_seed(0)
    return Case(WeightNormed(bug), nn.MSELoss(), (torch.randn(3, 5), torch.randn(3, 2)), expect=_e(bug))


class WithBuffers(nn.Module):
    """A positional-encoding buffer, a step counter buffer mutated by every forward, train-mode BatchNorm."""

    def __init__(self, bug: float | None = None) -> None:
        super().__init__()
        self.register_buffer("pos", torch.linspace(-1, 1, 6))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 2)
        self.bug = bug

    def forward(self, x):
        self.calls += 1
        h = self.bn(self.fc(x + self.pos))
        return self.head(torch.tanh(wrong(h, self.bug)))


def buffers(bug=None):
    torch.manual_seed(0)
    return Case(WithBuffers(bug).train(), nn.MSELoss(), (torch.randn(5, 6), torch.randn(5, 2)), expect=_e(bug))


class LoRALinear(nn.Module):
    """loralib-style: frozen base weight, A random, B zero, so A's gradient is exactly zero at init."""

    def __init__(self, bug: float | None = None) -> None:
        super().__init__()
        self.base = nn.Linear(6, 4)
        self.base.weight.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(2, 6) * 0.1)
        self.lora_B = nn.Parameter(torch.zeros(4, 2))
        self.bug = bug

    def forward(self, x):
        return self.base(x) + wrong(x @ self.lora_A.T @ self.lora_B.T, self.bug)


def lora_zero_init(bug=None):
    """Correct: A's gradient is 0 on both sides (warned, still passes); bug: B's gradient 2 % off."""
    torch.manual_seed(0)
    return Case(LoRALinear(bug), nn.MSELoss(), (torch.randn(3, 6), torch.randn(3, 4)), expect=_e(bug))


# --------------------------------------------------------------- C1-but-not-C2 points (B5)


class AtPoint(nn.Module):
    """A parameter whose elements sit exactly where `fn` is C1 but not C2; `bug` scales the slope there."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], values: list[float], bug: float | None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(values))
        self.fn = fn
        self.bug = bug

    def forward(self, x):
        return self.fn(wrong(self.w, self.bug)) * x


def _c1(fn, values, bug):
    torch.manual_seed(0)
    return Case(AtPoint(fn, values, bug), lambda out: out.sum(), torch.linspace(0.5, 1.5, len(values)), expect=_e(bug))


def x_abs_x(bug=None):
    """x*|x| + x at 0: slope 1, second derivative jumps from -2 to 2."""
    return _c1(lambda w: w * w.abs() + w, [0.0, 0.0, 0.3, -0.7], bug)


def elu_at_zero(bug=None):
    return _c1(lambda w: F.elu(w, alpha=1.0), [0.0, 0.0, 0.5, -0.5], bug)


def i1e_at_zero(bug=None):
    return _c1(torch.special.i1e, [0.0, 0.0, 1.0, -2.0], bug)


def huber_boundary(bug=None):
    """HuberLoss(delta=1) with residuals exactly at +-delta."""
    torch.manual_seed(0)
    model = AtPoint(lambda w: w, [1.0, -1.0, 0.25, 3.0], bug)
    return Case(model, nn.HuberLoss(delta=1.0), (torch.ones(4), torch.zeros(4)), expect=_e(bug))


# ------------------------------------------------------------- nondeterminism (C3)


class PythonNoise(nn.Module):
    """Noise from Python's `random` (1e-4 relative), outside torch's RNG; `bug` makes the backward 2x."""

    def __init__(self, bug: float | None = None, scale: float = 1e-4) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bug = bug
        self.scale = scale

    def forward(self, x):
        out = wrong(self.fc(x), self.bug)
        return out * (1 + self.scale * random.random())


def python_random_noise(bug=None):
    torch.manual_seed(0)
    return Case(PythonNoise(bug), nn.MSELoss(), (torch.randn(5, 4), torch.randn(5, 3)), expect="no power")


def python_random_noise_small(bug=None):
    """Noise 1e-13 relative: the tolerances widen but keep power; a correct model passes, a 2x bug fails."""
    torch.manual_seed(0)
    model = PythonNoise(bug, scale=1e-13)
    return Case(model, nn.MSELoss(), (torch.randn(5, 4), torch.randn(5, 3)), expect=_e(bug))


def _e(bug) -> str:
    return "fail" if bug else "pass"


# name -> (factory, bug factor for its twin)
CASES: dict[str, tuple[Callable[..., Case], float]] = {
    "layernorm_final": (layernorm_final, 1.02),
    "layernorm_noise_floor": (layernorm_noise_floor, 2.0),
    "attention_masks": (attention_masks, 1.02),
    "embedding_padding_idx": (embedding_padding_idx, 1.02),
    "gru": (gru, 1.02),
    "lstm": (lstm, 1.02),
    "weight_norm": (weight_norm, 1.02),
    "buffers": (buffers, 1.02),
    "lora_zero_init": (lora_zero_init, 1.02),
    "x_abs_x": (x_abs_x, 1.02),
    "elu_at_zero": (elu_at_zero, 1.02),
    "i1e_at_zero": (i1e_at_zero, 1.02),
    "huber_boundary": (huber_boundary, 1.02),
    "python_random_noise": (python_random_noise, 2.0),
    "python_random_noise_small": (python_random_noise_small, 2.0),
}

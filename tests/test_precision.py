"""Low precision (dtype=None), nondeterminism beyond the RNG, and the engines' agreement and fallback."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from corpus import mlp
from helpers import assert_unchanged, snapshot
from torch import nn

from torchgradcheck import InvalidArgumentError, verify_module


class _Float32Only(torch.autograd.Function):
    """A 'kernel' that only runs in float32: tanh with a hand-written backward, optionally 1 % off."""

    @staticmethod
    def forward(ctx, x, scale):
        if x.dtype != torch.float32:
            raise RuntimeError(f"kernel only supports float32, got {x.dtype}")
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y) * ctx.scale, None


class _Net(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.fc1, self.fc2, self.scale = nn.Linear(12, 16), nn.Linear(16, 3), scale

    def forward(self, x):
        return self.fc2(_Float32Only.apply(self.fc1(x), self.scale))


def _batch():
    return torch.randn(8, 12), torch.randint(0, 3, (8,))


def test_float32_only_kernel_gets_a_clear_error_naming_dtype_none():
    model, batch = _Net(1.0), _batch()
    before = snapshot(model)
    with pytest.raises(InvalidArgumentError, match=r"failed when run in torch.float64 .*pass dtype=None"):
        verify_module(model, nn.CrossEntropyLoss(), batch, mode="full")
    assert_unchanged(before, model)


def test_float32_only_kernel_correct_passes_with_dtype_none():
    model, batch = _Net(1.0), _batch()
    before = snapshot(model)
    report = verify_module(model, nn.CrossEntropyLoss(), batch, dtype=None, mode="full")
    assert report.passed, report
    assert report.options["dtype"] == "float32"
    assert_unchanged(before, model)


def test_float32_only_kernel_one_percent_wrong_fails_with_dtype_none():
    model = _Net(1.01)
    report = verify_module(model, nn.CrossEntropyLoss(), _batch(), dtype=None, mode="full")
    assert not report.passed
    assert {r.name for r in report.failures} == {"fc1.weight", "fc1.bias"}


def test_float32_noise_estimate_sets_the_tolerance_not_a_constant():
    model = _Net(1.0)
    report = verify_module(model, nn.CrossEntropyLoss(), _batch(), dtype=None, mode="full")
    sigma = report.results[0].noise
    assert 1e-9 < sigma < 1e-5  # float32 rounding of an O(1) loss: ~1e-7, measured, not assumed


class _Jittery(nn.Module):
    """A forward with a random source outside torch's RNG (like atomics in a GPU kernel)."""

    def __init__(self, jitter):
        super().__init__()
        self.fc = nn.Linear(6, 2)
        self.jitter = jitter
        self.rng = np.random.default_rng(0)

    def forward(self, x):
        return self.fc(x) + float(self.rng.normal()) * self.jitter


def test_nondeterministic_forward_is_reported_and_tolerated():
    model = _Jittery(1e-10)
    batch = (torch.randn(5, 6), torch.randn(5, 2))
    report = verify_module(model, F.mse_loss, batch, engine="loop", mode="full")
    assert report.passed, report
    assert any("nondeterministic beyond torch's RNG" in n for n in report.notes)
    assert "differ by" in str(report)


def test_nondeterministic_forward_still_fails_a_real_bug():
    model = _Jittery(1e-10)
    model.fc.weight.register_hook(lambda g: g * 1.1)
    report = verify_module(model, F.mse_loss, (torch.randn(5, 6), torch.randn(5, 2)), engine="loop", mode="full")
    assert not report.passed
    assert [r.name for r in report.failures] == ["fc.weight"]


class _ItemControlFlow(nn.Module):
    """Data-dependent control flow through .item(): vmap cannot run it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        out = self.fc(x)
        return torch.tanh(out) if out.sum().item() > -1e9 else out


def test_engine_falls_back_to_loop_and_says_why():
    model = _ItemControlFlow()
    batch = (torch.randn(5, 4), torch.randn(5, 3))
    report = verify_module(model, F.mse_loss, batch, mode="full")
    assert report.passed, report
    assert report.engine == "loop"
    assert any("vmap could not run the model" in n for n in report.notes)
    with pytest.raises(InvalidArgumentError, match="engine='vmap' is not usable here"):
        verify_module(model, F.mse_loss, batch, engine="vmap", mode="full")


@pytest.mark.parametrize("bug", [False, True])
def test_engines_give_the_same_verdict(bug):
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    if bug:
        model[0].bias.register_hook(lambda g: g * 1.001)
    batch = (torch.randn(6, 8), torch.randn(6, 2))
    loop = verify_module(model, F.mse_loss, batch, engine="loop", mode="full")
    vmap = verify_module(model, F.mse_loss, batch, engine="vmap", mode="full")
    assert vmap.engine == "vmap"
    assert loop.engine == "loop"
    assert loop.passed == vmap.passed == (not bug)
    assert [r.status for r in loop.results] == [r.status for r in vmap.results]
    for a, b in zip(loop.results, vmap.results):
        assert abs(a.worst[0].numerical - b.worst[0].numerical) <= 1e-8 * max(1.0, abs(a.worst[0].numerical))


def test_float32_model_is_checked_in_float64_by_default_and_restored():
    model, loss_fn, batch = mlp(None, sizes=(6, 7, 3))
    model.float()
    before = snapshot(model)
    report = verify_module(model, loss_fn, batch, mode="full")
    assert report.passed
    assert report.options["dtype"] == "float64"
    assert report.results[0].worst[0].tolerance < 1e-6  # float64 sharpness, not float32's
    assert_unchanged(before, model)

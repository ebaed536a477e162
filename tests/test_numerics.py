"""Each numerical claim the design rests on, proved: noise estimate, dilution, fixed atol, truncation, kinks."""

import math

import pytest
import torch
import torch.nn.functional as F
from corpus import mlp, offset_loss, one_element_wrong, tiny_gradients
from helpers import assert_unchanged, snapshot
from torch import nn

from torchgradcheck import verify_module
from torchgradcheck._compare import quartic_misfit, relative_error
from torchgradcheck._noise import noise_from_samples


def test_noise_from_samples_recovers_injected_noise():
    gen = torch.Generator().manual_seed(0)
    t = torch.arange(9, dtype=torch.float64)
    smooth = 3.0 + 0.5 * t - 0.01 * t**2  # a quadratic: its 3rd+ differences vanish
    for sigma in (1e-12, 1e-6):
        estimates = [
            noise_from_samples(smooth + sigma * torch.randn(9, generator=gen, dtype=torch.float64)) for _ in range(200)
        ]
        median = sorted(estimates)[100]
        assert sigma / 3 < median < 3 * sigma


def test_noise_from_samples_is_zero_without_noise():
    t = torch.arange(9, dtype=torch.float64)
    assert noise_from_samples(1.0 + 2.0 * t) == 0.0


def test_norm_ratio_dilutes_one_element_bug_but_element_check_catches_it():
    model, loss_fn, batch = one_element_wrong()  # 1 % error in 1 of 2,000 elements
    report = verify_module(model, loss_fn, batch, mode="full")
    bad = report.failures[0]
    assert bad.relative_error < 1e-3  # the textbook ratio would pass it at the usual 1e-3 ... 1e-2
    worst = bad.worst[0]
    assert worst.abs_error > 1000 * worst.tolerance  # while the element is far over its tolerance


def test_offset_loss_fails_fixed_atol_gradcheck_but_passes_here():
    """Cancellation noise ~1e-5 from a 1e6 offset: gradcheck's fixed atol false-alarms; the noise estimate does not."""
    model, loss_fn, batch = offset_loss()
    assert verify_module(model, loss_fn, batch, mode="full").passed
    model = model.double()
    x, y = batch[0].double(), batch[1]
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())

    def f(*ps):
        return loss_fn(torch.func.functional_call(model, dict(zip(names, ps)), (x,)), y)

    with pytest.raises(RuntimeError, match="Jacobian mismatch"):
        torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_tiny_gradients_with_ten_percent_error_hide_under_fixed_atol_but_not_here():
    model, loss_fn, batch = tiny_gradients(bug=True)
    report = verify_module(model, loss_fn, batch, mode="full")
    assert not report.passed
    bad = report.failures[0]
    assert bad.max_abs_error < 1e-5  # under gradcheck's default atol=1e-5, and under its rtol*|n| too
    assert bad.worst[0].abs_error > 1e3 * bad.worst[0].tolerance


def _sine(freq):
    class Sine(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.linspace(0.1, 1.0, 20))

        def forward(self, x):
            return torch.sin(freq * self.w * x).sum()

    return Sine()


def test_strong_curvature_is_rescued_by_second_look_not_by_loosening():
    """sin(300 w): truncation error of D(h) ~ (300h)^2/6 ~ 5e-7 relative ... Richardson fixes it."""
    model = _sine(300.0)
    report = verify_module(model, forward=lambda m, x: m(x), batch=torch.tensor(1.0), mode="full")
    assert report.passed, report
    # and a 1e-5 relative bug on the same curved loss still fails
    model.w.register_hook(lambda g: g * (1 + 1e-5))
    assert not verify_module(model, forward=lambda m, x: m(x), batch=torch.tensor(1.0), mode="full").passed


def quadratic_misfit(values: torch.Tensor) -> torch.Tensor:
    """Residual of the least-squares quadratic through five equal-spaced values: cubic and quartic parts."""
    cubic = values @ torch.tensor([-1.0, 2.0, 0.0, -2.0, 1.0], dtype=torch.float64)
    quartic = values @ torch.tensor([1.0, -4.0, 6.0, -4.0, 1.0], dtype=torch.float64)
    return torch.sqrt(cubic**2 / 10.0 + quartic**2 / 70.0)


def test_quadratic_misfit_separates_kinks_from_smooth_curves():
    x = torch.arange(-2, 3, dtype=torch.float64)
    h = 1e-5
    smooth = torch.exp(3 * x * h)[None]
    kink = (x * h).clamp(min=0)[None]
    assert quadratic_misfit(smooth).item() < 1e-13
    assert quadratic_misfit(kink).item() == pytest.approx(2 * h / math.sqrt(70), rel=1e-9)  # all quartic
    # a strongly curved smooth loss misfits a quadratic (its cubic part), but not a cubic: no kink
    curved = torch.sin(300 * (0.5 + x * 6e-6))[None]
    assert quadratic_misfit(curved).item() > 1e-10
    assert quartic_misfit(curved).item() < 1e-2 * quadratic_misfit(curved).item()
    assert quartic_misfit(kink).item() == pytest.approx(2 * h / math.sqrt(70), rel=1e-9)


def test_relative_error_is_the_seed_metric():
    a = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert relative_error(a, a) == 0.0
    assert relative_error(a, -a) == pytest.approx(1.0)
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0


def _relu_net_with_exact_zero_preactivation(act):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), act, nn.Linear(8, 2))
    x = torch.randn(6, 4)
    with torch.no_grad():
        x[0] = torch.tensor([1.0, 0.5, -0.25, 2.0])
        model[0].weight[0] = torch.tensor([0.5, -1.0, 2.0, 0.25])  # w . x0 = 0 exactly
        model[0].bias[0] = 0.0
    return model, F.mse_loss, (x, torch.randn(6, 2))


def test_relu_at_exact_zero_passes_and_lists_the_kink_elements():
    model, loss_fn, batch = _relu_net_with_exact_zero_preactivation(nn.ReLU())
    before = snapshot(model)
    report = verify_module(model, loss_fn, batch, mode="full")
    assert report.passed, report
    w = next(r for r in report.results if r.name == "0.weight")
    assert set(w.not_differentiable) == {(0, 0), (0, 1), (0, 2), (0, 3)}
    assert next(r for r in report.results if r.name == "0.bias").not_differentiable == ((0,),)
    assert "not differentiable here" in str(report)
    assert_unchanged(before, model)


class _LeakySlope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x > 0) * 0.9  # wrong slope


class _BadReLU(nn.Module):
    def forward(self, x):
        return _LeakySlope.apply(x)


def test_relu_like_function_with_wrong_slope_still_fails_at_kinks():
    model, loss_fn, batch = _relu_net_with_exact_zero_preactivation(_BadReLU())
    report = verify_module(model, loss_fn, batch, mode="full")
    assert not report.passed
    assert {r.name for r in report.failures} == {"0.weight", "0.bias"}


class _Pool(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 1.0, 0.5, 0.2, 3.0, 2.0]))

    def forward(self, x):
        return F.max_pool1d((self.w * x).view(1, 1, 6), 2).sum()


def test_max_pool_ties_are_excluded_not_failed():
    report = verify_module(_Pool(), lambda out: out, torch.ones(6), mode="full")
    assert report.passed, report
    (r,) = report.results
    assert r.not_differentiable == ((0,), (1,))  # the tied window; the other windows are checked
    assert r.status == "ok"
    assert r.checked == 4


def test_mostly_kinks_is_inconclusive_and_says_so():
    class ReLUAtZero(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(10))

        def forward(self, x):
            return (torch.relu(self.w) * x).sum()  # numerical 0.5 * x, autograd 0: all ten at the kink

    report = verify_module(ReLUAtZero(), lambda out: out, torch.ones(10), mode="full")
    (r,) = report.results
    assert r.status == "inconclusive"
    assert r.passed  # never a failure (the rule), but never an "ok" either ...
    assert not report.passed  # ... and with nothing else checked, no verdict: nothing was tested (issue 9, C3)
    assert "nothing was tested with power" in report.headline()
    assert r.excluded == 10
    assert "too few left to judge" in str(report)


def test_abs_at_zero_is_no_false_alarm():
    class AbsAtZero(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return (self.w.abs() * x).sum()

    report = verify_module(AbsAtZero(), lambda out: out, torch.ones(3), mode="full")
    (r,) = report.results
    assert r.status == "zero"  # both sides 0 by symmetry: no failure ...
    assert r.failed == 0
    assert not report.passed  # ... but nothing was tested either (issue 9, C3)


def test_one_element_error_in_ten_thousand_is_caught_with_default_options():
    model, loss_fn, batch = mlp(None, sizes=(100, 100, 10))

    def hook(g):
        g = g.clone()
        g[42, 17] *= 1.01
        return g

    model[0].weight.register_hook(hook)
    report = verify_module(model, loss_fn, batch)
    assert [r.name for r in report.failures] == ["0.weight"]
    assert report.failures[0].worst[0].index == (42, 17)

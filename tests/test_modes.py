"""Modes: directional probes, sampled elements, the auto plan; every verdict with the state unchanged."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_unchanged, snapshot
from torch import nn

from torchgradcheck import verify_module


def _mlp(width=64):
    model = nn.Sequential(nn.Linear(32, width), nn.Tanh(), nn.Linear(width, 10))
    return model, nn.CrossEntropyLoss(), (torch.randn(16, 32), torch.randint(0, 10, (16,)))


def _plant(param, index, factor):
    """A tensor hook that scales one element of the gradient: a one-element bug autograd writes to .grad."""

    def hook(g):
        g = g.clone()
        g[index] *= factor
        return g

    return param.register_hook(hook)


@pytest.mark.parametrize("mode", ["auto", "full", "directional", "sampled"])
def test_verify_module_passes_correct_model_in_every_mode(mode):
    model, loss_fn, batch = _mlp()
    before = snapshot(model)
    report = verify_module(model, loss_fn, batch, mode=mode)
    assert report.passed, report
    assert report.options["mode"] == mode
    assert_unchanged(before, model)


@pytest.mark.parametrize("mode", ["directional", "full"])
def test_directional_finds_and_names_one_wrong_element(mode):
    model, loss_fn, batch = _mlp()
    _plant(model[0].weight, (3, 7), 1.01)
    before = snapshot(model)
    report = verify_module(model, loss_fn, batch, mode=mode)
    assert not report.passed
    (bad,) = report.failures
    assert bad.name == "0.weight"
    assert bad.worst[0].index == (3, 7), report  # narrowed down to the element, not just the tensor
    assert bad.failed == 1
    assert_unchanged(before, model)


def test_directional_cost_does_not_grow_with_tensor_size():
    small, big = _mlp(16), _mlp(512)
    r_small = verify_module(*small, mode="directional")
    r_big = verify_module(*big, mode="directional")
    assert r_small.passed
    assert r_big.passed
    assert r_big.evaluations == r_small.evaluations  # 18 noise + 32 probe evaluations per tensor, any size


def test_sampled_always_includes_the_largest_gradient():
    model, loss_fn, batch = _mlp()
    model.zero_grad()
    loss_fn(model(batch[0]), batch[1]).backward()
    g = model[0].weight.grad
    index = tuple(int(i) for i in torch.unravel_index(g.abs().argmax(), g.shape))
    model.zero_grad(set_to_none=True)
    _plant(model[0].weight, index, 1.001)
    report = verify_module(model, loss_fn, batch, mode="sampled")
    assert not report.passed
    assert report.failures[0].worst[0].index == index
    assert "32 elems" in report.failures[0].coverage


def test_auto_covers_every_tensor_and_states_coverage():
    model, loss_fn, batch = _mlp(256)
    report = verify_module(model, loss_fn, batch, mode="auto", budget=1e-6)  # nothing fits: cheap everywhere
    assert report.passed, report
    big = {r.name: r.coverage for r in report.results}
    assert big["0.weight"] == "16 dirs + 32 elems / 8,192"
    assert big["2.bias"] == "full"  # 10 elements: cheaper in full than sampled
    assert all(r.coverage for r in report.results)


def test_auto_with_ample_budget_is_full():
    report = verify_module(*_mlp(8), budget=1e6)
    assert {r.coverage for r in report.results} == {"full"}


def test_auto_catches_uniform_small_relative_error_in_cheap_mode():
    """A 1e-5 relative error everywhere (a rounded constant) is caught by directions and samples alike."""
    model, loss_fn, batch = _mlp(128)
    model[0].weight.register_hook(lambda g: g * (1 + 1e-5))
    report = verify_module(model, loss_fn, batch, budget=1e-6)
    assert not report.passed
    assert [r.name for r in report.failures] == ["0.weight"]


def test_directional_failure_without_a_single_element_to_blame_still_fails():
    """Errors spread thinly over many elements: each within its element tolerance, the direction sees them all."""
    model, loss_fn, batch = _mlp(128)
    noise = torch.randn(128, 32) * 1e-7

    def spread(g):
        return g + noise * g.abs().max()

    model[0].weight.register_hook(spread)
    report = verify_module(model, loss_fn, batch, mode="directional")
    assert not report.passed, report
    assert "random directions disagree" in report.failures[0].note or report.failures[0].failed


def test_mode_is_validated():
    model, loss_fn, batch = _mlp(4)
    with pytest.raises(ValueError, match=r"unknown mode='fast'; valid options are \['auto', 'full', 'directional'"):
        verify_module(model, loss_fn, batch, mode="fast")
    with pytest.raises(ValueError, match="budget=0 must be a number of seconds > 0"):
        verify_module(model, loss_fn, batch, budget=0)


def test_cheap_modes_agree_with_full_on_verdict_for_cut_off_parameter():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(40, 40)
            self.b = nn.Linear(40, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)).detach())

    model = M()
    batch = (torch.randn(5, 40), torch.randn(5, 2))
    for mode in ("full", "directional", "sampled", "auto"):
        report = verify_module(model, F.mse_loss, batch, mode=mode, budget=1e-6)
        assert {r.name: r.status for r in report.failures} == {"a.weight": "no gradient", "a.bias": "no gradient"}, mode

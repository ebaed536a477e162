"""Unit tests of three decisions that the end-to-end tests only reach through timing or ranks:
the auto plan (`_modes.plan`), the bisection of a failed probe (`_directional.narrow`), and the
placement resolution of a distributed check (`distributed._placement.resolve_placement`)."""

from __future__ import annotations

import pytest
import torch

from torchgradcheck import InvalidArgumentError, InvalidArgumentTypeError
from torchgradcheck._directional import LEAF_SIZE, narrow
from torchgradcheck._measure import Settings
from torchgradcheck._modes import DIRECTIONS, SAMPLED, TensorJob, plan
from torchgradcheck._params import Target


def _job(name: str, numel: int, seconds_per_eval: float) -> TensorJob:
    t = torch.zeros(numel, dtype=torch.float64)
    return TensorJob(Target(name, t), torch.zeros(numel, dtype=torch.float64), True, seconds_per_eval=seconds_per_eval)


# --------------------------------------------------------------------------------------------- plan


@pytest.mark.parametrize("mode", ["full", "directional", "sampled"])
def test_plan_fixed_mode_applies_to_every_tensor(mode):
    jobs = [_job("a", 10, 1.0), _job("b", 10_000, 1.0)]
    plan(jobs, mode, budget=1e-9)
    assert [j.mode for j in jobs] == [mode, mode]


def test_plan_auto_small_tensors_are_always_full_even_without_budget():
    jobs = [_job("tiny", SAMPLED, 1.0), _job("big", SAMPLED + 1, 1.0)]
    plan(jobs, "auto", budget=1e-9)
    assert [j.mode for j in jobs] == ["full", "cheap"]


def test_plan_auto_upgrades_the_cheapest_full_checks_that_fit_the_budget():
    # extra cost of going full: 2*numel - cheap(= 2*SAMPLED + 2*DIRECTIONS) evaluations
    cheap = 2 * SAMPLED + 2 * DIRECTIONS
    a, b, c = _job("a", 100, 1.0), _job("b", 1_000, 1.0), _job("c", 300, 1.0)
    spent = 3 * cheap
    budget = spent + (200 - cheap) + (600 - cheap) + 1  # room for a and c, not for b as well
    plan([a, b, c], "auto", budget=budget)
    assert (a.mode, b.mode, c.mode) == ("full", "cheap", "full")
    plan([a, b, c], "auto", budget=budget - 2)  # one second less: only the cheapest (a) fits
    assert (a.mode, b.mode, c.mode) == ("full", "cheap", "cheap")


def test_plan_auto_prices_with_the_measured_seconds_per_evaluation():
    slow, fast = _job("slow", 1_000, 1.0), _job("fast", 1_000, 1e-6)
    # the cheap checks are paid first (about 96 s for "slow"); then full fits for "fast" only
    plan([slow, fast], "auto", budget=200.0)
    assert (slow.mode, fast.mode) == ("cheap", "full")


# ------------------------------------------------------------------------------------------- narrow


class _Quadratic:
    """A stand-in engine: L(t) = 0.5 * sum(c * t^2), evaluated along rows of perturbations."""

    name = "quadratic"

    def __init__(self, c: torch.Tensor) -> None:
        self.c = c
        self.evaluations = 0

    def losses_along(self, target: Target, deltas: torch.Tensor) -> torch.Tensor:
        points = target.flat.to(torch.float64) + deltas
        self.evaluations += len(deltas)
        return 0.5 * (self.c * points**2).sum(dim=1)


@pytest.mark.parametrize("wrong", [0, 777, 4095])
def test_narrow_finds_the_one_wrong_element_among_suspects_of_leaf_size(wrong):
    n = 4096
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(n, generator=gen, dtype=torch.float64)
    c = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    target = Target("w", t.clone())
    engine = _Quadratic(c)
    analytical = c * t
    analytical[wrong] *= 1.01
    loss0 = 0.5 * (c * t**2).sum()
    settings = Settings(eps=6e-6, rtol=1e-6, atol=0.0)
    suspects = narrow(engine, target, analytical, loss0, 1e-16, settings, torch.Generator().manual_seed(1))
    assert wrong in suspects.tolist()
    assert len(suspects) <= LEAF_SIZE
    # bisection: about 2 probes x 2 directions x 2 evaluations per level, far fewer than 2n
    assert engine.evaluations < 2 * 2 * 2 * 2 * 12


def test_narrow_returns_nothing_for_a_correct_gradient():
    n = 512
    t = torch.linspace(-1, 1, n, dtype=torch.float64)
    c = torch.full((n,), 2.0, dtype=torch.float64)
    settings = Settings(eps=6e-6, rtol=1e-6, atol=0.0)
    suspects = narrow(
        _Quadratic(c), Target("w", t.clone()), c * t, 0.5 * (c * t**2).sum(), 1e-16, settings, torch.Generator()
    )
    assert suspects.numel() == 0


# --------------------------------------------------------------------------------- resolve_placement


def test_placement_default_is_replicated_and_exact_names_win_over_globs():
    from torchgradcheck.distributed._placement import resolve_placement

    names = ["fc1.weight", "fc1.bias", "fc2.weight", "batch[0]", "batch0"]
    assert resolve_placement(None, names) == dict.fromkeys(names, "replicated")
    where = resolve_placement({"fc1.*": "sharded", "batch[0]": "sharded"}, names)
    assert where == {
        "fc1.weight": "sharded",
        "fc1.bias": "sharded",
        "fc2.weight": "replicated",
        "batch[0]": "sharded",  # the exact name, not the glob "batch0"
        "batch0": "replicated",
    }
    # later keys win where patterns overlap
    assert resolve_placement({"fc1.*": "sharded", "fc1.bias": "replicated"}, names)["fc1.bias"] == "replicated"


def test_placement_errors_name_the_key_and_the_fix():
    from torchgradcheck.distributed._placement import resolve_placement

    names = ["fc1.weight"]
    with pytest.raises(InvalidArgumentError, match=r"placement\['fc1.weight'\]='split' is not a placement"):
        resolve_placement({"fc1.weight": "split"}, names)
    with pytest.raises(InvalidArgumentError, match=r"placement key 'fc9\.\*' matches no parameter or input"):
        resolve_placement({"fc9.*": "sharded"}, names)
    with pytest.raises(InvalidArgumentTypeError, match="placement= must be a dict"):
        resolve_placement(["fc1.weight"], names)

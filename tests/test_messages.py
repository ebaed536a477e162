"""The wording of what a user reads: one ``pytest.raises(..., match=...)`` per line of a failure report.

A failure report is a message: what happened (headline), the evidence (table, worst elements, notes),
how it was checked, and the likely causes. Change these tests only with a reason to change the wording.
"""

from __future__ import annotations

import random

import pytest
import torch
from corpus import HandLinear
from helpers import assert_unchanged, snapshot
from torch import nn

from torchgradcheck import GradientMismatchError, _engines, verify_module


def _one_percent_off_at_3_7(gx, gw, gb):
    gw = gw.clone()
    gw[3, 7] *= 1.01
    return gx, gw, gb


class Cut(nn.Module):
    """``fc`` is wrong at [3, 7]; ``side`` is cut off by a .detach(); ``spare`` is never used."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = HandLinear(8, 4, _one_percent_off_at_3_7)
        self.side = nn.Linear(8, 4)
        self.spare = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return self.fc(x) + self.side(x).detach()


@pytest.fixture(scope="module")
def failure():
    model = Cut()
    gen = torch.Generator().manual_seed(3)
    batch = (torch.randn(5, 8, generator=gen), torch.randn(5, 4, generator=gen))
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), batch, engine="loop", localise=False, mode="full")
    assert_unchanged(before, model)
    return report


@pytest.mark.parametrize(
    "line",
    [
        # headline: what happened
        r"^verify_module: FAILED, gradients disagree for 3 of 5 tensors \(relative error \d\.\d\de-\d\d\)$",
        # the table: one row per tensor
        r"^  tensor +shape +status +coverage +rel\.err +max\|a-n\| +worst element +numerical +autograd +tol$",
        r"^  fc\.weight +\(4, 8\) +mismatch \(1/32\) +full +\S+ +\S+ +\[3, 7\] +\S+ +\S+ +\S+$",
        r"^  fc\.bias +\(4\) +ok +full ",
        r"^  side\.weight +\(4, 8\) +no gradient \(32/32\) +full ",
        r"^  spare +\(2\) +unused +full ",
        # the evidence: worst elements named like fc.weight[3, 7], with both values and the tolerance
        r"^  fc\.weight: 1 element\(s\) over tolerance; worst:$",
        r"^    fc\.weight\[3, 7\]: numerical -?\d\.\d+, autograd -?\d\.\d+, "
        r"\|diff\| \d\.\d\de-\d\d > tol \d\.\d\de-\d\d$",
        r"^  side\.weight: 32 element\(s\) over tolerance; worst:$",
        r"^  side\.weight: \.grad is None after backward, but the loss depends on this tensor: something cuts it off "
        r"\(\.detach\(\), torch\.no_grad\(\), \.data\)$",
        r"^  spare: \.grad is None after backward and the loss does not depend on it$",
        # how it was checked
        r"^Checked with: dtype=float64 device=cpu eps=6e-06 rtol=1e-06 atol=0\.0 seed=0 .*engine=loop; "
        r"[\d,]+ evaluations in \d+\.\d\d s$",
        # the likely causes
        r"^This usually means one of:$",
        r"^  1\. a custom autograd\.Function or hand-written backward returns a wrong gradient;$",
        r"^  2\. a \.detach\(\), torch\.no_grad\(\) or \.data cuts a parameter off from the loss "
        r"\(status \"no gradient\"\);$",
        r"^  3\. the loss is computed differently with and without autograd \(e\.g\. branches on requires_grad\)\.$",
        r"^Elements at kinks \(relu/abs/max at 0\) are listed as \"not differentiable here\", never as failures\.$",
    ],
)
def test_message_failure_report_line(failure, line):
    with pytest.raises(GradientMismatchError, match="(?m)" + line):
        failure.assert_passed()


def test_message_failure_report_has_no_dumped_tensors(failure):
    with pytest.raises(GradientMismatchError) as info:
        failure.assert_passed()
    text = str(info.value)
    assert "tensor(" not in text
    assert "grad_fn" not in text
    assert "input 0" not in text
    assert "output 0" not in text


def test_message_kink_is_reported_not_failed():
    class Kinked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.0, 1.0, -0.5]))

        def forward(self, x):
            return torch.relu(self.w) * x

    model = Kinked()
    batch = torch.tensor([1.0, 2.0, 3.0])
    before = snapshot(model)
    report = verify_module(model, lambda out: out.sum(), batch, mode="full")
    assert_unchanged(before, model)
    assert report.passed, str(report)
    text = str(report)
    assert "  w: 1 element(s) not differentiable here (excluded): w[0]\n" in text
    assert text.startswith("verify_module: OK, 1 tensor (2 elements) agree (relative error ")
    assert "This usually means" not in text


def test_message_nondeterministic_forward_is_noted():
    rng = random.Random(0)  # a random source torch's RNG does not control
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    batch = torch.randn(2, 3)
    before = snapshot(model)
    report = verify_module(model, lambda out: out.sum() + 1e-9 * rng.random(), batch, mode="full")
    assert_unchanged(before, model)
    assert report.passed, str(report)
    notes = [n for n in report.notes if "nondeterministic" in n]
    assert len(notes) == 1
    assert notes[0].startswith(
        "the forward is nondeterministic beyond torch's RNG: two identical evaluations differ by "
    )
    assert notes[0].endswith("; tolerances widened by this noise")
    assert f"  note: {notes[0]}" in str(report)


def test_message_vmap_fallback_is_noted(monkeypatch):
    monkeypatch.setattr(_engines, "dynamo_imported", lambda: False)  # a small plan: the cone is not tried
    model = nn.Sequential(HandLinear(3, 2), nn.Tanh())
    batch = torch.randn(4, 3)
    report = verify_module(model, lambda out: out.sum(), batch, engine="auto", mode="full")
    assert report.passed, str(report)
    assert report.engine == "loop"
    assert any(n.startswith("engine: loop, because vmap could not run the model (RuntimeError: ") for n in report.notes)


def test_the_cone_engine_takes_over_from_the_loop_where_vmap_cannot_run_the_model(monkeypatch):
    """An old-style autograd.Function has no vmap rule, but its forward is one graph of aten ops."""
    monkeypatch.setattr(_engines, "dynamo_imported", lambda: True)  # as if make_fx's import were paid for
    torch.manual_seed(0)
    model = nn.Sequential(HandLinear(3, 2), nn.Tanh())
    batch = torch.randn(4, 3)
    report = verify_module(model, lambda out: out.sum(), batch, engine="auto", mode="full")
    assert report.passed, str(report)
    assert report.engine == "cone"
    assert any(n.startswith("engine: loop, because vmap could not run the model (RuntimeError: ") for n in report.notes)

    def one_element(gx, gw, gb):  # 1 % on weight[1, 2] of the hand-written backward
        gw = gw.clone()
        gw[1, 2] *= 1.01
        return gx, gw, gb

    buggy = nn.Sequential(HandLinear(3, 2, bug=one_element), nn.Tanh())
    buggy.load_state_dict(model.state_dict())
    caught = verify_module(buggy, lambda out: out.sum(), batch, engine="auto", mode="full")
    assert caught.engine == "cone"
    assert [r.name for r in caught.failures] == ["0.weight"], str(caught)
    assert caught.failures[0].worst[0].index == (1, 2)


def test_message_engine_vmap_refuses_with_the_fix():
    model = nn.Sequential(HandLinear(3, 2), nn.Tanh())
    batch = torch.randn(4, 3)
    before = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"^verify_module\(model, loss_fn, batch\): engine='vmap' is not usable here: "
        r"vmap could not run the model .*; use engine='auto'\.$",
    ):
        verify_module(model, lambda out: out.sum(), batch, engine="vmap", mode="full")
    assert_unchanged(before, model)


@pytest.mark.slow
def test_message_default_failure_names_the_first_wrong_backward():
    """With default options a failure also checks each submodule alone and names the wrong one."""
    model = Cut()
    gen = torch.Generator().manual_seed(3)
    batch = (torch.randn(5, 8, generator=gen), torch.randn(5, 4, generator=gen))
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), batch, mode="full")
    assert_unchanged(before, model)
    with pytest.raises(
        GradientMismatchError,
        match=r"(?m)^first wrong backward: fc \(HandLinear\): gradient of weight disagrees "
        r"\(relative error \d\.\d\de-\d\d\); ",
    ):
        report.assert_passed()

"""The cone engine: the same numbers as the vmap engine (up to rounding), the same verdicts, refusals with a reason."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from corpus import BUGS, CORRECT, HandLinear
from deep_corpus import DEEP
from helpers import assert_unchanged, snapshot
from torch import nn

from torchgradcheck import InvalidArgumentError, _engines, verify_module
from torchgradcheck._batch import Objective, convert_batch
from torchgradcheck._cone import ConeEngine, ConeUnavailableError
from torchgradcheck._engines import LoopEngine, VmapEngine
from torchgradcheck._params import Target, lend_model
from torchgradcheck._state import preserved_global_state

# vmap over an eval-mode TransformerEncoderLayer under no_grad takes torch's fused fast path, which has
# no batching rule: torch warns (the reference engine's business, not the cone's).
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented")

# Corpus cases the cone engine must refuse, and the words of the reason.
REFUSED = {
    "dropout_train": "random",
    "batchnorm_train": "side effect",
    "conv_net": "side effect",  # train-mode BatchNorm
    "deep_dropout_buggy_activation": "random",
    "deep_dropout_correct": "random",
}


class _MatmulModel(nn.Module):
    """A raw parameter used by ``x @ W`` (the matmul low-rank start), then a Linear after a GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 5) / 3)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(F.gelu(x @ self.w))


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x)))


def _cnn():
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(inplace=True),
        nn.Conv2d(6, 8, 3, groups=2, dilation=2, bias=False),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 4),
    ).eval()
    return model, F.cross_entropy, (torch.randn(3, 3, 9, 9), torch.randint(0, 4, (3,)))


def _transformer():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.1, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    return model, F.mse_loss, (torch.randn(2, 5, 8), torch.randn(2, 5, 8))


def _matmul():
    return _MatmulModel(), F.cross_entropy, (torch.randn(7, 6), torch.randint(0, 3, (7,)))


def _tied():
    return _Tied(), F.mse_loss, (torch.randn(5, 4), torch.randn(5, 4))


MORE = {"cnn_eval": _cnn, "transformer_eval": _transformer, "matmul": _matmul, "tied": _tied}


@pytest.mark.parametrize("case", sorted(MORE))
def test_cone_losses_equal_vmap_losses_up_to_rounding(case):
    """Every element of every tensor, moved both ways, and dense moves: cone and vmap agree to rounding."""
    torch.manual_seed(0)
    model, loss_fn, batch = MORE[case]()
    if isinstance(model, nn.Sequential):  # a weight with no low-rank start: the generic path, many chunks
        model.append(nn.LayerNorm(model[-1].out_features))
    before = snapshot(model)
    with preserved_global_state(), lend_model(model, torch.float64) as lent:
        objective = Objective(loss_fn, convert_batch(batch, torch.float64), None)
        # The eval fast path (aten::_transformer_encoder_layer_fwd) has no vmap batching rule, and vmap
        # runs without its per-example fallback (see `_engines.without_vmap_fallback`): the loop is the
        # reference there.
        reference = LoopEngine if case == "transformer_eval" else VmapEngine
        cone, vmap = ConeEngine(lent, objective, 0, max_chunk=7), reference(lent, objective, 0)  # many chunks
        loss = abs(float(cone.cached_loss))
        for name, p in model.named_parameters():
            target = Target(name, p.data, param=p)
            index = torch.arange(p.numel())
            for step in (1e-3, -1e-3):
                values = target.flat + step
                a, b = cone.losses(target, index, values), vmap.losses(target, index, values)
                assert torch.allclose(a, b, rtol=0, atol=64 * 2**-53 * max(1.0, loss)), (name, (a - b).abs().max())
            deltas = torch.randn(3, p.numel(), generator=torch.Generator().manual_seed(1)) * 1e-3
            a, b = cone.losses_along(target, deltas), vmap.losses_along(target, deltas)
            assert torch.allclose(a, b, rtol=0, atol=64 * 2**-53 * max(1.0, loss)), name
    assert_unchanged(before, model)


def test_cone_uses_low_rank_starts_where_the_first_consumer_is_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.LayerNorm(3))
    with lend_model(model, torch.float64) as lent:
        objective = Objective(F.mse_loss, convert_batch((torch.randn(5, 4), torch.randn(5, 3)), torch.float64), None)
        cone = ConeEngine(lent, objective, 0)
        plans = {n: cone._plan(Target(n, p.data, param=p)).update for n, p in model.named_parameters()}
    # the first Linear: a rank-1 step through tanh into the second Linear's output
    assert plans["0.weight"] is not None
    assert plans["0.weight"].node.name == "linear_1"
    assert plans["2.weight"] is not None
    assert plans["2.weight"].node.name == "linear_1"
    assert plans["3.weight"] is None  # layer_norm is not linear in its weight's consumer output: plain cone


def test_the_start_through_tanh_into_a_third_linear_equals_vmap_near_and_falls_back_far():
    """Rows near the point: the third Linear's output from the per-column sums (no tanh, no matmul);
    rows too far for the cubic of tanh: the rank-1 start at the second Linear. Both equal vmap."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)
    )
    batch = (torch.randn(9, 5), torch.randint(0, 3, (9,)))
    with preserved_global_state(), lend_model(model, torch.float64) as lent:
        objective = Objective(F.cross_entropy, convert_batch(batch, torch.float64), None)
        cone, vmap = ConeEngine(lent, objective, 0, max_chunk=7), VmapEngine(lent, objective, 0)
        starts = {}
        for name, p in model.named_parameters():
            update = cone._plan(Target(name, p.data, param=p)).update
            starts[name] = [update.node.name, update.fallback.node.name if update.fallback else None]
            built = []
            near = update.build
            update.build = lambda i, d, pool, near=near, built=built: built.append(r := near(i, d, pool)) or r
            target = Target(name, p.data, param=p)
            index = torch.arange(p.numel())
            for step, is_near in ((1e-7, True), (-1e-7, True), (1e-2, False)):
                built.clear()
                values = target.flat + step
                a, b = cone.losses(target, index, values), vmap.losses(target, index, values)
                atol = 64 * 2**-53 * max(1.0, abs(float(cone.cached_loss)))
                torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=f"{name} step {step}")
                if update.fallback is not None:
                    assert all((r is not None) == is_near for r in built), (name, step)
            update.build = near
    assert starts["0.weight"] == ["linear_2", "linear_1"]  # through tanh into the third Linear
    assert starts["2.weight"] == ["linear_3", "linear_2"]
    assert starts["4.weight"] == ["linear_3", None]  # the last Linear: one rank-1 step, nothing after it
    assert starts["6.weight"] == ["linear_3", None]


_CASES = sorted(BUGS) + sorted(CORRECT) + sorted(MORE) + [pytest.param(c, marks=pytest.mark.slow) for c in sorted(DEEP)]


@pytest.mark.parametrize("case", _CASES)
def test_cone_gives_the_vmap_verdicts_and_errors_on_the_corpus(case, monkeypatch):
    """Full checks with engine="cone" and engine="vmap": same verdict, same statuses, errors within noise."""
    monkeypatch.setattr(_engines, "CONE_MIN_EVALUATIONS", 0)  # auto tries the cone whatever the plan
    factory = {**BUGS, **CORRECT, **DEEP, **MORE}[case]
    torch.manual_seed(0)
    model, loss_fn, batch = factory()[:3]
    before = snapshot(model)
    if case in REFUSED:
        auto = verify_module(model, loss_fn, batch, engine="auto", mode="directional", localise=False)
        with pytest.raises(InvalidArgumentError, match=f"engine='cone' is not usable here: .*{REFUSED[case]}"):
            verify_module(model, loss_fn, batch, engine="cone", mode="full", localise=False)
        assert auto.engine != "cone"
        if auto.engine == "vmap":  # auto tries the cone only where vmap runs; the reason is in the report
            assert any("engine: vmap, because the cone engine can't honour this model" in n for n in auto.notes)
        assert_unchanged(before, model)
        return
    cone = verify_module(model, loss_fn, batch, engine="cone", mode="full", localise=False)
    try:  # the reference: vmap where it runs, else the loop (old-style custom Functions)
        plain = verify_module(model, loss_fn, batch, engine="vmap", mode="full", localise=False)
    except InvalidArgumentError:
        plain = verify_module(model, loss_fn, batch, engine="loop", mode="full", localise=False)
    assert_unchanged(before, model)
    assert cone.engine == "cone"
    assert cone.passed == plain.passed, (cone, plain)
    assert cone.passed == (case in CORRECT or case in MORE or DEEP.get(case, lambda: (0, 0, 0, 1))()[3] is None)
    assert [r.status for r in cone.results] == [r.status for r in plain.results]
    for c, p in zip(cone.results, plain.results):
        if c.errors is None or p.errors is None:
            continue
        tol = np.maximum(c.errors.tolerance, p.errors.tolerance)
        judged = ~(c.errors.excluded | p.errors.excluded)
        gap = np.abs(c.errors.abs_error - p.errors.abs_error)[judged]
        assert bool((gap <= 0.5 * tol[judged] + 1e-30).all()), (case, c.name, float(gap.max()))
        assert math.isclose(c.noise, p.noise, rel_tol=0.9) or max(c.noise, p.noise) < 1e-12, (c.noise, p.noise)


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x)
        return h * 2 if h.sum() > 0 else h


class _Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


class _WritesParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        self.fc.bias.data.mul_(1.0)
        return self.fc(x)


@pytest.mark.parametrize(
    ("model", "words"),
    [
        (_DataDependent(), "could not be captured"),
        (_Counter(), "calls"),
        (nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).train(), "random"),
        (nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).train(), "side effect"),
    ],
    ids=["data-dependent", "buffer-counter", "dropout", "batchnorm-train"],
)
def test_cone_refuses_what_a_cached_graph_cannot_reproduce(model, words):
    batch = (torch.randn(5, 4), torch.randn(5, 3))
    before = snapshot(model)
    with preserved_global_state(), lend_model(model, torch.float64) as lent:
        objective = Objective(F.mse_loss, convert_batch(batch, torch.float64), None)
        with pytest.raises(ConeUnavailableError, match=words):
            ConeEngine(lent, objective, 0)
    assert_unchanged(before, model)
    with pytest.raises(InvalidArgumentError, match=r"engine='cone' is not usable here: .*; use engine='auto'\.$"):
        verify_module(model, F.mse_loss, batch, engine="cone")
    assert_unchanged(before, model)
    report = verify_module(model, F.mse_loss, batch, mode="full", localise=False)
    assert report.passed, report
    assert report.engine in ("vmap", "loop")
    assert_unchanged(before, model)


class _ThroughData(nn.Module):
    """``weight.data`` in the forward: a gradient that autograd drops. make_fx records that value as a
    constant, so a cached graph would drop it from the finite differences as well and pass the bug."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return torch.tanh(x @ self.lin.weight.data.T + self.lin(x))


def test_cone_refuses_a_graph_that_is_right_only_at_the_point(monkeypatch):
    monkeypatch.setattr(_engines, "dynamo_imported", lambda: True)  # auto tries the cone whatever the plan
    torch.manual_seed(0)
    model, batch = _ThroughData(), torch.randn(4, 3)
    before = snapshot(model)
    with pytest.raises(InvalidArgumentError, match="gave a different loss at a moved point"):
        verify_module(model, lambda out: out.pow(2).sum(), batch, engine="cone")
    assert_unchanged(before, model)
    report = verify_module(model, lambda out: out.pow(2).sum(), batch, mode="full", localise=False)
    assert report.engine == "loop"
    assert any("the cone engine gave a different loss at a moved point" in n for n in report.notes)
    assert {r.name: r.status for r in report.results} == {"lin.weight": "mismatch", "lin.bias": "ok"}
    worst = report.failures[0].worst[0]
    assert worst.numerical == pytest.approx(2 * worst.analytical, rel=1e-6)  # the .data path counts twice
    assert_unchanged(before, model)


def test_cone_refuses_a_loss_that_differentiates_inside():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1))

    def residual(model, x):  # u'(x) = cos(x): the loss calls torch.autograd.grad
        x = x.clone().requires_grad_(True)
        (du,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        return ((du - torch.cos(x)) ** 2).mean()

    with pytest.raises(InvalidArgumentError, match=r"differentiates inside \(torch.autograd.grad\)"):
        verify_module(model, None, torch.linspace(-2, 2, 8).unsqueeze(1), forward=residual, engine="cone")


def test_auto_prefers_the_cone_engine_for_big_plans_and_names_it(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    batch = (torch.randn(4, 5), torch.randn(4, 2))
    # as in a fresh process (deleting torch._dynamo from sys.modules instead would leave a second, half
    # imported torch._dynamo behind for the tests that follow: opcheck then fails on torch._dynamo.utils)
    monkeypatch.setattr(_engines, "dynamo_imported", lambda: False)
    small = verify_module(model, F.mse_loss, batch, mode="full")
    assert small.engine == "vmap"  # 124 evaluations: importing what the cone needs would cost more
    monkeypatch.setattr(_engines, "CONE_MIN_EVALUATIONS", 100)
    report = verify_module(model, F.mse_loss, batch, mode="full")
    assert report.passed, report
    assert report.engine == "cone"
    assert not any("cone" in n for n in report.notes)
    assert [r.status for r in report.results] == [r.status for r in small.results]


def test_cone_catches_a_one_element_bug_with_a_hand_written_backward():
    """Old-style custom Functions: vmap can't run them, the cone runs their traced forward."""
    torch.manual_seed(0)

    def bug(gx, gw, gb):
        gw = gw.clone()
        gw[1, 2] *= 1.01
        return gx, gw, gb

    model = nn.Sequential(HandLinear(6, 5, bug), nn.Tanh(), nn.Linear(5, 2))
    report = verify_module(model, F.mse_loss, (torch.randn(4, 6), torch.randn(4, 2)), engine="cone", mode="full")
    assert report.engine == "cone"
    assert not report.passed
    failed = [r for r in report.results if r.failed]
    assert [r.name for r in failed] == ["0.weight"]
    assert failed[0].worst[0].index == (1, 2)


def test_cone_checks_batch_inputs_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    batch = (torch.randn(5, 3), torch.randn(5, 2))
    cone = verify_module(model, F.mse_loss, batch, engine="cone", mode="full", inputs=True)
    vmap = verify_module(model, F.mse_loss, batch, engine="vmap", mode="full", inputs=True)
    assert cone.passed
    assert vmap.passed
    assert [r.name for r in cone.results] == [r.name for r in vmap.results]
    assert [r.status for r in cone.results] == [r.status for r in vmap.results]


@pytest.mark.parametrize(
    "options",
    [{}, {"reduction": "sum"}, {"ignore_index": 1}, {"weight": "w"}, {"label_smoothing": 0.1}],
    ids=["mean", "sum", "ignore_index", "weight", "smoothing"],
)
def test_cone_cross_entropy_in_plain_ops_equals_torch(options):
    """The cone evaluates cross_entropy in plain ops (or hands the unusual cases back to torch): same numbers."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    if options.get("weight") == "w":
        options = {"weight": torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)}
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 1, 0, 2])

    def loss(out, t):
        return F.cross_entropy(out, t, **options)

    with preserved_global_state(), lend_model(model, torch.float64) as lent:
        objective = Objective(loss, convert_batch((x, y), torch.float64), None)
        cone, vmap = ConeEngine(lent, objective, 0), VmapEngine(lent, objective, 0)
        target = Target("weight", model.weight.data, param=model.weight)
        index = torch.arange(12)
        a, b = cone.losses(target, index, target.flat + 1e-3), vmap.losses(target, index, target.flat + 1e-3)
        assert torch.allclose(a, b, rtol=0, atol=1e-14)
        assert torch.allclose(cone.cached_loss, vmap.loss(), rtol=0, atol=1e-15)

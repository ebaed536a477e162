"""verify_batch_independence: each leak is caught and located, each correct twin passes, state is kept."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_unchanged, snapshot
from torch import nn

from torchgradcheck import InvalidArgumentError, InvalidArgumentTypeError, verify_batch_independence


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


class WholeBatchNorm(nn.Module):
    """Bug: normalises over the whole batch instead of per sample."""

    def __init__(self, per_sample: bool) -> None:
        super().__init__()
        self.per_sample = per_sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_sample:
            return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)
        return (x - x.mean()) / x.std()


class SeqMix(nn.Module):
    """(batch, seq, d) -> (seq, batch, d) for a sequence-first op; the bug reshapes instead of transposing."""

    def __init__(self, d: int, bug: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.bug = bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.proj(x)
        h = h.reshape(s, b, d) if self.bug else h.transpose(0, 1)
        h = torch.cumsum(h, 0)  # a sequence-first op: mixes positions, must not mix samples
        return h.transpose(0, 1) if not self.bug else h.reshape(b, s, d)


class _RollLeak(torch.autograd.Function):
    """Forward mixes each sample with its neighbour; the backward pretends it doesn't."""

    @staticmethod
    def forward(ctx, x):
        return x + 0.1 * x.roll(1, 0)

    @staticmethod
    def backward(ctx, g):
        return g


class _ClaimsLeak(torch.autograd.Function):
    """Forward is per sample; the backward sends gradient to the neighbouring sample (wrong)."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g + 0.1 * g.roll(-1, 0)


class Apply(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn.apply(x)


def test_verify_batch_independence_passes_mlp():
    model, x = _mlp(), torch.randn(6, 4)
    before = snapshot(model)
    report = verify_batch_independence(model, x)
    assert report.passed, report
    assert [r.name for r in report.results] == [f"output[{i}]" for i in range(6)]
    assert report.leaks == ()
    assert report.mixing_module is None
    assert "OK, 6 of 6 output samples depend only on their own input sample" in str(report)
    assert_unchanged(before, model)


def test_verify_batch_independence_train_batchnorm_fails_with_module_and_hint():
    model, x = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)), torch.randn(6, 4)
    before = snapshot(model)
    report = verify_batch_independence(model, x)
    assert not report.passed
    assert report.mixing_module == "1"
    assert report.mixing_type == "BatchNorm1d"
    assert "check in eval mode" in report.hint
    assert dict(report.leaks)[0] == (1, 2, 3, 4, 5)
    text = str(report)
    assert "first module whose output mixes samples: 1 (BatchNorm1d)" in text
    assert "hint:" in text
    assert_unchanged(before, model)  # running stats and num_batches_tracked untouched


def test_verify_batch_independence_eval_batchnorm_passes():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).eval()
    model[1].running_mean.normal_()
    x = torch.randn(6, 4)
    before = snapshot(model)
    assert verify_batch_independence(model, x).passed
    assert_unchanged(before, model)


@pytest.mark.parametrize("per_sample", [False, True])
def test_verify_batch_independence_whole_batch_normalisation(per_sample):
    model = nn.Sequential(nn.Linear(4, 8), WholeBatchNorm(per_sample), nn.Linear(8, 3))
    report = verify_batch_independence(model, torch.randn(5, 4))
    assert report.passed == per_sample, report
    if not per_sample:
        assert report.mixing_module == "1"
        assert report.mixing_type == "WholeBatchNorm"
        assert "eval mode" not in report.hint


@pytest.mark.parametrize("bug", [True, False])
def test_verify_batch_independence_reshape_where_transpose_was_meant(bug):
    model = nn.Sequential(SeqMix(4, bug), nn.Linear(4, 2))
    report = verify_batch_independence(model, torch.randn(3, 5, 4))
    assert report.passed != bug, report
    if bug:
        assert report.mixing_module == "0"
        assert report.mixing_type == "SeqMix"
        assert sum(r.status == "leaks" for r in report.results) >= 2


def test_verify_batch_independence_leak_hidden_by_wrong_backward_is_found_by_finite_differences():
    model = nn.Sequential(nn.Linear(4, 4), Apply(_RollLeak), nn.Linear(4, 2))
    report = verify_batch_independence(model, torch.randn(5, 4))
    assert not report.passed
    # autograd sees nothing; the per-sample finite differences say exactly which neighbour leaks in
    assert dict(report.leaks) == {0: (4,), 1: (0,), 2: (1,), 3: (2,), 4: (3,)}
    assert "wrong backward hides the leak" in report.results[0].note
    assert report.mixing_module == "1"


def test_verify_batch_independence_backward_that_invents_a_dependence_is_a_mismatch():
    model = nn.Sequential(nn.Linear(4, 4), Apply(_ClaimsLeak), nn.Linear(4, 2))
    report = verify_batch_independence(model, torch.randn(5, 4))
    assert not report.passed
    assert {r.status for r in report.results} == {"mismatch"}
    assert report.leaks == ()
    assert "backward disagrees with finite differences" in report.headline()


def test_verify_batch_independence_batch_dim_and_forward():
    rnn = nn.GRU(3, 5)  # sequence-first: (seq, batch, features)
    x = torch.randn(7, 4, 3)
    report = verify_batch_independence(rnn, x, batch_dim=1, forward=lambda m, b: m(b)[0])
    assert report.passed, report
    assert report.options["batch_size"] == 4
    wrong = verify_batch_independence(rnn, x, batch_dim=0, forward=lambda m, b: m(b)[0])
    assert not wrong.passed  # along the sequence, outputs do depend on earlier steps


def test_verify_batch_independence_large_batch_checks_a_few_samples():
    report = verify_batch_independence(_mlp(), torch.randn(100, 4))
    assert report.passed
    assert len(report.results) == 8
    assert report.options["samples"] == 8
    two = verify_batch_independence(_mlp(), torch.randn(100, 4), samples=[0, -1])
    assert [r.name for r in two.results] == ["output[0]", "output[99]"]


def test_verify_batch_independence_tuple_batch_with_shared_tensor():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x, y, scale):
            return self.lin(x) * y + scale.sum()

    batch = (torch.randn(5, 4), torch.randn(5, 2), torch.randn(3))  # `scale` has no batch dim: shared
    assert verify_batch_independence(Two(), batch).passed


def test_verify_batch_independence_report_to_dict_is_json():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    d = verify_batch_independence(model, torch.randn(4, 4)).to_dict()
    json.dumps(d)
    assert d["passed"] is False
    assert d["mixing_module"] == "1"


def test_verify_batch_independence_bad_arguments():
    model, x, one, emb = _mlp(), torch.randn(4, 4), torch.randn(1, 4), nn.Embedding(5, 3)
    before = snapshot(model)
    with pytest.raises(InvalidArgumentTypeError, match="batch_dim="):
        verify_batch_independence(model, x, batch_dim="0")
    with pytest.raises(InvalidArgumentError, match="at least 2"):
        verify_batch_independence(model, one)
    with pytest.raises(InvalidArgumentError, match="no floating tensor"):
        verify_batch_independence(emb, torch.tensor([1, 2]))
    with pytest.raises(InvalidArgumentTypeError, match="unknown option"):
        verify_batch_independence(model, x, batchdim=0)
    with pytest.raises(InvalidArgumentTypeError, match=r"expected a torch\.nn\.Module"):
        verify_batch_independence(lambda x: x, x)
    with pytest.raises(InvalidArgumentError, match="samples="):
        verify_batch_independence(model, x, samples=0)
    with pytest.raises(InvalidArgumentError, match="batch size 4 at dim 0"):
        verify_batch_independence(model, x, forward=lambda m, b: m(b).sum())
    assert_unchanged(before, model)


def test_gradcheck_fixture_batch_independence(gradcheck):
    from torchgradcheck import GradientMismatchError

    model, x = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)), torch.randn(6, 4)
    report = gradcheck.batch_independence(model.eval(), x)
    assert report.passed
    with pytest.raises(GradientMismatchError, match=r"first module whose output mixes samples: 1 \(BatchNorm1d\)"):
        gradcheck.batch_independence(model.train(), x)


CLI_FACTORIES = """
import torch
from torch import nn


def _model(train):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    return model.train(train)


def _batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(6, 4, generator=gen), torch.randn(6, 2, generator=gen)


def train_mode():
    return _model(True), nn.MSELoss(), _batch()


def eval_mode():
    return _model(False), nn.MSELoss(), _batch()
"""


@pytest.mark.parametrize(("factory", "code"), [("train_mode", 1), ("eval_mode", 0)])
def test_cli_check_batch_independence(tmp_path, capsys, factory, code):
    from torchgradcheck.cli import main

    path = tmp_path / "cases.py"
    path.write_text(CLI_FACTORIES)
    assert main(["check", f"{path}:{factory}", "--batch-independence", "--mode", "full"]) == code
    out = capsys.readouterr().out
    assert "verify_module: OK" in out  # the gradients are right either way
    assert ("verify_batch_independence: OK" in out) == (code == 0)
    assert main(["check", f"{path}:{factory}", "--batch-independence", "--json", "--mode", "full"]) == code
    both = json.loads(capsys.readouterr().out)
    assert both["verify_batch_independence"]["passed"] is (code == 0)

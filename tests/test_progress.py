"""The progress bar: tqdm on stderr for long checks, silent when asked, when quick, or off a terminal."""

import pytest
import torch
from torch import nn

from torchgradcheck import _progress, verify_module


def _check(**options):
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    return verify_module(model, nn.MSELoss(), (torch.randn(4, 6), torch.randn(4, 2)), **options)


def test_progress_bar_counts_evaluations_on_stderr(monkeypatch, capsys):
    monkeypatch.setattr(_progress, "DELAY", 0.0)  # draw at once, as a check longer than a second would
    report = _check(progress=True, mode="full")
    err = capsys.readouterr().err
    assert "verify_module" in err
    assert "eval" in err
    assert f"{report.evaluations - 2}" in err or "100%" in err or "/" in err  # tqdm's n/total counter


@pytest.mark.parametrize("progress", [False, None])  # None: stderr is not a terminal under pytest
def test_progress_bar_silent_when_off_or_not_a_terminal(progress, monkeypatch, capsys):
    monkeypatch.setattr(_progress, "DELAY", 0.0)
    _check(progress=progress)
    assert capsys.readouterr().err == ""


def test_progress_bar_silent_for_quick_checks(monkeypatch, capsys):
    monkeypatch.setattr(_progress, "DELAY", 60.0)  # a check quicker than the delay draws nothing
    _check(progress=True)
    assert capsys.readouterr().err == ""

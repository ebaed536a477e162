"""Pictures: Report.plot (error / tolerance, heatmaps), plot_step_sweep (the step-size V), CLI --plot."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from corpus import HandLinear
from helpers import assert_unchanged, snapshot
from torch import nn

import torchgradcheck._measure as check_module
from torchgradcheck import InvalidArgumentError, verify_module
from torchgradcheck._plot import heatmap_grid
from torchgradcheck._sweep import plot_step_sweep
from torchgradcheck.cli import main

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"
BAD_ROW = 5


def _row_bug(gx, gw, gb):
    """Row BAD_ROW of the weight gradient is 2 % too large: the kind of bug a heatmap shows at a glance."""
    gw = gw.clone()
    gw[BAD_ROW] *= 1.02
    return gx, gw, gb


def _one_element(gx, gw, gb):
    gw = gw.clone()
    gw[3, 7] *= 1.01
    return gx, gw, gb


def _mlp(bug=None, sizes=(12, 8, 3)):
    model = nn.Sequential(HandLinear(sizes[0], sizes[1], bug), nn.Tanh(), nn.Linear(sizes[1], sizes[2]))
    return model, nn.CrossEntropyLoss(), (torch.randn(6, sizes[0]), torch.randint(0, sizes[2], (6,)))


@pytest.fixture(scope="module")
def failing_report():
    torch.manual_seed(0)
    return verify_module(*_mlp(_row_bug), mode="full", engine="loop")


def test_parameter_result_keeps_every_elements_error(failing_report):
    weight = failing_report.results[0]
    assert weight.name == "0.weight"
    assert weight.status == "mismatch"
    e = weight.errors
    assert e.abs_error.shape == e.tolerance.shape == e.excluded.shape == (8 * 12,)
    assert math.isclose(float(e.abs_error.max()), weight.max_abs_error, rel_tol=1e-6)
    assert int(((e.abs_error > e.tolerance) & ~e.excluded).sum()) == weight.failed == 12
    # for pictures only: not in the dict, the JSON, the repr or the table
    d = failing_report.to_dict()
    assert all("errors" not in r for r in d["results"])
    json.dumps(d)
    assert "errors" not in repr(weight)
    assert "abs_error" not in str(failing_report)


def test_report_plot_heatmap_shows_the_bad_row(failing_report, tmp_path):
    path = tmp_path / "report.png"
    fig = failing_report.plot(path)
    assert path.read_bytes()[:8] == PNG
    assert path.stat().st_size > 20_000
    # strip plot + one heatmap (only 0.weight fails) + its colorbar
    assert len(fig.axes) == 3
    err, over, _ = heatmap_grid(failing_report.results[0])
    assert err.shape == (8, 12)
    assert set(np.nonzero(over)[0].tolist()) == {BAD_ROW}
    assert int(np.argmax(err.max(axis=1))) == BAD_ROW
    assert err[BAD_ROW].min() > 100 * np.delete(err, BAD_ROW, axis=0).max()


def test_report_plot_of_a_passing_check_has_no_heatmap(tmp_path):
    model, loss_fn, batch = _mlp()
    before = snapshot(model)
    report = verify_module(model, loss_fn, batch, mode="full")
    assert report.passed
    fig = report.plot(tmp_path / "ok.svg")
    assert len(fig.axes) == 1
    assert (tmp_path / "ok.svg").read_text().lstrip().startswith("<?xml")
    assert_unchanged(before, model)


def test_report_plot_without_per_element_errors_uses_the_worst(monkeypatch):
    monkeypatch.setattr(check_module, "KEEP_ELEMENTS", 20)
    report = verify_module(*_mlp(_row_bug), mode="full", engine="loop")
    kept = {r.name: r.errors is not None for r in report.results}
    assert kept == {"0.weight": False, "0.bias": True, "2.weight": False, "2.bias": True}
    fig = report.plot()  # drawn, not saved
    assert len(fig.axes) == 1  # no heatmap without per-element errors
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[0] == "0.weight\n(8, 12)\n12/96 over\n(worst shown)"


def test_report_plot_of_a_subset_marks_unchecked_elements():
    report = verify_module(*_mlp(_row_bug, sizes=(24, 20, 3)), mode="sampled", engine="loop")
    weight = report.results[0]
    unchecked = int(np.isnan(weight.errors.tolerance).sum())
    assert 0 < unchecked == 24 * 20 - weight.checked - weight.excluded
    fig = report.plot()
    assert len(fig.axes) == 3  # the failing weight still gets its (partly grey) heatmap
    label = fig.axes[0].get_xticklabels()[0].get_text()
    assert label.endswith(f"{weight.checked + weight.excluded} of 480 checked")


def test_report_plot_names_the_extra_when_matplotlib_is_missing(failing_report, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install torchgradcheck\[plot\]"):
        failing_report.plot(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_step_sweep_draws_the_v(tmp_path):
    model, loss_fn, batch = _mlp()
    before = snapshot(model)
    sweep = plot_step_sweep(model, loss_fn, batch, param="0.weight", index=(3, 7), path=tmp_path / "v.png")
    assert (tmp_path / "v.png").read_bytes()[:8] == PNG
    assert_unchanged(before, model)
    err, h = sweep.abs_error, sweep.steps
    assert sweep.name == "0.weight[3, 7]"
    assert len(h) == 45
    assert math.isclose(h[0], 1e-12, rel_tol=1e-3)
    assert math.isclose(h[-1], 1e-1, rel_tol=1e-3)
    best = err.min()
    assert 1e-7 <= sweep.best_step <= 1e-3
    assert best < 1e-9 * max(1.0, abs(sweep.analytical))
    assert err[0] > 100 * best
    assert err[-1] > 100 * best
    slope = math.log(err[-1] / err[-5]) / math.log(h[-1] / h[-5])
    assert 1.7 < slope < 2.3  # central differences: truncation error ~ h^2
    # the rounding arm follows the measured noise: sigma / (sqrt(2) h) within a factor 30
    rounding = sweep.noise / (math.sqrt(2) * h[:10])
    assert np.all(err[:10] < 30 * rounding)
    assert np.median(err[:10] / rounding) > 0.03


def test_plot_step_sweep_of_a_wrong_element_has_a_floor():
    torch.manual_seed(0)
    sweep = plot_step_sweep(*_mlp(_one_element), param="0.weight", index=(3, 7))
    bug = abs(sweep.analytical) * 0.01 / 1.01  # |autograd - true| for a 1 % error
    assert sweep.abs_error.min() > 0.9 * bug  # no step gets below the bug
    assert abs(sweep.numerical[np.argmin(np.abs(sweep.steps - 1e-5))] - sweep.analytical) < 1.1 * bug


def test_plot_step_sweep_default_element_and_inputs():
    model, loss_fn, batch = _mlp()
    sweep = plot_step_sweep(model, loss_fn, batch, param="2.weight", steps=[1e-6, 1e-5, 1e-4])
    grad = torch.autograd.grad(loss_fn(model.double()(batch[0].double()), batch[1]), model[2].weight)[0]
    model.float()
    row, col = np.unravel_index(int(grad.abs().argmax()), tuple(grad.shape))
    assert sweep.name == f"2.weight[{row}, {col}]"
    assert math.isclose(sweep.analytical, float(grad[row, col]), rel_tol=1e-9)
    sweep = plot_step_sweep(model, loss_fn, batch, param="batch[0]", index=(0, 0), steps=[1e-5])
    assert sweep.abs_error[0] < 1e-8


def test_plot_step_sweep_rejects_unknown_names_and_indices():
    model, loss_fn, batch = _mlp()
    with pytest.raises(InvalidArgumentError, match=r"param='fc1.weight' is neither .* names are \['0.weight'"):
        plot_step_sweep(model, loss_fn, batch, param="fc1.weight")
    with pytest.raises(InvalidArgumentError, match=r"index=\(8, 0\) is not an element of 0.weight \(shape \(8, 12\)\)"):
        plot_step_sweep(model, loss_fn, batch, param="0.weight", index=(8, 0))


FACTORY = """
import torch
from torch import nn


def broken():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    model[0].weight.register_hook(lambda g: 1.1 * g)
    return model, nn.MSELoss(), (torch.randn(5, 4), torch.randn(5, 2))
"""


def test_cli_check_plot_writes_the_picture(tmp_path, capsys):
    (tmp_path / "factory.py").write_text(FACTORY)
    out = tmp_path / "check.png"
    code = main(["check", f"{tmp_path / 'factory.py'}:broken", "--plot", str(out)])
    assert code == 1
    assert out.read_bytes()[:8] == PNG
    captured = capsys.readouterr()
    assert "FAILED" in captured.out
    assert f"plot written to {out}" in captured.err


def test_report_plot_of_verify_function_shows_an_edge_bug():
    from torchgradcheck import verify_function

    class EdgeBug(torch.autograd.Function):
        """sin, whose backward is 5 % off in the last column only."""

        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.sin()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            d = x.cos().clone()
            d[:, -1] *= 1.05
            return g * d

    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    report = verify_function(EdgeBug.apply, x, second_order=False, forward_mode=False, noncontiguous=False)
    assert not report.passed
    fig = report.plot()
    assert len(fig.axes) == 3
    _, over, _ = heatmap_grid(report.failures[0])
    assert set(np.nonzero(over)[1].tolist()) == {8}  # every failing element is in the last column


def test_report_plot_survives_non_finite_and_empty_reports():
    from torchgradcheck import ElementResult, ParameterResult, Report
    from torchgradcheck._report import ElementErrors

    err = np.array([np.inf, 0.0, 1e-3, np.nan], dtype=np.float32)  # NaN: not checked
    tol = np.array([1e-6, 0.0, 1e-6, np.nan], dtype=np.float32)
    broken = ParameterResult(
        name="w",
        shape=(2, 2),
        status="mismatch",
        checked=3,
        failed=2,
        worst=(ElementResult((0, 0), math.nan, 1.0, math.inf, 1e-6),),
        errors=ElementErrors(err, tol, np.zeros(4, dtype=bool)),
    )
    fig = Report(call="verify_module", results=(broken,), relative_error=math.nan).plot()
    _, over, _ = heatmap_grid(broken)
    assert over.tolist() == [[True, False], [True, False]]
    image = fig.axes[1].images[0].get_array()
    assert bool(image.mask[1, 1])  # the unchecked element is masked (drawn grey)
    assert float(image[0, 0]) > float(image[1, 0])  # the infinite error is the brightest
    skipped = ParameterResult(name="frozen", shape=(3,), status="skipped")
    assert len(Report(call="verify_module", results=(skipped,), relative_error=0.0).plot().axes) == 1

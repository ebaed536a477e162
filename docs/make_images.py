"""Draw the example pictures in docs/ (run from the repository root: ``python docs/make_images.py``).

* ``docs/error_vs_tolerance.png``: ``Report.plot`` of a model with two planted bugs: one row of a
  weight gradient 2 % too large, and a square weight whose gradient is returned transposed.
* ``docs/step_sweep.png``: ``plot_step_sweep`` for a correct element (the V of rounding vs truncation)
  and for an element whose gradient is 1 % wrong (the V gets a floor at the size of the bug).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from corpus import HandLinear  # noqa: E402

from torchgradcheck import verify_module  # noqa: E402
from torchgradcheck._sweep import draw_step_sweep, finish_step_axes, sweep_steps  # noqa: E402


def row_bug(gx, gw, gb):
    gw = gw.clone()
    gw[5] *= 1.02
    return gx, gw, gb


def transposed(gx, gw, gb):
    return gx, gw.T.contiguous(), gb


def one_element(gx, gw, gb):
    gw = gw.clone()
    gw[3, 7] *= 1.01
    return gx, gw, gb


def two_bugs() -> tuple:
    torch.manual_seed(0)
    model = nn.Sequential(
        HandLinear(16, 12, row_bug), nn.Tanh(), HandLinear(12, 12, transposed), nn.Tanh(), nn.Linear(12, 4)
    )
    return model, nn.CrossEntropyLoss(), (torch.randn(32, 16), torch.randint(0, 4, (32,)))


def mlp(bug=None) -> tuple:
    torch.manual_seed(0)
    model = nn.Sequential(HandLinear(20, 16, bug), nn.Tanh(), nn.Linear(16, 4))
    return model, nn.CrossEntropyLoss(), (torch.randn(8, 20), torch.randint(0, 4, (8,)))


def main(report: bool = True) -> None:
    if report:
        result = verify_module(*two_bugs(), mode="full", engine="loop")
        print(result)
        result.plot(ROOT / "docs" / "error_vs_tolerance.png")

    fig = Figure(figsize=(11.0, 4.4), layout="constrained")
    for i, (bug, title) in enumerate([(None, "correct backward"), (one_element, "backward 1 % wrong at [3, 7]")]):
        sweep = sweep_steps(
            *mlp(bug),
            param="0.weight",
            index=(3, 7),
            steps=torch.logspace(-12, -1, 45).tolist(),
            forward=None,
            dtype=torch.float64,
            seed=0,
        )
        ax = fig.add_subplot(1, 2, i + 1)
        draw_step_sweep(ax, sweep, color="#3b75af" if bug is None else "#d62728")
        finish_step_axes(
            ax, f"{title}\n{sweep.name}: best h ≈ {sweep.best_step:.0e}, smallest error {sweep.abs_error.min():.1e}"
        )
    low = min(ax.get_ylim()[0] for ax in fig.axes)
    high = max(ax.get_ylim()[1] for ax in fig.axes)
    for ax in fig.axes:  # one scale: the floor of the wrong element against the V of the right one
        ax.set_ylim(low, high)
    fig.savefig(ROOT / "docs" / "step_sweep.png", dpi=110)


if __name__ == "__main__":
    main(report="--sweep-only" not in sys.argv)

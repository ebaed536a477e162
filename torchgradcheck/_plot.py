"""Pictures of a check: error against tolerance per tensor, heatmaps of failing weights, the step-size V.

Everything here needs matplotlib (``pip install torchgradcheck[plot]``), imported only when a picture
is drawn. Figures are built with ``matplotlib.figure.Figure`` directly, never pyplot: no global
state, no GUI backend, safe in tests and on headless machines.

* `plot_report` (``Report.plot``): one dot per element at ``|autograd - numerical| / tolerance`` on
  a log axis, one column per tensor; the line at 1 is the verdict. Below it, for up to three failing
  tensors with two or more dimensions, a heatmap of ``|a - n|``: a transposed gradient, an edge bug
  or one bad row shows at a glance.

The step-size V (`plot_step_sweep`) lives in `_sweep`, which runs the core; this module imports
nothing of the package at run time, so `Report.plot` can import it without a cycle.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ._report import Report, TensorResult

__all__ = ["heatmap_grid", "plot_report"]

MAX_DOTS = 3000  # dots drawn per tensor; the failing and the worst are always among them
MAX_HEATMAPS = 3
OK_COLOR, BAD_COLOR, _KINK = "#3b75af", "#d62728", "#7f7f7f"


def require_matplotlib(call: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(
            f"{call} draws with matplotlib, which is not installed; install it with "
            "`pip install torchgradcheck[plot]` (or `pip install matplotlib`)."
        ) from None


def save_figure(fig: Figure, path: str | os.PathLike[str] | None) -> None:
    if path is not None:
        fig.savefig(os.fspath(path), dpi=110)


# ------------------------------------------------------------------------------------------ report


def _ratios(r: TensorResult) -> tuple[Any, Any, Any]:
    """(ratios of judged elements, ratios of excluded elements, their flat indices) for one tensor."""
    import numpy as np

    e = r.errors
    if e is None:  # too large to keep every element: the worst ones still tell the story
        worst = np.array([w.score for w in r.worst], dtype=np.float64)
        return worst, np.empty(0), np.arange(len(worst))
    err = e.abs_error.astype(np.float64)
    tol = e.tolerance.astype(np.float64)
    checked = ~np.isnan(tol)  # NaN: not checked (sampled mode)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(tol > 0, err / tol, np.where(err > 0, np.inf, 0.0))
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    excluded = e.excluded.astype(bool)
    return ratio[checked & ~excluded], ratio[checked & excluded], np.flatnonzero(checked & ~excluded)


def _subsample(ratio: Any, rng: Any) -> Any:
    """At most MAX_DOTS values: all over tolerance and the worst first, then a uniform sample."""
    import numpy as np

    if ratio.size <= MAX_DOTS:
        return ratio
    order = np.argsort(-ratio, kind="stable")
    keep = order[: max(200, int((ratio > 1).sum()))][:MAX_DOTS]
    rest = np.setdiff1d(np.arange(ratio.size), keep)
    extra = rng.choice(rest, size=MAX_DOTS - keep.size, replace=False)
    return ratio[np.concatenate([keep, extra])]


def _column_label(r: TensorResult) -> str:
    """Name, shape, verdict and (for a cheap mode) how many elements were checked, under the column."""
    numel = math.prod(r.shape)
    lines = [r.name, str(tuple(r.shape)).replace(",)", ")"), f"{r.failed}/{r.checked} over" if r.failed else r.status]
    if r.errors is not None and r.checked + r.excluded < numel:
        lines.append(f"{r.checked + r.excluded:,} of {numel:,} checked")
    elif r.errors is None and numel:
        lines.append("(worst shown)")
    return "\n".join(lines)


def _strip(ax: Axes, report: Report) -> None:
    """One column of dots per tensor: |a - n| / tolerance, log scale, the tolerance at 1."""
    import numpy as np

    rng = np.random.default_rng(0)
    shown = [r for r in report.results if r.status != "skipped"]
    columns = []
    for r in shown:
        judged, excluded, _ = _ratios(r)
        columns.append((r, _subsample(judged, rng), excluded))
    finite = np.concatenate([np.concatenate([j, x]) for _, j, x in columns] or [np.empty(0)])
    finite = finite[np.isfinite(finite) & (finite > 0)]
    top = max(float(finite.max()) if finite.size else 1.0, 1.0) * 10
    bottom = max(min(float(finite.min()) if finite.size else 1e-3, 1e-1) / 3, top * 1e-14)
    labels = []
    for x, (r, judged, excluded) in enumerate(columns):
        shown_vals = np.clip(judged, bottom, top / 3)  # zeros at the floor, infinities at the ceiling
        jitter = rng.uniform(-0.32, 0.32, size=shown_vals.size)
        over = judged > 1
        size = 9 if judged.size > 300 else 16
        ax.scatter(x + jitter[~over], shown_vals[~over], s=size, color=OK_COLOR, alpha=0.45, linewidths=0)
        ax.scatter(x + jitter[over], shown_vals[over], s=28, color=BAD_COLOR, alpha=0.9, linewidths=0)
        if excluded.size:
            ax.scatter(
                x + rng.uniform(-0.32, 0.32, size=excluded.size),
                np.clip(excluded, bottom, top / 3),
                s=22,
                marker="x",
                color=_KINK,
                linewidths=1,
            )
        labels.append(_column_label(r))
    ax.axhline(1.0, color=BAD_COLOR, linewidth=1, linestyle="--")
    ax.annotate("tolerance", (len(columns) - 0.5, 1.0), ha="right", va="bottom", fontsize=8, color=BAD_COLOR)
    ax.set_yscale("log")
    ax.set_ylim(bottom / 2, top)  # exact zeros sit on the floor, still visible
    ax.set_xlim(-0.6, len(columns) - 0.4)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(
        labels, fontsize=8, rotation=30 if len(columns) > 6 else 0, ha="right" if len(columns) > 6 else "center"
    )
    for tick, (r, _, _) in zip(ax.get_xticklabels(), columns):
        if not r.passed:
            tick.set_color(BAD_COLOR)
    ax.set_ylabel("|autograd − numerical| / tolerance")  # noqa: RUF001
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.scatter([], [], s=16, color=OK_COLOR, label="element within tolerance")
    ax.scatter([], [], s=28, color=BAD_COLOR, label="element over tolerance")
    if any(x.size for _, _, x in columns):
        ax.scatter([], [], s=22, marker="x", color=_KINK, label="not differentiable here (excluded)")
    ax.legend(
        loc="lower left",
        bbox_to_anchor=(0.0, 1.0),
        ncol=3,
        fontsize=8,
        frameon=False,
        borderaxespad=0.2,
        handletextpad=0.2,
    )


def heatmap_grid(r: TensorResult) -> tuple[Any, Any, str]:
    """(|a - n| as a 2-D array, over-tolerance mask, axis note) of a tensor with >= 2 dimensions."""
    import numpy as np

    assert r.errors is not None
    rows = r.shape[0]
    err = r.errors.abs_error.astype(np.float64).reshape(rows, -1)
    over = ((r.errors.abs_error > r.errors.tolerance) & ~r.errors.excluded.astype(bool)).reshape(rows, -1)
    note = "" if len(r.shape) == 2 else f" (dims {tuple(r.shape[1:])} flattened)"
    return err, over, note


def _heatmap(fig: Figure, ax: Axes, r: TensorResult) -> None:
    import matplotlib
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    err, over, note = heatmap_grid(r)
    finite = err[np.isfinite(err) & (err > 0)]
    high = float(finite.max()) if finite.size else 1.0
    low = min(max(float(finite.min()) if finite.size else 0.0, high * 1e-8), high / 10)
    if np.isinf(err).any():  # infinite errors get the brightest colour, above every finite one
        high *= 10
    shown = np.ma.masked_invalid(np.clip(np.where(np.isinf(err), high, err), low, high))  # NaN: not checked
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    image = ax.imshow(shown, norm=LogNorm(vmin=low, vmax=high), cmap=cmap, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="|autograd − numerical|", shrink=0.9)  # noqa: RUF001
    rows, cols = np.nonzero(over)
    title = f"{r.name} {tuple(r.shape)}: {r.failed} of {r.checked} over tolerance"
    if 0 < rows.size <= 200:
        ax.scatter(cols, rows, s=60, facecolors="none", edgecolors=BAD_COLOR, linewidths=1.2)
        title += " (circled)"
    if np.isnan(err).any():
        title += "; grey: not checked"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(f"column{note}")
    ax.set_ylabel("row")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def plot_report(
    report: Report, path: str | os.PathLike[str] | None = None, *, max_heatmaps: int = MAX_HEATMAPS
) -> Figure:
    """Draw `report`: error / tolerance of every element per tensor, and heatmaps of failing tensors.

    Args:
        report: what `verify_module` returned.
        path: where to save the picture (the suffix picks the format: .png, .svg, .pdf); None: don't save.
        max_heatmaps: at most this many failing tensors with >= 2 dimensions get a heatmap of ``|a - n|``
            (tensors over 1e6 elements keep no per-element errors, hence no heatmap).

    Returns:
        The matplotlib ``Figure``.
    """
    require_matplotlib("Report.plot")
    from matplotlib.figure import Figure

    maps = [r for r in report.failures if r.errors is not None and len(r.shape) >= 2][:max_heatmaps]
    tensors = sum(r.status != "skipped" for r in report.results)
    width = min(max(7.0, 1.2 * tensors + 2.0, 5.0 * len(maps)), 24.0)
    fig = Figure(figsize=(width, 4.6 + (3.8 if maps else 0.0)), layout="constrained")
    fig.suptitle(report.headline(), fontsize=10, x=0.01, ha="left")
    if maps:
        grid = fig.add_gridspec(2, len(maps), height_ratios=[1.15, 1.0])
        _strip(fig.add_subplot(grid[0, :]), report)
        for i, r in enumerate(maps):
            _heatmap(fig, fig.add_subplot(grid[1, i]), r)
    else:
        _strip(fig.add_subplot(), report)
    save_figure(fig, path)
    return fig

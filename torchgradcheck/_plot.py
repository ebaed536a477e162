"""Pictures of a check: error against tolerance per tensor, heatmaps of failing weights, the step-size V.

Everything here needs matplotlib (``pip install torchgradcheck[plot]``), imported only when a picture
is drawn. Figures are built with ``matplotlib.figure.Figure`` directly, never pyplot: no global
state, no GUI backend, safe in tests and on headless machines.

* `plot_report` (``Report.plot``): one dot per element at ``|autograd - numerical| / tolerance`` on
  a log axis, one column per tensor; the line at 1 is the verdict. Below it, for up to three failing
  tensors with two or more dimensions, a heatmap of ``|a - n|``: a transposed gradient, an edge bug
  or one bad row shows at a glance.
* `plot_step_sweep`: ``|D(h) - autograd|`` of one element against the step ``h`` over many decades.
  The left arm of the V is rounding (``~ sigma / h``, drawn from the measured noise ``sigma``), the
  right arm truncation (``~ h^2``); a wrong gradient turns the bottom of the V into a floor at the size
  of the bug.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from torch import nn

    from ._report import Report, TensorResult

__all__ = ["StepSweep", "plot_report", "plot_step_sweep"]

MAX_DOTS = 3000  # dots drawn per tensor; the failing and the worst are always among them
MAX_HEATMAPS = 3
_OK, _BAD, _KINK = "#3b75af", "#d62728", "#7f7f7f"


def _require_matplotlib(call: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(
            f"{call} draws with matplotlib, which is not installed; install it with "
            "`pip install torchgradcheck[plot]` (or `pip install matplotlib`)."
        ) from None


def _save(fig: Figure, path: str | os.PathLike[str] | None) -> None:
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
        ax.scatter(x + jitter[~over], shown_vals[~over], s=size, color=_OK, alpha=0.45, linewidths=0)
        ax.scatter(x + jitter[over], shown_vals[over], s=28, color=_BAD, alpha=0.9, linewidths=0)
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
    ax.axhline(1.0, color=_BAD, linewidth=1, linestyle="--")
    ax.annotate("tolerance", (len(columns) - 0.5, 1.0), ha="right", va="bottom", fontsize=8, color=_BAD)
    ax.set_yscale("log")
    ax.set_ylim(bottom / 2, top)  # exact zeros sit on the floor, still visible
    ax.set_xlim(-0.6, len(columns) - 0.4)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(
        labels, fontsize=8, rotation=30 if len(columns) > 6 else 0, ha="right" if len(columns) > 6 else "center"
    )
    for tick, (r, _, _) in zip(ax.get_xticklabels(), columns):
        if not r.passed:
            tick.set_color(_BAD)
    ax.set_ylabel("|autograd − numerical| / tolerance")  # noqa: RUF001
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.scatter([], [], s=16, color=_OK, label="element within tolerance")
    ax.scatter([], [], s=28, color=_BAD, label="element over tolerance")
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
        ax.scatter(cols, rows, s=60, facecolors="none", edgecolors=_BAD, linewidths=1.2)
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
    _require_matplotlib("Report.plot")
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
    _save(fig, path)
    return fig


# -------------------------------------------------------------------------------------- step sweep


@dataclass(frozen=True)
class StepSweep:
    """|central difference - autograd| of one element over a range of steps (`plot_step_sweep`)."""

    name: str  # e.g. "fc1.weight[3, 7]"
    steps: Any  # h actually used, half the distance between the evaluated points (numpy, float64)
    numerical: Any  # central differences, one per step
    analytical: float  # autograd's value
    noise: float  # measured noise (std) of the loss
    default_step: float  # the step verify_module uses for this element

    @property
    def abs_error(self) -> Any:
        import numpy as np

        return np.abs(self.numerical - self.analytical)

    @property
    def best_step(self) -> float:
        import numpy as np

        return float(self.steps[int(np.nanargmin(self.abs_error))])


def sweep_steps(
    model: nn.Module,
    loss_fn: Callable[..., Any] | None,
    batch: Any,
    *,
    param: str,
    index: int | Sequence[int] | None,
    steps: Sequence[float],
    forward: Any,
    dtype: Any,
    seed: int,
) -> StepSweep:
    """The numbers behind `plot_step_sweep` (no matplotlib needed)."""
    import numpy as np

    from ._batch import BatchError, Objective, check_loss, convert_batch, input_targets
    from ._compare import DTYPE_DEFAULTS
    from ._engines import LoopEngine
    from ._errors import InvalidArgumentError
    from ._noise import estimate_noise
    from ._params import Target, lend_model
    from ._report import element_name
    from ._state import preserved_global_state, reseed

    call = "plot_step_sweep(model, loss_fn, batch)"
    try:
        converted = convert_batch(batch, dtype)
        objective = Objective(loss_fn, converted, forward)
    except BatchError as exc:
        raise InvalidArgumentError(f"{call}: {exc}.") from None
    with preserved_global_state(), lend_model(model, dtype) as lent:
        params = dict(lent.model.named_parameters())
        inputs = {t.name: t for t in input_targets(converted)}
        if param in params:
            target = Target(param, params[param].data, kind="parameter", param=params[param])
        elif param in inputs:
            target = inputs[param]
        else:
            raise InvalidArgumentError(
                f"{call}: param={param!r} is neither a parameter nor a batch tensor; "
                f"names are {[*params, *inputs][:12]}."
            )
        if target.kind == "input":
            target.tensor.requires_grad_(True)
        torch.set_grad_enabled(True)
        lent.reset_buffers()
        reseed(seed)
        loss = check_loss(objective(lent.model))
        if not loss.requires_grad:
            raise InvalidArgumentError(f"{call}: the loss does not require grad.")
        loss.backward()
        grad = target.param.grad if target.param is not None else None
        grad = torch.zeros_like(target.tensor) if grad is None else grad
        analytical = grad.to_dense().detach().to(torch.float64).reshape(-1)
        lent.clear_grads()
        if target.kind == "input":
            target.tensor.requires_grad_(False)
            target.tensor.grad = None
        torch.set_grad_enabled(False)
        numel = target.tensor.numel()
        if index is None:
            flat = int(analytical.abs().argmax())
        else:
            idx = (index,) if isinstance(index, int) else tuple(index)
            try:
                flat = int(np.ravel_multi_index(idx, target.shape)) if target.shape else int(idx[0] if idx else 0)
            except (ValueError, TypeError, IndexError):
                raise InvalidArgumentError(
                    f"{call}: index={index!r} is not an element of {param} (shape {target.shape})."
                ) from None
        if not 0 <= flat < numel:
            raise InvalidArgumentError(f"{call}: index={index!r} is out of range for {param} ({numel} elements).")
        engine = LoopEngine(lent, objective, seed)
        u = float(torch.finfo(target.tensor.dtype).eps) / 2  # the floor verify_module uses too: u * |L|
        noise = max(estimate_noise(engine, target, torch.Generator().manual_seed(seed)), u * abs(float(loss)))
        base = float(target.flat[flat])
        h = torch.tensor(sorted(float(s) for s in steps), dtype=torch.float64)
        up = (base + h).to(target.tensor.dtype)
        down = (base - h).to(target.tensor.dtype)
        where = torch.full((len(h),), flat, dtype=torch.long, device=target.tensor.device)
        plus = engine.losses(target, where, up.to(target.tensor.device)).cpu()
        minus = engine.losses(target, where, down.to(target.tensor.device)).cpu()
        span = up.to(torch.float64) - down.to(torch.float64)
        numerical = ((plus - minus) / span).numpy()
        eps = DTYPE_DEFAULTS[target.tensor.dtype].eps if target.tensor.dtype in DTYPE_DEFAULTS else 6e-6
        position = tuple(int(i) for i in np.unravel_index(flat, target.shape)) if target.shape else ()
        return StepSweep(
            name=element_name(target.name, position),
            steps=(span / 2).numpy(),
            numerical=numerical,
            analytical=float(analytical[flat]),
            noise=float(noise),
            default_step=eps * max(1.0, abs(base)),
        )


def draw_step_sweep(ax: Axes, sweep: StepSweep, label: str | None = None, color: str = _OK) -> None:
    """The V: |D(h) - autograd| against h, with the rounding and truncation guides."""
    import numpy as np

    h, err = sweep.steps, sweep.abs_error
    ok = np.isfinite(err) & (h > 0)
    floor = max(float(np.abs(sweep.analytical)) * 1e-17, 1e-300)
    ax.loglog(
        h[ok],
        np.maximum(err[ok], floor),
        "o-",
        color=color,
        markersize=3.5,
        linewidth=1.2,
        label=label or f"|D(h) − autograd|, {sweep.name}",  # noqa: RUF001
    )
    rounding = sweep.noise / (math.sqrt(2.0) * h)  # std of (e+ - e-) / 2h
    guide = "rounding ≈ σ/(√2·h), σ measured"  # noqa: RUF001
    ax.loglog(h, rounding, ":", color="#555555", linewidth=1, label=guide)
    # truncation ~ C h^2, measured against the numerical value at the default step (not autograd,
    # which may be the thing that is wrong), where it stands well above the rounding line
    ref = int(np.nanargmin(np.abs(np.log(h / sweep.default_step))))
    drift = np.abs(sweep.numerical - sweep.numerical[ref])
    clear = ok & (drift > 30 * rounding) & (h > 10 * sweep.default_step)
    trunc = np.zeros_like(h)
    if clear.any():
        trunc = float(np.median(drift[clear] / h[clear] ** 2)) * h**2
        ax.loglog(h, trunc, "--", color="#555555", linewidth=1, label="truncation ∝ h²")
    gap = float(err[ref])
    if gap > 100 * (rounding[ref] + trunc[ref]):  # autograd is off by more than the method's error
        ax.axhline(gap, color=_BAD, linewidth=1, alpha=0.6)
        ax.annotate(f"autograd is off by {gap:.1e}", (h[0], gap), va="bottom", fontsize=8, color=_BAD)
    ax.axvline(sweep.default_step, color="#2ca02c", linewidth=1)
    ax.annotate(
        " verify_module's step",
        (sweep.default_step, 0.02),
        xycoords=("data", "axes fraction"),
        va="bottom",
        fontsize=8,
        color="#2ca02c",
    )
    shown = np.maximum(err[ok], floor)
    if shown.size:  # the data decide the limits; the guides are clipped to them
        ax.set_ylim(float(shown.min()) / 100, float(shown.max()) * 10)


def plot_step_sweep(
    model: nn.Module,
    loss_fn: Callable[..., Any] | None = None,
    batch: Any = None,
    *,
    param: str,
    index: int | Sequence[int] | None = None,
    path: str | os.PathLike[str] | None = None,
    steps: Sequence[float] | None = None,
    forward: Callable[[Any, Any], Any] | None = None,
    dtype: torch.dtype | None = torch.float64,
    seed: int = 0,
) -> StepSweep:
    """Draw ``|central difference - autograd|`` of one element against the step ``h`` (the V).

    The model is lent exactly as in `verify_module` (float64 working copies, buffers reset and the
    RNG re-seeded before every evaluation) and handed back unchanged. Costs ``2 * len(steps) + 10``
    forwards and one backward.

    Args:
        model: the module; loss_fn, batch, forward: as in `verify_module`.
        param: a parameter name (``"fc1.weight"``) or a batch tensor name (``"batch[0]"``).
        index: the element, e.g. ``(3, 7)``; None: the element with the largest autograd gradient.
        path: where to save the picture; None: don't draw, only return the numbers.
        steps: the steps ``h``; default 45 steps from 1e-12 to 1e-1.
        dtype: checking precision (float64); None keeps the model's own dtype.
        seed: the RNG seed set before every evaluation.

    Returns:
        A `StepSweep`: the steps, the central differences, autograd's value, the measured noise.

    Example:
        >>> sweep = plot_step_sweep(model, nn.MSELoss(), (x, y), param="0.weight", index=(3, 7), path="v.png")
        >>> sweep.best_step  # about 1e-5 for a smooth float64 loss
    """
    import numpy as np

    if path is not None:
        _require_matplotlib("plot_step_sweep")
    if steps is None:
        steps = np.logspace(-12, -1, 45).tolist()
    sweep = sweep_steps(
        model, loss_fn, batch, param=param, index=index, steps=steps, forward=forward, dtype=dtype, seed=seed
    )
    if path is not None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7.0, 4.6), layout="constrained")
        ax = fig.add_subplot()
        draw_step_sweep(ax, sweep)
        finish_step_axes(
            ax, f"step size vs error for {sweep.name}: autograd {sweep.analytical:.6g}, best h ≈ {sweep.best_step:.1e}"
        )
        _save(fig, path)
    return sweep


def finish_step_axes(ax: Axes, title: str) -> None:
    ax.set_xlabel("step h")
    ax.set_ylabel("|central difference − autograd|")  # noqa: RUF001
    ax.set_title(title, fontsize=9, loc="left")
    ax.grid(which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")

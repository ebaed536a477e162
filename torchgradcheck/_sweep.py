"""The step-size V: ``|D(h) - autograd|`` of one element against the step ``h`` over many decades.

The left arm of the V is rounding (``~ sigma / h``, drawn from the measured noise ``sigma``), the
right arm truncation (``~ h^2``); a wrong gradient turns the bottom of the V into a floor at the size
of the bug. `sweep_steps` computes the numbers with the core's own pieces (`_check.analytical`,
`_measure.noise_level`, `_finite_diff.first_pass`); `plot_step_sweep` draws them (`_plot` helpers).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ._plot import BAD_COLOR, OK_COLOR, require_matplotlib, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from torch import nn

__all__ = ["StepSweep", "draw_step_sweep", "finish_step_axes", "plot_step_sweep", "sweep_steps"]


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
    """The numbers behind `plot_step_sweep` (no matplotlib needed).

    The same pieces as a check: `_check.analytical` (one backward), `_measure.noise_level` (the noise
    floor), `_finite_diff.first_pass` (one central difference per step) on the loop engine.
    """
    import numpy as np

    from ._batch import BatchError, Objective, convert_batch
    from ._check import analytical
    from ._compare import DTYPE_DEFAULTS
    from ._engines import LoopEngine
    from ._errors import InvalidArgumentError
    from ._finite_diff import first_pass
    from ._measure import noise_level
    from ._params import lend_model
    from ._report import element_name
    from ._state import preserved_global_state

    call = "plot_step_sweep(model, loss_fn, batch)"
    try:
        converted = convert_batch(batch, dtype)
        objective = Objective(loss_fn, converted, forward)
    except BatchError as exc:
        raise InvalidArgumentError(f"{call}: {exc}.") from None
    with preserved_global_state(), lend_model(model, dtype) as lent:
        target = _sweep_target(lent, converted, param, call)
        loss0, grads = analytical(lent, objective, [target], seed, call)
        grad = grads[target.name]
        gradient = torch.zeros(target.tensor.numel(), dtype=torch.float64) if grad is None else grad.cpu()
        flat = _sweep_element(index, target, gradient, param, call)
        engine = LoopEngine(lent, objective, seed)
        noise = noise_level(engine, target, loss0, 0.0, torch.Generator().manual_seed(seed))
        base = float(target.flat[flat])
        where = torch.tensor([flat], dtype=torch.long, device=target.tensor.device)
        passes = [first_pass(engine, target, where, float(h) / max(1.0, abs(base))) for h in sorted(steps)]
        span = torch.cat([fp.span for fp in passes]).cpu()
        numerical = torch.cat([fp.derivative for fp in passes]).cpu().numpy()
        eps = DTYPE_DEFAULTS[target.tensor.dtype].eps if target.tensor.dtype in DTYPE_DEFAULTS else 6e-6
        position = tuple(int(i) for i in np.unravel_index(flat, target.shape)) if target.shape else ()
        return StepSweep(
            name=element_name(target.name, position),
            steps=(span / 2).numpy(),
            numerical=numerical,
            analytical=float(gradient[flat]),
            noise=float(noise),
            default_step=eps * max(1.0, abs(base)),
        )


def _sweep_target(lent: Any, converted: Any, param: str, call: str) -> Any:
    """The `Target` named `param`: a parameter of the lent model or a floating tensor of the batch."""
    from ._batch import input_targets
    from ._errors import InvalidArgumentError
    from ._params import Target

    params = dict(lent.model.named_parameters())
    inputs = {t.name: t for t in input_targets(converted)}
    if param in params:
        return Target(param, params[param].data, kind="parameter", param=params[param])
    if param in inputs:
        return inputs[param]
    raise InvalidArgumentError(
        f"{call}: param={param!r} is neither a parameter nor a batch tensor; names are {[*params, *inputs][:12]}."
    )


def _sweep_element(index: int | Sequence[int] | None, target: Any, gradient: Any, param: str, call: str) -> int:
    """The flat index of the element to sweep: `index`, or the largest |gradient| when None."""
    import numpy as np

    from ._errors import InvalidArgumentError

    numel = target.tensor.numel()
    if index is None:
        return int(gradient.abs().argmax())
    idx = (index,) if isinstance(index, int) else tuple(index)
    try:
        flat = int(np.ravel_multi_index(idx, target.shape)) if target.shape else int(idx[0] if idx else 0)
    except (ValueError, TypeError, IndexError):
        raise InvalidArgumentError(
            f"{call}: index={index!r} is not an element of {param} (shape {target.shape})."
        ) from None
    if not 0 <= flat < numel:
        raise InvalidArgumentError(f"{call}: index={index!r} is out of range for {param} ({numel} elements).")
    return flat


def draw_step_sweep(ax: Axes, sweep: StepSweep, label: str | None = None, color: str = OK_COLOR) -> None:
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
        ax.axhline(gap, color=BAD_COLOR, linewidth=1, alpha=0.6)
        ax.annotate(f"autograd is off by {gap:.1e}", (h[0], gap), va="bottom", fontsize=8, color=BAD_COLOR)
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
        require_matplotlib("plot_step_sweep")
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
        save_figure(fig, path)
    return sweep


def finish_step_axes(ax: Axes, title: str) -> None:
    ax.set_xlabel("step h")
    ax.set_ylabel("|central difference − autograd|")  # noqa: RUF001
    ax.set_title(title, fontsize=9, loc="left")
    ax.grid(which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")

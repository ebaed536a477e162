"""verify_module: the public entry point for a module, and the only place its errors gain the caller's context."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._batch import Objective, input_targets
from ._check import Checked, check_module_call, check_targets, power_warnings, prepare
from ._compiled import Compiled, eager_calls, no_donated_buffers, split_compiled
from ._errors import InvalidArgumentError, InvalidArgumentTypeError
from ._hessian import check_input_second_order, check_second_order
from ._noise import NOISE_POINTS
from ._options import SHARED_OPTIONS, CheckOptions, check_options, reject_unknown, validate_patterns
from ._params import Lent, Target, lend_model
from ._progress import progress_bar
from ._report import Report, TensorResult
from ._state import preserved_global_state
from ._steps import take_steps
from ._zero_gradients import zero_gradient_warning

__all__ = ["verify_module"]

_CALL = "verify_module(model, loss_fn, batch)"
_DOUBLE_BACKWARD_HINT = (
    "the loss differentiates inside, so its value and gradient run through the double backward of the "
    "model's custom Functions (rows 'model input[k] (Hv)' check the model's own second derivatives): "
    "check each Function with verify_function(fn, x, second_order=True)"
)
_OPTIONS = (
    "forward",
    "params",
    "inputs",
    "localise",
    "accumulation",
    "after_steps",
    "optimizer",
    "second_order",
    *SHARED_OPTIONS,
)


def verify_module(
    model: nn.Module,
    loss_fn: Callable[..., Any] | None = None,
    batch: Any = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    params: str | Sequence[str] | None = None,
    inputs: bool = False,
    mode: str = "auto",
    budget: float = 3.0,
    eps: float | None = None,
    rtol: float | None = None,
    atol: float = 0.0,
    dtype: torch.dtype | None = torch.float64,
    seed: int = 0,
    engine: str = "auto",
    progress: bool | None = None,
    localise: bool | None = None,
    accumulation: bool = True,
    after_steps: int = 0,
    optimizer: Callable[[list[nn.Parameter]], Any] | None = None,
    second_order: bool = False,
    **unknown: Any,
) -> Report:
    """Check `model`'s parameter gradients from ``loss.backward()`` against central differences.

    Args:
        model: the module to check. Its own Parameter objects are used (so their hooks fire), holding
            `dtype` copies of their data during the check; everything is restored bit-exactly after.
        loss_fn: called as ``loss_fn(model(inputs), target)`` or ``loss_fn(model(batch))``.
        batch: a Tensor, a dict (keyword inputs), ``(inputs,)`` or ``(inputs, target)``; a tuple/list
            ``inputs`` is unpacked as positional arguments, a dict as keyword arguments.
        forward: instead of `loss_fn`, a callable ``forward(model, batch) -> loss`` for anything else
            (passing both `loss_fn` and `forward` is an error: one of them would be ignored).
        params: names or glob patterns restricting the checked parameters (others listed as skipped).
        inputs: also check the gradients w.r.t. the floating tensors of the batch.
        mode: "auto" (full where it fits `budget`, else random directions + sampled elements),
            "full" (every element), "directional" or "sampled". The report states each tensor's coverage.
        budget: seconds that "auto" may plan for (full checks are chosen cheapest first).
        eps: relative step; the step of element t is ``eps * max(1, |t|)``. Default per dtype (6e-6).
        rtol: relative floor of each element's tolerance. Default per dtype (1e-6 in float64).
        atol: absolute floor added to each element's tolerance (default 0: the noise estimate sets it).
        dtype: checking precision (float64); None keeps the model's own dtype.
        seed: the RNG seed set before every evaluation (dropout draws the same mask in each).
        engine: "auto" (the cone engine where it can run, else vmap, else a loop; the report says why),
            "cone" (re-evaluate only what each perturbation changes), "vmap" or "loop".
        progress: show a progress bar (None: when stderr is a terminal).
        localise: check each submodule's own backward in isolation and name the first wrong one
            (None: only when the check failed; False: never; True: always).
        accumulation: also check that ``.grad`` accumulates: ``.grad`` after a second backward through
            the same graph must be twice ``.grad`` after one (status "does not accumulate" if it is not).
            Costs one extra backward pass; False turns it off.
        after_steps: take this many optimizer steps on a private copy of the parameters first and check
            there (the model itself is never stepped): gradients blocked at initialisation (LoRA's
            ``B = 0``) come alive. Default 0: check at the model's own point.
        optimizer: with `after_steps`, a factory ``optimizer(params) -> torch.optim.Optimizer`` (default:
            SGD with a learning rate chosen so that the loss goes down).
        second_order: also check Hessian-vector products of the loss w.r.t. the parameters along random
            directions against finite differences of the gradient (one "(Hv)" row per tensor).

    Returns:
        A `Report`: ``report.passed``, one `TensorResult` per parameter, ``str(report)`` a table.

    Raises:
        InvalidArgumentError / InvalidArgumentTypeError: a bad argument or loss (the message says the fix).

    Example:
        >>> report = verify_module(nn.Linear(3, 2), nn.MSELoss(), (torch.randn(4, 3), torch.randn(4, 2)))
        >>> report.passed
        True
    """
    start = time.perf_counter()
    reject_unknown("verify_module", unknown, _OPTIONS)
    check_module_call(_CALL, model, loss_fn, forward, inputs=inputs)
    options = check_options(
        "verify_module",
        dtype=dtype,
        mode=mode,
        budget=budget,
        seed=seed,
        eps=eps,
        rtol=rtol,
        atol=atol,
        engine=engine,
        progress=progress,
    )
    patterns = validate_patterns("verify_module", params)
    compiled = split_compiled(model)  # torch.compile(model): the user's names, numerics on the eager module
    model = model if compiled is None else compiled.eager
    checked, skipped, objective = prepare(_CALL, model, loss_fn, batch, forward, patterns, inputs, dtype)
    if localise is not None and not isinstance(localise, bool):
        raise InvalidArgumentTypeError(f"{_CALL}: localise= must be True, False or None, got {localise!r}.")
    extras = _extras(accumulation, after_steps, optimizer, second_order)
    with eager_calls(compiled), preserved_global_state(), lend_model(model, dtype) as lent:
        report = _run(lent, objective, checked, skipped, inputs, options, start, extras, compiled)
        if after_steps and (localise or (localise is None and not report.passed and report.powered)):
            # localise at the stepped point, where the bug showed: the lent model holds the stepped copies
            report = _localised(report, lent.model, loss_fn, batch, forward, dtype, seed, engine, inputs, start)
            localise = False
    # Nothing to localise when nothing was tested with power (no finding, only "no verdict").
    if localise or (localise is None and not report.passed and report.powered):
        with eager_calls(compiled):
            report = _localised(report, model, loss_fn, batch, forward, dtype, seed, engine, inputs, start)
    return report


def _localised(
    report: Report,
    model: nn.Module,
    loss_fn: Any,
    batch: Any,
    forward: Any,
    dtype: torch.dtype | None,
    seed: int,
    engine: str,
    inputs: bool,
    start: float,
) -> Report:
    from ._localise import localise as find_wrong_backward

    found = find_wrong_backward(
        model, loss_fn, batch, forward=forward, dtype=dtype, seed=seed, engine=engine, inputs=inputs
    )
    return dataclasses.replace(report, localisation=found, seconds=time.perf_counter() - start)


@dataclass(frozen=True)
class _Extras:
    """verify_module's checks next to the gradient (issue "checks no other tool has")."""

    accumulation: bool
    after_steps: int
    optimizer: Callable[[list[nn.Parameter]], Any] | None
    second_order: bool

    def report(self) -> dict[str, Any]:
        """The facts for the report's options line (the accumulation check costs one extra backward)."""
        out: dict[str, Any] = {"accumulation": "on (+1 backward)" if self.accumulation else "off"}
        if self.after_steps:
            out["after_steps"] = self.after_steps
        if self.second_order:
            out["second_order"] = True
        return out


def _extras(accumulation: Any, after_steps: Any, optimizer: Any, second_order: Any) -> _Extras:
    for name, flag in (("accumulation", accumulation), ("second_order", second_order)):
        if not isinstance(flag, bool):
            raise InvalidArgumentTypeError(f"{_CALL}: {name}= must be True or False, got {flag!r}.")
    if isinstance(after_steps, bool) or not isinstance(after_steps, int):
        raise InvalidArgumentTypeError(
            f"{_CALL}: after_steps={after_steps!r} must be an int (optimizer steps before checking), "
            "e.g. after_steps=3."
        )
    if after_steps < 0:
        raise InvalidArgumentError(f"{_CALL}: after_steps={after_steps} must be >= 0 (0: check at the model's point).")
    if optimizer is not None:
        if not callable(optimizer) or isinstance(optimizer, torch.optim.Optimizer):
            raise InvalidArgumentTypeError(
                f"{_CALL}: optimizer= takes a factory, e.g. optimizer=lambda params: torch.optim.Adam(params, "
                f"lr=1e-3), got {optimizer!r}; the check builds it on its own copy of the parameters."
            )
        if not after_steps:
            raise InvalidArgumentError(
                f"{_CALL}: optimizer= is used only with after_steps= (how many steps to take); pass e.g. after_steps=3."
            )
    return _Extras(accumulation, after_steps, optimizer, second_order)


def _check(
    lent: Lent,
    objective: Objective,
    targets: list[Target],
    options: CheckOptions,
    bar: Any,
    accumulation: bool,
    compiled: Compiled | None,
) -> Checked:
    """`check_targets`; a compiled model's forward is compared with the eager one first, and its backward
    gives the analytical side (`_compiled`)."""
    if compiled is None:
        return check_targets(
            lent, objective, targets, options, bar.update, call=_CALL, grow=bar.grow, accumulation=accumulation
        )
    with no_donated_buffers():
        differs = compiled.forward_differs(lent, objective, options.seed)
        if differs is not None:
            why = "not checked: the compiled forward differs from the eager one (see the row 'compiled forward')"
            rows = [TensorResult(name=t.name, shape=tuple(t.tensor.shape), status="skipped", note=why) for t in targets]
            return Checked([differs, *rows], 0, "loop", torch.zeros((), dtype=torch.float64), [compiled.note()])
        try:
            found = check_targets(
                lent, objective, targets, options, bar.update, call=_CALL, grow=bar.grow,
                accumulation=accumulation, trained=compiled.compiled,
            )  # fmt: skip
        except RuntimeError as exc:
            if not accumulation or "donated buffers" not in str(exc):
                raise
            lent.clear_grads()  # a graph the user compiled before, with donated buffers: one backward only
            found = check_targets(
                lent, objective, targets, options, bar.update, call=_CALL, grow=bar.grow, trained=compiled.compiled
            )
            found.notes.append(_NO_ACCUMULATION)
    found.notes.append(compiled.note())
    return found


_NO_ACCUMULATION = (
    "accumulation: not checked, because the compiled backward frees its buffers after one backward "
    "(donated buffers; compiled before the check) and allows no second one"
)


def _second_order_rows(
    lent: Lent, objective: Objective, targets: list[Target], options: CheckOptions, wanted: bool
) -> tuple[list[TensorResult], int]:
    """Hessian-vector rows: of the parameters if `wanted`; of the model's input when the loss differentiates
    inside (its value then rests on the model's double backward, which its first-order check can't see)."""
    opts = (options.seed, float(options.eps), float(options.rtol), options.atol)
    rows, evaluations = check_second_order(lent, objective, targets, *opts) if wanted else ([], 0)
    if objective.needs_grad:
        inner, more = check_input_second_order(lent, objective, *opts)
        rows, evaluations = rows + inner, evaluations + more
    return rows, evaluations


def _run(
    lent: Lent,
    objective: Objective,
    checked: list[tuple[str, nn.Parameter]],
    skipped: list[tuple[str, str]],
    inputs: bool,
    options: CheckOptions,
    start: float,
    extras: _Extras,
    compiled: Compiled | None = None,
) -> Report:
    if options.dtype == torch.float64:
        torch.set_default_dtype(torch.float64)
    notes = (
        [take_steps(lent, objective, extras.after_steps, extras.optimizer, options.seed, _CALL)]
        if extras.after_steps
        else []
    )
    targets = [Target(name, p.data, kind="parameter", param=p) for name, p in checked]
    if inputs:
        targets += input_targets(objective.batch)
    work_dtype = targets[0].tensor.dtype if targets else torch.float64
    device = targets[0].tensor.device if targets else torch.device("cpu")
    options = options.resolve(work_dtype, device, **extras.report())
    with progress_bar(2 + len(targets) * NOISE_POINTS, options.progress, "verify_module") as bar:
        found = _check(lent, objective, targets, options, bar, extras.accumulation, compiled)
        second, evaluations = _second_order_rows(lent, objective, targets, options, extras.second_order)
    table = dict(lent.model.named_parameters(remove_duplicate=False))
    results = (
        found.results
        + second
        + [TensorResult(name=n, shape=tuple(table[n].shape), status="skipped", note=why) for n, why in skipped]
    )
    notes += found.notes
    if objective.needs_grad and not all(r.passed for r in results):
        notes.append(_DOUBLE_BACKWARD_HINT)
    warning = zero_gradient_warning(found.results, extras.after_steps)
    return Report(
        call="verify_module",
        results=tuple(results),
        relative_error=found.relative_error,
        options=options,
        evaluations=found.evaluations + evaluations,
        seconds=time.perf_counter() - start,
        engine=found.engine,
        notes=tuple(notes),
        warnings=((warning,) if warning else ()) + tuple(power_warnings(found.results)),
    )

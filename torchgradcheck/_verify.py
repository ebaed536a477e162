"""verify_module: the public entry point for a module, and the only place its errors gain the caller's context."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ._batch import Objective, input_targets
from ._check import Checked, check_module_call, check_targets, prepare
from ._errors import InvalidArgumentTypeError
from ._noise import NOISE_POINTS
from ._options import CheckOptions, check_options, reject_unknown, validate_patterns
from ._params import Lent, Target, lend_model
from ._progress import progress_bar
from ._report import Report, TensorResult
from ._state import preserved_global_state

__all__ = ["verify_module"]

_CALL = "verify_module(model, loss_fn, batch)"
_OPTIONS = (
    "forward",
    "params",
    "inputs",
    "mode",
    "budget",
    "eps",
    "rtol",
    "atol",
    "dtype",
    "seed",
    "engine",
    "progress",
    "localise",
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
        engine: "auto" (vmap, falling back to a loop), "vmap" or "loop".
        progress: show a progress bar (None: when stderr is a terminal).
        localise: check each submodule's own backward in isolation and name the first wrong one
            (None: only when the check failed; False: never; True: always).

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
    checked, skipped, objective = prepare(_CALL, model, loss_fn, batch, forward, patterns, inputs, dtype)
    if localise is not None and not isinstance(localise, bool):
        raise InvalidArgumentTypeError(f"{_CALL}: localise= must be True, False or None, got {localise!r}.")
    with preserved_global_state(), lend_model(model, dtype) as lent:
        report = _run(lent, objective, checked, skipped, inputs, options, start)
    if localise or (localise is None and not report.passed):
        from ._localise import localise as find_wrong_backward

        found = find_wrong_backward(
            model, loss_fn, batch, forward=forward, dtype=dtype, seed=seed, engine=engine, inputs=inputs
        )
        report = dataclasses.replace(report, localisation=found, seconds=time.perf_counter() - start)
    return report


def _run(
    lent: Lent,
    objective: Objective,
    checked: list[tuple[str, nn.Parameter]],
    skipped: list[tuple[str, str]],
    inputs: bool,
    options: CheckOptions,
    start: float,
) -> Report:
    if options.dtype == torch.float64:
        torch.set_default_dtype(torch.float64)
    targets = [Target(name, p.data, kind="parameter", param=p) for name, p in checked]
    if inputs:
        targets += input_targets(objective.batch)
    work_dtype = targets[0].tensor.dtype if targets else torch.float64
    device = targets[0].tensor.device if targets else torch.device("cpu")
    options = options.resolve(work_dtype, device)
    with progress_bar(2 + len(targets) * NOISE_POINTS, options.progress, "verify_module") as bar:
        found: Checked = check_targets(lent, objective, targets, options, bar.update, call=_CALL, grow=bar.grow)
    table = dict(lent.model.named_parameters(remove_duplicate=False))
    results = found.results + [
        TensorResult(name=n, shape=tuple(table[n].shape), status="skipped", note=why) for n, why in skipped
    ]
    return Report(
        call="verify_module",
        results=tuple(results),
        relative_error=found.relative_error,
        options=options,
        evaluations=found.evaluations,
        seconds=time.perf_counter() - start,
        engine=found.engine,
        notes=tuple(found.notes),
    )

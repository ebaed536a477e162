"""verify_module: the public entry point, and the only place errors gain the caller's context."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ._batch import BatchError, Objective, check_loss, convert_batch, input_targets, module_is_lazy
from ._check import Settings
from ._dtensor import is_dtensor, local_grad
from ._engines import Engine, LoopEngine, VmapEngine
from ._errors import InvalidArgumentError, InvalidArgumentTypeError
from ._modes import MODES, TensorJob, check_tensor, measure_noise, plan
from ._noise import NOISE_POINTS, unit_roundoff
from ._options import reject_unknown, resolve_tolerances, validate_common, validate_patterns
from ._params import Lent, Target, dense_grad, lend_model, select_parameters, unmatched_patterns
from ._progress import progress_bar
from ._report import ParameterResult, Report
from ._state import preserved_global_state, reseed

__all__ = ["verify_module"]

_CALL = "verify_module(model, loss_fn, batch)"
# What torch says when a kernel rejects the dtype it was given ("expected scalar type Float but found Double").
_DTYPE_ERROR = re.compile(r"(?i)double|float64|dtype|scalar type")
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


def _vmap_agrees(engine: VmapEngine, target: Target, loss0: torch.Tensor, slack: float) -> str | None:
    """None if one unperturbed batched evaluation reproduces the plain loss; else why not."""
    try:
        value = engine.losses_along(
            target, torch.zeros(1, target.tensor.numel(), dtype=target.tensor.dtype, device=target.tensor.device)
        )[0]
    except Exception as exc:  # vmap can't run this model: any error here means "use the loop"
        first = str(exc).split(". ")[0].splitlines()[0] if str(exc) else ""
        return f"vmap could not run the model ({type(exc).__name__}: {first[:160]})"
    if not abs(float(value) - float(loss0)) <= slack:
        return f"vmap gave a different unperturbed loss ({float(value)!r} vs {float(loss0)!r})"
    return None


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
        forward: instead of `loss_fn`, a callable ``forward(model, batch) -> loss`` for anything else.
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
        A `Report`: ``report.passed``, one `ParameterResult` per parameter, ``str(report)`` a table.

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
    validate_common("verify_module", eps=eps, rtol=rtol, atol=atol, dtype=dtype, seed=seed, engine=engine)
    patterns = validate_patterns("verify_module", params)
    if mode not in MODES:
        raise InvalidArgumentError(f"{_CALL}: unknown mode={mode!r}; valid options are {list(MODES)}.")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise InvalidArgumentError(f"{_CALL}: budget={budget!r} must be a number of seconds > 0.")
    checked, skipped, objective = prepare(_CALL, model, loss_fn, batch, forward, patterns, inputs, dtype)
    if localise is not None and not isinstance(localise, bool):
        raise InvalidArgumentTypeError(f"{_CALL}: localise= must be True, False or None, got {localise!r}.")
    with preserved_global_state(), lend_model(model, dtype) as lent:
        report = _run(
            lent,
            objective,
            checked,
            skipped,
            inputs,
            eps,
            rtol,
            atol,
            dtype,
            seed,
            engine,
            progress,
            start,
            mode,
            float(budget),
        )
    if localise or (localise is None and not report.passed):
        from ._localise import localise as find_wrong_backward

        found = find_wrong_backward(
            model, loss_fn, batch, forward=forward, dtype=dtype, seed=seed, engine=engine, inputs=inputs
        )
        report = dataclasses.replace(report, localisation=found, seconds=time.perf_counter() - start)
    return report


def check_module_call(call: str, model: Any, loss_fn: Any, forward: Any, **flags: Any) -> None:
    """The model, loss_fn/forward and boolean flags of a verify_* call on a module; errors name `call`."""
    if not isinstance(model, nn.Module):
        raise InvalidArgumentTypeError(
            f"{call}: expected a torch.nn.Module but got model={model!r} (type={type(model).__name__}); "
            "to check a plain function use verify_function."
        )
    if forward is None:
        if not callable(loss_fn):
            raise InvalidArgumentTypeError(
                f"{call}: loss_fn must be callable (e.g. nn.MSELoss()) but got loss_fn={loss_fn!r}; "
                "or pass forward=lambda model, batch: <loss>."
            )
    elif not callable(forward):
        raise InvalidArgumentTypeError(f"{call}: forward= must be a callable (model, batch) -> loss, got {forward!r}.")
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise InvalidArgumentTypeError(f"{call}: {name}= must be True or False, got {flag!r}.")


def prepare(
    call: str,
    model: nn.Module,
    loss_fn: Any,
    batch: Any,
    forward: Any,
    patterns: Sequence[str] | None,
    inputs: bool,
    dtype: torch.dtype | None,
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, str]], Objective]:
    """The parameters to check (and the skipped ones), and the objective on a converted copy of the batch."""
    if module_is_lazy(model):
        raise InvalidArgumentError(f"{call}: the model has uninitialized (lazy) parameters; run one forward first.")
    checked, skipped = select_parameters(model, patterns)
    for p in unmatched_patterns(model, patterns):
        names = [n for n, _ in model.named_parameters()]
        raise InvalidArgumentError(f"{call}: params={p!r} matches no parameter; names are {names[:10]}.")
    if not checked and not inputs:
        raise InvalidArgumentError(
            f"{call}: the model has no trainable floating parameters to check "
            f"(skipped: {skipped or 'none'}); set requires_grad=True, or pass inputs=True."
        )
    try:
        objective = Objective(loss_fn, convert_batch(batch, dtype), forward)
    except BatchError as exc:
        raise InvalidArgumentError(f"{call}: {exc}; fix the batch, or pass forward=.") from None
    return checked, skipped, objective


def analytical(
    lent: Lent, objective: Objective, targets: list[Target], seed: int, call: str = _CALL
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """One seeded forward and ``loss.backward()``: the loss and every target's ``.grad`` (flat float64).

    The errors name `call`; a kernel that rejects the checking dtype gets an error naming dtype=None.
    """
    for t in targets:
        if t.kind == "input":
            t.tensor.requires_grad_(True)
    torch.set_grad_enabled(True)
    lent.reset_buffers()
    reseed(seed)
    try:
        loss = check_loss(objective(lent.model))
        if not loss.requires_grad:
            raise InvalidArgumentError(
                f"{call}: the loss does not require grad: nothing connects it to the checked parameters "
                "(computed under torch.no_grad(), or detached?)."
            )
        loss.backward()
    except BatchError as exc:
        raise InvalidArgumentError(f"{call}: {exc}.") from None
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        own = {s.data.dtype for s in lent.saved_params if s.data.is_floating_point()}
        if lent.dtype is None or own <= {lent.dtype} or not _DTYPE_ERROR.search(str(exc)):
            raise  # the model's own error (a shape bug, ...), not our conversion: let it through untouched
        raise InvalidArgumentError(
            f"{call}: the model failed when run in {lent.dtype} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); its own dtype is {sorted(map(str, own))}. If its kernels "
            "only run in that dtype, pass dtype=None (tolerances then follow the measured noise of that dtype)."
        ) from exc
    grads = {
        t.name: local_grad(t.param, t.param.grad)
        if is_dtensor(t.param)
        else dense_grad(t.param.grad if t.param is not None else None)
        for t in targets
    }
    lent.clear_grads()
    for t in targets:
        if t.kind == "input":
            t.tensor.requires_grad_(False)
            t.tensor.grad = None
    torch.set_grad_enabled(False)
    return loss.detach().to(torch.float64), grads


class _Engines:
    """The engine in use, and the switch to the loop when vmap fails mid-check (noted, never silent)."""

    def __init__(self, loop: LoopEngine, engine: Engine, forced: bool, notes: list[str]) -> None:
        self.loop, self.engine, self.forced, self.notes = loop, engine, forced, notes

    def run(self, what: str, fn: Callable[[Engine], Any]) -> Any:
        try:
            return fn(self.engine)
        except Exception as exc:
            if self.engine is self.loop or self.forced:
                raise
            self.notes.append(f"engine: loop from {what} on, because vmap failed ({type(exc).__name__})")
            self.engine = self.loop
            return fn(self.engine)

    @property
    def evaluations(self) -> int:
        return self.loop.evaluations + (self.engine.evaluations if self.engine is not self.loop else 0)


def _choose_engine(
    lent: Lent,
    objective: Objective,
    seed: int,
    tick: Callable[[int], None],
    name: str,
    targets: list[Target],
    notes: list[str],
) -> tuple[_Engines, float]:
    """Pick the engine; also evaluates the unperturbed loss twice to detect nondeterminism."""
    loop = LoopEngine(lent, objective, seed, tick)
    loss_again, nondet = loop.loss_twice()
    if nondet > 0:
        notes.append(
            f"the forward is nondeterministic beyond torch's RNG: two identical evaluations differ by "
            f"{nondet:.2e}; tolerances widened by this noise"
        )
    engine: Engine = loop
    if name in ("auto", "vmap") and targets:
        slack = 1e4 * unit_roundoff(targets[0].tensor.dtype) * abs(float(loss_again)) + 10 * nondet
        vm = VmapEngine(lent, objective, seed, tick)
        why = _vmap_agrees(vm, targets[0], loss_again, slack)
        if why is None:
            engine = vm
        elif name == "vmap":
            raise InvalidArgumentError(f"{_CALL}: engine='vmap' is not usable here: {why}; use engine='auto'.")
        else:
            notes.append(f"engine: loop, because {why}")
    return _Engines(loop, engine, name == "vmap", notes), nondet


def _run(
    lent: Lent,
    objective: Objective,
    checked: list[tuple[str, nn.Parameter]],
    skipped: list[tuple[str, str]],
    inputs: bool,
    eps: float | None,
    rtol: float | None,
    atol: float,
    dtype: torch.dtype | None,
    seed: int,
    engine_name: str,
    progress: bool | None,
    start: float,
    mode: str = "auto",
    budget: float = 3.0,
) -> Report:
    if dtype == torch.float64:
        torch.set_default_dtype(torch.float64)
    targets = [Target(name, p.data, kind="parameter", param=p) for name, p in checked]
    if inputs:
        targets += input_targets(objective.batch)
    work_dtype = targets[0].tensor.dtype if targets else torch.float64
    eps_, rtol_ = resolve_tolerances(dtype or work_dtype, eps, rtol)
    loss0, grads = analytical(lent, objective, targets, seed)
    notes: list[str] = []
    jobs = []
    for t in targets:
        a = grads[t.name]
        zeros = torch.zeros(t.tensor.numel(), dtype=torch.float64, device=t.tensor.device)
        jobs.append(TensorJob(t, zeros if a is None else a, a is not None))
    with progress_bar(2 + len(jobs) * NOISE_POINTS, progress, "verify_module") as bar:
        engines, nondet = _choose_engine(lent, objective, seed, bar.update, engine_name, targets, notes)
        generator = torch.Generator().manual_seed(seed)
        settings = Settings(eps=eps_, rtol=rtol_, atol=atol)
        for job in jobs:
            engines.run(job.target.name, lambda e, job=job: measure_noise(e, job, loss0, nondet, generator))
        plan(jobs, mode, budget)
        bar.grow(sum(job.cost("auto" if job.mode == "cheap" else job.mode) for job in jobs))
        results = [
            engines.run(job.target.name, lambda e, job=job: check_tensor(e, job, loss0, nondet, settings, generator))
            for job in jobs
        ]
    results += [
        ParameterResult(name=n, shape=tuple(p.shape), status="skipped", note=why)
        for (n, why), p in zip(skipped, _params_by_name(lent.model, [n for n, _ in skipped]))
    ]
    overall = _overall_error(results)
    device = targets[0].tensor.device if targets else torch.device("cpu")
    options = {
        "dtype": str(dtype or work_dtype).replace("torch.", ""),
        "device": str(device),
        "eps": eps_,
        "rtol": rtol_,
        "atol": atol,
        "seed": seed,
        "mode": mode,
    }
    if mode == "auto":
        options["budget"] = budget
    return Report(
        call="verify_module",
        results=tuple(results),
        relative_error=overall,
        options=options,
        evaluations=engines.evaluations,
        seconds=time.perf_counter() - start,
        engine=engines.engine.name,
        notes=tuple(notes),
    )


def _overall_error(results: list[ParameterResult]) -> float:
    """``||a - n|| / (||a|| + ||n||)`` over every checked element of every tensor."""
    diff2 = a2 = n2 = 0.0
    for res in results:
        if res.norms is None or res.relative_error is None:
            continue
        a, n = res.norms
        diff2 += (res.relative_error * (a + n)) ** 2
        a2, n2 = a2 + a * a, n2 + n * n
    den = a2**0.5 + n2**0.5
    return diff2**0.5 / den if den > 0 else 0.0


def _params_by_name(model: nn.Module, names: list[str]) -> list[torch.Tensor]:
    table = dict(model.named_parameters(remove_duplicate=False))
    return [table[n] for n in names]

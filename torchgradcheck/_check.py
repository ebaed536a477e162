"""The shared middle: check a list of target tensors of a lent model against one objective.

`check_targets` is what every module-shaped check runs between "the model is lent and the targets
are chosen" and "a `Report` is assembled": `verify_module`, `_localise` (one site at a time),
`distributed/` (split and lockstep) and the step-sweep plot (`analytical`). It never validates
arguments and never lends the model: its callers have done that, once, at the public boundary.

    analytical (one backward) -> engine (`_engines.choose_engine`) -> noise per tensor (`_modes`)
    -> plan (`_modes.plan`) -> each tensor in its mode (`_modes.check_tensor`, `_measure`)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._accumulation import AccumulationVerdict, apply_accumulation, check_accumulation
from ._batch import BatchError, Objective, check_loss, convert_batch, module_is_lazy
from ._compare import DTYPE_DEFAULTS
from ._dtensor import is_dtensor, local_grad
from ._engines import EngineSwitch, LoopEngine, choose_engine
from ._errors import InvalidArgumentError, InvalidArgumentTypeError
from ._measure import Settings
from ._modes import TensorJob, check_tensor, measure_noise, plan
from ._options import CheckOptions
from ._params import Lent, Target, dense_grad, select_parameters, unmatched_patterns
from ._report import TensorResult
from ._state import reseed

__all__ = ["Checked", "analytical", "check_module_call", "check_targets", "overall_error", "prepare"]

# What torch says when a kernel rejects the dtype it was given ("expected scalar type Float but found Double").
_DTYPE_ERROR = re.compile(r"(?i)double|float64|dtype|scalar type")
# What torch.autograd.grad says when the loss that calls it runs under no_grad.
_NEEDS_GRAD = re.compile(r"does not require grad|does not have a grad_fn|differentiated Tensors")
Tick = Callable[[int], None]


def _noop(_: int) -> None:
    return None


@dataclass
class Checked:
    """What `check_targets` found: one row per target (in order), and how it got there."""

    results: list[TensorResult]
    evaluations: int
    engine: str
    loss: torch.Tensor
    notes: list[str] = field(default_factory=list)

    @property
    def relative_error(self) -> float:
        return overall_error(self.results)


def check_targets(
    lent: Lent,
    objective: Objective,
    targets: list[Target],
    options: CheckOptions,
    tick: Tick = _noop,
    *,
    call: str,
    grow: Tick = _noop,
    accumulation: bool = False,
) -> Checked:
    """Check every target of a lent model in its planned mode; errors name `call`.

    `options` must be resolved (`CheckOptions.resolve`: eps and rtol set). `tick(n)` reports finished
    evaluations; `grow(n)` adds planned work to a progress bar (the plan is known only after the noise).
    `accumulation`: also run one more backward and check that ``.grad`` accumulates (`_accumulation`).
    """
    notes: list[str] = []
    second: dict[str, AccumulationVerdict] | None = {} if accumulation else None
    loss0, grads = analytical(lent, objective, targets, options.seed, call, accumulation=second, notes=notes)
    jobs = []
    for t in targets:
        a = grads[t.name]
        zeros = torch.zeros(t.tensor.numel(), dtype=torch.float64, device=t.tensor.device)
        jobs.append(TensorJob(t, zeros if a is None else a, a is not None))
    engines, nondet = start_engines(call, lent, objective, targets, options, tick, notes)
    generator = torch.Generator().manual_seed(options.seed)
    settings = Settings(eps=float(options.eps or 0), rtol=float(options.rtol or 0), atol=options.atol)
    for job in jobs:
        engines.run(job.target.name, lambda e, job=job: measure_noise(e, job, loss0, nondet, generator))
    plan(jobs, options.mode, options.budget)
    grow(sum(job.cost("auto" if job.mode == "cheap" else job.mode) for job in jobs))
    results = [
        engines.run(job.target.name, lambda e, job=job: check_tensor(e, job, loss0, nondet, settings, generator))
        for job in jobs
    ]
    if second:
        results = [apply_accumulation(r, second.get(r.name)) for r in results]
    return Checked(results, engines.evaluations, engines.name, loss0, notes)


def start_engines(
    call: str,
    lent: Lent,
    objective: Objective,
    targets: list[Target],
    options: CheckOptions,
    tick: Tick,
    notes: list[str],
) -> tuple[EngineSwitch, float]:
    """The loop engine, the forward's nondeterminism (two identical evaluations), and the engine policy."""
    loop = LoopEngine(lent, objective, options.seed, tick)
    try:
        loss_again, nondet = loop.loss_twice()
    except RuntimeError as exc:
        # A loss that calls torch.autograd.grad (physics-informed, gradient penalties) can't run under
        # no_grad ("element 0 of tensors does not require grad"): evaluate it with grad enabled.
        if objective.needs_grad or not _NEEDS_GRAD.search(str(exc)):
            raise
        objective.needs_grad = True
        notes.append(
            "the loss differentiates inside (torch.autograd.grad) and fails under no_grad: every perturbed "
            "loss was evaluated with grad enabled"
        )
        loss_again, nondet = loop.loss_twice()
    if nondet > 0:
        notes.append(
            f"the forward is nondeterministic beyond torch's RNG: two identical evaluations differ by "
            f"{nondet:.2e}; tolerances widened by this noise"
        )
    first = targets[0] if targets else None
    return choose_engine(call, loop, first, loss_again, nondet, options.engine, notes), nondet


def overall_error(results: Sequence[TensorResult]) -> float:
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
    elif loss_fn is not None:
        raise InvalidArgumentError(
            f"{call}: got both loss_fn={loss_fn!r} and forward=; forward(model, batch) computes the loss "
            "itself, so loss_fn would be ignored: pass one of them (loss_fn=None with forward=)."
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
    lent: Lent,
    objective: Objective,
    targets: list[Target],
    seed: int,
    call: str,
    *,
    accumulation: dict[str, AccumulationVerdict] | None = None,
    notes: list[str] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """One seeded forward and ``loss.backward()``: the loss and every target's ``.grad`` (flat float64).

    The errors name `call`; a kernel that rejects the checking dtype gets an error naming dtype=None.
    With a dict `accumulation`, the graph is retained and one more backward fills it with the tensors
    whose ``.grad`` does not accumulate (`_accumulation.check_accumulation`); a note goes to `notes`
    if that second backward could not run.
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
        loss.backward(retain_graph=accumulation is not None)
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
    grads = {t.name: _grad(t) for t in targets}
    if accumulation is not None and targets:
        found, why = check_accumulation(loss, targets, grads, DTYPE_DEFAULTS[targets[0].tensor.dtype].rtol)
        accumulation.update(found)
        if why and notes is not None:
            notes.append(why)
    lent.clear_grads()
    for t in targets:
        if t.kind == "input":
            t.tensor.requires_grad_(False)
            t.tensor.grad = None
    torch.set_grad_enabled(False)
    return loss.detach().to(torch.float64), grads


def _grad(t: Target) -> torch.Tensor | None:
    """`t`'s ``.grad`` as a flat float64 copy; of a DTensor, this rank's block, which the check perturbs."""
    grad = t.param.grad if t.param is not None else None
    return local_grad(t.param, grad) if is_dtensor(t.param) else dense_grad(grad)

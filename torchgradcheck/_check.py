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
from ._batch import (
    BatchError,
    Objective,
    check_loss,
    convert_batch,
    integer_paths,
    module_is_lazy,
    non_finite_paths,
)
from ._compare import DTYPE_DEFAULTS
from ._cone import cone_agrees
from ._dtensor import is_dtensor, local_grad
from ._engines import EngineSwitch, LoopEngine, choose_engine
from ._errors import InvalidArgumentError, InvalidArgumentTypeError
from ._measure import Settings
from ._modes import TensorJob, check_tensor, measure_noise, plan
from ._noise import unit_roundoff
from ._options import CheckOptions
from ._params import Lent, Target, dense_grad, select_parameters, unmatched_patterns
from ._report import TensorResult, element_name
from ._state import reseed
from ._validate import BadLeafError, bad_leaves, meta_tensors
from ._zero_gradients import exactly_zero

__all__ = [
    "Checked",
    "analytical",
    "check_module_call",
    "check_targets",
    "overall_error",
    "power_warnings",
    "prepare",
]

# What torch says when a kernel rejects float64 ("not implemented for 'Double'", "expected scalar type
# Float but found Double"): only then is dtype=None the advice.
_DTYPE_ERROR = re.compile(r"(?i)double|float64")
# ... when an integer tensor reaches a float kernel ("mat1 and mat2 must have the same dtype, but got Long and Double").
_INTEGER_ERROR = re.compile(r"Long|\bInt\b|Short|Char|Byte|int64|int32|integer")
# ... when the model modifies in place a tensor that autograd saved for backward: a bug in the model.
_INPLACE_ERROR = re.compile(
    r"modified by an inplace operation|a leaf Variable that requires grad is being used in an in-place"
)
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
    empty: dict[str, TensorResult] = {}
    padding = padding_rows(lent.model)
    for t in targets:
        if t.tensor.numel() == 0:
            empty[t.name] = TensorResult(t.name, t.shape, "skipped", kind=t.kind, note=EMPTY_NOTE)
            continue
        a = grads[t.name]
        zeros = torch.zeros(t.tensor.numel(), dtype=torch.float64, device=t.tensor.device)
        mark_skipped_elements(t, a, padding)
        jobs.append(TensorJob(t, zeros if a is None else a, a is not None))
    live = [job.target for job in jobs]
    engines, nondet = start_engines(call, lent, objective, live, options, tick, notes, loss0=loss0)
    generator = torch.Generator().manual_seed(options.seed)
    settings = Settings(eps=float(options.eps or 0), rtol=float(options.rtol or 0), atol=options.atol)
    for job in jobs:
        engines.run(job.target.name, lambda e, job=job: measure_noise(e, job, loss0, nondet, generator))
    plan(jobs, options.mode, options.budget)
    planned = sum(job.cost("auto" if job.mode == "cheap" else job.mode) for job in jobs)
    engines.upgrade(planned)
    grow(planned)
    checked = {
        job.target.name: engines.run(
            job.target.name, lambda e, job=job: check_tensor(e, job, loss0, nondet, settings, generator)
        )
        for job in jobs
    }
    results = [empty[t.name] if t.name in empty else checked[t.name] for t in targets]
    if second:
        results = [apply_accumulation(r, second.get(r.name)) for r in results]
    if nondet > 0 and not any(r.status == "ok" or not r.passed for r in results):
        notes.append(
            f"nondeterminism of {nondet:.2e} (beyond torch's RNG) swamps the gradients: nothing could be tested. "
            "Seed that source inside the forward (random.seed(0), numpy.random.seed(0)) or make it deterministic"
        )
    return Checked(results, engines.evaluations, engines.name, loss0, notes)


EMPTY_NOTE = "empty tensor (0 elements): nothing to check"


def power_warnings(results: Sequence[TensorResult]) -> list[str]:
    """Full sentences naming the tensors whose backward was not really tested (statuses zero and weak)."""

    def names(status: str) -> str:  # exact zeros get `_zero_gradients.zero_gradient_warning` instead
        found = [r.name for r in results if r.status == status and not exactly_zero(r)]
        return ", ".join(found[:_SHOWN]) + (f" and {len(found) - _SHOWN} more" if len(found) > _SHOWN else "")

    out: list[str] = []
    if not any(r.status == "ok" or not r.passed for r in results):
        return out  # nothing had power: the report is not passed, and says why in full
    if names("zero"):
        out.append(
            f"nothing about the backward of {names('zero')} was tested: autograd and finite differences are "
            "both zero there (within the noise). If that is only true at this point (a LoRA B initialised "
            "to zero makes A's gradient exactly zero), check again after a few optimiser steps "
            "(after_steps=); a bias followed by BatchNorm has a zero gradient always."
        )
    if names("weak"):
        out.append(
            f"the check of {names('weak')} has little power: the tolerance is not small next to the gradient "
            "(see the notes), so only a grossly wrong backward could have failed there."
        )
    return out


_SHOWN = 5


def padding_rows(model: nn.Module) -> dict[int, int]:
    """``id(weight) -> padding_idx`` of every Embedding/EmbeddingBag whose padding row torch never updates."""
    rows = {}
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.padding_idx is not None:
            rows[id(module.weight)] = module.padding_idx
    return rows


def mark_skipped_elements(
    target: Target, grad: torch.Tensor | None, padding: dict[int, int], label: str | None = None
) -> None:
    """Set `target.skip` / `skip_note`: non-finite elements, and padding rows whose gradient is 0 by design.

    `label` names the tensor in the note (default: its target name).
    """
    skip = ~torch.isfinite(target.tensor)
    notes = []
    if bool(skip.any()):
        where = skip.nonzero().tolist()
        shown = ", ".join(element_name(label or target.name, tuple(i)) for i in where[:_SHOWN])
        more = f" and {len(where) - _SHOWN} more" if len(where) > _SHOWN else ""
        notes.append(f"{len(where)} element(s) not finite (NaN/Inf), not perturbed nor judged: {shown}{more}")
    # (a DTensor's local block has other row numbers: its padding row is judged like any other)
    row = padding.get(id(target.param)) if target.param is not None and not is_dtensor(target.param) else None
    if row is not None and grad is not None and target.tensor.dim() == 2:
        row = row % target.tensor.shape[0]
        if bool((grad.view(target.tensor.shape)[row] == 0).all()):
            skip[row] = True
            notes.append(f"row {row} is the padding_idx row: torch leaves its gradient at zero by design (not judged)")
    if bool(skip.any()):
        target.skip = skip.view(-1)
        target.skip_note = "; ".join(notes)


def start_engines(
    call: str,
    lent: Lent,
    objective: Objective,
    targets: list[Target],
    options: CheckOptions,
    tick: Tick,
    notes: list[str],
    *,
    loss0: torch.Tensor | None = None,
) -> tuple[EngineSwitch, float]:
    """The loop engine, the forward's nondeterminism (two identical evaluations), and the engine policy.

    With `loss0` (the loss of the backward pass, grad enabled), the no-grad loss must agree with it
    within the noise: every finite difference is taken without autograd, so a forward that computes
    something else there (it branches on ``torch.is_grad_enabled()``) would be compared with a
    different function. That is an error, not a verdict.
    """
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
    if loss0 is not None and not objective.needs_grad:
        same_with_and_without_grad(call, loss0, loss_again, nondet)
    if nondet > 0:
        notes.append(
            f"the forward is nondeterministic beyond torch's RNG: two identical evaluations differ by "
            f"{nondet:.2e}; tolerances widened by this noise"
        )
    first = targets[0] if targets else None
    return choose_engine(call, loop, first, loss_again, nondet, options.engine, notes, cone=cone_agrees), nondet


def same_with_and_without_grad(call: str, loss0: torch.Tensor, loss_again: torch.Tensor, nondet: float) -> None:
    """Raise if the loss of the backward pass (grad enabled) and the no-grad loss differ beyond the noise."""
    gap = abs(float(loss0) - float(loss_again))
    slack = 1e4 * unit_roundoff(loss_again.dtype) * max(abs(float(loss0)), abs(float(loss_again))) + 10 * nondet
    if not gap <= slack:
        raise InvalidArgumentError(
            f"{call}: the loss differs with and without autograd: {float(loss0)!r} with grad enabled (the "
            f"backward pass) but {float(loss_again)!r} under torch.no_grad() (every finite-difference "
            f"evaluation), a gap of {gap:.2e} where the noise allows {slack:.2e}. The forward must compute "
            "the same function in both modes: does it branch on torch.is_grad_enabled() or requires_grad?"
        )


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
    on_meta = meta_tensors(model)
    if on_meta:
        raise InvalidArgumentError(
            f"{call}: the model's tensors {on_meta[:3]}{' ...' if len(on_meta) > 3 else ''} are on the meta "
            "device and hold no data; materialise them first, e.g. model.to_empty(device='cpu') and then "
            "initialise them (reset_parameters()) or load_state_dict(...)."
        )
    if forward is None:  # with forward=, the batch is the user's to interpret
        try:
            bad_leaves(batch)
        except BadLeafError as exc:
            raise InvalidArgumentTypeError(f"{call}: {exc}.") from None
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


def _loss_message(exc: BatchError, objective: Objective) -> str:
    """A bad loss; a non-finite one also names the batch tensors holding NaN/Inf and how to mask them."""
    message = str(exc)
    holding = non_finite_paths(objective.batch)
    if "not finite" in message and holding:
        message += (
            f"; {', '.join(holding)} hold(s) NaN/Inf elements: mask them in the model or the loss "
            "(torch.nan_to_num, torch.nansum, torch.where), or fix the batch"
        )
    return message


def _model_error(call: str, lent: Lent, objective: Objective, exc: Exception) -> InvalidArgumentError | None:
    """The error to raise instead of the model's own, with the right advice; None: let the model's through.

    In-place errors and integer inputs get messages of their own; "pass dtype=None" only when a
    kernel rejected float64, the dtype the check converted the model to.
    """
    text = str(exc)
    first = f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"
    if _INPLACE_ERROR.search(text):
        return InvalidArgumentError(
            f"{call}: the model's backward failed because an in-place operation modified a tensor that "
            f"autograd saved for it ({first}). This is a bug in the model (training fails the same way), "
            "not a dtype problem: use the out-of-place op (x.mul(2), not x.mul_(2)) or clone before it; "
            "torch.autograd.set_detect_anomaly(True) shows which op."
        )
    integers = integer_paths(objective.batch)
    if integers and _INTEGER_ERROR.search(text):
        return InvalidArgumentError(
            f"{call}: the model failed on the integer tensor(s) {', '.join(integers)} ({first}). Integer "
            "tensors are passed as they are (they may be indices, as for nn.Embedding); if the model "
            "expects floating point, convert them yourself (x.float()) before the check."
        )
    own = {s.data.dtype for s in lent.saved_params if s.data.is_floating_point()}
    if lent.dtype is None or own <= {lent.dtype} or not _DTYPE_ERROR.search(text):
        return None
    return InvalidArgumentError(
        f"{call}: the model failed when run in {lent.dtype} ({first}); its own dtype is "
        f"{sorted(map(str, own))}. If its kernels only run in that dtype, pass dtype=None (tolerances then "
        "follow the measured noise of that dtype)."
    )


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
        raise InvalidArgumentError(f"{call}: {_loss_message(exc, objective)}.") from None
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        better = _model_error(call, lent, objective, exc)
        if better is None:
            raise  # the model's own error (a shape bug, ...), not our conversion: let it through untouched
        raise better from exc
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

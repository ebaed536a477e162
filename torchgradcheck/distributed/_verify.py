"""verify_distributed: gradient checks under torch.distributed (an initialised process group).

Two ways to use the ranks, chosen with ``split=``:

* ``split=True``, a *sharded check* of a replicated model (the same model and batch on every rank,
  no collectives in the forward): the elements of every checked tensor are split into one
  contiguous slice per rank, each rank evaluates its slice with the ordinary engines (vmap or loop),
  and one ``all_gather`` of the float64 results gives every rank the complete, identical `Report`.
  Only the slices are split: the noise estimate (9 evaluations per tensor) is repeated on each rank.
* ``split=False`` (default), a *distributed model* whose forward/backward call collectives
  (tensor-parallel layers, DDP): every rank runs every forward in lockstep, see `_placement`.

Both need the same call on every rank, in the same order, like any collective. Argument errors
and facts every rank sees alike (a loss that is not replicated, a model that differs across ranks)
are raised on every rank; a rank that never calls, or whose forward raises, leaves the others
waiting in a collective until the process group's ``timeout`` turns the wait into an error.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .._batch import Objective, input_targets
from .._check import check_module_call, prepare
from .._dtensor import is_dtensor, local_tensor
from .._errors import InvalidArgumentError
from .._measure import Settings
from .._noise import NOISE_POINTS
from .._options import SHARED_OPTIONS, CheckOptions, check_options, reject_unknown, validate_patterns
from .._params import Lent, Target, lend_model
from .._progress import progress_bar
from .._report import Report, TensorResult
from .._state import preserved_global_state
from ._collectives import CALL, PLACEMENTS, rank_and_size, reduced, work_device
from ._dtensor import dtensor_dtype, fsdp_modules, reshard
from ._placement import run_lockstep
from ._split import run_split

__all__ = ["PLACEMENTS", "verify_distributed"]

_OPTIONS = (
    "forward",
    "params",
    "inputs",
    "placement",
    "split",
    "group",
    *SHARED_OPTIONS,
)


def verify_distributed(
    model: nn.Module,
    loss_fn: Callable[..., Any] | None = None,
    batch: Any = None,
    *,
    placement: Mapping[str, str] | None = None,
    split: bool = False,
    group: Any = None,
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
    **unknown: Any,
) -> Report:
    """Check gradients under torch.distributed; call it on every rank (e.g. under ``torchrun``).

    Args:
        model: on each rank, that rank's module: a replicated model (``split=True``), a model with
            tensor-parallel layers whose forward/backward call collectives, a
            ``DistributedDataParallel`` wrapper, or a model with DTensor parameters
            (``parallelize_module``, ``fully_shard``; their placements are read from them, and they
            are checked in place, in their own dtype) (``split=False``).
        loss_fn, batch, forward, params, inputs, eps, rtol, atol, dtype, seed: as in `verify_module`;
            `batch` is this rank's batch.
        placement: ``split=False`` only: maps parameter names, or input names such as ``"batch[0]"``
            (glob patterns allowed), to ``"sharded"`` (each rank holds its own shard: perturbed on
            that rank only while every rank runs the forward) or ``"replicated"`` (the default: the same
            value on every rank, perturbed identically on all of them, checked to be identical).
        split: True divides the perturbations of a replicated model among the ranks (speed-up; the
            forward must not call collectives); False runs every forward on every rank in lockstep.
        group: the process group (None: the default group).
        engine: "auto", "vmap" or "loop" with ``split=True``; distributed models always use the loop.
        progress: show a progress bar on rank 0 (None: when stderr is a terminal).

    Returns:
        The same complete `Report` on every rank. With ``split=False``, a sharded plain tensor appears
        once per rank as ``rank<r>:<name>``, a sharded DTensor once, by global index, its note naming
        the ranks that own failing elements; a replicated tensor appears once, and fails with status
        "diverged" if its gradient differs across ranks. The objective is the replicated loss (checked
        to be identical on every rank); for DDP it is the mean of the ranks' losses, whose gradient is
        what DDP's averaging all-reduce (or FSDP2's reduce-scatter) produces.

    Raises:
        InvalidArgumentError / InvalidArgumentTypeError: a bad argument, no process group, a loss
            that is not replicated, a "replicated" tensor that differs across ranks, a DDP model
            not in the checking dtype (wrap ``model.double()``).

    Sharp edges: only full checks (every element; no ``mode=``). Every rank must make the same call;
    set ``timeout=`` in ``init_process_group`` so a rank that fails alone cannot hang the others.

    Example:
        >>> dist.init_process_group("gloo")  # under torchrun --nproc-per-node 2
        >>> report = verify_distributed(tp_mlp, nn.MSELoss(), (x, y), inputs=True,
        ...                             placement={"fc1.*": "sharded", "fc2.weight": "sharded"})
        >>> report.passed
        True
    """
    start = time.perf_counter()
    reject_unknown("verify_distributed", unknown, _OPTIONS)
    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidArgumentError(
            f"{CALL}: no torch.distributed process group is initialised; launch with torchrun and call "
            "torch.distributed.init_process_group() first (or use verify_module on one process)."
        )
    check_module_call(CALL, model, loss_fn, forward, inputs=inputs, split=split)
    options = check_options(
        "verify_distributed",
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
    patterns = validate_patterns("verify_distributed", params)
    is_ddp = _validate_layout(model, options, placement, split)
    fsdp = fsdp_modules(model)
    reshard(fsdp)  # a root FSDP2 module keeps unsharded parameters after a forward: its DTensors are the sharded ones
    dtype, warning = dtensor_dtype(model, dtype, split)
    options = dataclasses.replace(options, dtype=dtype)
    checked, skipped, objective = prepare(CALL, model, loss_fn, batch, forward, patterns, inputs, dtype)
    layout = _Layout(placement, split, is_ddp, fsdp, group)
    with preserved_global_state(), lend_model(model, dtype) as lent:
        report = _run(lent, objective, checked, inputs, options, layout, start)
    if warning is not None:
        report = dataclasses.replace(report, warnings=(*report.warnings, warning))
    table = dict(model.named_parameters(remove_duplicate=False))
    skipped_rows = [TensorResult(name=n, shape=tuple(table[n].shape), status="skipped", note=why) for n, why in skipped]
    return dataclasses.replace(report, results=report.results + tuple(skipped_rows))


def _validate_layout(model: nn.Module, options: CheckOptions, placement: Any, split: bool) -> bool:
    """The options only a distributed check has; returns whether `model` is a DistributedDataParallel."""
    if options.mode not in ("auto", "full"):
        raise InvalidArgumentError(
            f"verify_distributed: mode={options.mode!r} is not supported yet: every element is checked (the "
            "ranks would have to agree on one plan); use mode='auto' or mode='full'."
        )
    dtype = options.dtype
    # Only a model built after DDP was imported can be one (the import is slow: don't make it ourselves).
    ddp = sys.modules.get("torch.nn.parallel.distributed")
    is_ddp = ddp is not None and isinstance(model, ddp.DistributedDataParallel)
    if split and (placement or is_ddp):
        raise InvalidArgumentError(
            f"{CALL}: split=True is for a replicated model without collectives in its forward; a model with "
            "placement= or wrapped in DistributedDataParallel needs split=False."
        )
    if is_ddp and dtype is not None and any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        found = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point()})
        raise InvalidArgumentError(
            f"{CALL}: the DistributedDataParallel model has {', '.join(found)} parameters, but dtype={dtype}: DDP's "
            "gradient buckets keep the dtype the model had when it was wrapped, so its all-reduce would not see the "
            f"{dtype} gradients. Convert the model before wrapping it (DDP(model.double())), or pass dtype=None."
        )
    if not split and options.engine == "vmap":
        raise InvalidArgumentError(
            f"{CALL}: engine='vmap' needs split=True: a distributed model runs every "
            "forward on every rank in lockstep, one at a time (use engine='auto')."
        )
    return is_ddp


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How the model is spread over the ranks."""

    placement: Any  # the user's placement= (plain tensors)
    split: bool
    is_ddp: bool
    fsdp: list[nn.Module]  # the FSDP2 modules (empty if none)
    group: Any


def _run(
    lent: Lent,
    objective: Objective,
    checked: list[tuple[str, nn.Parameter]],
    inputs: bool,
    options: CheckOptions,
    layout: _Layout,
    start: float,
) -> Report:
    """The check itself, on a lent model: split or lockstep; the Report without the skipped rows."""
    placement, split, is_ddp, group = layout.placement, layout.split, layout.is_ddp, layout.group
    if options.dtype == torch.float64:
        torch.set_default_dtype(torch.float64)
    # a DTensor is perturbed in place, in its local block (`.._dtensor`)
    targets = [Target(name, local_tensor(p) if is_dtensor(p) else p.data, param=p) for name, p in checked]
    if inputs:
        targets += input_targets(objective.batch)
    work_dtype = targets[0].tensor.dtype if targets else torch.float64
    rank, size = rank_and_size(group)
    resolved = options.resolve(work_dtype, work_device(targets), ranks=size, split=split)
    settings = Settings(eps=float(resolved.eps or 0), rtol=float(resolved.rtol or 0), atol=resolved.atol)
    seed, notes = options.seed, []
    total = sum(2 * t.tensor.numel() + NOISE_POINTS for t in targets) // (size if split else 1)
    with progress_bar(total, options.progress if rank == 0 else False, "verify_distributed") as bar:
        if split:
            results, evaluations, overall, engine_used = run_split(
                lent, objective, targets, settings, seed, options.engine, group, notes, bar.update
            )
        else:
            results, evaluations, overall = run_lockstep(
                lent, objective, targets, placement, is_ddp, settings, seed, group, notes, bar.update, layout.fsdp
            )
            engine_used = "lockstep loop"
    seconds = float(reduced(torch.tensor([time.perf_counter() - start]), dist.ReduceOp.MAX, group)[0])
    return Report(
        call="verify_distributed",
        results=tuple(results),
        relative_error=overall,
        options=dataclasses.replace(resolved, mode="full"),
        evaluations=evaluations,
        seconds=seconds,
        engine=engine_used,
        notes=tuple(notes),
    )

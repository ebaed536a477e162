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

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import _verify
from ._batch import Objective, input_targets
from ._check import Settings, TensorCheck, measure, summarise
from ._compare import relative_error
from ._dtensor import fsdp_modules, is_dtensor, local_tensor, reshard
from ._engines import Engine, LoopEngine, VmapEngine
from ._errors import InvalidArgumentError
from ._noise import NOISE_POINTS, unit_roundoff
from ._options import reject_unknown, resolve_tolerances, validate_common, validate_patterns
from ._params import Lent, Target, lend_model
from ._progress import progress_bar
from ._report import ParameterResult, Report
from ._state import preserved_global_state

__all__ = ["PLACEMENTS", "verify_distributed"]

CALL = "verify_distributed(model, loss_fn, batch)"
PLACEMENTS = ("replicated", "sharded")
_OPTIONS = (
    "forward",
    "params",
    "inputs",
    "placement",
    "split",
    "group",
    "eps",
    "rtol",
    "atol",
    "dtype",
    "seed",
    "engine",
    "progress",
)
# Replicated values (loss, gradients) may differ across ranks by this many units of roundoff
# (relative to the largest magnitude) before they count as different: reduction order only.
SAME_ULPS = 1e3


Tick = Callable[[int], None]


class RankError(InvalidArgumentError):
    """Internal: raised on every rank with the same message when a rank's check went wrong."""


def rank_and_size(group: Any) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def comm_device(group: Any) -> torch.device:
    """Where collective payloads live: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduced(values: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    """An all-reduced float64 copy of `values` (on the communication device, returned on `values`' device)."""
    out = values.detach().to(comm_device(group), torch.float64).clone()
    dist.all_reduce(out, op=op, group=group)
    return out.to(values.device)


def spread(values: torch.Tensor, group: Any) -> torch.Tensor:
    """Elementwise max minus min of `values` across ranks (float64)."""
    return reduced(values, dist.ReduceOp.MAX, group) - reduced(values, dist.ReduceOp.MIN, group)


def same_bound(values: torch.Tensor, dtype: torch.dtype) -> float:
    """How far two replicas of `values` may drift apart from rounding alone."""
    scale = float(values.abs().max()) if values.numel() else 0.0
    return SAME_ULPS * unit_roundoff(dtype) * scale


def agree_on_errors(message: str | None, group: Any) -> None:
    """Collective: if any rank has an error message, raise it on every rank (rank named)."""
    _, size = rank_and_size(group)
    flag = reduced(torch.tensor([0.0 if message is None else 1.0]), dist.ReduceOp.MAX, group)
    if float(flag[0]) == 0.0:
        return
    messages: list[Any] = [None] * size
    dist.all_gather_object(messages, message, group=group)
    first = next((r, m) for r, m in enumerate(messages) if m is not None)
    raise RankError(f"{CALL}: on rank {first[0]}: {first[1]}")


def analytical(
    lent: Lent, objective: Objective, targets: list[Target], seed: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """`_verify.analytical` (collectives included in the forward and backward), errors naming this call."""
    return _verify.analytical(lent, objective, targets, seed, CALL)


def target_generator(seed: int, k: int) -> torch.Generator:
    """The noise-direction generator of the k-th target: the same on every rank, whatever ran before."""
    return torch.Generator().manual_seed(seed * 1_000_003 + k)


def _choose_engine(
    lent: Lent,
    objective: Objective,
    seed: int,
    name: str,
    targets: list[Target],
    loss0: torch.Tensor,
    slack: float,
    notes: list[str],
    tick: Tick,
) -> tuple[LoopEngine, Engine]:
    loop = LoopEngine(lent, objective, seed, tick)
    if name == "loop" or not targets:
        return loop, loop
    vm = VmapEngine(lent, objective, seed, tick)
    zero = torch.zeros(1, targets[0].tensor.numel(), dtype=targets[0].tensor.dtype, device=targets[0].tensor.device)
    try:
        value = float(vm.losses_along(targets[0], zero)[0])
        why = None if abs(value - float(loss0)) <= slack else f"vmap gave a different unperturbed loss ({value!r})"
    except Exception as exc:  # vmap can't run this model: use the loop
        why = f"vmap could not run the model ({type(exc).__name__})"
    if why is None:
        return loop, vm
    if name == "vmap":
        raise InvalidArgumentError(f"{CALL}: engine='vmap' is not usable here: {why}; use engine='auto'.")
    notes.append(f"engine: loop, because {why}")
    return loop, loop


def run_split(
    lent: Lent,
    objective: Objective,
    targets: list[Target],
    settings: Settings,
    seed: int,
    engine_name: str,
    group: Any,
    notes: list[str],
    tick: Tick,
) -> tuple[list[ParameterResult], int, float, str]:
    """Sharded check of a replicated model: each rank evaluates a slice of every tensor's elements."""
    rank, size = rank_and_size(group)
    loss0, grads = analytical(lent, objective, targets, seed)
    flat = [grads[t.name] for t in targets]
    has_grad = [g is not None for g in flat]
    mine = torch.cat(
        [loss0.reshape(1).cpu()]
        + [
            g.cpu() if g is not None else torch.zeros(t.tensor.numel(), dtype=torch.float64)
            for g, t in zip(flat, targets)
        ]
    )
    # Every rank judges rank 0's gradients, so every rank reaches the same verdict; the model must
    # really be replicated, which shows as (nearly) identical losses and gradients.
    theirs = mine.to(comm_device(group)).clone()
    dist.broadcast(theirs, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    theirs = theirs.cpu()
    gap = reduced(torch.tensor([float((theirs - mine).abs().max())]), dist.ReduceOp.MAX, group)
    if float(gap[0]) > same_bound(mine, targets[0].tensor.dtype if targets else torch.float64):
        raise InvalidArgumentError(
            f"{CALL}: split=True needs the same model and batch on every rank, but the loss or gradients differ "
            f"across ranks by up to {float(gap[0]):.2e}; seed the model's initialisation identically on every "
            "rank, or use split=False (with placement=) for a distributed model."
        )
    loss0 = theirs[0].to(loss0.device)
    payload: list[torch.Tensor] = []
    sigmas: list[float] = []
    message = None
    loop, engine = _choose_engine(
        lent,
        objective,
        seed,
        engine_name,
        targets,
        loss0,
        1e4 * unit_roundoff(targets[0].tensor.dtype if targets else torch.float64) * abs(float(loss0)),
        notes,
        tick,
    )
    try:
        _, nondet = loop.loss_twice()
        offset = 1
        for k, t in enumerate(targets):
            n = t.tensor.numel()
            a = theirs[offset : offset + n].to(t.tensor.device)
            offset += n
            index = torch.tensor_split(torch.arange(n, device=t.tensor.device), size)[rank]
            check = measure(engine, t, a, loss0, nondet, settings, target_generator(seed, k), index=index)
            sigmas.append(check.sigma)
            payload += [check.numerical, check.tolerance, check.kink.to(torch.float64)]
    except Exception as exc:  # agreed on below: a rank that stops early must not leave the others waiting
        message = f"{type(exc).__name__}: {exc}"
        payload, sigmas = [], [0.0] * len(targets)
    agree_on_errors(message, group)
    evaluations = loop.evaluations + (engine.evaluations if engine is not loop else 0)
    local = torch.cat(
        [torch.tensor([float(evaluations), *sigmas], dtype=torch.float64)]
        + [p.detach().to("cpu", torch.float64) for p in payload]
    )
    gathered = _all_gather_padded(local, group)
    results: list[ParameterResult] = []
    all_a, all_n = [], []
    offset = 1
    total_evaluations = int(sum(float(g[0]) for g in gathered))
    busiest = int(max(float(g[0]) for g in gathered))
    cursors = [1 + len(targets)] * size
    for k, t in enumerate(targets):
        n = t.tensor.numel()
        a = theirs[offset : offset + n].to(t.tensor.device)
        offset += n
        parts: list[list[torch.Tensor]] = [[], [], []]
        for r in range(size):
            m = len(torch.tensor_split(torch.arange(n), size)[r])
            for j in range(3):
                parts[j].append(gathered[r][cursors[r] : cursors[r] + m])
                cursors[r] += m
        numerical, tolerance, kink = (torch.cat(p).to(t.tensor.device) for p in parts)
        sigma = max(float(g[1 + k]) for g in gathered)
        results.append(summarise(t, TensorCheck(a, numerical, tolerance, kink.bool(), sigma), has_grad[k]))
        all_a.append(a[~kink.bool()])
        all_n.append(numerical[~kink.bool()])
    notes.append(
        f"split: the elements of every tensor were divided among {size} ranks (at most {busiest:,} "
        "evaluations per rank); every rank holds this report"
    )
    overall = relative_error(torch.cat(all_a), torch.cat(all_n)) if all_a else 0.0
    return results, total_evaluations, overall, engine.name


def _all_gather_padded(local: torch.Tensor, group: Any) -> list[torch.Tensor]:
    """``all_gather`` of 1-d float64 tensors whose lengths may differ by rank."""
    _, size = rank_and_size(group)
    device = comm_device(group)
    lengths = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(size)]
    dist.all_gather(lengths, torch.tensor([float(local.numel())], dtype=torch.float64, device=device), group=group)
    width = int(max(float(n[0]) for n in lengths))
    padded = torch.zeros(width, dtype=torch.float64, device=device)
    padded[: local.numel()] = local.to(device)
    out = [torch.empty(width, dtype=torch.float64, device=device) for _ in range(size)]
    dist.all_gather(out, padded, group=group)
    return [o[: int(n[0])].cpu() for o, n in zip(out, lengths)]


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
            tensor-parallel layers whose forward/backward call collectives, or a
            ``DistributedDataParallel`` wrapper (``split=False``).
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
        The same complete `Report` on every rank. With ``split=False``, a sharded tensor appears once
        per rank as ``rank<r>:<name>``; a replicated tensor appears once, and fails with status
        "diverged" if its gradient differs across ranks. The objective is the replicated loss (checked
        to be identical on every rank); for DDP it is the mean of the ranks' losses, whose gradient is
        what DDP's averaging all-reduce produces.

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
    _verify.check_module_call(CALL, model, loss_fn, forward, inputs=inputs, split=split)
    validate_common("verify_distributed", eps=eps, rtol=rtol, atol=atol, dtype=dtype, seed=seed, engine=engine)
    patterns = validate_patterns("verify_distributed", params)
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
    if not split and engine == "vmap":
        raise InvalidArgumentError(
            f"{CALL}: engine='vmap' needs split=True: a distributed model runs every "
            "forward on every rank in lockstep, one at a time (use engine='auto')."
        )
    fsdp = fsdp_modules(model)
    reshard(fsdp)  # a root FSDP2 module keeps unsharded parameters after a forward: its DTensors are the sharded ones
    dtype, own_dtype = dtensor_dtype(model, dtype, split)
    checked, skipped, objective = _verify.prepare(CALL, model, loss_fn, batch, forward, patterns, inputs, dtype)
    with preserved_global_state(), lend_model(model, dtype) as lent:
        if dtype == torch.float64:
            torch.set_default_dtype(torch.float64)
        targets = [
            Target(name, local_tensor(p) if is_dtensor(p) else p.data, kind="parameter", param=p) for name, p in checked
        ]
        if inputs:
            targets += input_targets(objective.batch)
        work_dtype = targets[0].tensor.dtype if targets else torch.float64
        eps_, rtol_ = resolve_tolerances(dtype or work_dtype, eps, rtol)
        settings = Settings(eps=eps_, rtol=rtol_, atol=atol)
        notes: list[str] = [] if own_dtype is None else [own_dtype]
        rank, size = rank_and_size(group)
        total = sum(2 * t.tensor.numel() + NOISE_POINTS for t in targets) // (size if split else 1)
        with progress_bar(total, progress if rank == 0 else False, "verify_distributed") as bar:
            if split:
                results, evaluations, overall, engine_used = run_split(
                    lent, objective, targets, settings, seed, engine, group, notes, bar.update
                )
            else:
                from ._placement import run_lockstep

                results, evaluations, overall = run_lockstep(
                    lent, objective, targets, placement, is_ddp, settings, seed, group, notes, bar.update, fsdp
                )
                engine_used = "lockstep loop"
        seconds = float(reduced(torch.tensor([time.perf_counter() - start]), dist.ReduceOp.MAX, group)[0])
    table = dict(model.named_parameters(remove_duplicate=False))
    results += [ParameterResult(name=n, shape=tuple(table[n].shape), status="skipped", note=why) for n, why in skipped]
    options = {
        "dtype": str(dtype or work_dtype).replace("torch.", ""),
        "device": str(work_device(targets)),
        "eps": eps_,
        "rtol": rtol_,
        "atol": atol,
        "seed": seed,
        "mode": "full",
        "ranks": size,
        "split": split,
    }
    return Report(
        call="verify_distributed",
        results=tuple(results),
        relative_error=overall,
        options=options,
        evaluations=evaluations,
        seconds=seconds,
        engine=engine_used,
        notes=tuple(notes),
    )


def dtensor_dtype(model: nn.Module, dtype: torch.dtype | None, split: bool) -> tuple[torch.dtype | None, str | None]:
    """The checking dtype for a model with DTensor parameters, and a warning if it is not `dtype`.

    DTensor shards are checked in place (`_dtensor`), so in their own dtype: a model in another
    dtype than `dtype` is checked in its own (``dtype=None``), and the report says so.
    """
    dtensors = [(n, p) for n, p in model.named_parameters() if is_dtensor(p)]
    if not dtensors:
        return dtype, None
    if split:
        raise InvalidArgumentError(
            f"{CALL}: split=True is for a replicated model without collectives in its forward, but "
            f"{dtensors[0][0]} is a DTensor (tensor parallel or FSDP2): use split=False."
        )
    for name, p in dtensors:
        if not local_tensor(p).is_contiguous():
            raise InvalidArgumentError(
                f"{CALL}: {name} is a DTensor whose local shard is not contiguous (strides "
                f"{local_tensor(p).stride()}); the check perturbs the shard in place and needs it contiguous."
            )
    other = sorted({str(p.dtype).replace("torch.", "") for _, p in dtensors if dtype is not None and p.dtype != dtype})
    if not other:
        return dtype, None
    return None, (
        f"WARNING: checked in the model's own dtype ({', '.join(other)}), not {str(dtype).replace('torch.', '')}: "
        "DTensor shards are checked in place, where their collectives read them, so they are not converted; "
        "tolerances follow that dtype's noise. For a float64 check, convert the model before sharding it "
        "(model.double() before parallelize_module / fully_shard)."
    )


def work_device(targets: list[Target]) -> torch.device:
    return targets[0].tensor.device if targets else torch.device("cpu")

"""Distributed models: every rank runs every forward in lockstep; `placement` says what moves where.

A model whose forward or backward calls collectives (Megatron-style tensor-parallel layers, DDP)
can only be evaluated by all ranks together, one forward at a time, so vmap is out and
`LockstepEngine` (the loop engine plus a little signalling) is used:

* a *replicated* tensor (the default) holds the same value on every rank: every rank perturbs it
  identically and runs the same evaluations; the first-pass failures are merged across ranks so
  that the second look, too, evaluates the same points everywhere;
* a *sharded* tensor holds a different shard on every rank: each rank in turn is the *owner* and
  perturbs its own shard while the other ranks *follow*, running unperturbed forwards (their
  collectives need them); the owner announces how many forwards each of its calls makes.

The objective is the replicated loss, which must be identical on every rank: it is checked at the
unperturbed point and at every evaluated point. For ``DistributedDataParallel`` the objective is
the mean over ranks of each rank's loss, because DDP's all-reduce averages the ranks' gradients:
the averaged ``.grad`` is the gradient of that mean. Gradients of replicated tensors must agree
across ranks; a divergence fails the tensor with status "diverged".

DTensor parameters carry their own placement (`_dtensor`): a ``Shard`` one is "sharded", its blocks
reported together by global index; a ``Replicate`` one is "replicated". FSDP2 (``fully_shard``) is
data parallel like DDP: the objective is the mean of the ranks' losses.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from .._batch import Objective, input_targets
from .._dtensor import is_dtensor
from .._engines import LoopEngine
from .._errors import InvalidArgumentError, InvalidArgumentTypeError
from .._measure import Settings, TensorCheck, measure, noise_level, summarise
from .._params import Lent, Target
from .._report import TensorResult
from ._collectives import (
    CALL,
    PLACEMENTS,
    Tick,
    agree_on_errors,
    analytical,
    comm_device,
    rank_and_size,
    reduced,
    same_bound,
    spread,
    target_generator,
)
from ._dtensor import dtensor_placements, global_result, reshard, shard_block

__all__ = ["LockstepEngine", "measure_agreed", "resolve_placement", "run_lockstep"]

_DONE = -1


def _global(group: Any, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


class LockstepEngine(LoopEngine):
    """The loop engine, run by all ranks at once; with an `owner`, only the owner perturbs."""

    name = "lockstep"

    def __init__(self, *args: Any, group: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group
        self.owner: int | None = None  # None: every rank perturbs the same (replicated) tensor
        self.values: list[torch.Tensor] = []  # every loss evaluated, in order: checked replicated at the end

    def _announce(self, count: int) -> None:
        if self.owner is not None:
            n = torch.tensor([float(count)], dtype=torch.float64, device=comm_device(self.group))
            dist.broadcast(n, src=_global(self.group, self.owner), group=self.group)

    def loss(self) -> torch.Tensor:
        value = super().loss()
        self.values.append(value.reshape(1).cpu())
        return value

    def losses(self, target: Target, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        self._announce(len(index))
        out = super().losses(target, index, values)
        self.values.append(out.cpu())
        return out

    def losses_along(self, target: Target, deltas: torch.Tensor) -> torch.Tensor:
        self._announce(deltas.shape[0])
        out = super().losses_along(target, deltas)
        self.values.append(out.cpu())
        return out

    def finish(self) -> None:
        """Owner: tell the followers that this tensor is done."""
        self._announce(_DONE)

    def follow(self, owner: int) -> None:
        """Not the owner: run as many unperturbed forwards as the owner announces, until it is done."""
        n = torch.zeros(1, dtype=torch.float64, device=comm_device(self.group))
        while True:
            dist.broadcast(n, src=_global(self.group, owner), group=self.group)
            count = int(n[0])
            if count == _DONE:
                return
            out = torch.empty(count, dtype=torch.float64)
            with torch.no_grad():
                for j in range(count):
                    out[j] = self._one()
                    self.evaluations += 1
                    self.tick(1)
            self.values.append(out)


class _MeanOverRanks(Objective):
    """DDP's and FSDP2's objective: the mean over ranks of each rank's own loss (evaluations only, no graph)."""

    def __init__(self, inner: Objective, group: Any, fsdp: list[Any]) -> None:
        super().__init__(inner.loss_fn, inner.batch, inner.forward)
        self.group = group
        self.fsdp = fsdp

    def __call__(self, model: Any) -> Any:
        local = torch.as_tensor(super().__call__(model)).detach()
        reshard(self.fsdp)  # FSDP2 keeps the root unsharded after a forward: the next one must all-gather again
        return reduced(local.reshape(1), dist.ReduceOp.SUM, self.group)[0] / dist.get_world_size(self.group)


def resolve_placement(placement: Any, names: list[str]) -> dict[str, str]:
    """``{tensor name: "sharded" | "replicated"}`` for `names`, from the user's patterns (default replicated)."""
    if placement is None:
        return dict.fromkeys(names, "replicated")
    if not isinstance(placement, Mapping):
        raise InvalidArgumentTypeError(
            f"{CALL}: placement= must be a dict {{name or pattern: 'sharded' | 'replicated'}}, got {placement!r}."
        )
    out = dict.fromkeys(names, "replicated")
    for pattern, where in placement.items():
        if where not in PLACEMENTS:
            raise InvalidArgumentError(
                f"{CALL}: placement[{pattern!r}]={where!r} is not a placement; valid options are {list(PLACEMENTS)}."
            )
        # an exact name first: "batch[0]" read as a glob would mean "batch0"
        matched = [n for n in names if n == pattern] or [n for n in names if fnmatch.fnmatchcase(n, str(pattern))]
        if not matched:
            raise InvalidArgumentError(
                f"{CALL}: placement key {pattern!r} matches no parameter or input; names are {names[:12]}."
            )
        for n in matched:
            out[n] = where
    return out


def measure_agreed(
    engine: LockstepEngine,
    target: Target,
    analytical: torch.Tensor,
    sigma: float,
    loss0: torch.Tensor,
    settings: Settings,
) -> TensorCheck:
    """`_measure.measure` of a replicated tensor on every rank at once, the second look agreed on.

    The numerical side is the same on every rank but the analytical one may not be (that is the
    divergence the check reports), so the elements that failed the first pass on ANY rank get the
    second look on every rank: all ranks keep evaluating the same points in the same order.
    """

    def any_rank(bad: torch.Tensor) -> torch.Tensor:
        return reduced(bad.to(torch.float64), dist.ReduceOp.MAX, engine.group).to(bad.device) > 0

    unused = torch.Generator()  # sigma is given: measure draws no noise directions
    return measure(engine, target, analytical, loss0, 0.0, settings, unused, sigma=sigma, agree=any_rank)


def _check_replicated(t: Target, group: Any) -> None:
    """Raise (on every rank alike) unless `t` holds the same value on every rank."""
    if float(spread(torch.tensor([float(t.tensor.numel())]), group)[0]) != 0:
        raise InvalidArgumentError(
            f"{CALL}: {t.name} has shape {t.shape} here but another shape on another rank: "
            f"declare it placement={{{t.name!r}: 'sharded'}}."
        )
    gap = float(spread(t.flat, group).max()) if t.tensor.numel() else 0.0
    if gap > 0:
        raise InvalidArgumentError(
            f"{CALL}: {t.name} is replicated (the default placement) but its value differs across ranks by up to "
            f"{gap:.2e}; declare placement={{{t.name!r}: 'sharded'}} if each rank holds its own shard, or make "
            "the replicas identical (same seed, or broadcast from rank 0)."
        )


def _merge_replicated(per_rank: list[TensorResult], gap: float, bound: float) -> TensorResult:
    """One result for a replicated tensor: the first failing rank's, or rank 0's; divergence fails it."""
    failing = [(r, res) for r, res in enumerate(per_rank) if not res.passed]
    rank, res = failing[0] if failing else (0, per_rank[0])
    notes = [res.note] if res.note else []
    if failing and len(failing) < len(per_rank):
        notes.append(f"fails on rank(s) {[r for r, _ in failing]} only; shown for rank {rank}")
    elif failing and len(per_rank) > 1:
        notes.append("fails on every rank; shown for rank 0")
    status = res.status
    if gap > bound:
        notes.append(
            f"replicated, but its gradient differs across ranks by up to {gap:.2e}: a missing or extra "
            "all-reduce of this tensor's gradient?"
        )
        if res.passed:
            status = "diverged"
    return dataclasses.replace(res, status=status, note="; ".join(notes))


def _renamed(res: TensorResult, rank: int) -> TensorResult:
    return dataclasses.replace(res, name=f"rank{rank}:{res.name}")


def run_lockstep(
    lent: Lent,
    objective: Objective,
    targets: list[Target],
    placement: Any,
    is_ddp: bool,
    settings: Settings,
    seed: int,
    group: Any,
    notes: list[str],
    tick: Tick,
    fsdp: list[Any] | None = None,
) -> tuple[list[TensorResult], int, float]:
    """Check a distributed model; returns the merged results, the forwards per rank, the relative error.

    DTensor parameters carry their own placement (`_dtensor`); `fsdp` lists the FSDP2 modules: their
    objective is the mean of the ranks' losses (as for DDP), and they are resharded after every forward.
    """
    where, dtensors = _layout(lent, objective, targets, placement, group, notes)
    if fsdp and any(t.kind == "input" for t in targets):
        raise InvalidArgumentError(
            f"{CALL}: an FSDP2 (fully_shard) model is data parallel: each rank's batch reaches only its own loss, "
            "so inputs=True is not supported (check input gradients with verify_module)."
        )
    if is_ddp and (any(v == "sharded" for v in where.values()) or any(t.kind == "input" for t in targets)):
        raise InvalidArgumentError(
            f"{CALL}: a DistributedDataParallel model is replicated and DDP averages parameter gradients only: "
            "pass neither sharded placements nor inputs=True (check input gradients with verify_module)."
        )
    for t in targets:
        if where[t.name] == "replicated":
            _check_replicated(t, group)
    loss0, grads = analytical(lent, objective, targets, seed)
    objective, loss0 = _global_objective(objective, loss0, is_ddp, fsdp or [], group, notes)
    sharded = [t.name for t in targets if where[t.name] == "sharded" and t.name not in dtensors]
    if sharded:
        notes.append(
            f"placement: sharded (perturbed on each owner rank in turn, shown per rank): "
            f"{', '.join(sharded)}; every other tensor replicated (perturbed on all ranks at once, "
            "checked identical)"
        )
    engine = LockstepEngine(lent, objective, seed, tick, group=group)
    _, nondet = engine.loss_twice()
    state = _Lockstep(engine, loss0, nondet, settings, seed, group)
    for k, t in enumerate(targets):
        state.check(k, t, grads[t.name], where[t.name] == "replicated", t.name in dtensors)
    agree_on_errors(state.message, group, state.error)
    _check_drift(engine, targets, group)
    return _gather(state, targets, where, group), engine.evaluations, state.overall()


def _layout(
    lent: Lent, objective: Objective, targets: list[Target], placement: Any, group: Any, notes: list[str]
) -> tuple[dict[str, str], set[str]]:
    """Where every tensor lives (placement=, DTensor placements), and the names of the DTensor parameters."""
    _, size = rank_and_size(group)
    seen: list[Any] = [None] * size
    dist.all_gather_object(seen, [(t.name, t.kind) for t in targets], group=group)
    differs = next((r for r in range(size) if seen[r] != seen[0]), None)
    if differs is not None:
        raise InvalidArgumentError(
            f"{CALL}: the checked tensors differ across ranks: rank 0 has {[n for n, _ in seen[0]][:8]}, rank "
            f"{differs} has {[n for n, _ in seen[differs]][:8]}; build the same modules (same names) on every rank."
        )
    names = [n for n, _ in lent.model.named_parameters()] + [t.name for t in input_targets(objective.batch)]
    dtensors = {t.name: t.param for t in targets if t.kind == "parameter" and is_dtensor(t.param)}
    where = resolve_placement(placement, names)
    where.update(dtensor_placements(dtensors, placement))
    if dtensors:
        notes.append(
            "placement: from the DTensor parameters ("
            + ", ".join(f"{n}: {', '.join(map(repr, p.placements))}" for n, p in dtensors.items())
            + "); a sharded one is perturbed on its owner rank, element by element, and reported by global index"
        )
    return where, set(dtensors)


def _global_objective(
    objective: Objective, loss0: torch.Tensor, is_ddp: bool, fsdp: list[Any], group: Any, notes: list[str]
) -> tuple[Objective, torch.Tensor]:
    """The loss every rank differentiates: DDP's and FSDP2's mean over ranks, else the (checked) replicated loss."""
    rank, size = rank_and_size(group)
    if is_ddp or fsdp:
        how = "DDP's averaging all-reduce" if is_ddp else "FSDP2's averaging reduce-scatter"
        notes.append(
            f"objective: the global loss = mean over {size} ranks of each rank's loss, whose gradient is "
            f"what {how} writes into .grad"
        )
        mean = reduced(loss0.reshape(1), dist.ReduceOp.SUM, group)[0] / size
        return _MeanOverRanks(objective, group, fsdp), mean
    gap = float(spread(loss0.reshape(1), group)[0])
    if gap > same_bound(loss0.reshape(1), loss0.dtype):
        raise InvalidArgumentError(
            f"{CALL}: the loss is not replicated: it differs across ranks by {gap:.2e} (rank {rank}: "
            f"{float(loss0)!r}). The check differentiates the loss every rank agrees on: all-reduce it (e.g. "
            "reduce the output of the last row-parallel layer); for data parallelism wrap the model in DDP."
        )
    notes.append(f"objective: the replicated loss (identical on all {size} ranks, checked at every evaluation)")
    return objective, loss0


class _Lockstep:
    """The per-target part of `run_lockstep`: this rank's results, the gaps, the error sums."""

    def __init__(
        self, engine: LockstepEngine, loss0: torch.Tensor, nondet: float, settings: Settings, seed: int, group: Any
    ) -> None:
        self.engine, self.loss0, self.nondet, self.settings, self.seed, self.group = (
            engine,
            loss0,
            nondet,
            settings,
            seed,
            group,
        )
        self.rank, self.size = rank_and_size(group)
        self.local: list[TensorResult | None] = []
        self.gaps: list[tuple[float, float]] = []  # replicated: spread of the gradient across ranks, its bound
        self.sums = torch.zeros(3, dtype=torch.float64)  # ||a - n||^2, ||a||^2, ||n||^2 of what this rank reports
        self.message: str | None = None
        self.error: BaseException | None = None  # this rank's own exception, re-raised as it is
        self.blocks: dict[str, Any] = {}  # sharded DTensors: this rank's block (`_dtensor.shard_block`)

    def check(self, k: int, t: Target, g: torch.Tensor | None, replicated: bool, dtensor: bool = False) -> None:
        a = g if g is not None else torch.zeros(t.tensor.numel(), dtype=torch.float64, device=t.tensor.device)
        if replicated:
            check: TensorCheck | None = self._replicated(k, t, a)
        else:
            self.gaps.append((0.0, 0.0))
            check = self._sharded(k, t, a)
        self.local.append(None if check is None else summarise(t, check, g is not None))
        if dtensor and not replicated:
            self.blocks[t.name] = shard_block(t, check, g is not None)
        if check is not None and (not replicated or self.rank == 0):
            keep = ~check.kink
            a_, n_ = check.analytical[keep].cpu(), check.numerical[keep].cpu()
            self.sums += torch.stack([((a_ - n_) ** 2).sum(), (a_**2).sum(), (n_**2).sum()])

    def _replicated(self, k: int, t: Target, a: torch.Tensor) -> TensorCheck:
        engine, group = self.engine, self.group
        engine.owner = None
        sigma = noise_level(engine, t, self.loss0, self.nondet, target_generator(self.seed, k))
        check = measure_agreed(engine, t, a, sigma, self.loss0, self.settings)
        scale = reduced(a.abs().max().reshape(1), dist.ReduceOp.MAX, group) if a.numel() else torch.zeros(1)
        self.gaps.append((float(spread(a, group).max()) if a.numel() else 0.0, same_bound(scale, t.tensor.dtype)))
        return check

    def _sharded(self, k: int, t: Target, a: torch.Tensor) -> TensorCheck | None:
        """Each owner rank in turn perturbs its shard while the others follow its evaluations."""
        engine = self.engine
        check = None
        for owner in range(self.size):
            engine.owner = owner
            if owner != self.rank:
                engine.follow(owner)
                continue
            try:
                generator = target_generator(self.seed, k)
                if t.tensor.numel():  # an FSDP2 shard can be empty on the last ranks
                    check = measure(engine, t, a, self.loss0, self.nondet, self.settings, generator)
            except Exception as exc:  # agreed on after the loop; the followers are released first
                if self.message is None:
                    self.message, self.error = f"{t.name}: {type(exc).__name__}: {exc}", exc
            finally:
                engine.finish()
        engine.owner = None
        return check

    def overall(self) -> float:
        total = reduced(self.sums, dist.ReduceOp.SUM, self.group)
        denom = math.sqrt(float(total[1])) + math.sqrt(float(total[2]))
        return 0.0 if denom == 0.0 else math.sqrt(float(total[0])) / denom


def _check_drift(engine: LockstepEngine, targets: list[Target], group: Any) -> None:
    """Every evaluation's loss must be the same on every rank (a perturbation reached every rank's loss)."""
    values = torch.cat(engine.values)
    drift = float(spread(values, group).max())
    if drift > same_bound(values, targets[0].tensor.dtype if targets else torch.float64):
        raise InvalidArgumentError(
            f"{CALL}: the loss is not replicated at the perturbed points: evaluations differ across ranks by up to "
            f"{drift:.2e}; a perturbation of one rank's shard must reach every rank's loss (a missing all-reduce "
            "in the forward?), or declare the tensor's placement correctly."
        )


def _gather(state: _Lockstep, targets: list[Target], where: dict[str, str], group: Any) -> list[TensorResult]:
    """Every rank's rows on every rank: replicated tensors merged into one row, sharded ones per rank,
    sharded DTensors assembled into one row over the global tensor."""
    size = state.size
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, (state.local, state.blocks), group=group)
    results: list[TensorResult] = []
    for k, t in enumerate(targets):
        if where[t.name] == "replicated":
            results.append(_merge_replicated([gathered[r][0][k] for r in range(size)], *state.gaps[k]))
        elif t.name in state.blocks:
            results.append(global_result(t, [gathered[r][1][t.name] for r in range(size)]))
        else:
            results += [_renamed(gathered[r][0][k], r) for r in range(size)]
    return results

"""Engines evaluate the loss at many perturbed points of one target tensor.

Two interchangeable engines answer the same two questions:

* ``losses(target, index, values)``: loss with element ``index[j]`` of `target` set to ``values[j]``;
* ``losses_along(target, deltas)``: loss with `target` moved by the dense row ``deltas[j]``.

`LoopEngine` perturbs the working copy in place and runs one forward per point under ``no_grad``
(with grad enabled when the loss differentiates inside, ``Objective.needs_grad``, see
`_check.start_engines`): it works for every model. `VmapEngine` evaluates a chunk of perturbed
copies of the tensor in one batched forward with ``torch.func.vmap`` over
``torch.func.functional_call`` (the other tensors are shared, not copied). Before every
evaluation both engines reset the buffers and re-seed the RNG, so the two give the same verdicts.

A third engine, `_cone.ConeEngine`, answers the same questions from a captured graph, re-evaluating
only what each perturbation changes (module checks try it first under ``engine="auto"``).

The engine policy lives here, once, for every entry point: `choose_engine` picks the cone engine or
vmap when one batched unperturbed evaluation reproduces the plain loss (within
``1e4 u |L| + 10 * nondet``), and `EngineSwitch` falls back from cone to vmap and from vmap to the
loop when an engine fails mid-check (always with a note).

vmap runs with its per-example fallback disabled (`without_vmap_fallback`): an op without a batching
rule (a custom op without ``register_vmap``) makes vmap raise, the policy picks the loop, and the
note names the op (`missing_batching_rule`). Nothing is printed at the user.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.func import functional_call, vmap

from ._batch import Objective
from ._errors import InvalidArgumentError
from ._params import Lent, Target
from ._state import reseed

__all__ = [
    "Engine",
    "EngineSwitch",
    "LoopEngine",
    "VmapEngine",
    "choose_engine",
    "missing_batching_rule",
    "vmap_agrees",
    "without_vmap_fallback",
]

# What vmap raises, with its fallback disabled, for an op that has no batching rule.
_NO_RULE = re.compile(r"^(\S+) hit the vmap fallback which is currently disabled")

Tick = Callable[[int], None]
# Builds the cone engine for a target (`_cone.cone_agrees`): the engine, or None and why not.
ConeTrial = Callable[["LoopEngine", Target, torch.Tensor, float], "tuple[Engine | None, str]"]
# Under engine="auto", the cone engine is tried for plans of at least this many evaluations (or when
# torch._dynamo, which it needs, is already imported): below that, its one-off import costs more than it saves.
CONE_MIN_EVALUATIONS = 100_000


def _noop(_: int) -> None:
    return None


class Engine:
    """Shared plumbing: one unperturbed evaluation, the evaluation counter, progress ticks."""

    name = "engine"

    def __init__(self, lent: Lent, objective: Objective, seed: int, tick: Tick = _noop) -> None:
        self.lent = lent
        self.objective = objective
        self.seed = seed
        self.tick = tick
        self.evaluations = 0

    def _prepare(self) -> None:
        self.lent.reset_buffers()
        reseed(self.seed)

    def evaluate(self, model: Any) -> torch.Tensor:
        """The objective at `model`, detached: without a graph, unless the loss differentiates inside."""
        with torch.set_grad_enabled(self.objective.needs_grad):
            return torch.as_tensor(self.objective(model)).detach()

    def loss(self) -> torch.Tensor:
        """The unperturbed loss, without recording a graph (unless the loss needs one)."""
        with torch.no_grad():
            self._prepare()
            self.evaluations += 1
            return self.evaluate(self.lent.model).to(torch.float64)

    def loss_twice(self) -> tuple[torch.Tensor, float]:
        """The unperturbed loss and how much a second identical evaluation differs from it.

        Anything but 0 means a random source outside torch's RNG (atomics, numpy, ...): the checks
        widen their noise floor by it and the report says so.
        """
        first, second = self.loss(), self.loss()
        return first, abs(float(first) - float(second))

    def losses(self, target: Target, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def losses_along(self, target: Target, deltas: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LoopEngine(Engine):
    """One forward per point, perturbing the working copy in place; restores it even on error."""

    name = "loop"

    def _one(self) -> torch.Tensor:
        self._prepare()
        return self.evaluate(self.lent.model)

    def losses(self, target: Target, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        flat = target.flat
        out = torch.empty(len(index), dtype=torch.float64, device=flat.device)
        with torch.no_grad():
            for j, i in enumerate(index.tolist()):
                old = flat[i].clone()
                flat[i] = values[j]
                try:
                    out[j] = self._one()
                finally:
                    flat[i] = old
                self.evaluations += 1
                self.tick(1)
        return out

    def losses_along(self, target: Target, deltas: torch.Tensor) -> torch.Tensor:
        flat = target.flat
        base = flat.clone()
        out = torch.empty(deltas.shape[0], dtype=torch.float64, device=flat.device)
        with torch.no_grad():
            try:
                for j in range(deltas.shape[0]):
                    torch.add(base, deltas[j], out=flat)
                    out[j] = self._one()
                    self.evaluations += 1
                    self.tick(1)
            finally:
                flat.copy_(base)
        return out


def memory_budget(device: torch.device) -> int:
    """Bytes the perturbed copies of one chunk may take: 1/8 of what is free, at most 32 MiB on CPU.

    The rest is left to the activations of the batched forward, which scale with the same chunk.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1 << 20, free // 8)
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume plenty
        free = 1 << 34
    return max(1 << 20, min(1 << 25, free // 8))


def _substitute(tree: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    """`tree` with the leaf `old` (by identity) replaced by `new`."""
    return pytree.tree_map(lambda leaf: new if leaf is old else leaf, tree)


class _Wrapped(nn.Module):
    """Lets functional_call reparametrize the user's module while the objective sees the module itself."""

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self._objective = objective

    def forward(self, batch: Any) -> Any:
        objective = self._objective
        if batch is not objective.batch:
            objective = Objective(objective.loss_fn, batch, objective.forward)
            objective.needs_grad = self._objective.needs_grad
        return objective(self.model)


@contextlib.contextmanager
def without_vmap_fallback() -> Iterator[None]:
    """vmap with its per-example fallback disabled: an op without a batching rule raises instead.

    With the fallback on, such an op runs one example at a time, and C++ prints "There is a
    performance drop because we have not yet implemented the batching rule for mylib::op" straight
    to stderr, at every call (c10's warning handler, not Python's `warnings`: it can't be caught or
    filtered, and ``-W error`` does not stop it). Disabled, vmap raises, and `choose_engine` /
    `EngineSwitch` switch to the loop with a note naming the op. The setting is process-wide;
    it is restored on exit.
    """
    functorch = torch._C._functorch
    if not hasattr(functorch, "_set_vmap_fallback_enabled"):  # an older torch: nothing to switch
        yield
        return
    was = functorch._is_vmap_fallback_enabled()
    functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        functorch._set_vmap_fallback_enabled(was)


def missing_batching_rule(exc: BaseException) -> str | None:
    """``"mylib::op has no vmap batching rule (...)"`` if `exc` is vmap refusing its fallback, else None."""
    found = _NO_RULE.match(str(exc))
    if found is None:
        return None
    return (
        f"{found.group(1)} has no vmap batching rule (torch.library.register_vmap adds one, for the faster vmap engine)"
    )


class VmapEngine(Engine):
    """Chunks of perturbed copies of one tensor per batched forward (``vmap`` + ``functional_call``)."""

    name = "vmap"

    def __init__(self, *args: Any, max_chunk: int = 256, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.wrapped = _Wrapped(self.lent.model, self.objective)
        self.max_chunk = max_chunk

    def chunk_size(self, target: Target) -> int:
        """Rows per batched forward: at most `max_chunk`, and perturbed copies within the memory budget."""
        budget = memory_budget(target.tensor.device) // target.tensor.element_size()
        return max(1, min(self.max_chunk, budget // max(1, target.tensor.numel())))

    def _row_fn(self, target: Target) -> Callable[[torch.Tensor], torch.Tensor]:
        wrapped, batch = self.wrapped, self.objective.batch
        if target.kind == "parameter":
            key = "model." + target.name

            def row(p: torch.Tensor) -> torch.Tensor:
                return functional_call(wrapped, {key: p}, (batch,))

        else:

            def row(x: torch.Tensor) -> torch.Tensor:
                return wrapped(_substitute(batch, target.tensor, x))

        return row

    def _batched(self, target: Target, rows: torch.Tensor) -> torch.Tensor:
        fn = vmap(self._row_fn(target), randomness="same")
        out = torch.empty(rows.shape[0], dtype=torch.float64, device=rows.device)
        size = self.chunk_size(target)
        with torch.set_grad_enabled(self.objective.needs_grad):
            start = 0
            while start < rows.shape[0]:
                chunk = rows[start : start + size]
                self._prepare()
                try:
                    with without_vmap_fallback():
                        out[start : start + len(chunk)] = fn(chunk.view(len(chunk), *target.shape)).detach()
                except torch.OutOfMemoryError:
                    if size == 1:
                        raise
                    size = self.max_chunk = max(1, size // 2)  # activations did not fit: halve and retry
                    continue
                self.evaluations += len(chunk)
                self.tick(len(chunk))
                start += len(chunk)
        return out

    def losses(self, target: Target, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        flat = target.flat
        out = torch.empty(len(index), dtype=torch.float64, device=flat.device)
        size = min(self.chunk_size(target), len(index))
        # One buffer of unperturbed copies per call; each chunk sets its elements and puts them back,
        # so the copies cost O(rows) per chunk instead of O(rows * numel).
        rows = flat.expand(size, flat.numel()).clone()
        diagonal = torch.arange(size, device=flat.device)
        for start in range(0, len(index), size):
            idx = index[start : start + size]
            k = len(idx)
            rows[diagonal[:k], idx] = values[start : start + k].to(rows.dtype)
            out[start : start + k] = self._batched(target, rows[:k])
            rows[diagonal[:k], idx] = flat[idx]
        return out

    def losses_along(self, target: Target, deltas: torch.Tensor) -> torch.Tensor:
        return self._batched(target, target.flat + deltas)


def vmap_agrees(engine: VmapEngine, target: Target, loss0: torch.Tensor, slack: float) -> str | None:
    """None if one unperturbed batched evaluation reproduces the plain loss; else why not."""
    try:
        value = engine.losses_along(
            target, torch.zeros(1, target.tensor.numel(), dtype=target.tensor.dtype, device=target.tensor.device)
        )[0]
    except Exception as exc:  # vmap can't run this model: any error here means "use the loop"
        rule = missing_batching_rule(exc)
        if rule is not None:
            return rule
        first = str(exc).split(". ")[0].splitlines()[0] if str(exc) else ""
        return f"vmap could not run the model ({type(exc).__name__}: {first[:160]})"
    if not abs(float(value) - float(loss0)) <= slack:
        return f"vmap gave a different unperturbed loss ({float(value)!r} vs {float(loss0)!r})"
    return None


def dynamo_imported() -> bool:
    """Whether ``torch._dynamo`` (which the cone engine needs) is already imported in this process."""
    return "torch._dynamo" in sys.modules


class EngineSwitch:
    """The engine in use, and THE switch when it fails mid-check (noted, never silent).

    The cone engine falls back to vmap (`fallback`), vmap to the loop.
    """

    def __init__(
        self, loop: LoopEngine, engine: Engine, forced: bool, notes: list[str], fallback: Engine | None = None
    ) -> None:
        self.loop, self.engine, self.forced, self.notes = loop, engine, forced, notes
        self.fallback = fallback
        self.used: list[Engine] = [loop] if engine is loop else [loop, engine]
        self.cone_trial: tuple[ConeTrial, Target, torch.Tensor, float] | None = None  # see `upgrade`

    def run(self, what: str, fn: Callable[[Engine], Any]) -> Any:
        """``fn(engine)``; if the engine raises (and was not forced), note it and rerun ``fn`` on the next one."""
        while True:
            try:
                return fn(self.engine)
            except Exception as exc:
                if self.engine is self.loop or self.forced:
                    raise
                following = self.fallback or self.loop
                why = missing_batching_rule(exc) or f"{self.engine.name} failed ({type(exc).__name__})"
                note = f"engine: {following.name} from {what} on, because {why}"
                if note not in self.notes:
                    self.notes.append(note)
                self.engine, self.fallback = following, None
                if following not in self.used:
                    self.used.append(following)

    def upgrade(self, planned: int) -> None:
        """Under ``engine="auto"``, move from vmap (or the loop) to the cone engine when it pays for itself.

        The cone engine needs ``torch._dynamo`` (imported by ``make_fx``: about 2 s, once per process),
        so it is tried when that is already paid for, or when the plan holds at least
        `CONE_MIN_EVALUATIONS` evaluations. It is tried from the loop too: a model vmap can't run
        (fused attention without a batching rule, an old-style autograd.Function) may still be one
        graph of aten ops. Its reason for declining is noted; the engine before it stays its fallback.
        """
        pending, self.cone_trial = self.cone_trial, None
        if pending is None or self.engine.name not in ("vmap", "loop"):
            return
        if planned < CONE_MIN_EVALUATIONS and not dynamo_imported():
            return
        trial, *args = pending
        found, why = trial(self.loop, *args)
        if found is None:
            _note(self.notes, f"engine: {self.engine.name}, because {why}")
            return
        self.engine, self.fallback = found, self.engine
        self.used.append(found)

    @property
    def evaluations(self) -> int:
        return sum(e.evaluations for e in self.used)

    @property
    def name(self) -> str:
        return self.engine.name


def choose_engine(
    call: str,
    loop: LoopEngine,
    target: Target | None,
    loss0: torch.Tensor,
    nondet: float,
    wanted: str,
    notes: list[str],
    *,
    cone: ConeTrial | None = None,
) -> EngineSwitch:
    """THE engine policy: cone, else vmap, where they reproduce the plain loss; else the loop (with a note).

    `loop` is the loop engine of this check (its lent model, objective, seed and tick are reused);
    `target` the tensor the batched engines are tried on (None: nothing to check, the loop); `nondet`
    the measured nondeterminism of the forward, which widens the agreement slack by ``10 * nondet``.
    `cone` (module checks pass `_cone.cone_agrees`) builds the cone engine: ``wanted="cone"`` forces
    it, and under ``wanted="auto"`` it may replace vmap once the plan is known (`EngineSwitch.upgrade`).
    ``wanted="vmap"`` or ``"cone"`` that can't run is an error naming `call`.
    """
    engine: Engine = loop
    if target is None:
        return EngineSwitch(loop, loop, wanted in ("vmap", "cone"), notes)
    u = float(torch.finfo(target.tensor.dtype).eps) / 2
    slack = 1e4 * u * abs(float(loss0)) + 10 * nondet
    if wanted == "cone":
        found, why = cone(loop, target, loss0, slack) if cone else (None, "it is only available to module checks")
        if found is None:
            raise InvalidArgumentError(f"{call}: engine='cone' is not usable here: {why}; use engine='auto'.")
        return EngineSwitch(loop, found, True, notes)
    if wanted in ("auto", "vmap"):
        vm = VmapEngine(loop.lent, loop.objective, loop.seed, loop.tick)
        why = vmap_agrees(vm, target, loss0, slack)
        if why is None:
            engine = vm
        elif wanted == "vmap":
            raise InvalidArgumentError(f"{call}: engine='vmap' is not usable here: {why}; use engine='auto'.")
        else:
            _note(notes, f"engine: loop, because {why}")
    switch = EngineSwitch(loop, engine, wanted in ("vmap", "cone"), notes)
    if wanted == "auto" and cone:
        switch.cone_trial = (cone, target, loss0, slack)
    return switch


def _note(notes: list[str], note: str) -> None:
    if note not in notes:
        notes.append(note)

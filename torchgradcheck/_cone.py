"""The cone engine: evaluate only what a perturbation changes.

Perturbing a tensor changes nothing upstream of where it is first used. So the objective is
captured once as a graph of aten ops (``make_fx`` with ``pre_dispatch=True``, over
``functional_call``: the user's model is not changed), evaluated once unperturbed, and every value
is cached. For each target tensor only its downstream *cone* is re-evaluated, a chunk of perturbed
rows at a time (chunks sized by the cone's values, buffer resets and reseeding as `VmapEngine`):
in plain batched tensor ops where an op is batch-transparent, under ``vmap`` from the first op
that is not (`_rows`). Every value outside the cone is read from the cache.

Where the target's first consumer is linear in it (``linear`` weight or bias, ``conv2d`` weight or
bias, ``matmul``/``mm`` right operand), one perturbed element changes that op's output by a
low-rank term: ``W[r, c] += h`` changes output column ``r`` of ``linear`` by ``h * x[..., c]``. The
perturbed outputs are then built from the cached one by a gather and a scaled add, with no matmul,
and only the rest of the cone is evaluated. A changed column that passes through pointwise ops into
a second Linear is one more rank-1 step, and through a tanh into a third Linear one more (`_low_rank`).

The engine refuses (`ConeUnavailableError`, with the reason) whatever a cached graph can't reproduce:
a capture that fails (data-dependent control flow: ``if x.sum() > 0``, ``.item()``), random ops
(dropout in train mode), side effects on the model's state (in-place updates of parameters, buffers
or inputs, e.g. train-mode BatchNorm's running statistics) and ops it does not know. Python side
effects of the forward (counters, prints) are not repeated per evaluation; they can't change the
loss without showing up as one of the above.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from ._batch import Objective
from ._engines import Engine, LoopEngine, memory_budget, without_vmap_fallback
from ._low_rank import Update, linear_update
from ._params import Lent, Target
from ._plain_ops import FASTER, attention, cross_entropy
from ._rows import Pool, run_rows

__all__ = ["ConeEngine", "ConeUnavailableError", "capture", "cone_agrees"]

aten = torch.ops.aten
Tick = Callable[[int], None]

# Dropout-like ops: (input, p, train). Identity when not training or p == 0; random otherwise.
_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default}
_DROPOUTS |= {aten.feature_alpha_dropout.default}
# Ops that pass their first argument's values through unchanged (followed to find a linear consumer).
_PASS_THROUGH = {aten.clone.default, aten.alias.default, aten.detach.default, aten.contiguous.default}
_GRAD_MODE = {torch._C._set_grad_enabled}
_PYTHON_OPS = {operator.getitem}


class ConeUnavailableError(RuntimeError):
    """The cone engine can't honour this objective; the message says why (it ends up in the report)."""


def _noop(_: int) -> None:
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:160]}"


class _Traced(nn.Module):
    """``objective(model)`` as a function of every parameter, buffer and batch tensor, flat."""

    def __init__(self, model: nn.Module, objective: Objective, keys: list[str], spec: Any, leaves: list[Any]):
        super().__init__()
        self.model = model
        self.objective = objective
        self.keys = keys
        self.spec = spec
        self.leaves = leaves  # batch leaves; tensors are replaced by the traced inputs

    def forward(self, *flat: torch.Tensor) -> Any:
        state = dict(zip(self.keys, flat[: len(self.keys)]))
        tensors = iter(flat[len(self.keys) :])
        leaves = [next(tensors) if isinstance(x, torch.Tensor) else x for x in self.leaves]
        batch = pytree.tree_unflatten(leaves, self.spec)
        objective = Objective(self.objective.loss_fn, batch, self.objective.forward)
        holder = _Holder(self.model, objective)
        return functional_call(holder, {"model." + k: v for k, v in state.items()}, ())


class _Holder(nn.Module):
    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self._objective = objective

    def forward(self) -> Any:
        return self._objective(self.model)


@dataclass
class Captured:
    """The objective as a graph, its inputs, and every node's unperturbed value."""

    module: fx.GraphModule
    nodes: list[fx.Node]  # call_function nodes in order
    params: dict[str, fx.Node]  # parameter name -> placeholder
    inputs: dict[int, fx.Node]  # id(batch tensor) -> placeholder
    output: fx.Node  # the loss node
    cache: dict[fx.Node, Any]


def _mutated_args(node: fx.Node) -> list[fx.Node]:
    schema = node.target._schema  # type: ignore[union-attr]
    found = []
    for i, arg in enumerate(schema.arguments):
        info = arg.alias_info
        if info is None or not info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if isinstance(value, fx.Node):
            found.append(value)
    return found


def _is_view(node: fx.Node) -> bool:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return any(r.alias_info is not None and not r.alias_info.is_write for r in target._schema.returns)


def _functional(op: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """``aten.relu_.default`` -> ``aten.relu.default`` (None when there is no such out-of-place op)."""
    name = op._schema.name.split("::")[-1]
    if not name.endswith("_") or name.endswith("__"):
        return None
    packet = getattr(aten, name[:-1], None)
    overload = getattr(packet, op._overloadname, None) if packet is not None else None
    if overload is None or overload._schema.is_mutable:
        return None
    return overload


def _remove_mutations(graph: fx.Graph, names: dict[fx.Node, str]) -> None:
    """Rewrite in-place ops on fresh intermediates as out-of-place ops; refuse anything else."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        op = node.target
        if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload) or not op._schema.is_mutable:
            continue
        for arg in _mutated_args(node):
            root = arg
            while _is_view(root) and root.args and isinstance(root.args[0], fx.Node):
                root = root.args[0]
            if root.op in ("placeholder", "get_attr"):
                what = names.get(root, root.name)
                raise ConeUnavailableError(f"the forward changes {what} in place ({op}): a side effect")
            if root is not arg or any(_is_view(u) for u in arg.users if u is not node):
                raise ConeUnavailableError(f"the forward writes in place through a view ({op})")
        functional = _functional(op)
        if functional is None:
            raise ConeUnavailableError(f"the forward uses the in-place op {op}, which has no out-of-place twin")
        mutated = _mutated_args(node)
        node.target = functional
        for arg in mutated:
            for user in list(arg.users):
                if user is not node and order[user] > order[node]:
                    user.replace_input_with(arg, node)


def _trace(lent: Lent, traced: nn.Module, args: list[torch.Tensor], buffers: list[tuple[str, torch.Tensor]]) -> Any:
    """``make_fx`` of `traced`; refuses a capture that fails or changes a buffer (a side effect)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    lent.reset_buffers()
    before = [b.clone() for _, b in buffers]
    try:
        with torch.enable_grad(), _quiet(), _one_fake_mode():
            gm = make_fx(traced, pre_dispatch=True)(*args)
    except ConeUnavailableError:
        raise
    except Exception as exc:
        raise ConeUnavailableError(f"the forward could not be captured as a graph ({_first_line(exc)})") from None
    finally:
        changed = [n for (n, b), old in zip(buffers, before) if not torch.equal(b, old)]
        lent.reset_buffers()
    if changed:
        raise ConeUnavailableError(
            f"the forward updates buffer {changed[0]!r} (e.g. train-mode BatchNorm): a side effect"
        )
    return gm


def _classify(graph: fx.Graph) -> list[fx.Node]:
    """The nodes to evaluate, or refuse. Grad-mode switches (nothing to do under no_grad) and dropouts
    that are identities (eval mode or p == 0) are taken out of the graph."""
    nodes = []
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        op = node.target
        if op in _GRAD_MODE and not node.users:
            graph.erase_node(node)
            continue
        if op in _DROPOUTS:
            p, train = [*node.args, None, None][1:3]
            if train and p:
                raise ConeUnavailableError(f"the forward draws random numbers ({op} in train mode)")
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            continue
        if (
            op is aten.scaled_dot_product_attention.default
            and _random_off(node, op)
            and not node.kwargs.get("enable_gqa")
        ):
            node.target = attention  # vmap has no batching rule for the fused CPU kernels: plain ops
        elif op is aten.cross_entropy_loss.default:
            node.target = cross_entropy  # the fused kernel is slow on short rows under vmap: plain ops
        elif isinstance(op, torch._ops.OpOverload):
            if torch.Tag.nondeterministic_seeded in op.tags and not _random_off(node, op):
                raise ConeUnavailableError(f"the forward draws random numbers ({op})")
            if (
                op in (aten.batch_norm.default, aten.instance_norm.default)
                and node.args[5]
                and node.args[3] is not None
            ):
                raise ConeUnavailableError(
                    f"the forward updates running statistics ({op} in train mode): a side effect"
                )
        elif op not in _PYTHON_OPS:
            raise ConeUnavailableError(f"the captured graph calls {op!r}, which the cone engine does not evaluate")
        nodes.append(node)
    return nodes


def capture(lent: Lent, objective: Objective) -> Captured:
    """Trace the objective once and cache every value; `ConeUnavailableError` says why it can't be used."""
    model = lent.model
    params = list(model.named_parameters())
    buffers = list(model.named_buffers())
    keys = [n for n, _ in params] + [n for n, _ in buffers]
    state = [p.data for _, p in params] + [b for _, b in buffers]
    leaves, spec = pytree.tree_flatten(objective.batch)
    batch_tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    # Trace with grad on and parameters requiring grad, as in training: no inference fast paths.
    args = [t.detach().requires_grad_(t.is_floating_point()) for t in state[: len(params)]]
    args += list(state[len(params) :]) + batch_tensors
    gm = _trace(lent, _Traced(model, objective, keys, spec, leaves), args, buffers)
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    names = dict(zip(placeholders, keys + [f"batch tensor {i}" for i in range(len(batch_tensors))]))
    _remove_mutations(graph, names)
    nodes = _classify(graph)
    (output,) = [n for n in graph.nodes if n.op == "output"]
    loss = output.args[0]
    if not isinstance(loss, fx.Node):
        raise ConeUnavailableError("the captured loss is not a tensor computed from the inputs")
    cache: dict[fx.Node, Any] = dict(zip(placeholders, state + batch_tensors))
    for node in graph.nodes:
        if node.op == "get_attr":
            cache[node] = _attr(gm, str(node.target))
    by_name = dict(zip(keys[: len(params)], placeholders))
    by_id = {id(t): ph for ph, t in zip(placeholders[len(keys) :], batch_tensors)}
    captured = Captured(gm, nodes, by_name, by_id, loss, cache)
    with torch.no_grad():
        lent.reset_buffers()
        try:
            _evaluate(nodes, cache)
        except Exception as exc:
            raise ConeUnavailableError(f"the captured graph could not be evaluated ({_first_line(exc)})") from None
    return captured


def _one_fake_mode() -> Any:
    """A tracing context with one FakeTensorMode: ``make_fx`` then records each node's metadata with it
    instead of creating a mode per node (a third of the capture time). A plain context where torch lacks it."""
    import contextlib

    try:
        from torch._guards import TracingContext, tracing
        from torch._subclasses.fake_tensor import FakeTensorMode

        return tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True)))
    except Exception:  # pragma: no cover - torch versions without these internals
        return contextlib.nullcontext()


class _quiet:
    """Silence warnings that tracing itself raises (pytest runs with filterwarnings=error)."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def _random_off(node: fx.Node, op: torch._ops.OpOverload) -> bool:
    """True for a seeded op whose randomness is switched off by its arguments (``dropout_p=0``, ``train=False``)."""
    bound = {
        a.name: (node.args[i] if i < len(node.args) else node.kwargs.get(a.name, a.default_value))
        for i, a in enumerate(op._schema.arguments)
    }
    if "train" in bound and bound["train"] is False:
        return True
    return "dropout_p" in bound and bound["dropout_p"] == 0


def _attr(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _evaluate(nodes: Sequence[fx.Node], env: dict[fx.Node, Any]) -> None:
    """Evaluate `nodes` in order, reading and writing their values in `env`."""
    for node in nodes:
        env[node] = _call(node, env)


def _call(node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    """One node's value from the values of its inputs in `env`."""
    args = fx.node.map_arg(node.args, env.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
    return FASTER.get(node.target, node.target)(*args, **kwargs)  # type: ignore[operator]


@dataclass
class _Plan:
    """How one target is evaluated: from its placeholder, or from a low-rank start."""

    placeholder: fx.Node
    cone: list[fx.Node]  # every node that depends on the target, in order
    update: Update | None
    rests: dict[fx.Node, list[fx.Node]]  # per low-rank start (and its fallbacks): the nodes that depend on it


class ConeEngine(Engine):
    """Re-evaluate only the downstream cone of each target, from a cached unperturbed graph."""

    name = "cone"

    def __init__(
        self,
        lent: Lent,
        objective: Objective,
        seed: int,
        tick: Tick = _noop,
        *,
        chunk_elements: int | None = None,
        max_chunk: int = 8192,
        cache_elements: int = 1 << 17,
        low_rank: bool = True,
    ) -> None:
        super().__init__(lent, objective, seed, tick)
        self.chunk_elements = chunk_elements
        self.max_chunk = max_chunk
        self.cache_elements = cache_elements
        self.low_rank = low_rank
        self.captured = capture(lent, objective)
        self._plans: dict[tuple[str, str], _Plan] = {}

    @property
    def cached_loss(self) -> torch.Tensor:
        return torch.as_tensor(self.captured.cache[self.captured.output]).detach().to(torch.float64)

    def chunk_size(self, target: Target, cone: Sequence[fx.Node] = (), copies: bool = True) -> int:
        """Rows per batched evaluation, from what one row of the cone holds.

        All of a chunk's cone values are alive at once: they stay within the memory budget of
        `VmapEngine.chunk_size`, and the largest of them within `cache_elements` (bigger chunks ran
        slower on CPU once one value outgrew the cache). A cone of a few small values runs up to
        `max_chunk` rows at once. `copies`: each row holds a perturbed copy of the whole target.
        """
        cache = self.captured.cache
        sizes = [v.numel() for n in cone if isinstance(v := cache.get(n), torch.Tensor)]
        if copies or not sizes:
            sizes.append(target.tensor.numel())
        budget = self.chunk_elements or memory_budget(target.tensor.device) // target.tensor.element_size()
        rows = min(budget // max(1, sum(sizes)), self.cache_elements // max(1, max(sizes)))
        return max(1, min(self.max_chunk, rows))

    # -- planning ---------------------------------------------------------------------------------

    def _plan(self, target: Target) -> _Plan:
        key = (target.kind, target.name)
        if key not in self._plans:
            if target.kind == "parameter":
                ph = self.captured.params.get(target.name)
            else:
                ph = self.captured.inputs.get(id(target.tensor))
            if ph is None:
                raise ConeUnavailableError(f"{target.name} is not an input of the captured graph")
            update = self._low_rank(ph, target) if self.low_rank else None
            cone = _downstream(self.captured.nodes, ph)
            rests = {u.node: _downstream(cone, u.node) for u in _starts(update)}
            self._plans[key] = _Plan(ph, cone, update, rests)
        return self._plans[key]

    def _low_rank(self, ph: fx.Node, target: Target) -> Update | None:
        """A gather-and-add start when the target's only consumer is linear in it."""
        node = ph
        while len(node.users) == 1:
            (user,) = node.users
            if user.target in _PASS_THROUGH and user.args[0] is node and not user.kwargs:
                node = user
                continue
            return linear_update(self.captured.cache, node, user, target.shape)
        return None

    # -- evaluation -------------------------------------------------------------------------------

    def _cone_fn(self, seed: fx.Node, cone: list[fx.Node], near: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
        """A chunk of rows: `seed` set to the rows' values, then every node downstream of it (`_rows`).

        `near`: ops of rows close to the cached point may use their `_plain_ops.NEAR` forms, whose
        rounding noise is lower (the cached value's own rounding cancels in a difference).
        """
        cache, output = self.captured.cache, self.captured.output
        pool = Pool()

        def rows(values: torch.Tensor) -> torch.Tensor:
            env = dict(cache)
            env[seed] = values
            return run_rows(cone, env, seed, output, _call, cache if near else {}, pool)

        return rows

    def _run_rows(
        self,
        fn: Callable[[Any], torch.Tensor],
        make: Callable[[int, int], Any],
        n: int,
        size: int,
        device: torch.device,
    ) -> torch.Tensor:
        """``fn`` of rows ``make(start, stop)``, chunk by chunk (halved on out-of-memory)."""
        out = torch.empty(n, dtype=torch.float64, device=device)
        with torch.no_grad():
            start = 0
            while start < n:
                stop = min(n, start + size)
                self._prepare()
                try:
                    with without_vmap_fallback():  # no C++ fallback warnings (see `_engines`)
                        out[start:stop] = fn(make(start, stop))
                except torch.OutOfMemoryError:
                    if size == 1:
                        raise
                    size = self.max_chunk = max(1, size // 2)
                    continue
                self.evaluations += stop - start
                self.tick(stop - start)
                start = stop
        return out

    def _constant(self, n: int, device: torch.device) -> torch.Tensor:
        """The loss does not depend on the target: every row is the cached loss."""
        out = self.cached_loss.to(device).expand(n).clone()
        self.evaluations += n
        self.tick(n)
        return out

    def losses(self, target: Target, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        plan = self._plan(target)
        flat, update = target.flat, plan.update
        n = len(index)
        if not plan.cone or n == 0:
            return self._constant(n, flat.device)
        if update is not None:
            return self._low_rank_losses(plan, update, target, index, values)
        size = min(self.chunk_size(target, plan.cone), n)
        rows = flat.expand(size, flat.numel()).clone()
        diagonal = torch.arange(size, device=flat.device)
        fn = self._cone_fn(plan.placeholder, plan.cone)

        last: list[
            torch.Tensor
        ] = []  # the elements the previous chunk set, put back first (O(rows), not O(rows*numel))

        def make(a: int, b: int) -> torch.Tensor:
            k = b - a
            for idx in last:
                rows[diagonal[: len(idx)], idx] = flat[idx]
            last[:] = [index[a:b]]
            rows[diagonal[:k], index[a:b]] = values[a:b].to(rows.dtype)
            return rows[:k].view(k, *target.shape)

        return self._run_rows(fn, make, n, size, flat.device)

    def _low_rank_losses(
        self, plan: _Plan, update: Update, target: Target, index: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """Rows built by the low-rank start, chunk by chunk; a chunk it can't build goes to its fallback."""
        flat, n = target.flat, len(index)
        starts = _starts(update)
        size = min(min(self.chunk_size(target, [u.node, *plan.rests[u.node]], copies=False) for u in starts), n)
        deltas = values.to(torch.float64) - flat[index].to(torch.float64)
        fns = {u.node: self._cone_fn(u.node, plan.rests[u.node]) for u in starts}
        buffers = Pool()  # the rows of one chunk are dead once its losses are out: the next reuses them

        def make(a: int, b: int) -> tuple[fx.Node, torch.Tensor]:
            buffers.reset()
            for start in starts:
                rows = start.build(index[a:b], deltas[a:b], buffers)
                if rows is not None:
                    return start.node, rows
            raise AssertionError("the last low-rank start builds every chunk")

        return self._run_rows(lambda made: fns[made[0]](made[1]), make, n, size, flat.device)

    def losses_along(self, target: Target, deltas: torch.Tensor) -> torch.Tensor:
        plan = self._plan(target)
        flat = target.flat
        n = deltas.shape[0]
        if not plan.cone or n == 0:
            return self._constant(n, flat.device)
        rows = flat + deltas
        # Not the NEAR forms: the noise measured along these rows (`_noise`) must not be lower than
        # the noise of a first-pass row that is too far from the cached point for them.
        fn = self._cone_fn(plan.placeholder, plan.cone, near=False)
        size = self.chunk_size(target, plan.cone)
        return self._run_rows(fn, lambda a, b: rows[a:b].view(b - a, *target.shape), n, size, flat.device)


def _starts(update: Update | None) -> list[Update]:
    """A low-rank start and its fallbacks, in order."""
    found = []
    while update is not None:
        found.append(update)
        update = update.fallback
    return found


def _downstream(nodes: Sequence[fx.Node], seed: fx.Node) -> list[fx.Node]:
    """The nodes that depend on `seed`, in evaluation order (`seed` itself excluded)."""
    reach = {seed}
    cone = []
    for node in nodes:
        if any(a in reach for a in node.all_input_nodes):
            reach.add(node)
            cone.append(node)
    return cone


def cone_agrees(loop: LoopEngine, target: Target, loss0: torch.Tensor, slack: float) -> tuple[Engine | None, str]:
    """The cone engine if it can run this objective and reproduces the plain loss; else None and why not.

    Reproduced means: at the point, and moved along one random direction of `target` (against the
    loop engine), within `slack`. A graph that caught a value of the target as a constant (autograd's
    saved tensors inside a loss that differentiates) gives the right loss at the point only.
    `_engines.choose_engine` gets this function from the module checks (`_check.start_engines`).
    """
    if loop.objective.needs_grad:
        return None, "the loss differentiates inside (torch.autograd.grad): the cone engine evaluates forwards only"
    try:
        cone = ConeEngine(loop.lent, loop.objective, loop.seed, loop.tick)
        moves = _probe(target)
        value, moved = cone.losses_along(target, moves)
        plain = loop.losses_along(target, moves[1:])[0]
    except ConeUnavailableError as exc:
        return None, f"the cone engine can't honour this model: {exc}"
    except Exception as exc:  # any error here means: the engine before it
        first = str(exc).split(". ")[0].splitlines()[0] if str(exc) else ""
        return None, f"the cone engine could not run the model ({type(exc).__name__}: {first[:160]})"
    if not abs(float(value) - float(loss0)) <= slack:
        return None, f"the cone engine gave a different unperturbed loss ({float(value)!r} vs {float(loss0)!r})"
    if not abs(float(moved) - float(plain)) <= slack:
        return None, f"the cone engine gave a different loss at a moved point ({float(moved)!r} vs {float(plain)!r})"
    return cone, ""


def _probe(target: Target) -> torch.Tensor:
    """Two rows for `cone_agrees`: no move, and a seeded random move of 1e-3 relative in every element."""
    base = target.flat
    generator = torch.Generator().manual_seed(12345)
    signs = torch.randint(0, 2, (base.numel(),), generator=generator).to(base.device, base.dtype) * 2 - 1
    move = signs * 1e-3 * base.abs().clamp(min=1.0)
    return torch.stack([torch.zeros_like(move), move])

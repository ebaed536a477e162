"""Evaluate a cone on a chunk of rows with plain tensor ops wherever an op is batch-transparent.

The cone engine's rows carry a leading dim of size k. Under ``vmap`` a call costs about 35 µs plus 2
to 4 µs per op, and ``linear`` is decomposed into a matmul and an add that take 1.7x one ``addmm``
on CPU. Most of a cone is pointwise ops, Linear layers with an unbatched weight, views, and
reductions over given dims, whose batched forms are plain calls on the physical ``(k, *shape)``
tensors. So `run_rows` evaluates node by node while each op has a rule here; from the first op
without one (or whose arguments the rule can't take), the rest of the cone runs under one
``vmap``. Same kernels, same formulas: the losses equal the vmap ones up to rounding
(`tests/test_cone.py`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch.func import vmap

from ._plain_ops import FASTER, NEAR, attention, cross_entropy, cross_entropy_rows, plain_cross_entropy

__all__ = ["run_rows"]

aten = torch.ops.aten
_NO = object()  # a rule's answer: not batch-transparent with these arguments

# A rule gets the node's argument values (batched ones with the row dim) and which are batched.
Rule = Callable[[list[Any], list[bool], "Pool"], Any]
Call = Callable[[fx.Node, dict[fx.Node, Any]], Any]


def run_rows(
    nodes: Sequence[fx.Node],
    env: dict[fx.Node, Any],
    seed: fx.Node,
    output: fx.Node,
    call: Call,
    cache: dict[fx.Node, Any],
    pool: Pool,
) -> Any:
    """Evaluate `nodes` (all downstream of `seed`) into `env`; `seed`'s value has a leading row dim.

    `call(node, env)` evaluates one node on unbatched values (the graph's own semantics): it runs
    under vmap for the rest of the cone once an op has no rule. `cache` holds every node's
    unperturbed value, for the `NEAR` forms. `pool` lends the hot ops their outputs (see `Pool`).
    """
    batched = {seed}
    pool.reset()
    for i, node in enumerate(nodes):
        value = _near(node, env, batched, cache, pool)
        if value is None:
            value = _plain(node, env, batched, pool)
        if value is _NO:
            return _vmap_rest(nodes[i:], env, batched, output, call)
        env[node] = value
        batched.add(node)
    return env[output]


def _near(node: fx.Node, env: dict[fx.Node, Any], batched: set[fx.Node], cache: dict[fx.Node, Any], pool: Pool) -> Any:
    """An op of rows near its cached first input, in its `_plain_ops.NEAR` form; or None."""
    form = NEAR.get(node.target)
    if form is None or node.kwargs or node.args[0] not in batched:
        return None
    if any(isinstance(a, fx.Node) and a in batched for a in node.args[1:]):
        return None
    x0 = cache.get(node.args[0])
    if node not in pool.constants:  # the other inputs are not in the cone: cached values, fixed
        y0 = cache.get(node)
        known = isinstance(x0, torch.Tensor) and isinstance(y0, torch.Tensor)
        rest = [env[a] if isinstance(a, fx.Node) else a for a in node.args[1:]]
        pool.constants[node] = form.constants(x0, y0, rest) if known else None
    constants = pool.constants[node]
    if constants is None:
        return None
    x = env[node.args[0]]
    return form.rows(x, x0, constants, pool.take(x), pool.take(x))


def _plain(node: fx.Node, env: dict[fx.Node, Any], batched: set[fx.Node], pool: Pool) -> Any:
    if node.target is aten.broadcast_tensors.default and not node.kwargs:
        return _broadcast([env[a] for a in node.args[0]], [a in batched for a in node.args[0]])
    rule = _rule(node.target)
    if rule is None or node.kwargs:
        return _NO
    if any(isinstance(a, (list, tuple)) and any(isinstance(x, fx.Node) for x in a) for a in node.args):
        return _NO  # other lists of tensors (cat, stack)
    args = [env[a] if isinstance(a, fx.Node) else a for a in node.args]
    return rule(args, [isinstance(a, fx.Node) and a in batched for a in node.args], pool)


def _broadcast(tensors: list[torch.Tensor], flags: list[bool]) -> list[torch.Tensor]:
    """``broadcast_tensors``: every output gets the row dim (the node's outputs are all batched)."""
    k = next(t.shape[0] for t, f in zip(tensors, flags) if f)
    shape = torch.broadcast_shapes(*[t.shape[1:] if f else t.shape for t, f in zip(tensors, flags)])
    return [(_lift(t, len(shape)) if f else t).expand(k, *shape) for t, f in zip(tensors, flags)]


def _vmap_rest(
    rest: Sequence[fx.Node], env: dict[fx.Node, Any], batched: set[fx.Node], output: fx.Node, call: Call
) -> Any:
    """The rest of the cone under one vmap, over the batched values it reads."""
    inside = set(rest)
    needed = [n for n in batched if any(u in inside for u in n.users)]

    def fn(*values: Any) -> Any:
        local = dict(env)
        local.update(zip(needed, values))
        for node in rest:
            local[node] = call(node, local)
        return local[output]

    return vmap(fn, randomness="same")(*[env[n] for n in needed])


class Pool:
    """Output buffers for the hot ops of a chunk, lent again to the next chunk in the same order.

    Every value of a chunk is dead once its losses are copied out, and the next chunk asks for the
    same shapes in the same order. Allocating afresh instead lets glibc give the memory back to the
    system after each chunk and fault it in again for the next: 1.4x the time of the deep MLP here.
    """

    def __init__(self) -> None:
        self.free: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        self.lent: dict[tuple[Any, ...], int] = {}
        self.constants: dict[fx.Node, Any] = {}  # per node, what its NEAR form needs of the cached point

    def reset(self) -> None:
        self.lent.clear()

    def take(self, like: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
        """A buffer of `shape` (default: `like`'s), with `like`'s dtype and device; contents undefined."""
        shape = tuple(like.shape if shape is None else shape)
        key = (shape, like.dtype, like.device)
        n = self.lent.get(key, 0)
        buffers = self.free.setdefault(key, [])
        if n == len(buffers):
            buffers.append(torch.empty(shape, dtype=like.dtype, device=like.device))
        self.lent[key] = n + 1
        return buffers[n]


# -- rules ------------------------------------------------------------------------------------------

_RULES: dict[Any, Rule] = {}


def _rule(op: Any) -> Rule | None:
    """The rule for `op`; pointwise aten ops get theirs on first use."""
    found = _RULES.get(op)
    if found is None and isinstance(op, torch._ops.OpOverload) and torch.Tag.pointwise in op.tags:
        if not op._schema.is_mutable:
            found = _RULES[op] = _pointwise(FASTER.get(op, op))
    return found


def _rules(*ops: Any) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in ops:
            _RULES[op] = fn
        return fn

    return register


def _rank(x: torch.Tensor, batched: bool) -> int:
    """The rank the graph sees (without the row dim)."""
    return x.dim() - 1 if batched else x.dim()


def _dim(d: int, rank: int) -> int:
    """Logical dim `d` of a rank-`rank` value, as a dim of its batched form."""
    return d % rank + 1 if rank else 1


def _pointwise(fn: Callable[..., Any]) -> Rule:
    def apply(args: list[Any], flags: list[bool], pool: Pool) -> Any:
        tensors = [(a, f) for a, f in zip(args, flags) if isinstance(a, torch.Tensor)]
        scalar_rows = any(f and a.dim() == 1 for a, f in tensors)
        if (scalar_rows and len({a.dtype for a, _ in tensors}) > 1) or len({a.device for a, _ in tensors}) > 1:
            return _NO  # a 0-dim value with a row dim is no longer 0-dim to type promotion
        rank = max(_rank(a, f) for a, f in tensors)
        aligned = [_lift(a, rank) if f else a for a, f in zip(args, flags)]  # unbatched: broadcasting aligns right
        return fn(*aligned)

    return apply


def _lift(x: torch.Tensor, rank: int) -> torch.Tensor:
    """A batched value as rank `rank` + 1: size-1 dims after the row dim."""
    missing = rank - (x.dim() - 1)
    return x.view(x.shape[0], *[1] * missing, *x.shape[1:]) if missing else x


def _unbatched_rest(rule: Callable[..., Any]) -> Rule:
    """A rule for ops whose first argument is the only batched one."""

    def apply(args: list[Any], flags: list[bool], pool: Pool) -> Any:
        if not flags[0] or any(flags[1:]):
            return _NO
        return rule(*args)

    return apply


@_rules(aten.linear.default)
def _linear(args: list[Any], flags: list[bool], pool: Pool) -> Any:
    """Rows of the input (one GEMM, bias fused), of the weight (one matmul per row), or of the bias."""
    x, w, *rest = args
    b = rest[0] if rest else None
    moved_x, moved_w, moved_b = [*flags, False][:3]
    if moved_w:
        if moved_x or w.dim() != 3:
            return _NO
        out = torch.matmul(x.reshape(-1, x.shape[-1]), w.transpose(-1, -2)).view(w.shape[0], *x.shape[:-1], -1)
    elif moved_x:
        if w.dim() != 2:
            return _NO
        flat = x.reshape(-1, x.shape[-1])
        out = pool.take(flat, (flat.shape[0], w.shape[0]))
        if b is not None and not moved_b:
            torch.addmm(b, flat, w.t(), out=out)
            return out.view(*x.shape[:-1], w.shape[0])
        torch.mm(flat, w.t(), out=out)
        out = out.view(*x.shape[:-1], w.shape[0])
    else:
        out = torch.nn.functional.linear(x, w)  # the same for every row: only the bias moves
    if b is None:
        return out
    return out + (_lift(b, out.dim() - 1 if moved_x or moved_w else out.dim()) if moved_b else b)


@_rules(aten.matmul.default, aten.mm.default)
def _matmul(args: list[Any], flags: list[bool], pool: Pool) -> Any:
    a, b = args
    if not flags[0] or flags[1] or b.dim() != 2 or a.dim() < 3:
        return _NO
    return torch.matmul(a, b)


def _on_dim(method: str) -> Rule:
    """``x.method(dim, *rest)`` with the logical dim moved past the row dim."""

    def apply(args: list[Any], flags: list[bool], pool: Pool) -> Any:
        x, d, *rest = args
        if not flags[0] or any(flags[1:]) or x.dim() == 1:
            return _NO
        return getattr(x, method)(_dim(d, x.dim() - 1), *rest)

    return apply


def _install_views() -> None:
    for op, method in [
        (aten.squeeze.dim, "squeeze"),
        (aten.select.int, "select"),
        (aten.unflatten.int, "unflatten"),
        (aten.softmax.int, "softmax"),
        (aten.log_softmax.int, "log_softmax"),
    ]:
        _RULES[op] = _on_dim(method)
    for op in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        _RULES[op] = _unbatched_rest(lambda x, shape: x.reshape(x.shape[0], *shape))
    for op in (aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default):
        _RULES[op] = _unbatched_rest(lambda x: x)
    _RULES[aten.t.default] = _unbatched_rest(lambda x: x.transpose(-1, -2) if x.dim() == 3 else x)
    _RULES[aten.unsqueeze.default] = _unbatched_rest(lambda x, d: x.unsqueeze(_dim(d, x.dim())))
    _RULES[aten.transpose.int] = _unbatched_rest(
        lambda x, a, b: x.transpose(_dim(a, x.dim() - 1), _dim(b, x.dim() - 1))
    )
    _RULES[aten.permute.default] = _unbatched_rest(lambda x, ds: x.permute(0, *[_dim(d, x.dim() - 1) for d in ds]))
    _RULES[aten.slice.Tensor] = _unbatched_rest(lambda x, d=0, *r: aten.slice.Tensor(x, _dim(d, x.dim() - 1), *r))
    _RULES[aten.flatten.using_ints] = _unbatched_rest(_flatten)
    _RULES[aten.expand.default] = _unbatched_rest(lambda x, sizes: _lift(x, len(sizes)).expand(x.shape[0], *sizes))
    _RULES[operator.getitem] = lambda args, flags, pool: args[0][args[1]] if isinstance(args[0], (tuple, list)) else _NO


def _flatten(x: torch.Tensor, start: int = 0, end: int = -1) -> Any:
    rank = x.dim() - 1
    return x.reshape(x.shape[0], 1) if rank == 0 else x.flatten(_dim(start, rank), _dim(end, rank))


def _reduction(op: Any) -> Rule:
    """``op(x, dims, *rest)`` over given logical dims; "every dim" (no dims) goes to vmap."""

    def apply(args: list[Any], flags: list[bool], pool: Pool) -> Any:
        x, *rest = args
        dims = rest[0] if rest else None
        if not flags[0] or any(flags[1:]) or x.dim() == 1 or not dims:
            return _NO
        dims = [dims] if isinstance(dims, int) else dims
        return op(x, [_dim(d, x.dim() - 1) for d in dims], *rest[1:])

    return apply


def _total(method: str) -> Rule:
    """``sum`` / ``mean`` over every dim: one value per row."""

    def apply(args: list[Any], flags: list[bool], pool: Pool) -> Any:
        if len(args) != 1 or not flags[0]:
            return _NO
        return getattr(args[0].reshape(args[0].shape[0], -1), method)(-1)

    return apply


def _folded(op: Any, least: int) -> Rule:
    """conv2d, eval-mode batch_norm, adaptive pooling: rows folded into the batch dim N (rank >= `least`)."""

    def apply(args: list[Any], flags: list[bool], pool: Pool) -> Any:
        x = args[0]
        if not flags[0] or any(flags[1:]) or x.dim() - 1 < least:
            return _NO
        out = op(x.reshape(-1, *x.shape[2:]), *args[1:])
        return out.view(x.shape[0], x.shape[1], *out.shape[1:])

    return apply


@_rules(aten.layer_norm.default)
def _layer_norm(args: list[Any], flags: list[bool], pool: Pool) -> Any:
    if not flags[0] or any(flags[1:]):
        return _NO
    return aten.layer_norm.default(*args)  # normalises trailing dims: the row dim is one more leading dim


@_rules(aten.batch_norm.default)
def _batch_norm(args: list[Any], flags: list[bool], pool: Pool) -> Any:
    training = args[5]
    return _NO if training else _folded(aten.batch_norm.default, 2)(args, flags, pool)


@_rules(aten.mse_loss.default)
def _mse(args: list[Any], flags: list[bool], pool: Pool) -> Any:
    x, t, *rest = args
    reduction = rest[0] if rest else 1
    rank = _rank(x, flags[0])
    if reduction not in (1, 2) or x.dtype != t.dtype or rank != _rank(t, flags[1]) or rank == 0:
        return _NO
    square = (x - t) ** 2
    dims = list(range(1, square.dim()))
    return square.mean(dims) if reduction == 1 else square.sum(dims)


@_rules(cross_entropy)
def _cross_entropy(args: list[Any], flags: list[bool], pool: Pool) -> Any:
    logits, target, *rest = args
    weight, reduction, ignore, smoothing = (rest + [None, 1, -100, 0.0][len(rest) :])[:4]
    plain = plain_cross_entropy(weight, reduction, smoothing, target)
    if not flags[0] or any(flags[1:]) or logits.dim() != 3 or not plain:
        return _NO
    return cross_entropy_rows(logits, target, reduction, ignore)


@_rules(attention)
def _attention(args: list[Any], flags: list[bool], pool: Pool) -> Any:
    ranks = {_rank(a, f) for a, f in zip(args[:3], flags[:3])}
    if any(flags[3:]) or len(ranks) != 1 or (len(args) > 7 and args[7]):
        return _NO  # a batched mask, or q, k, v of different ranks: vmap
    return attention(*args)


def _install() -> None:
    _install_views()
    for op in (aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default, aten.logsumexp.default):
        _RULES[op] = _reduction(op)
    _RULES[aten.sum.default] = _total("sum")
    _RULES[aten.mean.default] = _total("mean")
    _RULES[aten.conv2d.default] = _folded(aten.conv2d.default, 4)
    _RULES[aten.adaptive_avg_pool2d.default] = _folded(aten.adaptive_avg_pool2d.default, 4)


_install()

"""Low-rank starts of the cone engine: the perturbed outputs of the first ops a perturbation reaches.

One perturbed element of a tensor whose first consumer is linear in it (``linear`` weight or bias,
``conv2d`` weight or bias, ``matmul``/``mm`` right operand) changes that op's output by a low-rank
term: ``W[r, c] += h`` changes output column ``r`` of ``linear`` by ``h * x[..., c]``. The rows of a
chunk are then built from the cached output by a gather and a scaled add, with no matmul:

* `linear_update`: the changed column of the first op's output;
* `_next_linear`: through pointwise ops into a second Linear, a changed column is a rank-1 update
  of its output (``u (outer) W2[:, r]``);
* `_through_near`: through a tanh into a third Linear, that rank-1 update is a cubic in ``u``
  (`_plain_ops.tanh_near`), so the third output changes by ``u S1[r] + u^2 S2[r] + u^3 S3[r]``
  with ``S`` computed once per column ``r``: no matmul and no tanh per row. Rows too far from the
  cached point for the cubic fall back to the second start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from ._plain_ops import FASTER, NEAR, NEAR_LIMIT, fast_here
from ._rows import Pool

__all__ = ["Update", "linear_update"]

aten = torch.ops.aten
SUMS_LIMIT = 1 << 22  # elements of the per-column sums S of `_through_near` (3 of them), at most


@dataclass
class Update:
    """A low-rank start: the perturbed outputs of `node`, built from its cached output.

    `build` returns None for a chunk it can't build (rows too far from the cached point for a
    near form); `fallback` is then the start to use.
    """

    node: fx.Node
    build: Callable[[torch.Tensor, torch.Tensor, Pool], torch.Tensor | None]  # (flat indices, deltas, buffers)
    fallback: Update | None = None


def linear_update(
    cache: dict[fx.Node, Any], source: fx.Node, op_node: fx.Node, shape: tuple[int, ...]
) -> Update | None:
    """How one perturbed element of `source` changes the output of `op_node`, if it is linear in it."""
    op = op_node.target
    args = list(op_node.args)
    if op_node.kwargs:
        return None
    base = cache.get(op_node)
    if not isinstance(base, torch.Tensor) or base.dim() == 0:
        return None
    column: _Column | None = None
    if op is aten.linear.default:
        if len(args) > 1 and args[1] is source and args[0] is not source and len(shape) == 2:
            xt = cache[args[0]].reshape(-1, shape[1]).T.contiguous()  # rows are gathered: (in, M)
            in_f = shape[1]
            column = _Column(op_node, base, lambda k: k // in_f, lambda k, d: d[:, None] * xt[k % in_f])
        elif len(args) > 2 and args[2] is source and args[1] is not source and args[0] is not source:
            m = base.numel() // base.shape[-1]
            column = _Column(op_node, base, lambda k: k, lambda k, d: d[:, None].expand(len(k), m))
    elif op in (aten.matmul.default, aten.mm.default):
        if args[1] is source and args[0] is not source and len(shape) == 2 and base.dim() >= 2:
            at = cache[args[0]].reshape(-1, shape[0]).T.contiguous()  # out[..., c] += h * a[..., r] for W[r, c]
            n_cols = shape[1]
            column = _Column(op_node, base, lambda k: k % n_cols, lambda k, d: d[:, None] * at[k // n_cols])
    elif op is aten.conv2d.default:
        return _conv2d_update(cache, source, op_node, args, base, shape)
    if column is None:
        return None
    return _next_linear(cache, column) or Update(op_node, column.rows)


@dataclass
class _Column:
    """A perturbation that changes one output column of `node` (the last dim): ``out[..., r] += dcol``."""

    node: fx.Node
    base: torch.Tensor
    which: Callable[[torch.Tensor], torch.Tensor]  # flat element index -> column r
    change: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (index, deltas) -> dcol (k, M)

    def rows(self, index: torch.Tensor, deltas: torch.Tensor, pool: Pool) -> torch.Tensor:
        base2 = self.base.reshape(-1, self.base.shape[-1])
        k = len(index)
        rows = _copies(pool, base2, k)
        rows[torch.arange(k, device=rows.device), :, self.which(index)] += self.change(index, deltas.to(rows.dtype))
        return rows.view(k, *self.base.shape)


def _copies(pool: Pool, base: torch.Tensor, k: int) -> torch.Tensor:
    """`k` copies of `base` in a buffer of `pool` (a fresh one per chunk costs page faults on CPU)."""
    return pool.take(base, (k, *base.shape)).copy_(base)


def _next_linear(cache: dict[fx.Node, Any], column: _Column) -> Update | None:
    """One more step for free: through pointwise unary ops into a Linear, a changed column is a rank-1 update.

    ``y = linear(f(z), W2, b2)`` with only column r of z changed: y changes by
    ``(f(z')[:, r] - f(z)[:, r]) (outer) W2[:, r]``, a B x out product instead of a matmul.
    """
    chain: list[fx.Node] = []
    node = column.node
    while len(node.users) == 1:
        (user,) = node.users
        op = user.target
        if op is aten.linear.default and user.args[0] is node and not user.kwargs and len(user.args) >= 2:
            weight = user.args[1]
            if any(a is node for a in user.args[1:]):  # the changed tensor is also the weight: not rank-1
                return None
            w = cache.get(weight)
            base = cache.get(user)
            if not isinstance(w, torch.Tensor) or w.dim() != 2 or not isinstance(base, torch.Tensor):
                return None
            break
        if not _pointwise_unary(user, node):
            return None
        chain.append(user)
        node = user
    else:
        return None
    # Columns as contiguous rows, so that a chunk's columns are one cheap gather each.
    zt = column.base.reshape(-1, column.base.shape[-1]).T.contiguous()
    last = cache[chain[-1]] if chain else column.base
    at = last.reshape(-1, last.shape[-1]).T.contiguous()
    wt = w.T.contiguous()
    out2 = base.reshape(-1, base.shape[-1])

    def changed(index: torch.Tensor, deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The column r of each row and how much the input of the second Linear moves there, (k, M)."""
        r = column.which(index)
        zcol = zt[r] + column.change(index, deltas.to(zt.dtype))  # (k, M)
        for step in chain:  # pointwise, one tensor argument: the chain node itself
            zcol = FASTER.get(step.target, step.target)(zcol, *step.args[1:])  # type: ignore[operator]
        return r, zcol - at[r]

    def build(index: torch.Tensor, deltas: torch.Tensor, pool: Pool) -> torch.Tensor:
        r, diff = changed(index, deltas)
        rows = _copies(pool, out2, len(index))  # contiguous, batch dim first: matmuls fold it
        rows.addcmul_(diff[:, :, None], wt[r][:, None, :])
        return rows.view(len(index), *base.shape)

    second = Update(user, build)
    return _through_near(cache, user, w, changed, second) or second


def _through_near(
    cache: dict[fx.Node, Any],
    linear: fx.Node,
    w2: torch.Tensor,
    changed: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    second: Update,
) -> Update | None:
    """The third Linear's output, when the second Linear's output goes through a tanh into it alone.

    The second output moves by ``d[m, j] = u[m] W2[j, r]``; ``tanh`` of it moves by
    ``q d - t q d^2 + c d^3`` (`_plain_ops.tanh_constants`, exact to rounding while ``|d| <= NEAR_LIMIT``),
    so the third output moves by ``u S1[r] + u^2 S2[r] + u^3 S3[r]``, with
    ``S_p[r, m, o] = sum_j coef_p[m, j] W2[j, r]^p W3[o, j]`` and ``coef = (q, -t q, c)``.
    Rows with a larger ``d``: `second`. CPU, float32/64 only, like the near forms.
    """
    act = _only_user(linear)
    third = _only_user(act) if act is not None else None
    if act is None or third is None or act.target is not aten.tanh.default or act.args != (linear,) or act.kwargs:
        return None
    if third.target is not aten.linear.default or third.kwargs or third.args[0] is not act or act in third.args[1:]:
        return None
    x0, y0, w3, out3 = (cache.get(n) for n in (linear, act, third.args[1], third))
    tensors = (x0, y0, w3, out3)
    if not all(isinstance(t, torch.Tensor) for t in tensors) or w3.dim() != 2 or not fast_here(x0):
        return None
    if any(t.dtype != x0.dtype for t in (y0, w2, w3, out3)):
        return None
    m, j, r_all = x0.numel() // x0.shape[-1], w2.shape[0], w2.shape[1]
    if m * j * r_all > SUMS_LIMIT or 3 * r_all * m * w3.shape[0] > SUMS_LIMIT:
        return None
    _, q, tq, cubic = NEAR[aten.tanh.default].constants(x0, y0, [])
    coefs = [c.reshape(m, j) for c in (q, -tq, cubic)]
    sums = [torch.matmul((c[:, :, None] * w2**p).permute(2, 0, 1), w3.T) for p, c in enumerate(coefs, 1)]
    reach = w2.abs().amax(0)  # |d| <= |u| max_j |W2[j, r]|
    base3 = out3.reshape(m, -1)

    def build(index: torch.Tensor, deltas: torch.Tensor, pool: Pool) -> torch.Tensor | None:
        r, u = changed(index, deltas)
        if not bool((u.abs().amax(1) * reach[r]).max() <= NEAR_LIMIT):  # also NaN: the second start
            return None
        k = len(index)
        acc, part = pool.take(base3, (k, *base3.shape)), pool.take(base3, (k, *base3.shape))
        lift = u[:, :, None]
        torch.index_select(sums[2], 0, r, out=acc).mul_(lift)
        acc.add_(torch.index_select(sums[1], 0, r, out=part)).mul_(lift)
        acc.add_(torch.index_select(sums[0], 0, r, out=part)).mul_(lift)
        return acc.add_(base3).view(k, *out3.shape)

    return Update(third, build, fallback=second)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _pointwise_unary(node: fx.Node, source: fx.Node) -> bool:
    """A pointwise op of `source` alone (scalars besides): it maps each column to itself."""
    op = node.target
    if not isinstance(op, torch._ops.OpOverload) or torch.Tag.pointwise not in op.tags:
        return False
    if op._schema.is_mutable or node.kwargs:
        return False
    return node.args[0] is source and not any(isinstance(a, fx.Node) for a in node.args[1:])


def _conv2d_update(
    cache: dict[fx.Node, Any],
    source: fx.Node,
    op_node: fx.Node,
    args: list[Any],
    base: torch.Tensor,
    shape: tuple[int, ...],
) -> Update | None:
    """conv2d(x, W, b, stride, padding, dilation, groups): W[o, i, p, q] += h adds h * (a shifted x) to channel o."""
    args = args + [None] * (7 - len(args))
    x_node, w_node, b_node = args[0], args[1], args[2]
    if x_node is source or not isinstance(x_node, fx.Node):
        return None
    x = cache[x_node]
    batched = x.dim() == 4
    if not batched and x.dim() != 3:
        return None
    stride, padding, dilation = (list(a) if a is not None else d for a, d in zip(args[3:6], ([1, 1], [0, 0], [1, 1])))
    groups = args[6] if args[6] is not None else 1
    out = base if batched else base.unsqueeze(0)
    if w_node is source and b_node is not source and len(shape) == 4:
        xb = x if batched else x.unsqueeze(0)
        c_out, c_in_g, kh, kw = shape
        cols = torch.nn.functional.unfold(xb, (kh, kw), dilation=dilation, padding=padding, stride=stride)
        per_group = c_out // groups
        cols = cols.view(xb.shape[0], xb.shape[1] * kh * kw, *out.shape[2:])

        def build(index: torch.Tensor, deltas: torch.Tensor, pool: Pool) -> torch.Tensor:
            o = index // (c_in_g * kh * kw)
            rest = index % (c_in_g * kh * kw)  # (i, p, q) within the group, channel-major like unfold
            col = (o // per_group) * (c_in_g * kh * kw) + rest
            k = len(index)
            rows = _copies(pool, out, k)
            ar = torch.arange(k, device=rows.device)
            rows[ar, :, o] += deltas.to(rows.dtype).view(k, 1, 1, 1) * cols[:, col].transpose(0, 1)
            return rows if batched else rows.squeeze(1)

        return Update(op_node, build)
    if b_node is source and w_node is not source and len(shape) == 1:

        def build_bias(index: torch.Tensor, deltas: torch.Tensor, pool: Pool) -> torch.Tensor:
            k = len(index)
            rows = _copies(pool, out, k)
            rows[torch.arange(k, device=rows.device), :, index] += deltas.to(rows.dtype).view(k, 1, 1, 1)
            return rows if batched else rows.squeeze(1)

        return Update(op_node, build_bias)
    return None

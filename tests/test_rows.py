"""The cone's rows in plain batched ops (`_rows`) and the faster op forms (`_plain_ops`): equal to vmap
and to torch up to rounding, used where claimed, declined where an op is not batch-transparent."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
import torch.nn.functional as F
from torch import fx
from torch.func import vmap
from torch.fx.experimental.proxy_tensor import make_fx

from torchgradcheck import _rows
from torchgradcheck._cone import _downstream
from torchgradcheck._plain_ops import (
    NEAR_LIMIT,
    attention,
    cross_entropy,
    cross_entropy_constants,
    cross_entropy_near,
    cross_entropy_rows,
    tanh,
    tanh_constants,
    tanh_near,
)
from torchgradcheck._rows import Pool, run_rows

aten = torch.ops.aten
K = 5  # rows


def _graph(fn, *example):
    """`fn` traced as the cone engine traces (pre_dispatch aten), with its fused ops replaced the same way."""
    with torch.enable_grad():
        gm = make_fx(fn, pre_dispatch=True)(*example)
    for node in gm.graph.nodes:
        if node.target is aten.cross_entropy_loss.default:
            node.target = cross_entropy
        elif node.target is aten.scaled_dot_product_attention.default:
            node.target = attention
    return gm


def _call(node: fx.Node, env):
    args = fx.node.map_arg(node.args, env.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
    return node.target(*args, **kwargs)


def _rows_and_vmap(fn, seed_rows, *rest, plain_only: bool):
    """run_rows over the graph of ``fn(seed, *rest)`` with the seed batched, and vmap of fn itself."""
    gm = _graph(fn, seed_rows[0], *rest)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    every = [n for n in gm.graph.nodes if n.op == "call_function"]
    nodes = _downstream(every, placeholders[0])  # what the cone engine evaluates per chunk
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    cache = dict(zip(placeholders, (seed_rows[0], *rest)))
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            cache[node] = getattr(gm, node.target)
    with torch.no_grad():
        for node in every:
            cache[node] = _call(node, cache)
        env = dict(cache)
        env[placeholders[0]] = seed_rows
        fallbacks = []
        original = _rows._vmap_rest

        def spy(rest_nodes, *args):
            fallbacks.append(rest_nodes[0].target)
            return original(rest_nodes, *args)

        _rows._vmap_rest = spy
        try:
            got = run_rows(nodes, env, placeholders[0], output.args[0], _call, cache, Pool())
        finally:
            _rows._vmap_rest = original
        want = vmap(lambda s: fn(s, *rest))(seed_rows)
    if plain_only:
        assert not fallbacks, f"fell back to vmap at {fallbacks[0]}"
    else:
        assert fallbacks, "expected a vmap fallback"
    return got, want


def _x(*shape):
    return torch.randn(K, *shape, dtype=torch.float64)


W = torch.randn(6, 4, dtype=torch.float64)
B = torch.randn(6, dtype=torch.float64)
W2 = torch.randn(3, 6, dtype=torch.float64)

PLAIN = {
    "mlp": (
        lambda x, y: F.cross_entropy(F.linear(torch.tanh(F.linear(x, W, B)), W2), y),
        _x(7, 4),
        torch.randint(0, 3, (7,)),
    ),
    "views": (
        lambda x: (x.view(2, 6).t().unsqueeze(0).transpose(1, 2).permute(2, 0, 1).squeeze(1) ** 2).sum(),
        _x(3, 4),
    ),
    "select_slice_expand": (lambda x: (x[1:, 2].expand(4, 2) * x[0, :2]).flatten().softmax(-1).sum(), _x(3, 4)),
    "reductions": (lambda x: x.sum(-1).mean(0) + x.amax(1).logsumexp(0) + x.log_softmax(0)[1, 2], _x(3, 4)),
    "pointwise_broadcast": (
        lambda x, b: torch.where(x > 0, x, b).mul(2.0).add(b).exp().sum(),
        _x(3, 4),
        torch.randn(4, dtype=torch.float64),
    ),
    "matmul": (lambda x: (x @ W.T).tanh().sum(), _x(7, 4)),
    "batched_weight": (lambda w, x: F.linear(x, w, B).sum(), _x(6, 4), torch.randn(2, 7, 4, dtype=torch.float64)),
    "layer_norm_mse": (
        lambda x, t: F.mse_loss(F.layer_norm(x, (4,)), t),
        _x(3, 4),
        torch.randn(3, 4, dtype=torch.float64),
    ),
    "attention": (
        lambda q, k: F.scaled_dot_product_attention(q, k, k).pow(2).mean(),
        _x(2, 3, 4),
        torch.randn(2, 3, 4, dtype=torch.float64),
    ),
}


@pytest.mark.parametrize("case", sorted(PLAIN))
def test_rows_in_plain_ops_equal_vmap(case):
    fn, seed, *rest = PLAIN[case]
    got, want = _rows_and_vmap(fn, seed, *rest, plain_only=True)
    assert got.shape == want.shape == (K,)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


def _conv_bn(x):
    w = torch.ones(4, 3, 3, 3, dtype=torch.float64) / 9
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    y = F.batch_norm(F.conv2d(x, w, padding=1), rm, rv, training=False)
    return F.adaptive_avg_pool2d(F.relu(y), 2).flatten(1).sum()


def test_rows_fold_conv_and_eval_batch_norm_into_the_batch_dim():
    got, want = _rows_and_vmap(_conv_bn, _x(2, 3, 5, 5), plain_only=True)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


DECLINED = {
    # a 0-dim value with a row dim would promote differently: float64 scalar times float32 tensor
    "zero_dim_promotion": (lambda s, v: (s * v).sum(), _x(), torch.randn(3)),
    "reduce_every_dim": (lambda x: x.amax().exp(), _x(3, 4)),
    "cat": (lambda x: torch.cat([x, x * 2]).sum(), _x(3)),
}


@pytest.mark.parametrize("case", sorted(DECLINED))
def test_rows_decline_what_is_not_batch_transparent_and_vmap_the_rest(case):
    fn, seed, *rest = DECLINED[case]
    got, want = _rows_and_vmap(fn, seed, *rest, plain_only=False)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


def test_pool_lends_the_same_buffers_to_the_next_chunk_and_new_ones_within_a_chunk():
    pool, like = Pool(), torch.zeros(3, 4)
    first = [pool.take(like), pool.take(like), pool.take(like, (2, 2))]
    assert len({id(t) for t in first}) == 3
    pool.reset()
    again = [pool.take(like), pool.take(like), pool.take(like, (2, 2))]
    assert all(a is b for a, b in zip(first, again))


def _ulps(got: torch.Tensor, exact: list[float], dtype: torch.dtype) -> float:
    eps = torch.finfo(dtype).eps
    return max(abs(float(g) - e) / (eps * max(abs(e), torch.finfo(dtype).tiny)) for g, e in zip(got, exact))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tanh_formula_is_within_2_ulp_of_the_exact_value(dtype):
    x = torch.cat([torch.randn(400, dtype=torch.float64) * 4, torch.logspace(-300, 2, 100, dtype=torch.float64)])
    x = torch.cat([x, -x]).to(dtype)
    mpmath.mp.dps = 40
    exact = [float(mpmath.tanh(mpmath.mpf(float(v)))) for v in x]
    assert _ulps(tanh(x), exact, dtype) <= 2.0
    special = torch.tensor([0.0, -0.0, 400.0, -400.0, math.inf, -math.inf, math.nan], dtype=dtype)
    torch.testing.assert_close(tanh(special), torch.tanh(special), equal_nan=True, rtol=0, atol=0)
    assert torch.signbit(tanh(special))[1]


def test_tanh_near_is_exact_to_rounding_up_to_its_limit_and_declines_beyond():
    torch.manual_seed(0)
    x0 = torch.cat([torch.randn(200, dtype=torch.float64) * 3, torch.tensor([0.0, 1e-7, -2e-6, 25.0])])
    mpmath.mp.dps = 40
    pool = Pool()
    for scale in (1e-9, 1e-7, NEAR_LIMIT):
        d = (torch.rand(3, x0.numel(), dtype=torch.float64) * 2 - 1) * scale
        x = x0 + d
        got = tanh_near(x, x0, tanh_constants(x0, torch.tanh(x0), []), pool.take(x), pool.take(x))
        exact = [float(mpmath.tanh(mpmath.mpf(float(v)))) for v in x.reshape(-1)]
        assert _ulps(got.reshape(-1), exact, torch.float64) <= 2.0, scale
    constants = tanh_constants(x0, torch.tanh(x0), [])
    far = x0 + 2 * NEAR_LIMIT
    assert tanh_near(far, x0, constants, torch.empty_like(far), torch.empty_like(far)) is None
    bad = x0.clone()
    bad[3] = math.nan
    assert tanh_near(bad, x0, constants, torch.empty_like(bad), torch.empty_like(bad)) is None


def test_the_fourth_derivative_bound_behind_tanh_near():
    """|tanh''''| / 24 <= 0.17 on the real line (the truncation bound in the docstring)."""
    mpmath.mp.dps = 30
    worst = max(abs(float(mpmath.diff(mpmath.tanh, mpmath.mpf(x) / 100, 4))) / 24 for x in range(-600, 601))
    assert 0.17 < worst <= 0.171


@pytest.mark.parametrize("reduction", [1, 2])
def test_cross_entropy_near_equals_the_plain_formula_to_rounding_and_declines_far_rows(reduction):
    torch.manual_seed(0)
    x0 = torch.randn(6, 5, dtype=torch.float64) * 3
    target = torch.tensor([0, 4, -100, 2, 1, 3])  # one ignored sample
    y0 = cross_entropy_rows(x0, target, reduction, -100)
    pool = Pool()
    for scale in (1e-9, NEAR_LIMIT):
        x = x0 + (torch.rand(4, 6, 5, dtype=torch.float64) * 2 - 1) * scale
        constants = cross_entropy_constants(x0, y0, [target, None, reduction])
        got = cross_entropy_near(x, x0, constants, pool.take(x), pool.take(x))
        want = cross_entropy_rows(x, target, reduction, -100)
        torch.testing.assert_close(got, want, rtol=4 * 2**-52, atol=0)
        assert not torch.equal(got, cross_entropy_rows(x0, target, reduction, -100).expand(4)), "rows moved"
    far = x0 + 3 * NEAR_LIMIT
    constants = cross_entropy_constants(x0, y0, [target])
    assert cross_entropy_near(far[None], x0, constants, pool.take(far[None]), pool.take(far[None])) is None
    smoothed = [target, None, reduction, -100, 0.1]  # label smoothing: not this formula
    assert cross_entropy_constants(x0, y0, smoothed) is None

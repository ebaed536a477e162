"""PyTorch's own operators (`op_db`), run the way PyTorch's gradient tests run them.

A fast subset (`opdb_corpus.FAST`, a few dozen ops of every family) runs here: every real op
passes, its correct once-differentiable wrapper passes, every non-vacuous planted mutant fails,
nothing crashes. The full sweep (all 540 OpInfos, about an hour on 2 cores) is
``benchmarks/opdb_sweep.py``; its numbers are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("expecttest")

import opdb_corpus as oc

from torchgradcheck import verify_function

_OPS = {oc.op_id(op): op for op in oc.load_ops()}


@pytest.fixture(autouse=True)
def _pytorch_test_harness():
    """Backend flags frozen, as ``common_utils`` leaves them in PyTorch's own test processes."""
    with oc.frozen_flags():
        yield


def _verdicts(name, wrap):
    """The check of the op's first sample with power (inputs of more than one element, a gradient that
    is not zero everywhere: relu on an all-negative sample can't be tested, and says so)."""
    for sample in oc.samples(_OPS[name], 8):
        fn, args = oc.case(_OPS[name], sample)
        if not args or any(a.numel() <= 1 for a in args):
            continue
        report = verify_function(wrap(fn, args), *args)
        if report.powered or not all(r.passed for r in report.results):
            return report
    raise AssertionError(f"{name}: no sample with power")


@pytest.mark.parametrize("name", [n for n in oc.FAST if n in _OPS])
def test_opdb_real_op_passes(name):
    report = _verdicts(name, lambda fn, args: fn)
    assert report.passed, report


@pytest.mark.parametrize("name", [n for n in oc.FAST if n in _OPS])
def test_opdb_once_differentiable_wrapper_passes(name):
    report = _verdicts(name, lambda fn, args: oc.wrapped(fn, len(args), oc.Mutant(None, 0)))
    assert report.passed, report


@pytest.mark.parametrize("name", [n for n in oc.FAST if n in _OPS])
def test_opdb_planted_mutants_fail(name):
    """Every planted mutant that changes something fails (on the first sample where one does)."""
    for sample in oc.samples(_OPS[name], 8):
        fn, args = oc.case(_OPS[name], sample)
        if not args or any(a.numel() <= 1 for a in args):
            continue
        counted = 0
        for m in oc.mutants(len(args)):
            report = verify_function(oc.wrapped(fn, len(args), m), *args)
            if report.passed:
                assert m.changed <= 1e-12 * max(1.0, m.scale), f"{name}: mutant {m} missed\n{report}"
            else:
                counted += 1
        if counted:
            return
    raise AssertionError(f"{name}: every mutant vacuous on every sample (the gradient is zero everywhere)")


def test_opdb_fast_subset_is_large_enough():
    assert sum(n in _OPS for n in oc.FAST) >= 30


def test_opdb_logcumsumexp_jvp_defect_is_real():
    """The one excluded op is a verified defect of torch, not of the checker: an exact identity fails."""
    import torch
    import torch.autograd.forward_ad as fwAD

    sample = oc.samples(_OPS["logcumsumexp"], 2)[1]
    x, dim = sample.input.detach(), sample.args[0]
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(torch.logcumsumexp(fwAD.make_dual(x, d), dim)).tangent
    # logcumsumexp(x)[..., 0] == x[..., 0] along dim, so its jvp is exactly the tangent there
    first, want = tangent.select(dim, 0), d.select(dim, 0)
    assert float(((first - want).abs() / want.abs()).max()) > 1e-6  # torch's jvp is off ...
    jac = torch.autograd.functional.jacobian(lambda z: torch.logcumsumexp(z, dim), x)
    reverse = (jac.reshape(x.numel(), x.numel()) @ d.reshape(-1)).reshape(x.shape).select(dim, 0)
    assert torch.equal(reverse, want)  # ... reverse mode is exact
    report = verify_function(lambda t: torch.logcumsumexp(t, dim), x.clone().requires_grad_(True))
    assert [r.kind for r in report.failures] == ["forward mode"]  # and the checker blames only the jvp

"""Nothing lost, nothing drifts: after a check that passed, failed or raised halfway, the model and the
global state (RNG, default dtype, grad mode) are exactly as before.

Every test snapshots with `helpers.snapshot` and compares with `helpers.assert_unchanged`; the
explicit asserts next to it spell out the property the test is about.
"""

from __future__ import annotations

import functools

import pytest
import torch
from corpus import HandLinear
from helpers import assert_unchanged, snapshot
from torch import nn

from torchgradcheck import verify_module

ENGINES = ["loop", "auto"]


def _mlp(dtype=torch.float32, bug=None):
    """Hand-written first layer (an autograd.Function: vmap falls back to the loop) or plain Linear."""
    torch.manual_seed(0)
    first = HandLinear(12, 16, bug) if bug is not None else nn.Linear(12, 16)
    return nn.Sequential(first, nn.Dropout(0.2), nn.Tanh(), nn.Linear(16, 3)).to(dtype).train()


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).train()


def _data(n_in=12, n_out=3, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(6, n_in, generator=gen, dtype=dtype), torch.randn(6, n_out, generator=gen, dtype=dtype)


def _double_first_weight(gx, gw, gb):
    return gx, 2 * gw, gb


def _stale_grads(model):
    """A .grad on some parameters (stale, from an earlier step) and None on others."""
    model[0].weight.grad = torch.full_like(model[0].weight, 0.25)
    return model[0].weight.grad


# ------------------------------------------------------------------------------ passed / failed


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_verify_module_leaves_model_unchanged_after_pass(engine, dtype):
    model = _mlp(dtype)
    stale = _stale_grads(model)
    x, y = _data(dtype=dtype)
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), (x, y), engine=engine, mode="full")
    assert report.passed, report
    assert_unchanged(before, model)
    assert model[0].weight.grad is stale
    assert bool((stale == 0.25).all())
    assert model[3].weight.grad is None
    assert all(p.dtype == dtype for p in model.parameters())


@pytest.mark.parametrize("engine", [pytest.param("auto", marks=pytest.mark.slow), "loop"])
def test_verify_module_leaves_model_unchanged_after_failure(engine):
    model = _mlp(bug=_double_first_weight)
    stale = _stale_grads(model)
    x, y = _data()
    before = snapshot(model)
    # default options for "auto" (a failure then localises the wrong backward, which must restore too)
    report = verify_module(
        model, nn.MSELoss(), (x, y), engine=engine, localise=None if engine == "auto" else False, mode="full"
    )
    assert not report.passed
    assert [r.name for r in report.failures] == ["0.weight"]
    assert_unchanged(before, model)
    assert model[0].weight.grad is stale


def test_verify_module_keeps_noncontiguous_parameter_layout():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    model.weight = nn.Parameter(torch.randn(4, 3).t())  # stride (1, 3)
    x, y = _data(4, 3)
    before = snapshot(model)
    assert verify_module(model, nn.MSELoss(), (x, y), mode="full").passed
    assert_unchanged(before, model)
    assert model.weight.stride() == (1, 3)


def test_verify_module_keeps_frozen_flags_and_training_flags():
    model = _bn_net()
    model[0].bias.requires_grad_(False)
    model[1].eval()  # mixed: BatchNorm in eval inside a model in train mode
    batch = (torch.randn(7, 5), torch.randn(7, 2))
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), batch, mode="full")
    assert report.passed, report
    assert_unchanged(before, model)
    assert model.training
    assert not model[1].training
    assert model[3].training
    assert not model[0].bias.requires_grad
    assert model[0].weight.requires_grad


@pytest.mark.parametrize("engine", ENGINES)
def test_verify_module_batchnorm_buffers_do_not_drift_in_train_mode(engine):
    model = _bn_net()
    bn = model[1]
    model(torch.randn(7, 5))  # non-trivial running stats, num_batches_tracked = 1
    mean, var, count = bn.running_mean, bn.running_var, bn.num_batches_tracked
    values = (mean.clone(), var.clone(), count.clone())
    batch = (torch.randn(7, 5), torch.randn(7, 2))
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), batch, engine=engine, mode="full")
    assert report.passed, report
    assert_unchanged(before, model)
    assert bn.running_mean is mean
    assert bn.running_var is var
    assert bn.num_batches_tracked is count
    assert torch.equal(mean, values[0])
    assert torch.equal(var, values[1])
    assert int(count) == 1


def test_verify_module_every_evaluation_starts_from_the_same_buffers():
    """Each evaluation sees the buffers as they were before the check, not as the last forward left them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.5), nn.Tanh(), nn.Linear(4, 1)).train()
    seen = []
    model[1].register_forward_pre_hook(
        lambda mod, args: seen.append((mod.running_mean.clone(), int(mod.num_batches_tracked)))
    )
    batch = (torch.randn(5, 3), torch.randn(5, 1))
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), batch, engine="loop", mode="full")
    assert report.passed, report
    assert_unchanged(before, model)
    assert len(seen) > 50
    assert all(torch.equal(m, seen[0][0]) and n == 0 for m, n in seen)


# ------------------------------------------------------------------------------ hooks


@pytest.mark.parametrize("engine", ENGINES)
def test_verify_module_keeps_hooks_and_fires_parameter_hooks(engine):
    model = _mlp()
    fired = []
    model[0].weight.register_hook(lambda g: fired.append(g.dtype))
    model[3].weight.register_post_accumulate_grad_hook(lambda p: fired.append("post"))
    model[2].register_forward_hook(lambda mod, inp, out: None)
    model[2].register_forward_pre_hook(lambda mod, inp: None)
    model[3].register_full_backward_hook(lambda mod, gin, gout: None)
    x, y = _data()
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), (x, y), engine=engine, mode="full")
    assert report.passed, report
    assert_unchanged(before, model)
    # the analytical side is the user's own loss.backward(): their parameter hooks ran, in float64
    assert torch.float64 in fired
    assert "post" in fired


# ------------------------------------------------------------------------------ global state


@pytest.mark.parametrize("engine", ENGINES)
def test_verify_module_does_not_advance_caller_rng(engine):
    model = _mlp()
    x, y = _data()
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    before = snapshot(model)
    verify_module(model, nn.MSELoss(), (x, y), engine=engine, seed=7, mode="full")
    assert_unchanged(before, model)
    assert torch.equal(torch.rand(5), expected)


@pytest.mark.parametrize("default", [torch.float32, torch.float64])
def test_verify_module_restores_default_dtype(default):
    model = _mlp()
    x, y = _data()
    old = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        before = snapshot(model)
        verify_module(model, nn.MSELoss(), (x, y), dtype=torch.float32, mode="full")
        verify_module(model, nn.MSELoss(), (x, y), mode="full")
        assert_unchanged(before, model)
        assert torch.get_default_dtype() == default
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("engine", ENGINES)
def test_verify_module_under_no_grad_checks_and_keeps_grad_mode(engine):
    model = _mlp()
    x, y = _data()
    with torch.no_grad():
        before = snapshot(model)
        report = verify_module(model, nn.MSELoss(), (x, y), engine=engine, mode="full")
        assert not torch.is_grad_enabled()
        assert_unchanged(before, model)
    assert report.passed, report
    assert torch.is_grad_enabled()


def test_verify_module_under_no_grad_still_catches_a_bug():
    model = _mlp(bug=_double_first_weight)
    x, y = _data()
    with torch.no_grad():
        before = snapshot(model)
        report = verify_module(model, nn.MSELoss(), (x, y), localise=False, mode="full")
        assert_unchanged(before, model)
    assert not report.passed


# ------------------------------------------------------------------------------ randomness


def test_verify_module_dropout_sees_the_same_mask_in_every_evaluation():
    model = _mlp()
    masks = []
    model[1].register_forward_hook(lambda mod, inp, out: masks.append((out == 0) & (inp[0] != 0)))
    x, y = _data()
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), (x, y), engine="loop", mode="full")
    assert report.passed, report
    assert_unchanged(before, model)
    assert len(masks) > 500
    assert 0 < int(masks[0].sum()) < masks[0].numel()  # dropout really drops something
    assert all(torch.equal(m, masks[0]) for m in masks)


def test_verify_module_seed_option_changes_the_mask():
    model = _mlp()
    masks = {}
    handle = model[1].register_forward_hook(lambda mod, inp, out: masks.setdefault(seed, out == 0))
    x, y = _data()
    before = snapshot(model)
    for seed in (0, 1):
        assert verify_module(model, nn.MSELoss(), (x, y), engine="loop", seed=seed, mode="full").passed
    assert_unchanged(before, model)
    handle.remove()
    assert not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("engine", ENGINES)
def test_verify_module_passes_dropout_in_train_mode(engine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 3)).train()
    x, y = _data()
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), (x, y), engine=engine, mode="full")
    assert report.passed, report
    assert report.notes == () or all("nondeterministic" not in n for n in report.notes)
    assert_unchanged(before, model)


# ------------------------------------------------------------------------------ raised halfway


@functools.cache
def _count_calls(engine):
    """How many times the loss is called in a full check of `_mlp()` with `engine`."""
    calls = [0]

    def loss(out, t):
        calls[0] += 1
        return ((out - t) ** 2).mean()

    verify_module(_mlp(), loss, _data(), engine=engine, mode="full")
    return calls[0]


@pytest.mark.parametrize("engine", ENGINES)
def test_verify_module_restores_everything_when_the_loss_raises_halfway(engine):
    total = _count_calls(engine)
    # the loop calls the loss once per perturbation: fail at the 500th; vmap once per chunk: fail halfway
    fail_at = 500 if engine == "loop" else max(2, total // 2)
    assert total > fail_at
    model = _mlp()
    stale = _stale_grads(model)
    calls = [0]

    def loss(out, t):
        calls[0] += 1
        if calls[0] >= fail_at:
            raise RuntimeError(f"loss failed at call {calls[0]}")
        return ((out - t) ** 2).mean()

    x, y = _data()
    with torch.no_grad():
        before = snapshot(model)
        with pytest.raises(RuntimeError, match="loss failed at call"):
            verify_module(model, loss, (x, y), engine=engine, mode="full")
        assert_unchanged(before, model)
    assert model[0].weight.grad is stale
    assert calls[0] >= fail_at


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.95])
def test_verify_module_restores_everything_on_keyboard_interrupt_in_forward(engine, fraction):
    total = _count_calls(engine)  # one forward per loss call
    fail_at = max(1, int(fraction * total))
    model = _mlp()
    _stale_grads(model)
    calls = [0]

    def interrupt(mod, inp, out):
        calls[0] += 1
        if calls[0] == fail_at:
            raise KeyboardInterrupt

    model[2].register_forward_hook(interrupt)
    x, y = _data()
    before = snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        verify_module(model, nn.MSELoss(), (x, y), engine=engine, mode="full")
    assert_unchanged(before, model)
    # and the model (and torch) still work: a second check after the interruption passes
    calls[0] = -(10**9)
    assert verify_module(model, nn.MSELoss(), (x, y), engine=engine, mode="full").passed
    assert_unchanged(before, model)


def test_verify_module_restores_buffers_when_interrupted():
    model = _bn_net()
    model(torch.randn(7, 5))
    calls = [0]

    def interrupt(mod, inp, out):
        calls[0] += 1
        if calls[0] == 30:
            raise KeyboardInterrupt

    model[2].register_forward_hook(interrupt)
    batch = (torch.randn(7, 5), torch.randn(7, 2))
    before = snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        verify_module(model, nn.MSELoss(), batch, mode="full")
    assert_unchanged(before, model)
    assert int(model[1].num_batches_tracked) == 1


# ------------------------------------------------------------------------------ device


@pytest.mark.cuda
@pytest.mark.parametrize("engine", ENGINES)
def test_verify_module_keeps_cuda_model_and_cuda_rng(engine):
    model = _mlp().cuda()
    x, y = (t.cuda() for t in _data())
    cuda_rng = torch.cuda.get_rng_state_all()
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), (x, y), engine=engine, mode="full")
    assert report.passed, report
    assert report.options["device"].startswith("cuda")
    assert_unchanged(before, model)
    assert all(p.is_cuda for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(cuda_rng, torch.cuda.get_rng_state_all()))


# ------------------------------------------------------------------------------ more state


@pytest.mark.parametrize("engine", ENGINES)
def test_verify_module_keeps_a_pending_graph_usable(engine):
    """A loss computed before the check can still be backpropagated after it (no version-counter bumps)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = _data(3, 2)
    pending = nn.MSELoss()(model(x), y)
    expected = torch.autograd.grad(nn.MSELoss()(model(x), y), list(model.parameters()))
    versions = [p._version for p in model.parameters()]
    before = snapshot(model)
    assert verify_module(model, nn.MSELoss(), (x, y), engine=engine, mode="full").passed
    assert_unchanged(before, model)
    assert [p._version for p in model.parameters()] == versions
    pending.backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), expected))


def test_verify_module_keeps_a_stale_sparse_grad():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3, sparse=True), nn.Flatten(), nn.Linear(6, 1))
    idx, target = torch.randint(0, 6, (4, 2)), torch.randn(4, 1)
    nn.MSELoss()(model(idx), target).backward()
    stale = model[0].weight.grad
    assert stale.is_sparse
    before = snapshot(model)
    assert verify_module(model, nn.MSELoss(), (idx, target), mode="full").passed
    assert_unchanged(before, model)
    assert model[0].weight.grad is stale


def test_verify_module_restores_everything_on_interrupt_inside_backward():
    model = _mlp()
    stale = _stale_grads(model)

    def interrupt(grad):
        raise KeyboardInterrupt

    model[3].weight.register_hook(interrupt)
    x, y = _data()
    before = snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        verify_module(model, nn.MSELoss(), (x, y), mode="full")
    assert_unchanged(before, model)
    assert model[0].weight.grad is stale
    assert model[3].weight.grad is None


@pytest.mark.parametrize("engine", ENGINES)
def test_verify_module_works_under_inference_mode_and_keeps_it(engine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2))
    with torch.inference_mode():
        idx, target = torch.randint(0, 5, (4, 2)), torch.randn(4, 2)  # inference tensors
        before = snapshot(model)
        report = verify_module(model, nn.MSELoss(), (idx, target), engine=engine, mode="full")
        assert_unchanged(before, model)
        assert torch.is_inference_mode_enabled()
    assert report.passed, str(report)
    assert not torch.is_inference_mode_enabled()


def test_verify_module_under_inference_mode_still_catches_a_bug():
    model = _mlp(bug=_double_first_weight)
    with torch.inference_mode():
        x, y = _data()
        before = snapshot(model)
        report = verify_module(model, nn.MSELoss(), (x, y), localise=False, mode="full")
        assert_unchanged(before, model)
    assert [r.name for r in report.failures] == ["0.weight"]


def test_tf32_is_off_during_a_check_and_restored_after():
    """TF32 (10-bit mantissa float32 matmuls on CUDA) would pose as noise; the user's setting comes back."""
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, x):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return self.fc(x)

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        verify_module(Spy(), lambda out: out.sum(), torch.randn(2, 3), engine="loop", localise=False, mode="full")
        assert set(seen) == {(False, False)}
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before

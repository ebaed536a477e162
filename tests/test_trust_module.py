"""Verdicts you can trust on code nobody here wrote (issue 9), verify_module side.

Each item has a minimal case written here and its buggy twin, which must still fail. The real-world
corpus (`realworld_corpus.py`) is run by `test_realworld.py`.
"""

from __future__ import annotations

import contextlib
import random
import sys
import warnings

import numpy as np
import pytest
import torch
from helpers import assert_unchanged, snapshot
from realworld_corpus import WrongGrad
from torch import nn

from torchgradcheck import InvalidArgumentError, InvalidArgumentTypeError, verify_module

pytest_plugins = ["pytester"]


def _mlp(bug: float | None = None):
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 2)

        def forward(self, x):
            h = torch.tanh(self.fc1(x))
            return self.fc2(h if bug is None else WrongGrad.apply(h, bug))

    return M(), nn.MSELoss(), (torch.randn(6, 4), torch.randn(6, 2))


# ------------------------------------------------------------------ A1: frozen backend flags

_FLAG = "_" + "_allow_nonbracketed_mutation_flag"  # torch.backends' module global (a dunder name)


@contextlib.contextmanager
def frozen_backend_flags():
    """What PyTorch's test harness does (``disable_global_flags()``), undone afterwards for the other tests."""
    module_globals = torch.backends.flags_frozen.__globals__
    old = module_globals[_FLAG]
    torch.backends.disable_global_flags()
    try:
        yield
    finally:
        module_globals[_FLAG] = old


def _flags():
    return (
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.enabled,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.flags_frozen(),
    )


@pytest.mark.parametrize("bug", [None, 2.0])
def test_verify_module_works_after_disable_global_flags(bug):
    model, loss_fn, batch = _mlp(bug)
    with frozen_backend_flags():
        before = _flags()
        report = verify_module(model, loss_fn, batch, localise=False)
        assert _flags() == before
    assert report.passed == (bug is None), report


def test_tf32_is_off_inside_the_check_and_flags_come_back():
    seen = []

    class Spy(nn.Linear):
        def forward(self, x):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return super().forward(x)

    before = _flags()
    with frozen_backend_flags():
        report = verify_module(Spy(3, 2), nn.MSELoss(), (torch.randn(4, 3), torch.randn(4, 2)), engine="loop")
    assert report.passed, report
    assert seen
    assert set(seen) == {(False, False)}
    assert _flags() == before


# ------------------------------------------------------------------ A3: empty tensors


class _WithEmpty(nn.Module):
    def __init__(self, bug: float | None = None):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.extra = nn.Parameter(torch.empty(0, 4))  # e.g. a prefix of length 0
        self.bug = bug

    def forward(self, x):
        out = self.fc(torch.cat([x, x @ self.extra.T], dim=1))
        return out if self.bug is None else WrongGrad.apply(out, self.bug)


def test_empty_parameter_is_skipped_with_a_note():
    torch.manual_seed(0)
    report = verify_module(_WithEmpty(), nn.MSELoss(), (torch.randn(3, 4), torch.randn(3, 2)))
    assert report.passed, report
    extra = next(r for r in report.results if r.name == "extra")
    assert extra.status == "skipped"
    assert "empty" in extra.note


def test_empty_parameter_does_not_hide_a_bug_elsewhere():
    torch.manual_seed(0)
    report = verify_module(_WithEmpty(bug=1.02), nn.MSELoss(), (torch.randn(3, 4), torch.randn(3, 2)), localise=False)
    assert not report.passed


def test_empty_batch_input_is_skipped_with_a_note():
    torch.manual_seed(0)

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x, empty):
            return self.fc(x) + empty.sum()

    batch = ((torch.randn(3, 4), torch.empty(0)), torch.randn(3, 2))
    report = verify_module(TwoInputs(), nn.MSELoss(), batch, inputs=True)
    assert report.passed, report
    empty = next(r for r in report.results if r.name == "batch[0][1]")
    assert empty.status == "skipped"
    assert "empty" in empty.note


# ------------------------------------------------------------------ A4: non-finite inputs


class _NanTolerant(nn.Module):
    """Masks non-finite inputs the way real pipelines do (nan_to_num), so their gradient is 0."""

    def __init__(self, bug: float | None = None):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.bug = bug

    def forward(self, x):
        h = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        return self.fc(h if self.bug is None else WrongGrad.apply(h, self.bug))


def _nan_batch():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    x[0, 1] = float("nan")
    x[2, 3] = float("inf")
    return (x, torch.randn(3, 2))


def test_non_finite_inputs_are_listed_and_not_perturbed():
    report = verify_module(_NanTolerant(), nn.MSELoss(), _nan_batch(), inputs=True)
    assert report.passed, report
    x = next(r for r in report.results if r.name == "batch[0]")
    assert x.status == "ok"
    assert x.checked == 10  # 12 elements, 2 non-finite
    assert "[0, 1]" in x.note
    assert "[2, 3]" in x.note
    assert "not finite" in x.note
    assert "batch[0][0, 1]" in str(report)


def test_non_finite_inputs_do_not_hide_a_bug():
    report = verify_module(_NanTolerant(bug=1.02), nn.MSELoss(), _nan_batch(), inputs=True, localise=False)
    assert not report.passed
    assert next(r for r in report.results if r.name == "batch[0]").status == "mismatch"


def test_nansum_loss_over_nan_inputs_passes_and_a_wrong_slope_fails():
    torch.manual_seed(0)
    x = torch.randn(5, 3)
    x[1, 2] = float("nan")

    class Shift(nn.Module):
        """x + tanh(s * w): the NaN elements of x reach torch.nansum only through an addition."""

        def __init__(self, bug=None):
            super().__init__()
            self.s = nn.Parameter(torch.tensor(1.5))
            self.register_buffer("w", torch.linspace(-1, 1, 3))
            self.bug = bug

        def forward(self, x):
            s = self.s if self.bug is None else WrongGrad.apply(self.s, self.bug)
            return x + torch.tanh(s * self.w)

    loss = torch.nansum
    Scale = Shift

    assert verify_module(Scale(), loss, (x,)).passed
    assert not verify_module(Scale(1.02), loss, (x,), localise=False).passed


def test_non_finite_loss_at_the_point_is_an_error():
    x = torch.randn(3, 4)
    x[0, 0] = float("nan")
    with pytest.raises(InvalidArgumentError, match="not finite"):
        verify_module(nn.Linear(4, 2), nn.MSELoss(), (x, torch.randn(3, 2)))


# ------------------------------------------------------------------ A5: warnings as errors

_WARN_TEST = """
import warnings
import torch
from torch import nn
from torchgradcheck import verify_module, verify_function

torch.set_num_threads(1)


class Bug(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class Square(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 2 * x * t


def model(bug=False, warn=False):
    torch.manual_seed(0)
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
        def forward(self, x):
            if warn:
                warnings.warn("the user's own warning", UserWarning)
            out = self.fc(x)
            return Bug.apply(out) if bug else out
    return M(), nn.MSELoss(), (torch.randn(4, 3), torch.randn(4, 2))


def test_correct_passes():
    assert verify_module(*model()).passed


def test_bug_fails():
    assert not verify_module(*model(bug=True), localise=False).passed


def test_function_with_jvp_passes():
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert verify_function(Square.apply, x).passed


def test_user_warning_escapes():
    verify_module(*model(warn=True))
"""


def test_warnings_as_errors_verdicts_on_merit_and_user_warnings_escape(pytester):
    pytester.makepyfile(test_warn=_WARN_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error", "-q")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*test_user_warning_escapes*", "*UserWarning: the user's own warning*"])


# ------------------------------------------------------------------ C2: grad mode changes the loss


class _Branches(nn.Module):
    """A forward whose value depends on torch.is_grad_enabled() (a cache, a "fast path", ...)."""

    def __init__(self, branch: bool):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.branch = branch

    def forward(self, x):
        y = self.fc(x)
        if self.branch and not torch.is_grad_enabled():
            return y.detach() * 0  # the no-grad fast path is wrong
        return y


def test_loss_that_differs_without_autograd_is_an_error():
    torch.manual_seed(0)
    model = _Branches(branch=True)
    batch = (torch.randn(3, 4), torch.randn(3, 2))
    before = snapshot(model)
    with pytest.raises(InvalidArgumentError, match="with and without autograd"):
        verify_module(model, nn.MSELoss(), batch)
    assert_unchanged(before, model)


def test_same_loss_with_and_without_autograd_passes():
    torch.manual_seed(0)
    assert verify_module(_Branches(branch=False), nn.MSELoss(), (torch.randn(3, 4), torch.randn(3, 2))).passed


# ------------------------------------------------------------------ C3: power


def test_tolerance_large_next_to_gradient_is_weak_and_not_passed():
    model, loss_fn, batch = _mlp()
    loss_fn(model(batch[0]), batch[1]).backward()
    largest = max(float(p.grad.abs().max()) for p in model.parameters())
    model.zero_grad(set_to_none=True)
    report = verify_module(model, loss_fn, batch, atol=largest / 3)  # some |g| > tol, none > 10 tol
    assert {r.status for r in report.results} == {"weak"}
    assert not report.passed
    assert "power" in report.headline()


def test_one_weak_tensor_among_tested_ones_passes_with_a_warning():
    """fc1 sits far below the noise floor (x1e-12 through a constant-norm path); fc2 has power."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.fc2(x) + 1e-15 * self.fc1(x).sum()

    torch.manual_seed(0)
    report = verify_module(M(), lambda out: 1e3 + out.pow(2).sum(), (torch.randn(4, 3),))
    statuses = {r.name: r.status for r in report.results}
    assert statuses["fc2.weight"] == "ok", report
    assert statuses["fc1.weight"] in ("weak", "zero"), report
    assert report.passed, report
    assert any("fc1.weight" in w for w in report.warnings)


def test_python_random_noise_swamping_the_gradient_is_not_passed_and_names_the_fix():
    from realworld_corpus import python_random_noise

    for bug in (None, 2.0):
        random.seed(0)
        c = python_random_noise(bug)
        report = verify_module(c.model, c.loss_fn, c.batch, localise=False)
        assert not report.passed, report
        assert "seed" in str(report)
        assert {r.status for r in report.results} <= {"weak", "zero"}


def test_nondeterminism_that_leaves_power_still_passes_and_a_bug_fails():
    from realworld_corpus import python_random_noise_small

    random.seed(0)
    c = python_random_noise_small()
    assert verify_module(c.model, c.loss_fn, c.batch).passed
    c = python_random_noise_small(2.0)
    assert not verify_module(c.model, c.loss_fn, c.batch, localise=False).passed


# ------------------------------------------------------------------ C4: zero on both sides


def test_zero_gradient_on_both_sides_warns_and_names_the_tensor():
    from realworld_corpus import lora_zero_init

    c = lora_zero_init()
    report = verify_module(c.model, c.loss_fn, c.batch)
    assert report.passed, report
    assert next(r for r in report.results if r.name == "lora_A").status == "zero"
    (warning,) = [w for w in report.warnings if "lora_A" in w]
    assert "after_steps=" in warning
    assert "WARNING" in report.headline()


def test_zero_gradient_warning_does_not_change_a_failing_verdict():
    from realworld_corpus import lora_zero_init

    c = lora_zero_init(1.02)
    report = verify_module(c.model, c.loss_fn, c.batch, localise=False)
    assert not report.passed
    assert any("lora_A" in w for w in report.warnings)


# ------------------------------------------------------------------ D2: the dtype=None hint


def test_integer_inputs_get_their_own_message_not_the_dtype_hint():
    model = nn.Linear(4, 2)
    with pytest.raises(InvalidArgumentError, match=r"integer.*batch\[0\]") as info:
        verify_module(model, nn.MSELoss(), (torch.randint(0, 3, (3, 4)), torch.randn(3, 2)))
    assert "dtype=None" not in str(info.value)
    assert ".float()" in str(info.value)


def test_float_inputs_to_the_same_layer_pass():
    torch.manual_seed(0)
    assert verify_module(nn.Linear(4, 2), nn.MSELoss(), (torch.randint(0, 3, (3, 4)).float(), torch.randn(3, 2)))


class _InPlace(nn.Module):
    def __init__(self, in_place: bool):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.in_place = in_place

    def forward(self, x):
        h = torch.sigmoid(self.fc(x))
        return h.mul_(2) if self.in_place else h.mul(2)  # sigmoid saved its output for backward


def test_in_place_error_in_the_model_gets_its_own_message():
    torch.manual_seed(0)
    model = _InPlace(True)
    batch = (torch.randn(3, 4), torch.randn(3, 3))
    before = snapshot(model)
    with pytest.raises(InvalidArgumentError, match="in-place") as info:
        verify_module(model, nn.MSELoss(), batch)
    assert "dtype=None" not in str(info.value)
    assert_unchanged(before, model)


def test_out_of_place_twin_passes():
    torch.manual_seed(0)
    assert verify_module(_InPlace(False), nn.MSELoss(), (torch.randn(3, 4), torch.randn(3, 3))).passed


class _Float32Only(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        if self.fc.weight.dtype == torch.float64:
            raise RuntimeError("\"my_kernel\" not implemented for 'Double'")
        return self.fc(x)


def test_float64_kernel_failure_keeps_the_dtype_none_hint():
    with pytest.raises(InvalidArgumentError, match="dtype=None"):
        verify_module(_Float32Only(), nn.MSELoss(), (torch.randn(4, 3), torch.randn(4, 2)))
    torch.manual_seed(0)
    assert verify_module(_Float32Only(), nn.MSELoss(), (torch.randn(4, 3), torch.randn(4, 2)), dtype=None).passed


# ------------------------------------------------------------------ D3: the batch, validated first


class _Three(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x, a, b):
        self.calls += 1
        return self.fc(x) * (a if isinstance(a, torch.Tensor) else 1.0)


@pytest.mark.parametrize(
    ("leaf", "what"),
    [("sum", "str"), ((i for i in range(2)), "generator"), (np.ones(3), "ndarray"), ({1, 2}, "set")],
)
def test_non_tensor_leaf_is_a_type_error_naming_its_path(leaf, what):
    model = _Three()
    batch = ((torch.randn(3, 4), torch.randn(1), leaf), torch.randn(3, 2))
    before = snapshot(model)
    with pytest.raises(InvalidArgumentTypeError, match=r"batch\[0\]\[2\].*" + what) as info:
        verify_module(model, nn.MSELoss(), batch)
    assert "forward=" in str(info.value)
    assert model.calls == 0  # validated before the model runs
    assert_unchanged(before, model)


def test_numpy_input_names_torch_from_numpy():
    with pytest.raises(InvalidArgumentTypeError, match=r"batch\[0\].*torch\.from_numpy"):
        verify_module(nn.Linear(4, 2), nn.MSELoss(), (np.ones((3, 4)), torch.randn(3, 2)))


def test_plain_python_leaves_still_pass():
    torch.manual_seed(0)
    report = verify_module(_Three(), nn.MSELoss(), ((torch.randn(3, 4), torch.randn(1), None), torch.randn(3, 2)))
    assert report.passed, report
    report = verify_module(_Three(), nn.MSELoss(), ((torch.randn(3, 4), 2.0, 3), torch.randn(3, 2)))
    assert report.passed, report


def test_meta_device_model_is_a_clear_error():
    model = nn.Linear(4, 2, device="meta")
    with pytest.raises(InvalidArgumentError, match=r"meta.*to_empty"):
        verify_module(model, nn.MSELoss(), (torch.randn(3, 4), torch.randn(3, 2)))


def test_warnings_module_is_untouched_by_a_check():
    """The checker's own warning filters never leak into the caller's (catch_warnings restores them)."""
    before = list(warnings.filters)
    model, loss_fn, batch = _mlp()
    verify_module(model, loss_fn, batch)
    assert warnings.filters == before
    assert sys.modules.get("torchgradcheck") is not None


# ------------------------------------------------------------------ B5: C1-but-not-C2 points


def _judge(f, x0: float, slope: float):
    """judge_second_look on the central differences of `f` at `x0` (steps h, 2h, 4h), autograd `slope`."""
    from torchgradcheck._compare import judge_second_look

    h = 6e-6 * max(1.0, abs(x0))

    def d(s):
        return (f(x0 + s) - f(x0 - s)) / (2 * s)

    values = torch.tensor([[f(x0 + k * h) for k in (-2, -1, 0, 1, 2)]], dtype=torch.float64)
    j = judge_second_look(
        torch.tensor([slope]),
        torch.tensor([d(h)]),
        torch.tensor([h]),
        torch.tensor([2 * h]),
        values,
        torch.tensor([d(2 * h)]),
        1e-17,
        1e-6,
        0.0,
        wider=torch.tensor([d(4 * h)]),
    )
    return float((j.numerical - slope).abs()[0]), float(j.tolerance[0]), bool(j.kink[0])


@pytest.mark.parametrize(
    ("f", "x0", "slope"),
    [
        (lambda x: x * abs(x) + x, 0.0, 1.0),  # second derivative jumps -2 -> 2
        (lambda x: x if x > 0 else np.expm1(x), 0.0, 1.0),  # ELU(1)
        (lambda x: float(torch.special.i1e(torch.tensor(x, dtype=torch.float64))), 0.0, 0.5),
        (lambda x: x * abs(x) + x, 3e-6, 1.0 + 6e-6),  # the jump half a step off centre
    ],
)
def test_c1_point_passes_and_a_two_percent_wrong_slope_fails(f, x0, slope):
    err, tol, kink = _judge(f, x0, slope)
    assert err <= tol or (kink and x0 != 0.0)  # off centre, the quartic kink test may exclude it: no failure
    err, tol, kink = _judge(f, x0, slope * 1.02)
    assert not kink
    assert err > 100 * tol


def test_richardson_still_used_where_convergence_is_quadratic():
    """sin(300x): strongly curved but smooth; the O(h^2) estimate passes it and is not widened to O(h)."""
    err, tol, _ = _judge(lambda x: np.sin(300 * x), 0.1, 300 * np.cos(30.0))
    assert err <= tol
    assert tol < 1e-5 * 300 * abs(np.cos(30.0))


def test_power_numbers_quoted_in_the_readme():
    """README "Power": float64 reaches ~1e-6 (the rtol floor), a 1e6 offset ~1e-3, Python noise of 1e-4 > 100 %."""
    from corpus import correct_mlp, offset_loss
    from realworld_corpus import python_random_noise

    def smallest_error_seen(model, loss_fn, batch):
        report = verify_module(model, loss_fn, batch, mode="full", localise=False)
        return 1 / max(r.power for r in report.results if r.power is not None)

    assert 9e-7 < smallest_error_seen(*correct_mlp()) < 2e-6
    assert 1e-4 < smallest_error_seen(*offset_loss()) < 1e-2
    random.seed(0)
    c = python_random_noise()
    assert smallest_error_seen(c.model, c.loss_fn, c.batch) > 5.0


class _NanSum(torch.autograd.Function):
    """torch.nansum with a hand-written backward; `scale` plants a wrong slope."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(x)
        ctx.scale = scale
        return torch.nansum(x * x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.where(torch.isnan(x), torch.zeros_like(x), 2 * x * g * ctx.scale), None


@pytest.mark.parametrize("fn", ["torch", "hand-written"])
def test_verify_function_nansum_over_nan_inputs_lists_them_and_checks_the_rest(fn):
    from torchgradcheck import verify_function

    x = torch.tensor([[0.5, float("nan"), -1.0], [2.0, 0.25, float("nan")]], dtype=torch.float64, requires_grad=True)
    f = torch.nansum if fn == "torch" else (lambda x: _NanSum.apply(x, 1.0))
    report = verify_function(f, x, second_order=False)
    assert report.passed, report
    first = report.results[0]
    assert first.checked == 4
    assert "[0, 1]" in first.note
    assert "not finite" in first.note


def test_verify_function_nansum_with_a_wrong_slope_fails():
    from torchgradcheck import verify_function

    x = torch.tensor([[0.5, float("nan"), -1.0], [2.0, 0.25, float("nan")]], dtype=torch.float64, requires_grad=True)
    assert not verify_function(lambda x: _NanSum.apply(x, 1.02), x, second_order=False).passed


def test_verify_function_nansum_default_options_with_nan_gradients():
    """nansum(x * x): autograd's gradient is NaN at the NaN elements (0 * NaN); they are not judged, the
    rest passes every row, and the determinism row treats NaN in the same places as the same gradient."""
    from torchgradcheck import verify_function

    x = torch.tensor([[0.5, float("nan"), -1.0], [2.0, 0.25, float("nan")]], dtype=torch.float64, requires_grad=True)
    report = verify_function(lambda x: torch.nansum(x * x), x)
    assert report.passed, report
    assert "x[0, 1], x[1, 2]" in str(report)

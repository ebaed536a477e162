"""verify_function on awkward but legal code: one minimal case per behaviour, each with a buggy twin.

A2 second order that can't be computed; B1 non-tensor arguments before/between tensors; B2 outputs
marked non-differentiable; B3 no forward-mode formula; B4 forwards that reject (or depend on) a
non-contiguous layout; B6 second order as a warning; C1 a backward that is not repeatable; D1
``dtype=None``. Each correct case passes, its twin (one planted first-order mistake) fails.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.autograd import Function

from torchgradcheck import GradcheckWarning, InvalidArgumentError, verify_function


def _leaf(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)


def _text(report) -> str:
    return "\n".join([str(report), *getattr(report, "warnings", ())])


# ----------------------------------------------------------------------- A2: second order unavailable


class _NoDoubleBackward(Function):
    """``exp(x)`` whose backward modifies in place a tensor autograd needs for the double backward."""

    @staticmethod
    def forward(ctx, x, bug):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return x.exp()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        e = x.exp()
        e.mul_(g)  # exp's own backward needs e: "modified by an inplace operation" in the double backward
        return (e * 1.01 if ctx.bug else e), None


class _Inner(Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    # no backward: differentiating through it raises NotImplementedError


class _BackwardCallsInner(Function):
    """``x**2`` whose backward goes through a Function that has no backward of its own."""

    @staticmethod
    def forward(ctx, x, bug):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        out = _Inner.apply(x) * g
        return (out * 0.98 if ctx.bug else out), None


@pytest.mark.parametrize("cls", [_NoDoubleBackward, _BackwardCallsInner])
def test_verify_function_second_order_unavailable_is_a_note_not_an_exception(cls):
    report = verify_function(cls.apply, _leaf(3, 4), False)
    assert report.passed, report
    assert report.warnings, report
    assert any("second derivatives" in w.lower() for w in report.warnings)
    assert any("once_differentiable" in w for w in report.warnings)
    assert report.headline().startswith("verify_function: OK — WARNING")


@pytest.mark.parametrize("cls", [_NoDoubleBackward, _BackwardCallsInner])
def test_verify_function_second_order_unavailable_buggy_twin_fails(cls):
    report = verify_function(cls.apply, _leaf(3, 4), True)
    assert not report.passed
    assert any(r.name == "grad w.r.t. x" and not r.passed for r in report.results)


def test_verify_function_second_order_unavailable_fails_when_asked_for():
    report = verify_function(_NoDoubleBackward.apply, _leaf(3, 4), False, second_order=True)
    assert not report.passed
    assert any(r.name.startswith("2nd order") and not r.passed for r in report.results)


def test_verify_function_real_op_without_double_backward_passes():
    # aten::multilabel_margin_loss_backward has no derivative: gradgradcheck raises on it
    x = _leaf(3, 5)
    target = torch.tensor([[3, 0, -1, 1, 2], [1, -1, 0, 0, 0], [0, 2, -1, 0, 0]])
    report = verify_function(lambda x: torch.nn.functional.multilabel_margin_loss(x, target), x)
    assert report.passed, report
    assert any("not implemented" in w for w in report.warnings)


# -------------------------------------------------------------------- B1: non-tensor arguments first


class _DimFirst(Function):
    """``forward(ctx, dim, x, scale, w)``: non-tensors before and between tensors, w broadcast over rows."""

    @staticmethod
    def forward(ctx, dim, x, scale, w, bug=None):
        ctx.save_for_backward(x, w)
        ctx.scale, ctx.dim, ctx.bug = scale, dim, bug
        return (x * w).sum(dim) * scale

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g = g.unsqueeze(ctx.dim) * ctx.scale
        gw = (g * x).sum(0)
        if ctx.bug == "w":
            gw = gw * 1.02
        return None, g * w, None, gw, None


def test_verify_function_non_tensor_arguments_before_tensors_pass():
    report = verify_function(_DimFirst.apply, 1, _leaf(3, 4), 2.0, _leaf(4, seed=1))
    assert report.passed, report
    assert {r.status for r in report.results if r.name in ("grad w.r.t. x", "grad w.r.t. w")} == {"ok"}


def test_verify_function_non_tensor_arguments_before_tensors_bug_fails():
    report = verify_function(_DimFirst.apply, 1, _leaf(3, 4), 2.0, _leaf(4, seed=1), "w")
    failed = {r.name: r.status for r in report.results if not r.passed}
    assert failed == {"grad w.r.t. w": "mismatch"}, report


class _DimFirstWrongShape(_DimFirst):
    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g = g.unsqueeze(ctx.dim) * ctx.scale
        return None, g * w, None, g * x, None  # not reduced over rows: autograd sums it down silently


def test_verify_function_non_tensor_arguments_wrong_shape_still_named():
    # the unreduced gradient is summed down by autograd (right values): a warning, named by argument
    report = verify_function(_DimFirstWrongShape.apply, 1, _leaf(3, 4), 2.0, _leaf(4, seed=1))
    assert report.passed
    assert {r.name: r.status for r in report.results if r.status == "warning"} == {"grad w.r.t. w": "warning"}
    assert any("for w of shape (3, 4), but w has shape (4,)" in w for w in report.warnings), report.warnings


# ---------------------------------------------------------------- B2: non-differentiable outputs


class _CenterAndMean(Function):
    """Returns ``(x - mean, mean)`` and marks ``mean`` non-differentiable (as native_layer_norm's stats)."""

    @staticmethod
    def forward(ctx, x, bug):
        m = x.mean(-1, keepdim=True)
        ctx.mark_non_differentiable(m)
        ctx.bug = bug
        return x - m, m

    @staticmethod
    def backward(ctx, g, gm):
        out = g - g.mean(-1, keepdim=True)
        return (g if ctx.bug else out), None


def test_verify_function_non_differentiable_outputs_are_noted_not_checked():
    report = verify_function(_CenterAndMean.apply, _leaf(3, 4), False)
    assert report.passed, report
    assert not any("output 1" in r.name for r in report.results), report
    assert any("output 1" in n and "non-differentiable" in n for n in report.notes), report.notes


def test_verify_function_non_differentiable_outputs_bug_fails():
    report = verify_function(_CenterAndMean.apply, _leaf(3, 4), True)
    assert not report.passed
    assert [r.name for r in report.failures] == ["grad of output 0 w.r.t. x"]


def test_verify_function_native_layer_norm_mean_rstd_not_checked():
    x, w, b = _leaf(3, 4), _leaf(4, seed=1), _leaf(4, seed=2)
    report = verify_function(lambda x, w, b: torch.native_layer_norm(x, (4,), w, b, 1e-5), x, w, b)
    assert report.passed, report
    assert any("non-differentiable" in n for n in report.notes)


# ----------------------------------------------------------------------- B3: no forward-mode formula


class _NoJvp(Function):
    @staticmethod
    def forward(ctx, x, bug):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return x.sin()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.cos() + (0.01 if ctx.bug else 0.0)), None


@torch.library.custom_op("tgc_verdicts::cube", mutates_args=())
def _cube(x: torch.Tensor) -> torch.Tensor:
    return x**3


@torch.library.custom_op("tgc_verdicts::cube_bug", mutates_args=())
def _cube_bug(x: torch.Tensor) -> torch.Tensor:
    return x**3


def _save(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


_cube.register_autograd(lambda ctx, g: 3 * ctx.saved_tensors[0] ** 2 * g, setup_context=_save)
_cube_bug.register_autograd(lambda ctx, g: 3 * ctx.saved_tensors[0] * g, setup_context=_save)  # BUG: x**1


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # custom ops without a vmap rule: the C++ warning is not ours here
        return verify_function(fn, *args, **kwargs)


@pytest.mark.parametrize("fn", [lambda x: _NoJvp.apply(x, False), _cube], ids=["lambda-wrapped Function", "custom op"])
def test_verify_function_forward_mode_unavailable_is_noted_never_compared(fn):
    report = _quiet(fn, _leaf(3, 4))
    assert report.passed, report
    assert not any(r.kind == "forward mode" for r in report.results), report
    assert any("forward mode unavailable" in n for n in report.notes), report.notes


@pytest.mark.parametrize(
    "fn", [lambda x: _NoJvp.apply(x, True), _cube_bug], ids=["lambda-wrapped Function", "custom op"]
)
def test_verify_function_forward_mode_unavailable_bug_still_fails(fn):
    report = _quiet(fn, _leaf(3, 4))
    assert not report.passed
    assert [(r.kind, r.status) for r in report.failures] == [("input", "mismatch")]


# --------------------------------------------------------------------------- B4: non-contiguous


class _ViewFlatten(Function):
    """Flattens with ``.view``, which rejects a transposed input: that is the forward's contract."""

    @staticmethod
    def forward(ctx, x, bug):
        ctx.shape, ctx.bug = x.shape, bug
        return x.view(-1) * 3.0

    @staticmethod
    def backward(ctx, g):
        return g.reshape(ctx.shape) * (3.3 if ctx.bug else 3.0), None


def test_verify_function_forward_rejecting_noncontiguous_inputs_is_a_note():
    report = verify_function(_ViewFlatten.apply, _leaf(3, 4), False)
    assert report.passed, report
    assert any("fn requires contiguous inputs" in n for n in report.notes), report.notes


def test_verify_function_forward_rejecting_noncontiguous_inputs_bug_fails():
    report = verify_function(_ViewFlatten.apply, _leaf(3, 4), True)
    assert [r.name for r in report.failures] == ["grad w.r.t. x"]


def _layout_dependent(x):
    # reads memory in storage order: a transposed copy gives other values (a legal, if odd, function)
    return torch.as_strided(x, (x.numel(),), (1,)) * torch.arange(1.0, x.numel() + 1, dtype=x.dtype)


def test_verify_function_layout_dependent_value_is_not_a_gradient_failure():
    report = verify_function(_layout_dependent, _leaf(3, 4))
    assert report.passed, report
    assert any("non-contiguous" in n for n in report.notes)


class _StridedBug(Function):
    """as_strided-style forward (storage order) with a backward that is wrong on every layout."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.as_strided(x, (x.numel(),), (1,)) * 2.0

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        out = torch.zeros_like(x)
        torch.as_strided(out, (x.numel(),), (1,)).copy_(g * 2.2)
        return out


def test_verify_function_layout_dependent_bug_fails():
    report = verify_function(_StridedBug.apply, _leaf(3, 4))
    assert not report.passed


# ------------------------------------------------------------------ B6: second order is a warning


class _DetachedBackward(Function):
    """``x**3`` whose backward detaches x: first derivatives right, second derivatives zero."""

    @staticmethod
    def forward(ctx, x, bug):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        x = x.detach()
        return g * 3 * x**2 * (1.02 if ctx.bug else 1.0), None


def test_verify_function_wrong_second_order_is_a_warning_by_default():
    report = verify_function(_DetachedBackward.apply, _leaf(3, 4), False)
    assert report.passed, report
    assert report.headline().startswith("verify_function: OK — WARNING")
    assert len(report.warnings) >= 1
    text = " ".join(report.warnings)
    assert "2nd order: grad w.r.t. x" in text
    assert "@once_differentiable" in text
    assert "second_order=True" in text
    assert report.to_dict()["warnings"] == list(report.warnings)


def test_verify_function_wrong_second_order_fails_with_second_order_true():
    report = verify_function(_DetachedBackward.apply, _leaf(3, 4), False, second_order=True)
    assert not report.passed
    assert [r.name for r in report.failures] == ["2nd order: grad w.r.t. x"]


def test_verify_function_second_order_false_skips_it():
    report = verify_function(_DetachedBackward.apply, _leaf(3, 4), False, second_order=False)
    assert report.passed
    assert not report.warnings
    assert not any(r.name.startswith("2nd order") for r in report.results)


def test_verify_function_wrong_second_order_bug_twin_fails_first_order():
    report = verify_function(_DetachedBackward.apply, _leaf(3, 4), True)
    assert not report.passed
    assert [r.name for r in report.failures] == ["grad w.r.t. x"]


def test_verify_function_right_second_order_gives_no_warning():
    report = verify_function(lambda x: x**3, _leaf(3, 4))
    assert report.passed
    assert not report.warnings
    assert not report.headline().startswith("verify_function: OK — WARNING")


def test_gradcheck_fixture_reemits_report_warnings_as_gradcheck_warnings():
    from torchgradcheck.pytest_plugin import Gradcheck

    with pytest.warns(GradcheckWarning, match="once_differentiable"):
        report = Gradcheck().function(_DetachedBackward.apply, _leaf(3, 4), False)
    assert report.passed


def test_gradcheck_fixture_still_fails_the_buggy_twin():
    from torchgradcheck import GradientMismatchError
    from torchgradcheck.pytest_plugin import Gradcheck

    with pytest.raises(GradientMismatchError):
        Gradcheck().function(_DetachedBackward.apply, _leaf(3, 4), True)


# -------------------------------------------------------------------- C1: backward not repeatable


class _MutatesSaved(Function):
    """``x**2`` whose backward scales a saved tensor in place: right once, wrong on the next call."""

    @staticmethod
    def forward(ctx, x, stateful):
        ctx.save_for_backward(x)
        ctx.twice = 2 * x.detach().clone()
        ctx.stateful = stateful
        return x * x

    @staticmethod
    def backward(ctx, g):
        if ctx.stateful:
            ctx.twice.mul_(g)  # the state of the graph changes: a second backward returns twice * g * g
            return ctx.twice, None
        return ctx.twice * g, None


def test_verify_function_backward_not_repeatable_fails_with_its_own_status():
    report = verify_function(_MutatesSaved.apply, _leaf(3, 4), True)
    assert not report.passed
    statuses = {r.status for r in report.failures}
    assert "backward not repeatable" in statuses, report
    assert "backward not repeatable" in str(report)


def test_verify_function_backward_repeatable_twin_passes():
    report = verify_function(_MutatesSaved.apply, _leaf(3, 4), False)
    assert report.passed, report
    assert not any(r.status == "backward not repeatable" for r in report.results)


class _KernelBenchSwishV2(Function):
    """nathanjpaek/kb-pilot, KernelBench/KernelBench/level9/6311_SwishV2.py: ``grad *= grad_output`` on ctx."""

    @staticmethod
    def forward(ctx, feat):
        sig = torch.sigmoid(feat)
        out = feat * torch.sigmoid(feat)
        ctx.grad = sig * (1 + feat * (1 - sig))
        return out

    @staticmethod
    def backward(ctx, grad_output):
        grad = ctx.grad
        grad *= grad_output
        return grad


def test_verify_function_published_stateful_backward_is_not_repeatable():
    report = verify_function(_KernelBenchSwishV2.apply, _leaf(3, 4))
    assert not report.passed
    assert any(r.status == "backward not repeatable" for r in report.failures), report


# ------------------------------------------------------------------------------- D1: dtype=None


class _Float32Only(Function):
    """A float32-only kernel (as many CUDA/Triton kernels are): refuses float64."""

    @staticmethod
    def forward(ctx, x, bug):
        if x.dtype != torch.float32:
            raise RuntimeError(f"kernel not implemented for '{x.dtype}'")
        ctx.save_for_backward(x)
        ctx.bug = bug
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - torch.tanh(x) ** 2) * (1.05 if ctx.bug else 1.0), None


def test_verify_function_dtype_none_keeps_float32():
    report = verify_function(_Float32Only.apply, _leaf(3, 4, dtype=torch.float32), False, dtype=None)
    assert report.passed, report
    assert "float32" in str(report.options), report.options


def test_verify_function_dtype_none_bug_fails():
    report = verify_function(_Float32Only.apply, _leaf(3, 4, dtype=torch.float32), True, dtype=None)
    assert not report.passed
    assert [r.name for r in report.failures] == ["grad w.r.t. x"]


def test_verify_function_float32_only_kernel_in_float64_says_pass_dtype_none():
    with pytest.raises(Exception, match="dtype=None"):
        verify_function(_Float32Only.apply, _leaf(3, 4, dtype=torch.float32), False)


def test_verify_function_dtype_rejects_integer_dtype():
    with pytest.raises(InvalidArgumentError, match="dtype"):
        verify_function(_Float32Only.apply, _leaf(3, 4, dtype=torch.float32), False, dtype=torch.int64)


# ------------------------------------------------------------------------ A3 (function side): empty


def test_verify_function_empty_input_is_skipped_with_a_note():
    x, e = _leaf(3), torch.empty(0, dtype=torch.float64, requires_grad=True)
    report = verify_function(lambda x, e: x.sin() + e.sum(), x, e)
    assert report.passed, report
    assert "e is empty (numel 0): nothing to check, skipped" in report.notes
    assert [r.name for r in report.results if r.kind == "input"] == ["grad w.r.t. x"]


def test_verify_function_empty_input_next_to_a_buggy_backward_fails():
    x, e = _leaf(3, 4), torch.empty(0, dtype=torch.float64, requires_grad=True)
    report = verify_function(lambda x, e: _DetachedBackward.apply(x, True) + e.sum(), x, e)
    assert [r.name for r in report.failures] == ["grad w.r.t. x"]


def test_verify_function_only_empty_inputs_is_a_clear_error():
    with pytest.raises(InvalidArgumentError, match="every input that requires grad is empty"):
        verify_function(lambda e: e.exp(), torch.empty(0, 3, dtype=torch.float64, requires_grad=True))


def test_verify_function_empty_output_is_skipped_with_a_note():
    report = verify_function(lambda x: (x.sin(), x[:0] * 2), _leaf(4))
    assert report.passed, report
    assert "output 1 is empty (numel 0): nothing to check, skipped" in report.notes
    bug = verify_function(lambda x: (_DetachedBackward.apply(x, True), x[:0] * 2), _leaf(4))
    assert [r.name for r in bug.failures] == ["grad of output 0 w.r.t. x"]


def test_verify_function_only_empty_outputs_is_a_clear_error():
    with pytest.raises(InvalidArgumentError, match="every output of fn that requires grad is empty"):
        verify_function(lambda x: x[:0] * 2, _leaf(4))


def test_verify_function_view_that_fn_reads_outside_of_is_a_clear_error():
    base = torch.randn(20, dtype=torch.float64)
    x = base[5:15].detach().requires_grad_(True)  # as_strided with offset 10 reads beyond the view
    with pytest.raises(InvalidArgumentError, match="is a view into a larger storage"):
        verify_function(lambda t: torch.as_strided(t, (2, 2), (1, 2), 10), x)


def test_verify_function_own_error_with_a_view_input_propagates_unchanged():
    x = torch.randn(20, dtype=torch.float64)[5:15].detach().requires_grad_(True)
    with pytest.raises(RuntimeError, match="inconsistent tensor size"):
        verify_function(lambda t: t @ torch.ones(3, dtype=t.dtype), x)

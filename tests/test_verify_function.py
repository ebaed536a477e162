"""verify_function: corpus verdicts, names in the report, the extra checks, errors, untouched inputs."""

from __future__ import annotations

import pytest
import torch
from function_corpus import BUGS, CORRECT, TWINS, OnceSquare, linear, scaled_tanh
from helpers import assert_unchanged, snapshot
from torch import nn

from torchgradcheck import GradientMismatchError, InvalidArgumentError, InvalidArgumentTypeError
from torchgradcheck.function import verify_function


def _state(tree):
    """Everything about the caller's tensors that a check must leave as it was."""
    if isinstance(tree, torch.Tensor):
        t = tree.detach()
        grad = tree.grad if tree.is_leaf and tree.grad is not None else None
        return (
            str(t.dtype),
            tuple(t.shape),
            t.stride(),
            t.data_ptr(),
            tree.requires_grad,
            tree._version,
            None if grad is None else grad.clone(),
            t.cpu().contiguous().numpy().tobytes(),
        )
    if isinstance(tree, dict):
        return {k: _state(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return [_state(v) for v in tree]
    return repr(tree)


def _check(case):
    fn, args, kwargs = case
    before = _state((args, kwargs))
    report = verify_function(fn, *args, **kwargs)
    after = _state((args, kwargs))
    assert str(before) == str(after), "the caller's tensors changed"
    return report


# ------------------------------------------------------------------------------ verdict table


@pytest.mark.parametrize("case", list(BUGS))
def test_verify_function_fails_planted_bug(case):
    report = _check(BUGS[case]())
    assert not report.passed, report


@pytest.mark.parametrize("case", list(CORRECT))
def test_verify_function_passes_correct_twin(case):
    report = _check(CORRECT[case]())
    assert report.passed, report


def test_corpus_every_bug_has_a_correct_twin():
    assert set(TWINS) == set(BUGS)
    assert set(TWINS.values()) <= set(CORRECT)


@pytest.mark.parametrize("case", ["wrong_sign", "swapped_grads", "wrong_at_edges", "ignored_output_grad"])
def test_verify_function_loop_engine_gives_the_same_verdict(case):
    fn, args, kwargs = BUGS[case]()
    assert not verify_function(fn, *args, engine="loop", **kwargs).passed


# ------------------------------------------------------------------------------ what the report says


def test_verify_function_report_raises_with_the_table():
    fn, args, kwargs = BUGS["wrong_sign"]()
    report = verify_function(fn, *args, **kwargs)
    assert report.call == "verify_function"
    pattern = r"(?s)verify_function: FAILED.*grad w\.r\.t\. w: 25 element"
    with pytest.raises(GradientMismatchError, match=pattern) as info:
        report.assert_passed()
    assert info.value.report is report


def test_verify_function_names_output_and_input_pair():
    report = _check(BUGS["ignored_output_grad"]())
    failed = {r.name for r in report.failures}
    assert "grad of output 1 w.r.t. x" in failed
    assert "grad of output 0 w.r.t. x" not in failed  # the sin output's gradient is right
    assert "grad of output 1 w.r.t. x[" in str(report)


def test_verify_function_names_the_wrong_element():
    report = _check(BUGS["one_element"]())
    (row,) = [r for r in report.failures if r.kind == "input"]
    assert row.name == "grad w.r.t. w"
    assert row.failed == 1
    assert row.worst[0].index == (3, 1)
    assert "grad w.r.t. w[3, 1]: numerical" in str(report)


def test_verify_function_reports_a_tiny_uniform_error():
    report = _check(BUGS["relative_1e-5"]())
    (row,) = [r for r in report.failures if r.kind == "input"]
    assert row.name == "grad w.r.t. x"
    assert row.failed == row.checked == 25  # every element, 1e-5 relative each
    assert 4e-6 < row.relative_error < 6e-6  # ||a - n|| / (||a|| + ||n||) = 1e-5 / 2


def test_verify_function_reports_wrong_dtype_by_name():
    report = _check(BUGS["float32_grad"]())
    (row,) = report.failures
    assert (row.name, row.status) == ("grad w.r.t. w", "wrong dtype")
    assert "returned a gradient for w of dtype float32, but w is float64" in row.note


def test_verify_function_reports_wrong_dtype_of_a_function_inside_fn():
    fn, args, _ = BUGS["float32_grad"]()
    x, w, b, bug = args
    report = _check((lambda x, w, b: fn(x, w.sin(), b, bug), (x, w, b), {}))
    (row,) = report.failures
    assert (row.name, row.status) == ("returned by Linear: input 1", "wrong dtype")
    assert "input 1 of Linear of dtype float32, but input 1 of Linear is float64" in row.note


def test_verify_function_reports_wrong_shape_by_name_when_autograd_raises():
    class BadShape(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, b):
            return x + b

        @staticmethod
        def backward(ctx, g):
            return g, g[0, :2]

    x, b = torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    report = _check((BadShape.apply, (x, b), {}))
    assert not report.passed
    (row,) = report.failures
    assert (row.name, row.status) == ("grad w.r.t. b", "wrong shape")
    assert "of shape (2,), but b has shape (3,)" in row.note


def test_verify_function_reports_broadcast_shape_that_autograd_sums():
    class Unreduced(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, b):
            return x + b

        @staticmethod
        def backward(ctx, g):
            return g, g  # b's gradient left at x's shape

    x, b = torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    report = _check((Unreduced.apply, (x, b), {}))
    statuses = {r.name: r.status for r in report.results}
    # autograd sums it down, so the values are right: a warning (PyTorch's own custom_op_db does this)
    assert report.passed
    assert statuses["grad w.r.t. b"] == "warning"
    assert statuses["grad w.r.t. x"] == "ok"
    assert any("of shape (4, 3), but b has shape (3,): autograd sums it down" in w for w in report.warnings)


def test_verify_function_broadcast_shape_with_wrong_values_still_fails():
    class UnreducedWrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, b):
            return x + b

        @staticmethod
        def backward(ctx, g):
            return g, 1.02 * g  # summed down by autograd, and 2 % wrong

    x, b = torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    report = _check((UnreducedWrong.apply, (x, b), {}))
    assert not report.passed
    assert [r.name for r in report.failures] == ["grad w.r.t. b"]


def test_verify_function_second_order_row_and_option():
    fn, args, kwargs = BUGS["second_derivative_only"]()
    report = verify_function(fn, *args, **kwargs)
    first = [r for r in report.results if r.kind == "input"]
    assert all(r.passed for r in first)  # the first derivative is right ...
    (row,) = report.failures  # ... the second is not
    assert (row.name, row.status) == ("2nd order: grad w.r.t. x", "no gradient")
    assert ".detach()" in row.note
    assert kwargs == {"second_order": True}
    off = verify_function(fn, *args, second_order=False)
    assert off.passed
    assert "second order: off (second_order=False)" in off.notes
    default = verify_function(fn, *args)  # second_order=None: a warning, the verdict stands
    assert default.passed
    assert [(r.name, r.status) for r in default.results if r.kind == "second order"] == [
        ("2nd order: grad w.r.t. x", "warning")
    ]
    assert "2nd order: grad w.r.t. x" in default.warnings[0]


def test_verify_function_second_order_catches_a_detached_cross_term():
    class Mul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x * w

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            return g * w.detach(), g * x  # d(grad_x)/dw is lost; d(grad_w)/dx is kept

    x, w = (torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    report = _check((Mul.apply, (x, w), {"second_order": True}))
    assert [r.name for r in report.failures] == ["2nd order: grad w.r.t. w"]
    assert report.evaluations < 150  # second order costs O(1) evaluations, not O(N)


def test_verify_function_module_with_buffers_in_train_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh()).double().train()
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    before = snapshot(model)
    report = verify_function(model, x)
    assert report.passed, report
    assert_unchanged(before, model)  # running stats and num_batches_tracked untouched


def test_verify_function_second_order_is_checked_on_correct_twin():
    fn, args, kwargs = CORRECT["cube"]()
    report = verify_function(fn, *args, **kwargs)
    (row,) = [r for r in report.results if r.kind == "second order"]
    assert row.status == "ok"
    assert row.relative_error < 1e-8


def test_verify_function_once_differentiable_is_a_note_not_a_failure():
    report = _check((OnceSquare.apply, (torch.randn(5, dtype=torch.float64, requires_grad=True),), {}))
    assert report.passed
    assert not [r for r in report.results if r.kind == "second order"]
    assert any("OnceSquare is @once_differentiable" in n for n in report.notes)


def test_verify_function_forward_mode_note_when_no_jvp():
    report = _check(linear())
    assert "forward mode unavailable: Linear defines no jvp; not compared" in report.notes


def test_verify_function_forward_mode_checks_jvp():
    good = _check(CORRECT["scaled_tanh"]())
    assert [r.status for r in good.results if r.kind == "forward mode"] == ["ok"]
    bad = _check(BUGS["wrong_jvp"]())
    assert [r.name for r in bad.failures] == ["jvp of the output along x"]


def test_verify_function_noncontiguous_only_failure():
    report = _check(BUGS["noncontiguous_assumption"]())
    assert [r.name for r in report.failures] == ["non-contiguous: grad w.r.t. w"]
    assert any("transposed/strided copies of x, w" in n for n in report.notes)


def test_verify_function_noncontiguous_raise_is_a_failure():
    class NeedsContiguous(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * g * x.view(-1).view(x.shape)

    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    report = _check((NeedsContiguous.apply, (x,), {}))
    (row,) = report.failures
    assert (row.status, row.name) == ("error", "non-contiguous: grad w.r.t. x")
    assert "with non-contiguous inputs" in row.note
    assert verify_function(NeedsContiguous.apply, x, noncontiguous=False).passed


def test_verify_function_determinism_reported_after_correctness():
    report = _check(BUGS["stale_buffer"]())
    kinds = [r.kind for r in report.results]
    assert kinds[-1] == "determinism"
    assert report.results[0].kind == "input"
    assert report.results[0].passed  # the first run is right
    (row,) = [r for r in report.results if r.kind == "determinism"]
    assert row.status == "nondeterministic"
    assert row.max_abs_error > 0


def test_verify_function_nondet_tol_allows_small_differences():
    fn, args, kwargs = BUGS["stale_buffer"]()
    report = verify_function(fn, *args, nondet_tol=1.0, second_order=False, noncontiguous=False, **kwargs)
    assert report.passed
    assert any(n.startswith("determinism: the backward run twice gives gradients within") for n in report.notes)


def test_verify_function_expanded_input_is_copied_with_a_note():
    report = _check(CORRECT["expanded_input"]())
    assert report.passed
    assert any("x is an expanded tensor (overlapping memory)" in n for n in report.notes)


def test_verify_function_names_keyword_and_varargs_inputs():
    def f(*xs, scale):
        return sum(x.sin() for x in xs) * scale.exp()

    xs = [torch.randn(3, requires_grad=True) for _ in range(2)]
    report = _check((f, tuple(xs), {"scale": torch.randn(3, requires_grad=True)}))
    assert [r.name for r in report.results if r.kind == "input"] == [
        "grad w.r.t. xs[0]",
        "grad w.r.t. xs[1]",
        "grad w.r.t. scale",
    ]


class NewStyleSquare(torch.autograd.Function):
    """``x**2`` in the torch.func style (setup_context, a vmap rule, a jvp); `factor` plants a bug."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, factor):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])
        ctx.factor = inputs[1]

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return ctx.factor * g * x, None

    @staticmethod
    def jvp(ctx, tx, _):
        (x,) = ctx.saved_tensors
        return 2 * x * tx


@pytest.mark.parametrize("factor", [2.0, 2.001])
def test_verify_function_new_style_function_runs_on_vmap(factor):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    report = _check((NewStyleSquare.apply, (x, factor), {}))
    assert report.engine == "vmap"
    assert report.passed == (factor == 2.0), report
    assert report.results[0].name == "grad w.r.t. x"  # named from forward(x, factor), no ctx
    if factor == 2.0:
        assert [r.status for r in report.results if r.kind == "forward mode"] == ["ok"]


def test_verify_function_names_tensors_inside_a_list():
    def f(xs, w):
        return torch.stack(xs) @ w

    xs = [torch.randn(3, requires_grad=True), torch.randn(3)]  # the second is passed through unchecked
    report = _check((f, (xs, torch.randn(3, 2, requires_grad=True)), {}))
    assert report.passed, report
    assert [r.name for r in report.results if r.kind == "input"] == ["grad w.r.t. xs[0]", "grad w.r.t. w"]


def test_verify_function_passes_keyword_to_fn():
    _, args, kwargs = CORRECT["scaled_tanh"]()
    assert kwargs["scale"] == 3.0
    assert verify_function(scaled_tanh, *args, scale=3.0).passed
    assert not verify_function(scaled_tanh, *args, scale=3.0, bug="ignores_scale").passed


def test_verify_function_module_as_fn_is_lent_and_restored():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))  # float32 parameters
    x = torch.randn(5, 3, requires_grad=True)
    before = snapshot(model)
    report = verify_function(model, x)
    assert report.passed, report
    assert [r.name for r in report.results if r.kind == "input"] == ["grad w.r.t. input"]
    assert_unchanged(before, model)


def test_verify_function_inputs_unchanged_when_fn_raises_halfway():
    calls = []

    def flaky(x, w):
        calls.append(1)
        if len(calls) >= 6:  # after the analytical pass, during the numerical one
            raise RuntimeError("boom on the 6th call")
        return x @ w

    x = torch.randn(3, 3, dtype=torch.float32, requires_grad=True)
    w = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    x.grad = torch.ones(3, 3)
    before = _state((x, w))
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="boom on the 6th call"):
        verify_function(flaky, x, w)
    assert str(_state((x, w))) == str(before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.get_default_dtype() == torch.float32


def test_verify_function_agrees_with_gradcheck_on_first_order_cases():
    for name in ["wrong_scale", "swapped_grads", "wrong_at_edges", "wrong_in_one_branch", "ignored_output_grad"]:
        fn, args, kwargs = BUGS[name]()
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        rest = [a for a in args if not isinstance(a, torch.Tensor)]

        def call(*ts, fn=fn, rest=rest):
            return fn(*ts, *rest)

        assert not torch.autograd.gradcheck(call, tensors, raise_exception=False), name
        assert not verify_function(fn, *args, **kwargs).passed, name
        fn, args, kwargs = CORRECT[TWINS[name]]()
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        rest = [a for a in args if not isinstance(a, torch.Tensor)]

        def twin(*ts, fn=fn, rest=rest):
            return fn(*ts, *rest)

        assert torch.autograd.gradcheck(twin, tensors, raise_exception=False), name
        assert verify_function(fn, *args, **kwargs).passed, name


# ------------------------------------------------------------------------------ errors


def test_verify_function_rejects_non_callable():
    with pytest.raises(InvalidArgumentTypeError, match=r"fn must be callable .* got fn=3"):
        verify_function(3, torch.randn(2, requires_grad=True))


def test_verify_function_rejects_no_input_requiring_grad():
    with pytest.raises(InvalidArgumentError, match="no input requires grad"):
        verify_function(torch.sin, torch.randn(3))


def test_verify_function_rejects_nothing_differentiable():
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(InvalidArgumentError, match="fn returned nothing differentiable"):
        verify_function(lambda x: x > 0, x)
    with pytest.raises(InvalidArgumentError, match="no output of fn requires grad"):
        verify_function(lambda x: x.detach() * 2, x)


def test_verify_function_rejects_option_typo():
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(InvalidArgumentTypeError, match=r"unknown keyword second_ordr=False.*Did you mean second_ord"):
        verify_function(torch.sin, x, second_ordr=False)
    with pytest.raises(InvalidArgumentTypeError, match=r"unknown keyword scale=2"):
        verify_function(lambda x: x.sin(), x, scale=2)


def test_verify_function_rejects_bad_option_values():
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(InvalidArgumentError, match="eps"):
        verify_function(torch.sin, x, eps=-1.0)
    with pytest.raises(InvalidArgumentTypeError, match="second_order= must be True, False or None"):
        verify_function(torch.sin, x, second_order="yes")
    with pytest.raises(InvalidArgumentError, match="nondet_tol"):
        verify_function(torch.sin, x, nondet_tol=-1)


def test_verify_function_rejects_nan_output_and_complex_inputs():
    """NaN inputs are legal (issue 9, A4: see test_trust_module.py), a non-finite output is not."""
    with pytest.raises(InvalidArgumentError, match=r"output 0 of fn is not finite.*torch\.nansum"):
        verify_function(lambda x: x.sin(), torch.tensor([1.0, float("nan")], requires_grad=True))
    with pytest.raises(InvalidArgumentError, match="complex inputs are not supported"):
        verify_function(lambda x: x.abs(), torch.randn(3, dtype=torch.complex128, requires_grad=True))


class _CrashingJvp(torch.autograd.Function):
    """A correct backward, and a jvp that crashes: a finding, not 'forward mode unavailable'."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g

    @staticmethod
    def jvp(ctx, t):
        raise RuntimeError("index out of range in my jvp kernel")


def test_verify_function_reports_a_crashing_jvp_as_a_failure():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    report = verify_function(_CrashingJvp.apply, x)
    assert not report.passed
    (row,) = report.failures
    assert row.status == "error"
    assert "the jvp raised RuntimeError: index out of range" in row.note

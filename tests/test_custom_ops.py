"""torch.library custom ops through verify_function: each correct op passes, its buggy twin fails.

Also: no vmap batching rule means the loop engine, silently (nothing on stderr, no warning, even
as errors), with the reason in a note; a registered batching rule keeps vmap; no jvp is noted, never
compared; a mutating op and an op without autograd are clear errors; torch.library.opcheck's verdict
is in the report (a warning when it fails); PyTorch's own custom-op corpus (``custom_op_db``) passes.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from torchgradcheck import InvalidArgumentError, verify_function

NS = "tgc_tests"


def _sin_op(name: str, factor: float, *, fake: bool = True, vmap: bool = False):
    """``sin`` as a custom op whose registered backward is ``factor`` times the right one."""

    @torch.library.custom_op(f"{NS}::{name}", mutates_args=())
    def op(x: torch.Tensor) -> torch.Tensor:
        return x.sin()

    if fake:
        op.register_fake(lambda x: torch.empty_like(x))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x.cos() * factor

    op.register_autograd(backward, setup_context=setup_context)
    if vmap:

        def batched(info, in_dims, x):
            return op(x), in_dims[0]

        op.register_vmap(batched)
    return op


mysin = _sin_op("mysin", 1.0)
mysin_bug = _sin_op("mysin_bug", 1.02)  # 2 % off
mysin_vmap = _sin_op("mysin_vmap", 1.0, vmap=True)
mysin_vmap_bug = _sin_op("mysin_vmap_bug", 1.02, vmap=True)
mysin_nofake = _sin_op("mysin_nofake", 1.0, fake=False)


def _linear_op(name: str, bug: bool):
    """``x @ w.T + b`` with two outputs (the second ``x * scale``); the bug drops ``b``'s gradient's sum axis."""

    @torch.library.custom_op(f"{NS}::{name}", mutates_args=())
    def op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return x @ w.T + b, x * scale

    @op.register_fake
    def _(x, w, b, scale):
        return x.new_empty(x.shape[0], w.shape[0]), torch.empty_like(x)

    def setup_context(ctx, inputs, output):
        x, w, _b, scale = inputs
        ctx.save_for_backward(x, w)
        ctx.scale = scale

    def backward(ctx, g, g2):
        x, w = ctx.saved_tensors
        gx = g @ w + g2 * (ctx.scale if not bug else 1.0)  # bug: forgets the scale of output 1
        return gx, g.T @ x, g.sum(0), None

    op.register_autograd(backward, setup_context=setup_context)
    return op


linear2 = _linear_op("linear2", bug=False)
linear2_bug = _linear_op("linear2_bug", bug=True)


def _check_quietly(capfd, fn, *args, **kwargs):
    """verify_function with every warning an error, asserting nothing reached stdout/stderr."""
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = verify_function(fn, *args, **kwargs)
    out, err = capfd.readouterr()
    assert err == "", f"printed at the user: {err!r}"
    assert out == ""
    return report


# ------------------------------------------------------------------------------ correct and buggy


@pytest.mark.parametrize("spelling", ["custom_op", "packet", "overload"])
def test_custom_op_correct_passes_silently_on_the_loop_engine(capfd, spelling):
    fn = {"custom_op": mysin, "packet": torch.ops.tgc_tests.mysin, "overload": torch.ops.tgc_tests.mysin.default}
    x = torch.randn(5, 3, requires_grad=True)
    report = _check_quietly(capfd, fn[spelling], x)
    assert report.passed, report
    assert report.engine == "loop"
    assert any(f"{NS}::mysin has no vmap batching rule" in n for n in report.notes), report.notes
    assert report.results[0].name == "grad w.r.t. x"  # the schema's name, not args[0]


@pytest.mark.parametrize("spelling", ["custom_op", "packet"])
def test_custom_op_wrong_backward_fails_silently(capfd, spelling):
    fn = {"custom_op": mysin_bug, "packet": torch.ops.tgc_tests.mysin_bug}
    x = torch.randn(5, 3, requires_grad=True)
    report = _check_quietly(capfd, fn[spelling], x)
    assert not report.passed
    first = report.results[0]
    assert first.name == "grad w.r.t. x"
    assert first.status == "mismatch"


def test_custom_op_with_a_batching_rule_keeps_vmap(capfd):
    x = torch.randn(5, 3, requires_grad=True)
    report = _check_quietly(capfd, mysin_vmap, x)
    assert report.passed, report
    assert report.engine == "vmap"
    assert not any("batching rule" in n for n in report.notes)
    assert not _check_quietly(capfd, mysin_vmap_bug, x).passed


def test_custom_op_several_inputs_and_outputs(capfd):
    x, w, b = (torch.randn(4, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True), torch.randn(2))
    b.requires_grad_()
    good = _check_quietly(capfd, linear2, x, w, b, 0.5)
    assert good.passed, good
    names = {r.name for r in good.results}
    assert {"grad of output 0 w.r.t. x", "grad of output 1 w.r.t. x", "grad of output 0 w.r.t. b"} <= names
    bad = _check_quietly(capfd, linear2_bug, x, w, b, 0.5)
    assert not bad.passed
    assert {r.name for r in bad.failures} == {"grad of output 1 w.r.t. x"}


def test_custom_op_jvp_is_noted_not_compared(capfd):
    """custom_op has no forward-mode formula: the jvp is never a failing row, and a note says why."""
    x = torch.randn(6, requires_grad=True)
    report = _check_quietly(capfd, mysin, x)
    assert report.passed, report
    assert not any(r.name.startswith("jvp") and not r.passed for r in report.results)
    assert any("forward mode" in n and "unavailable" in n for n in report.notes), report.notes


def test_custom_op_under_pytest_filterwarnings_error_runs_twice(capfd):
    """A second check in the same process stays silent too (the C++ warning is not a 'once' warning)."""
    x = torch.randn(3, requires_grad=True)
    for _ in range(2):
        assert _check_quietly(capfd, mysin, x).passed


def test_custom_op_vmap_fallback_setting_is_restored():
    before = torch._C._functorch._is_vmap_fallback_enabled()
    verify_function(mysin, torch.randn(3, requires_grad=True))
    assert torch._C._functorch._is_vmap_fallback_enabled() == before


# ------------------------------------------------------------------------------ opcheck


def test_custom_op_opcheck_pass_is_noted(capfd):
    report = _check_quietly(capfd, mysin, torch.randn(4, requires_grad=True))
    assert report.passed
    assert not report.warnings
    note = next(n for n in report.notes if n.startswith("opcheck:"))
    for test in ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"):
        assert test in note


def test_custom_op_opcheck_failure_is_a_warning_naming_the_test(capfd):
    """No register_fake: right gradients (passed), but opcheck's test_faketensor fails and says so."""
    report = _check_quietly(capfd, mysin_nofake, torch.randn(4, requires_grad=True))
    assert report.passed, report
    assert len(report.warnings) == 1
    assert "test_faketensor" in report.warnings[0]
    assert "register_fake" in report.warnings[0]
    assert "WARNING" in report.headline()


@torch.library.custom_op(f"{NS}::wrong_fake", mutates_args=())
def wrong_fake(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@wrong_fake.register_fake
def _(x):
    return x.new_empty(x.shape[0] + 1)  # wrong shape: opcheck's test_faketensor must fail


wrong_fake.register_autograd(lambda ctx, g: g * 2)


def test_custom_op_opcheck_catches_a_wrong_fake_kernel(capfd):
    report = _check_quietly(capfd, wrong_fake, torch.randn(4, requires_grad=True))
    assert report.passed  # the gradient is right
    assert any("test_faketensor" in w for w in report.warnings), report.warnings


def test_custom_op_opcheck_can_be_turned_off():
    report = verify_function(mysin_nofake, torch.randn(4, requires_grad=True), opcheck=False)
    assert not report.warnings
    assert any("opcheck: off" in n for n in report.notes)


def test_custom_op_caller_tensors_untouched_by_opcheck():
    x = torch.randn(4, requires_grad=True)
    before = x.detach().clone()
    verify_function(mysin, x)
    assert x.grad is None
    assert torch.equal(x.detach(), before)
    assert x._version == 0


# ------------------------------------------------------------------------------ errors


@torch.library.custom_op(f"{NS}::scale_", mutates_args=("x",))
def scale_(x: torch.Tensor, s: float) -> None:
    x.mul_(s)


@torch.library.custom_op(f"{NS}::no_autograd", mutates_args=())
def no_autograd(x: torch.Tensor) -> torch.Tensor:
    return x.sin()


def test_custom_op_mutating_is_a_clear_error():
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(InvalidArgumentError, match=r"tgc_tests::scale_ mutates its argument\(s\) x"):
        verify_function(scale_, x, 2.0)


def test_custom_op_without_autograd_is_a_clear_error():
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(InvalidArgumentError, match=r"has no autograd formula.*register_autograd"):
        verify_function(no_autograd, x)


# ------------------------------------------------------------------------------ PyTorch's own corpus


def _custom_op_db():
    """PyTorch's custom_op_db; its import freezes the backend flags (common_utils): the state is put back."""
    was = torch.backends.flags_frozen()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportWarning)  # "Fail to import hypothesis in common_utils"
        from torch.testing._internal.custom_op_db import custom_op_db
    torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = not was
    return [op for op in custom_op_db if op.supports_autograd]


# numpy_mul's backward returns grad_out * y for x, in y's (broadcast) shape, and lets autograd sum it
# down to x's shape, as autograd allows: the values are right, so it passes with a warning about the shape.
_BROADCAST_RETURN = {"NumpyMulCustomOp"}


def _db_fn(info):
    default = type(info).__dataclass_fields__["gradcheck_wrapper"].default
    if info.gradcheck_wrapper.__code__ is default.__code__:
        return info.op  # the op itself: recognised as a custom op (schema names, opcheck)
    return lambda *args, **kwargs: info.gradcheck_wrapper(info.op, *args, **kwargs)


def test_custom_op_db_correct_ops_pass(capfd):
    """PyTorch's custom_op_db (code nobody here wrote): every differentiable sample passes quietly."""
    ops = _custom_op_db()
    assert len(ops) >= 8
    checked = 0
    for info in ops:
        for sample in list(info.sample_inputs("cpu", torch.float64, requires_grad=True))[:3]:
            args = (sample.input, *sample.args)
            report = _check_quietly(capfd, _db_fn(info), *args, **sample.kwargs)
            assert report.passed, (info.name, report)
            if info.name in _BROADCAST_RETURN and any(r.status == "warning" for r in report.results):
                assert any("autograd sums it down, so the values are right" in w for w in report.warnings)
            checked += 1
    assert checked >= 9  # 8 ops, one or two samples each


# Buggy twins of two custom_op_db ops: the math of torch/testing/_internal/custom_op_db.py (PyTorch,
# BSD-3-Clause), numpy kernels and all, each with one planted error in its registered backward.


@torch.library.custom_op(f"{NS}::numpy_mul_bug", mutates_args=())
def numpy_mul_bug(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.tensor(x.detach().cpu().numpy() * y.detach().cpu().numpy(), device=x.device)


numpy_mul_bug.register_fake(lambda x, y: (x * y).contiguous())


def _mul_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _mul_backward_bug(ctx, grad_out):
    x, _y = ctx.saved_tensors
    return grad_out * x, grad_out * x  # BUG: grad_x should be grad_out * y


numpy_mul_bug.register_autograd(_mul_backward_bug, setup_context=_mul_setup)


@torch.library.custom_op(f"{NS}::numpy_cube_bug", mutates_args=())
def numpy_cube_bug(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x_np = x.detach().cpu().numpy()
    return torch.tensor(x_np**3, device=x.device), torch.tensor(3 * x_np**2, device=x.device)


numpy_cube_bug.register_fake(lambda x: (x.clone(), x.clone()))


def _cube_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[1])


def _cube_backward_bug(ctx, grad_out, grad_dx):
    x, dx = ctx.saved_tensors
    return grad_out * dx + 3 * grad_dx * x  # BUG: the derivative of 3x^2 is 6x


numpy_cube_bug.register_autograd(_cube_backward_bug, setup_context=_cube_setup)


def test_custom_op_db_buggy_twins_fail(capfd):
    x, y = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    mul = _check_quietly(capfd, numpy_mul_bug, x, y)
    assert [r.name for r in mul.failures] == ["grad w.r.t. x"]
    cube = _check_quietly(capfd, numpy_cube_bug, x)
    assert [r.name for r in cube.failures] == ["grad of output 1 w.r.t. x"]  # only the second output's term


class _OpModel(torch.nn.Module):
    """A Linear followed by a custom op: verify_module meets the op inside a model."""

    def __init__(self, op):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.op = op

    def forward(self, x):
        return self.op(self.fc(x))


@pytest.mark.parametrize(("op", "bug"), [(mysin, False), (mysin_bug, True)], ids=["correct", "buggy"])
def test_custom_op_inside_a_module_quietly_on_the_loop(capfd, op, bug):
    from torchgradcheck import verify_module

    model = _OpModel(op)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = verify_module(model, torch.nn.MSELoss(), (x, y), mode="full", localise=False)
    assert capfd.readouterr().err == ""
    assert report.passed is not bug, report
    assert report.engine == "loop"
    assert any(f"{NS}::{op._name} has no vmap batching rule" in n for n in report.notes), report.notes


def test_builtin_op_without_a_batching_rule_is_quiet_too(capfd):
    """PyTorch's own ops can lack a batching rule too (the TransformerEncoderLayer eval fast path,
    aten::_transformer_encoder_layer_fwd): no C++ warning reaches stderr, and the verdict stands."""
    from torchgradcheck import verify_module

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    x, y = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    capfd.readouterr()
    report = verify_module(model, torch.nn.MSELoss(), (x, y), mode="full", engine="auto", localise=False)
    assert capfd.readouterr().err == ""
    assert report.passed, report
    assert report.engine != "vmap"

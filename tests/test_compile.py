"""verify_module on torch.compile'd models: clean names, eager numerics, compiled gradients.

Most tests compile with ``backend="aot_eager"``: AOTAutograd traces the forward and the backward
into graphs exactly as Inductor's pipeline does (so a custom Function's backward runs as traced
under compile), without Inductor's C++ code generation, which takes 10-20 s per graph on a busy
2-core machine. One slow test runs the default Inductor backend.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_unchanged, snapshot
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from torchgradcheck import verify_module


class _Tanh(torch.autograd.Function):
    """tanh with a hand-written backward; ``scale`` multiplies the backward (1.0 is right)."""

    generate_vmap_rule = True  # the eager numerical side may then run under vmap

    @staticmethod
    def forward(x, scale, only_compiled):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.scale, ctx.only_compiled = inputs
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        wrong = ctx.scale if (torch.compiler.is_compiling() or not ctx.only_compiled) else 1.0
        return g * (1 - y * y) * wrong, None, None


class Act(nn.Module):
    def __init__(self, scale=1.0, only_compiled=False, forward_off=False):
        super().__init__()
        self.scale, self.only_compiled, self.forward_off = scale, only_compiled, forward_off

    def forward(self, x):
        if self.forward_off and torch.compiler.is_compiling():
            x = x * 1.001  # the compiled forward computes something else
        return _Tanh.apply(x, self.scale, self.only_compiled)


def _model(**act):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), Act(**act), nn.Linear(6, 2))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)


def _compiled(model, backend="aot_eager"):
    return torch.compile(model, backend=backend)


def test_compiled_correct_model_passes_with_the_users_names():
    model = _model()
    compiled = _compiled(model)
    before = snapshot(model)
    report = verify_module(compiled, nn.MSELoss(), _batch(), mode="full")
    assert report.passed, report
    assert [r.name for r in report.results] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert "_orig_mod." not in str(report)
    assert any("torch.compile" in n and "compiled" in n and "eager" in n for n in report.notes), report.notes
    assert_unchanged(before, model)


def test_compiled_wrong_function_backward_fails():
    """A 2 % wrong custom-Function backward, traced into the compiled graph, fails."""
    report = verify_module(_compiled(_model(scale=1.02)), nn.MSELoss(), _batch(), mode="full")
    assert not report.passed
    assert {r.name for r in report.failures} == {"0.weight", "0.bias"}


def test_compiled_only_bug_is_caught_where_eager_passes():
    """The backward is wrong only under compile: eager passes, the compiled model fails.

    This is what proves the analytical side comes from the compiled module (what the user trains
    with), not from the eager one.
    """
    model = _model(scale=1.02, only_compiled=True)
    assert verify_module(model, nn.MSELoss(), _batch(), mode="full").passed
    report = verify_module(_compiled(model), nn.MSELoss(), _batch(), mode="full")
    assert not report.passed
    assert "0.weight" in {r.name for r in report.failures}


def test_compiled_forward_that_differs_from_eager_has_its_own_status():
    report = verify_module(_compiled(_model(forward_off=True)), nn.MSELoss(), _batch(), mode="full")
    assert not report.passed
    row = next(r for r in report.results if r.status == "compiled forward differs")
    assert row.name == "compiled forward"


def test_compiled_check_compiles_once_and_never_under_vmap():
    """One (float64) compile for the analytical side; the numerical side runs eagerly (vmap, no recompiles)."""
    model = _model()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    report = verify_module(compiled, nn.MSELoss(), _batch(), mode="full", engine="vmap")
    assert report.passed, report
    assert report.engine == "vmap"
    assert counter.frame_count == 1


def test_compiled_dtype_none_keeps_float32_and_passes():
    report = verify_module(_compiled(_model()), nn.MSELoss(), _batch(), mode="full", dtype=None)
    assert report.passed, report


def test_compiled_input_gradients_come_from_the_compiled_backward():
    model = _model(scale=1.02, only_compiled=True)
    report = verify_module(_compiled(model), nn.MSELoss(), _batch(), mode="full", inputs=True, params="2.*")
    assert not report.passed
    assert any(r.name.startswith("batch") for r in report.failures), report


@pytest.mark.slow
def test_compiled_with_inductor_buggy_fails():
    """The default backend (Inductor, C++ codegen on CPU, 10-30 s per compile here): a 2 % bug fails.

    Its correct twin is examples/compiled_model.py (run by tests/test_examples.py).
    """
    bad = verify_module(_compiled(_model(scale=1.02), backend="inductor"), nn.MSELoss(), _batch(), mode="full")
    assert not bad.passed
    assert {r.name for r in bad.failures} == {"0.weight", "0.bias"}


# torch's own warning, raised while dynamo traces a module's _call_impl (model.compile()) around an
# autograd.Function, with or without torchgradcheck (a plain forward + backward raises it too).
_DYNAMO_GRAD_WARNING = "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"


@pytest.mark.filterwarnings(_DYNAMO_GRAD_WARNING)
def test_module_compiled_in_place_correct_and_buggy():
    """``model.compile()`` (compiled in place): same split, and the compiled call is put back after."""
    model = _model()
    model.compile(backend="aot_eager")
    impl = model._compiled_call_impl
    report = verify_module(model, nn.MSELoss(), _batch(), mode="full")
    assert report.passed, report
    assert any(n.startswith("model.compile()") for n in report.notes), report.notes
    assert model._compiled_call_impl is impl
    buggy = _model(scale=1.02, only_compiled=True)
    buggy.compile(backend="aot_eager")
    bad = verify_module(buggy, nn.MSELoss(), _batch(), mode="full", localise=True)
    assert not bad.passed
    assert buggy._compiled_call_impl is not None


@pytest.mark.filterwarnings(_DYNAMO_GRAD_WARNING)
def test_module_compiled_in_place_restored_when_the_loss_raises():
    model = _model()
    model.compile(backend="aot_eager")
    impl = model._compiled_call_impl

    def broken(out, target):
        raise RuntimeError("loss failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        verify_module(model, broken, _batch(), mode="full")
    assert model._compiled_call_impl is impl

"""Batch conventions: how ``(model, loss_fn, batch)`` becomes the loss, and ``inputs=True``.

* Tensor -> ``loss_fn(model(x))``; dict -> ``loss_fn(model(**d))``; ``(inputs,)`` -> ``loss_fn(model(inputs))``;
* ``(inputs, target)`` -> ``loss_fn(model(inputs), target)``, a tuple/list ``inputs`` unpacked as ``*args``,
  a dict as ``**kwargs``; ``target=None`` means ``loss_fn(model(inputs))``;
* a namedtuple is one input, passed whole; ``forward=fn`` gets ``(model, batch)``;
* floating tensors reach the model as private float64 copies; integer tensors pass through as they are.
"""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from corpus import HandLinear
from helpers import assert_unchanged, snapshot
from torch import nn

from torchgradcheck import verify_module

ENGINES = ["loop", "auto"]


def _describe(v):
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), v.dtype)
    if isinstance(v, tuple) and hasattr(v, "_fields"):
        return (type(v).__name__, {k: _describe(x) for k, x in v._asdict().items()})
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, [_describe(x) for x in v])
    if isinstance(v, dict):
        return ("dict", {k: _describe(x) for k, x in v.items()})
    return (type(v).__name__, v)


def _floats(v):
    """Every floating tensor inside `v` (any nesting)."""
    if isinstance(v, torch.Tensor):
        return [v] if v.is_floating_point() else []
    if isinstance(v, dict):
        v = list(v.values())
    if isinstance(v, (tuple, list)):
        return [t for x in v for t in _floats(x)]
    return []


class Recorder(nn.Module):
    """Records how it is called; returns a smooth function of its parameter and every float it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.5]))
        self.calls: list = []

    def forward(self, *args, **kwargs):
        self.calls.append((_describe(args), _describe(kwargs)))
        total = sum(torch.tanh(t).sum() for t in _floats([args, kwargs]))
        return self.w * total


class LossRecorder:
    def __init__(self) -> None:
        self.calls: list = []

    def __call__(self, *args):
        self.calls.append(_describe(args))
        out = (args[0] ** 2).sum()
        if len(args) > 1:
            out = out + (args[0] * args[1].sum()).sum()
        return out


F64 = torch.float64


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _check(batch, **kwargs):
    """Run verify_module with recorders (loop engine) and return (model calls, loss calls)."""
    model, loss_fn = Recorder(), LossRecorder()
    before = snapshot(model)
    report = verify_module(model, loss_fn, batch, engine="loop", **kwargs)
    assert report.passed, report
    assert_unchanged(before, model)
    assert len(model.calls) > 2
    assert len(loss_fn.calls) == len(model.calls)
    assert all(c == model.calls[0] for c in model.calls)
    return model.calls[0], loss_fn.calls[0]


def test_batch_tensor_is_the_model_input():
    model_call, loss_call = _check(_t(3, 2))
    assert model_call == (("tuple", [("tensor", (3, 2), F64)]), ("dict", {}))
    assert loss_call == ("tuple", [("tensor", (2,), F64)])


def test_batch_dict_is_keyword_arguments():
    model_call, loss_call = _check({"a": _t(3), "b": _t(2, 2)})
    assert model_call == (("tuple", []), ("dict", {"a": ("tensor", (3,), F64), "b": ("tensor", (2, 2), F64)}))
    assert len(loss_call[1]) == 1


def test_batch_one_tuple_is_inputs_only():
    model_call, loss_call = _check((_t(4),))
    assert model_call == (("tuple", [("tensor", (4,), F64)]), ("dict", {}))
    assert len(loss_call[1]) == 1


@pytest.mark.parametrize("container", [tuple, list])
def test_batch_pair_is_inputs_and_target(container):
    model_call, loss_call = _check(container([_t(4), _t(5)]))
    assert model_call == (("tuple", [("tensor", (4,), F64)]), ("dict", {}))
    assert loss_call == ("tuple", [("tensor", (2,), F64), ("tensor", (5,), F64)])


def test_batch_tuple_inputs_are_unpacked_as_positional_arguments():
    model_call, loss_call = _check(((_t(3), _t(2), _t(1)), _t(2)))
    assert model_call == (
        ("tuple", [("tensor", (3,), F64), ("tensor", (2,), F64), ("tensor", (1,), F64)]),
        ("dict", {}),
    )
    assert len(loss_call[1]) == 2


def test_batch_list_inputs_are_unpacked_as_positional_arguments():
    model_call, _ = _check(([_t(3), _t(2)], _t(2)))
    assert model_call[0] == ("tuple", [("tensor", (3,), F64), ("tensor", (2,), F64)])


def test_batch_dict_inputs_are_keyword_arguments():
    model_call, loss_call = _check(({"a": _t(3), "b": _t(2)}, _t(2)))
    assert model_call == (("tuple", []), ("dict", {"a": ("tensor", (3,), F64), "b": ("tensor", (2,), F64)}))
    assert loss_call[1][1] == ("tensor", (2,), F64)


def test_batch_target_none_calls_loss_with_output_only():
    model_call, loss_call = _check((_t(3), None))
    assert model_call == (("tuple", [("tensor", (3,), F64)]), ("dict", {}))
    assert loss_call == ("tuple", [("tensor", (2,), F64)])


Pair = namedtuple("Pair", ["x", "y"])


def test_batch_namedtuple_is_passed_whole_with_its_type():
    model_call, loss_call = _check(Pair(_t(3), _t(2)))
    assert model_call == (("tuple", [("Pair", {"x": ("tensor", (3,), F64), "y": ("tensor", (2,), F64)})]), ("dict", {}))
    assert len(loss_call[1]) == 1


def test_batch_non_tensor_values_pass_through():
    """Plain Python scalars pass through; a string is an error naming it (issue 9, tests/test_trust_module.py)."""
    model_call, _ = _check({"x": _t(3), "scale": 2.5, "flag": None})
    assert model_call[1] == ("dict", {"x": ("tensor", (3,), F64), "scale": ("float", 2.5), "flag": ("NoneType", None)})


def test_batch_integer_tensors_pass_through_unchanged():
    idx = torch.tensor([1, 0, 2])
    seen = []

    class Emb(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(3, 2)

        def forward(self, i, x):
            seen.append(i)
            return self.emb(i) * x

    model = Emb()
    batch = ((idx, _t(3, 1)), _t(3, 2))
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), batch, engine="loop", mode="full")
    assert report.passed, report
    assert_unchanged(before, model)
    assert all(i is idx for i in seen)
    assert idx.dtype == torch.int64
    assert idx.tolist() == [1, 0, 2]


def test_batch_dtype_none_keeps_float32():
    model_call, _ = _check((_t(3), _t(2)), dtype=None)
    assert model_call[0] == ("tuple", [("tensor", (3,), torch.float32)])


def test_batch_forward_callable_gets_model_and_converted_batch():
    got = []

    def forward(model, batch):
        got.append(_describe(batch))
        return (model(batch["x"]) ** 2).sum() * batch["k"]

    model = Recorder()
    batch = {"x": _t(3), "k": 3, "ids": torch.arange(2)}
    before = snapshot(model)
    report = verify_module(model, batch=batch, forward=forward, mode="full")
    assert report.passed, report
    assert_unchanged(before, model)
    assert got[0] == ("dict", {"x": ("tensor", (3,), F64), "k": ("int", 3), "ids": ("tensor", (2,), torch.int64)})


def test_batch_forward_callable_takes_any_batch():
    model = nn.Linear(3, 1)
    before = snapshot(model)
    report = verify_module(model, batch=None, forward=lambda m, b: m(torch.ones(2, 3)).sum(), mode="full")
    assert report.passed, report
    assert_unchanged(before, model)


@pytest.mark.parametrize("engine", ENGINES)
def test_batch_float_tensors_reach_the_model_in_float64(engine):
    model = nn.Linear(3, 2)
    batch = (_t(4, 3), _t(4, 2))
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), batch, engine=engine, mode="full")
    assert report.passed, report
    assert report.options["dtype"] == "float64"
    assert_unchanged(before, model)


# ------------------------------------------------------------------------------ the caller's batch


def _batch_state(batch):
    return [(id(t), t.dtype, t.requires_grad, t.grad, t.data_ptr(), t.clone()) for t in _floats(batch)]


def _assert_batch_unchanged(state, batch):
    now = _floats(batch)
    assert len(now) == len(state)
    for (ident, dtype, requires_grad, grad, ptr, values), t in zip(state, now):
        assert (id(t), t.dtype, t.requires_grad, t.grad, t.data_ptr()) == (ident, dtype, requires_grad, grad, ptr)
        assert torch.equal(t, values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inputs", [False, True])
@pytest.mark.parametrize("engine", ENGINES)
def test_batch_caller_tensors_are_never_modified(inputs, engine, dtype):
    x = _t(4, 3, dtype=dtype).requires_grad_(True)
    batch = ({"x": x, "z": _t(4, 3, dtype=dtype)}, _t(4, 2, dtype=dtype))
    state = _batch_state(batch)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, z):
            return self.fc(x * z)

    model = M()
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), batch, inputs=inputs, engine=engine, mode="full")
    assert report.passed, report
    assert_unchanged(before, model)
    _assert_batch_unchanged(state, batch)
    assert x.grad is None
    assert x.dtype == dtype


# ------------------------------------------------------------------------------ inputs=True


def _wrong_input_grad(gx, gw, gb):
    return 1.5 * gx, gw, gb


def _input_bug_model():
    torch.manual_seed(0)
    return nn.Sequential(HandLinear(4, 5, _wrong_input_grad), nn.Tanh(), nn.Linear(5, 2))


@pytest.mark.parametrize("engine", ENGINES)
def test_inputs_false_cannot_see_a_wrong_input_gradient(engine):
    model = _input_bug_model()
    batch = (_t(3, 4), _t(3, 2))
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), batch, engine=engine, mode="full")
    assert report.passed, report
    assert all(r.kind == "parameter" for r in report.results)
    assert_unchanged(before, model)


@pytest.mark.parametrize("engine", ENGINES)
def test_inputs_true_catches_a_wrong_input_gradient(engine):
    model = _input_bug_model()
    batch = (_t(3, 4), _t(3, 2))
    state = _batch_state(batch)
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), batch, inputs=True, engine=engine, localise=False, mode="full")
    assert not report.passed
    assert [(r.name, r.kind, r.status) for r in report.failures] == [("batch[0]", "input", "mismatch")]
    by_name = {r.name: r for r in report.results}
    assert by_name["batch[0]"].failed == 12
    assert by_name["batch[0]"].shape == (3, 4)
    assert by_name["batch[1]"].status == "ok"
    assert "batch[0][" in str(report)
    assert_unchanged(before, model)
    _assert_batch_unchanged(state, batch)


@pytest.mark.parametrize("engine", ENGINES)
def test_inputs_true_passes_a_correct_model_and_names_nested_inputs(engine):
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, a, b, idx):
            return self.fc(torch.tanh(a) * b)[idx]

    model = M()
    batch = ((_t(4, 3), _t(4, 3), torch.tensor([0, 2])), _t(2, 2))
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), batch, inputs=True, engine=engine, mode="full")
    assert report.passed, report
    inputs = [r.name for r in report.results if r.kind == "input"]
    assert inputs == ["batch[0][0]", "batch[0][1]", "batch[1]"]  # the integer index is not a target
    assert_unchanged(before, model)


def test_inputs_true_names_dict_entries():
    model = Recorder()
    report = verify_module(model, LossRecorder(), ({"a": _t(3)}, _t(2)), inputs=True, engine="loop", mode="full")
    assert report.passed, report
    assert [r.name for r in report.results if r.kind == "input"] == ["batch[0]['a']", "batch[1]"]


def test_inputs_true_works_with_a_frozen_model():
    model = _input_bug_model().requires_grad_(False)
    batch = (_t(3, 4), _t(3, 2))
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), batch, inputs=True, localise=False, mode="full")
    assert not report.passed
    assert [r.name for r in report.failures] == ["batch[0]"]
    assert {r.status for r in report.results if r.kind == "parameter"} == {"skipped"}
    assert_unchanged(before, model)


def test_batch_complex_tensors_keep_their_imaginary_part():
    seen = []

    class Spectral(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, z):
            seen.append(z)
            return self.fc(z.real) * self.fc(z.imag)

    torch.manual_seed(0)
    model = Spectral()
    z = torch.randn(4, 3, dtype=torch.complex64)
    before = snapshot(model)
    report = verify_module(model, lambda out: out.sum(), z, engine="loop", mode="full")
    assert report.passed, str(report)
    assert_unchanged(before, model)
    assert seen[0].dtype == torch.complex128
    assert torch.equal(seen[0], z.to(torch.complex128))
    assert not any(r.kind == "input" for r in report.results)

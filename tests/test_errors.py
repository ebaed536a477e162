"""Bad calls raise a TypeError/ValueError subclass that names the argument and the fix.

Every case also checks that the model is exactly as before: an error never leaves it half-changed.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_unchanged, snapshot
from torch import nn

from torchgradcheck import InvalidArgumentError, InvalidArgumentTypeError, TorchGradcheckError, verify_module

PREFIX = r"^verify_module\(model, loss_fn, batch\): "


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).train()
    model[0].weight.grad = torch.full_like(model[0].weight, 0.5)  # stale .grad must survive too
    return model, nn.MSELoss(), (torch.randn(5, 3), torch.randn(5, 2))


def _raises(model, cls, match, *args, **kwargs):
    """Call verify_module(model, *args, **kwargs), expect `cls` matching `match`, model unchanged."""
    before = snapshot(model)
    with pytest.raises(cls, match=match) as info:
        verify_module(model, *args, **kwargs)
    assert isinstance(info.value, TorchGradcheckError)
    assert_unchanged(before, model)
    return info.value


def test_error_classes_are_builtin_subclasses():
    assert issubclass(InvalidArgumentError, ValueError)
    assert issubclass(InvalidArgumentTypeError, TypeError)
    assert not issubclass(InvalidArgumentError, TypeError)


def test_verify_module_rejects_non_module():
    with pytest.raises(
        InvalidArgumentTypeError,
        match=PREFIX + r"expected a torch\.nn\.Module but got model=.*"
        r"\(type=function\); to check a plain function use verify_function",
    ):
        verify_module(lambda x: x, nn.MSELoss(), (torch.randn(2, 3), torch.randn(2, 3)))


def test_verify_module_rejects_module_class_instead_of_instance():
    with pytest.raises(InvalidArgumentTypeError, match=r"expected a torch\.nn\.Module .*\(type=type\)"):
        verify_module(nn.Linear, nn.MSELoss(), torch.randn(2, 3))


def test_verify_module_rejects_non_callable_loss_fn():
    model, _, batch = _setup()
    _raises(
        model,
        InvalidArgumentTypeError,
        PREFIX + r"loss_fn must be callable \(e\.g\. nn\.MSELoss\(\)\) but got loss_fn=3; or pass forward=",
        3,
        batch,
    )


def test_verify_module_rejects_non_callable_forward():
    model, _, batch = _setup()
    _raises(
        model,
        InvalidArgumentTypeError,
        PREFIX + r"forward= must be a callable \(model, batch\) -> loss, got 3",
        None,
        batch,
        forward=3,
    )


def test_verify_module_rejects_non_scalar_loss():
    model, _, batch = _setup()
    _raises(
        model,
        InvalidArgumentError,
        PREFIX + r"the loss has shape \(5, 2\), not a scalar; reduce it yourself \(e\.g\. reduction='mean' or "
        r"\.sum\(\)\)",
        nn.MSELoss(reduction="none"),
        batch,
    )


def test_verify_module_rejects_one_element_non_scalar_loss():
    """A (1,)-shaped loss is not silently squeezed."""
    model, _, batch = _setup()
    _raises(
        model,
        InvalidArgumentError,
        r"the loss has shape \(1,\), not a scalar",
        lambda out, t: ((out - t) ** 2).sum().reshape(1),
        batch,
    )


def test_verify_module_rejects_python_float_loss():
    model, _, batch = _setup()
    _raises(
        model,
        InvalidArgumentError,
        PREFIX + r"the loss is a Python float \(.*\), which carries no gradient; return the tensor itself "
        r"\(no \.item\(\)\)",
        lambda out, t: ((out - t) ** 2).mean().detach().item(),
        batch,
    )


def test_verify_module_rejects_non_tensor_loss():
    model, _, batch = _setup()
    _raises(
        model,
        InvalidArgumentError,
        PREFIX + r"the loss is a list, not a torch\.Tensor",
        lambda out, t: [((out - t) ** 2).mean()],
        batch,
    )


def test_verify_module_rejects_integer_loss():
    model, _, batch = _setup()
    _raises(
        model,
        InvalidArgumentError,
        r"the loss has dtype torch\.int64; it must be a real floating scalar",
        lambda out, t: torch.tensor(3),
        batch,
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_verify_module_rejects_non_finite_loss(bad):
    model, _, batch = _setup()
    _raises(
        model,
        InvalidArgumentError,
        PREFIX + r"the loss is -?(nan|inf) \(not finite\) at the unperturbed point",
        lambda out, t: ((out - t) ** 2).mean() + bad,
        batch,
    )


@pytest.mark.parametrize("where", [0, 1])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_verify_module_rejects_non_finite_batch(where, bad):
    model, loss_fn, batch = _setup()
    batch = list(batch)
    batch[where] = batch[where].clone()
    batch[where][1, 1] = bad
    error = _raises(
        model,
        InvalidArgumentError,
        PREFIX
        + rf"the loss is -?(nan|inf) \(not finite\) at the unperturbed point; batch\[{where}\] hold\(s\) NaN/Inf",
        loss_fn,
        tuple(batch),
    )
    assert "torch.nan_to_num" in str(error)  # non-finite elements are legal; a non-finite loss is not


def test_verify_module_rejects_non_finite_in_dict_batch():
    torch.manual_seed(0)
    model = nn.Bilinear(3, 3, 1)
    batch = {"input1": torch.randn(4, 3), "input2": torch.full((4, 3), float("nan"))}
    _raises(
        model, InvalidArgumentError, r"not finite.*batch\['input2'\] hold\(s\) NaN/Inf", lambda out: out.sum(), batch
    )


def test_verify_module_rejects_model_without_trainable_parameters():
    model, loss_fn, batch = _setup()
    model.requires_grad_(False)
    _raises(
        model,
        InvalidArgumentError,
        PREFIX + r"the model has no trainable floating parameters to check \(skipped: .*'0\.weight', 'frozen'.*\); "
        r"set requires_grad=True, or pass inputs=True",
        loss_fn,
        batch,
    )


def test_verify_module_rejects_model_without_parameters():
    _raises(
        nn.Tanh(),
        InvalidArgumentError,
        r"no trainable floating parameters to check \(skipped: none\)",
        lambda out: out.sum(),
        torch.randn(3),
    )


@pytest.mark.parametrize("eps", [0, 0.0, -1e-6, float("nan"), float("inf")])
def test_verify_module_rejects_non_positive_eps(eps):
    model, loss_fn, batch = _setup()
    _raises(
        model,
        InvalidArgumentError,
        r"^verify_module: eps=.* must be finite and > 0; pass a relative step such as eps=1e-6, or leave eps unset",
        loss_fn,
        batch,
        eps=eps,
    )


@pytest.mark.parametrize("eps", [1, 1.0, 5.0])
def test_verify_module_rejects_eps_of_one_or_more(eps):
    model, loss_fn, batch = _setup()
    _raises(
        model,
        InvalidArgumentError,
        r"eps=.* is a relative step and must be < 1; pass a relative step such as",
        loss_fn,
        batch,
        eps=eps,
    )


@pytest.mark.parametrize("eps", ["1e-6", True, [1e-6]])
def test_verify_module_rejects_non_number_eps(eps):
    model, loss_fn, batch = _setup()
    _raises(
        model,
        InvalidArgumentTypeError,
        r"expected a number for eps= but got .* \(type=\w+\); pass a relative step",
        loss_fn,
        batch,
        eps=eps,
    )


@pytest.mark.parametrize("name", ["rtol", "atol"])
@pytest.mark.parametrize("value", [-1e-3, float("nan"), -float("inf")])
def test_verify_module_rejects_negative_tolerances(name, value):
    model, loss_fn, batch = _setup()
    _raises(
        model,
        InvalidArgumentError,
        rf"^verify_module: {name}=.* must be finite and >= 0; pass e\.g\. {name}=",
        loss_fn,
        batch,
        **{name: value},
    )


def test_verify_module_accepts_zero_tolerances():
    model, loss_fn, batch = _setup()
    before = snapshot(model)
    report = verify_module(model, loss_fn, batch, rtol=0, atol=0)
    assert report.passed, report
    assert_unchanged(before, model)


@pytest.mark.parametrize(
    ("option", "suggestion"),
    [("rtoll", "rtol"), ("epsilon", "eps"), ("param", "params"), ("input", "inputs"), ("engin", "engine")],
)
def test_verify_module_rejects_unknown_option_with_suggestion(option, suggestion):
    model, loss_fn, batch = _setup()
    _raises(
        model,
        InvalidArgumentTypeError,
        rf"^verify_module: unknown option {option}=1\. Did you mean {suggestion}=\? Valid options are \[",
        loss_fn,
        batch,
        **{option: 1},
    )


def test_verify_module_rejects_unknown_option_without_close_match():
    model, loss_fn, batch = _setup()
    error = _raises(
        model,
        InvalidArgumentTypeError,
        r"unknown option colour='red'\. Valid options are \[",
        loss_fn,
        batch,
        colour="red",
    )
    assert "Did you mean" not in str(error)


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex128, "float64", 64])
def test_verify_module_rejects_bad_dtype(dtype):
    model, loss_fn, batch = _setup()
    _raises(
        model,
        InvalidArgumentError,
        r"^verify_module: dtype=.* is not supported; use one of \['torch\.float64', .*\], or dtype=None",
        loss_fn,
        batch,
        dtype=dtype,
    )


def test_verify_module_rejects_bad_engine():
    model, loss_fn, batch = _setup()
    _raises(
        model,
        InvalidArgumentError,
        r"unknown engine='fast'; valid options are \['auto', 'vmap', 'loop', 'cone'\]",
        loss_fn,
        batch,
        engine="fast",
    )


@pytest.mark.parametrize("seed", [1.5, "0", True])
def test_verify_module_rejects_bad_seed(seed):
    model, loss_fn, batch = _setup()
    _raises(model, InvalidArgumentTypeError, r"seed=.* must be an int, e\.g\. seed=0", loss_fn, batch, seed=seed)


def test_verify_module_rejects_non_bool_inputs():
    model, loss_fn, batch = _setup()
    _raises(model, InvalidArgumentTypeError, PREFIX + r"inputs= must be True or False, got 1", loss_fn, batch, inputs=1)


def test_verify_module_rejects_params_matching_nothing():
    model, loss_fn, batch = _setup()
    _raises(
        model,
        InvalidArgumentError,
        PREFIX + r"params='encoder\.\*' matches no parameter; names are \['0\.weight', '0\.bias', ",
        loss_fn,
        batch,
        params="encoder.*",
    )


def test_verify_module_rejects_one_bad_pattern_among_good_ones():
    model, loss_fn, batch = _setup()
    _raises(
        model,
        InvalidArgumentError,
        r"params='3\.wieght' matches no parameter",
        loss_fn,
        batch,
        params=["0.*", "3.wieght"],
    )


def test_verify_module_rejects_params_of_wrong_type():
    model, loss_fn, batch = _setup()
    _raises(
        model,
        InvalidArgumentTypeError,
        r"params= takes parameter names or glob patterns \(a str or a list of str\), got 3",
        loss_fn,
        batch,
        params=3,
    )


def test_verify_module_rejects_lazy_module():
    model = nn.Sequential(nn.LazyLinear(2))
    with pytest.raises(
        InvalidArgumentError, match=PREFIX + r"the model has uninitialized \(lazy\) parameters; run one forward first"
    ):
        verify_module(model, nn.MSELoss(), (torch.randn(4, 3), torch.randn(4, 2)))
    # the snapshot helper cannot read uninitialized parameters; check what it can't
    assert isinstance(model[0].weight, nn.parameter.UninitializedParameter)
    assert model[0].weight.grad is None


@pytest.mark.parametrize("size", [0, 3, 4])
def test_verify_module_rejects_batch_tuple_of_wrong_length(size):
    model, loss_fn, (x, y) = _setup()
    _raises(
        model,
        InvalidArgumentError,
        PREFIX + rf"batch is a tuple of {size} items; expected a Tensor, a dict, \(inputs,\) or "
        r"\(inputs, target\); "
        r"fix the batch, or pass forward=",
        loss_fn,
        (x, y, y, y)[:size],
    )


def test_verify_module_accepts_long_tuple_with_forward():
    """forward= takes any batch, so a 3-tuple is fine there."""
    model, loss_fn, (x, y) = _setup()
    before = snapshot(model)
    report = verify_module(model, batch=(x, y, 2.0), forward=lambda m, b: b[2] * loss_fn(m(b[0]), b[1]))
    assert report.passed, report
    assert_unchanged(before, model)


def test_verify_module_rejects_missing_batch():
    model, loss_fn, _ = _setup()
    _raises(
        model, InvalidArgumentError, PREFIX + r"no batch was given \(batch=None\); pass the model's inputs", loss_fn
    )


def test_verify_module_rejects_loss_that_does_not_require_grad():
    model, _, batch = _setup()
    _raises(
        model,
        InvalidArgumentError,
        PREFIX + r"the loss does not require grad: nothing connects it to the checked parameters",
        lambda out, t: ((out - t) ** 2).mean().detach(),
        batch,
    )


def test_verify_module_lets_model_errors_through_unchanged():
    """A forward that crashes is the user's error: its message reaches the caller, and the model is restored."""
    model, loss_fn, (_, y) = _setup()
    x = torch.randn(5, 7)  # before the snapshot: drawing it advances the RNG
    before = snapshot(model)
    with pytest.raises((RuntimeError, InvalidArgumentError), match=r"mat1 and mat2 shapes cannot be multiplied"):
        verify_module(model, loss_fn, (x, y))
    assert_unchanged(before, model)


def test_verify_module_model_error_in_own_dtype_propagates_as_is():
    """dtype=None runs the model as it is: its error comes through untouched."""
    model, loss_fn, (_, y) = _setup()
    x = torch.randn(5, 7)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"^mat1 and mat2 shapes cannot be multiplied"):
        verify_module(model, loss_fn, (x, y), dtype=None)
    assert_unchanged(before, model)


def test_verify_module_does_not_blame_dtype_for_a_shape_error():
    model, loss_fn, (_, y) = _setup()
    x = torch.randn(5, 7)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"^mat1 and mat2 shapes cannot be multiplied") as info:
        verify_module(model, loss_fn, (x, y))
    assert_unchanged(before, model)
    assert "dtype=None" not in str(info.value)


def test_verify_module_params_may_name_a_tied_parameter_by_any_name():
    torch.manual_seed(0)
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Tanh(), head)
    batch = (torch.randint(0, 5, (4,)), torch.randint(0, 5, (4,)))
    before = snapshot(model)
    report = verify_module(model, nn.CrossEntropyLoss(), batch, params="2.weight")
    assert_unchanged(before, model)
    assert [(r.name, r.status) for r in report.results] == [("0.weight", "ok")]


@pytest.mark.parametrize("params", [[], ()])
def test_verify_module_rejects_empty_params(params):
    model, loss_fn, batch = _setup()
    _raises(
        model,
        InvalidArgumentError,
        r"^verify_module: params=(\[\]|\(\)) selects nothing; pass parameter names or glob patterns .*or leave "
        r"params=None",
        loss_fn,
        batch,
        params=params,
    )

"""Bugs next to the gradient: accumulation, zero at init (after_steps), second order, losses that differentiate.

Each check gets a planted bug that must fail and its correct twin that must pass; the model must come
back bit-exactly from every one of them.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_unchanged, snapshot
from torch import nn

from torchgradcheck import InvalidArgumentError, InvalidArgumentTypeError, verify_module

# ---------------------------------------------------------------- gradient accumulation


class _LinearOverwrites(torch.autograd.Function):
    """x @ w.T whose backward *assigns* w.grad instead of returning the gradient (bug)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        ctx.w = w
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        ctx.w.grad = g.t() @ x  # overwrites whatever .grad held: gradient accumulation is lost
        return g @ w, None


class _LinearReturns(torch.autograd.Function):
    """The correct twin: returns the weight's gradient and lets autograd accumulate it."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.t() @ x


class HandLinear(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(torch.randn(3, 4) / 2)

    def forward(self, x):
        return self.fn.apply(x, self.weight)


def _batch():
    return torch.randn(8, 4), torch.randn(8, 3)


@pytest.mark.parametrize(("fn", "passes"), [(_LinearOverwrites, False), (_LinearReturns, True)])
def test_accumulation_backward_that_assigns_grad_fails(fn, passes):
    model, batch = nn.Sequential(HandLinear(fn), nn.Tanh()), _batch()
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), batch, mode="full")
    assert report.passed == passes, report
    row = report.results[0]
    if passes:
        assert row.status == "ok"
    else:
        assert row.status == "does not accumulate"
        assert "overwrites .grad" in row.note
        assert "does not accumulate" in str(report)
    assert_unchanged(before, model)


class HookLinear(nn.Module):
    """A hand-written backward through a tensor hook that assigns weight.grad (bug) or adds to it."""

    def __init__(self, adds: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4) / 2)
        self.adds = adds

    def forward(self, x):
        out = x @ self.weight.detach().t()  # the weight's gradient comes from the hook below
        if torch.is_grad_enabled():
            out.requires_grad_(True)
            out.register_hook(lambda g: self._write(g.t() @ x))
        return out

    def _write(self, grad):
        w = self.weight
        w.grad = grad if (w.grad is None or not self.adds) else w.grad + grad


@pytest.mark.parametrize(("adds", "passes"), [(False, False), (True, True)])
def test_accumulation_hand_written_backward_in_a_hook(adds, passes):
    model, batch = nn.Sequential(HookLinear(adds), nn.Tanh()), _batch()
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), batch, mode="full")
    assert report.passed == passes, report
    assert report.results[0].status == ("ok" if passes else "does not accumulate")
    assert_unchanged(before, model)


def test_accumulation_benign_post_accumulate_hook_passes():
    model, batch = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), _batch()
    norms = []
    model[0].weight.register_post_accumulate_grad_hook(lambda p: norms.append(float(p.grad.norm())))
    report = verify_module(model, nn.MSELoss(), batch, mode="full")
    assert report.passed, report
    assert len(norms) >= 2  # once per backward: the check's backward and the accumulation backward
    assert norms[1] == pytest.approx(2 * norms[0], rel=1e-12)


def test_accumulation_can_be_turned_off_and_costs_one_backward():
    model, batch = nn.Sequential(HandLinear(_LinearOverwrites)), _batch()
    report = verify_module(model, nn.MSELoss(), batch, mode="full", accumulation=False)
    assert report.passed  # the one backward is right: only the accumulation check sees this bug
    on = verify_module(model, nn.MSELoss(), batch, mode="full")
    assert "accumulation" in str(on)
    assert "accumulation=on (+1 backward)" in str(on)


# ---------------------------------------------------------------- zero at init: after_steps


class _AdapterTanh(torch.autograd.Function):
    """tanh whose backward is `scale` times the true derivative (scale 1.03: a 3 % bug)."""

    @staticmethod
    def forward(ctx, x, scale):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y) * ctx.scale, None


class LoRALinear(nn.Module):
    """A frozen base layer plus a LoRA adapter B @ act(A x), with B initialised to zero."""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float) -> None:
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False)
        self.A = nn.Parameter(torch.randn(rank, d_in) / d_in**0.5)
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        self.scale = scale

    def forward(self, x):
        return self.base(x) + _AdapterTanh.apply(x @ self.A.t(), self.scale) @ self.B.t()


def _lora(scale):
    return LoRALinear(6, 4, 2, scale), (torch.randn(16, 6), torch.randn(16, 4))


def test_after_steps_lora_bug_hidden_at_init_warns():
    model, batch = _lora(1.03)
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), batch, mode="full")
    assert report.passed  # nothing fails at B = 0 ...
    assert any("A" in w and "after_steps" in w for w in report.warnings), report.warnings  # ... but it says so
    assert "WARNING" in report.headline()
    assert_unchanged(before, model)


@pytest.mark.parametrize(("scale", "passes"), [(1.03, False), (1.0, True)])
def test_after_steps_lora_bug_found_after_three_steps(scale, passes):
    model, batch = _lora(scale)
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), batch, mode="full", after_steps=3)
    assert report.passed == passes, report
    status = {r.name: r.status for r in report.results}
    assert status["A"] == ("ok" if passes else "mismatch")
    assert any("3 SGD step(s)" in n for n in report.notes)
    assert not any("after_steps" in w for w in report.warnings)
    assert_unchanged(before, model)  # the model itself was never stepped


def test_after_steps_with_an_optimizer_factory():
    model, batch = _lora(1.03)
    before = snapshot(model)
    report = verify_module(
        model, nn.MSELoss(), batch, mode="full", after_steps=2, optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05)
    )
    assert not report.passed
    assert any("Adam" in n for n in report.notes)
    assert_unchanged(before, model)


def test_after_steps_bad_arguments():
    model, batch = _lora(1.0)
    before = snapshot(model)
    with pytest.raises(InvalidArgumentTypeError, match="after_steps="):
        verify_module(model, nn.MSELoss(), batch, after_steps=1.5)
    with pytest.raises(InvalidArgumentError, match="after_steps="):
        verify_module(model, nn.MSELoss(), batch, after_steps=-1)
    with pytest.raises(InvalidArgumentTypeError, match="optimizer="):
        verify_module(model, nn.MSELoss(), batch, after_steps=1, optimizer=torch.optim.SGD([torch.zeros(1)], lr=1))
    with pytest.raises(InvalidArgumentError, match="optimizer="):
        verify_module(model, nn.MSELoss(), batch, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    with pytest.raises(InvalidArgumentTypeError, match="optimizer="):
        verify_module(model, nn.MSELoss(), batch, after_steps=1, optimizer=lambda ps: "not an optimizer")
    assert_unchanged(before, model)


# ---------------------------------------------------------------- second order of a module


class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 3 * x * x


class _CubeDetached(_Cube):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 3 * (x * x).detach()  # first order right, second order wrong


class Act(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(x)


@pytest.mark.parametrize(("fn", "passes"), [(_CubeDetached, False), (_Cube, True)])
def test_second_order_detached_backward_fails(fn, passes):
    model = nn.Sequential(nn.Linear(3, 5), Act(fn), nn.Linear(5, 2))
    batch = (torch.randn(8, 3), torch.randn(8, 2))
    before = snapshot(model)
    first = verify_module(model, nn.MSELoss(), batch, mode="full")
    assert first.passed  # the first order is right either way
    assert not any(r.kind == "second order" for r in first.results)
    report = verify_module(model, nn.MSELoss(), batch, mode="full", second_order=True)
    assert report.passed == passes, report
    rows = {r.name: r for r in report.results if r.kind == "second order"}
    assert set(rows) == {"0.weight (Hv)", "0.bias (Hv)", "2.weight (Hv)", "2.bias (Hv)"}
    if not passes:
        assert rows["0.weight (Hv)"].status == "mismatch"
        assert rows["2.weight (Hv)"].status == "ok"  # downstream of the Function: right
    assert_unchanged(before, model)


def test_second_order_not_computable_is_a_note_not_an_error():
    from torch.autograd.function import once_differentiable

    class Once(_Cube):
        @staticmethod
        @once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * 3 * x * x

    model = nn.Sequential(nn.Linear(3, 5), Act(Once), nn.Linear(5, 2))
    report = verify_module(model, nn.MSELoss(), (torch.randn(8, 3), torch.randn(8, 2)), second_order=True)
    rows = [r for r in report.results if r.kind == "second order"]
    assert rows
    assert all(r.status == "inconclusive" for r in rows), report
    assert "once_differentiable" in rows[0].note


# ---------------------------------------------------------------- losses that differentiate inside


class _SoftplusDouble(torch.autograd.Function):
    """softplus whose backward is differentiable (double backward right) or detached (wrong)."""

    @staticmethod
    def forward(ctx, x, detach):
        ctx.save_for_backward(x)
        ctx.detach = detach
        return nn.functional.softplus(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x.detach() if ctx.detach else x)
        return g * s, None


class PinnMLP(nn.Module):
    def __init__(self, detach: bool) -> None:
        super().__init__()
        self.fc1, self.fc2, self.detach = nn.Linear(1, 8), nn.Linear(8, 1), detach

    def forward(self, x):
        return self.fc2(_SoftplusDouble.apply(self.fc1(x), self.detach))


def pinn_loss(model, x):
    """Residual of u'(x) = cos(x) with u(0) = 0: the loss differentiates the model w.r.t. its input."""
    x = x.clone().requires_grad_(True)
    u = model(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    return ((du - torch.cos(x)) ** 2).mean() + model(torch.zeros(1, 1)).pow(2).sum()


@pytest.mark.parametrize(("detach", "passes"), [(True, False), (False, True)])
def test_pinn_loss_that_differentiates_inside(detach, passes):
    model, x = PinnMLP(detach), torch.linspace(-2, 2, 12).unsqueeze(1)
    before = snapshot(model)
    report = verify_module(model, None, x, forward=pinn_loss, mode="full")
    assert report.passed == passes, report
    assert any("grad enabled" in n for n in report.notes)
    if not passes:
        assert {r.name: r.status for r in report.results}["fc1.weight"] == "mismatch"
    assert_unchanged(before, model)


# ---------------------------------------------------------------- command line


def test_cli_after_steps_and_second_order(tmp_path, capsys):
    from torchgradcheck.cli import main

    path = tmp_path / "cases.py"
    path.write_text(
        "import torch\nfrom torch import nn\n"
        "def lin():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), nn.MSELoss(), "
        "(torch.randn(5, 3), torch.randn(5, 2))\n"
    )
    assert main(["check", f"{path}:lin", "--after-steps", "2", "--second-order", "--mode", "full"]) == 0
    out = capsys.readouterr().out
    assert "after_steps=2" in out
    assert "second_order=True" in out
    assert "0.weight (Hv)" in out
    assert "2 SGD step(s)" in out
    assert main(["check", f"{path}:lin", "--no-accumulation", "--json"]) == 0
    assert '"accumulation": "off"' in capsys.readouterr().out


def test_accumulation_backward_that_cannot_run_twice_is_a_note():
    class Frees(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.x = x
            return x * x

        @staticmethod
        def backward(ctx, g):
            x = ctx.x
            del ctx.x  # frees what it kept: a second backward through this graph raises AttributeError
            return 2 * x * g

    model = nn.Sequential(nn.Linear(3, 2), Act(Frees))
    report = verify_module(model, nn.MSELoss(), (torch.randn(4, 3), torch.randn(4, 2)), mode="full")
    assert report.passed, report
    assert any("gradient accumulation not checked" in n for n in report.notes)


class _TanhGrad(torch.autograd.Function):
    """The derivative g * (1 - tanh(x)^2) as a Function, whose own backward (d/dx) is `scale` times right."""

    @staticmethod
    def forward(ctx, x, g, scale):
        ctx.save_for_backward(x, g)
        ctx.scale = scale
        t = torch.tanh(x)
        return g * (1 - t * t)

    @staticmethod
    def backward(ctx, gg):
        x, g = ctx.saved_tensors
        t = torch.tanh(x)
        d = 1 - t * t
        return gg * g * (-2 * t * d) * ctx.scale, gg * d, None


class _TanhTwice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(x)
        ctx.scale = scale
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _TanhGrad.apply(x, g, ctx.scale), None


class PoissonMLP(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.fc1, self.fc2, self.scale = nn.Linear(2, 12), nn.Linear(12, 1), scale

    def forward(self, x):
        return self.fc2(_TanhTwice.apply(self.fc1(x), self.scale))


def poisson_loss(model, x):
    """-laplacian(u) = 1 in the unit square, u = 0 at a boundary point: second derivatives inside the loss."""
    x = x.clone().requires_grad_(True)
    (du,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    lap = sum(torch.autograd.grad(du[:, k].sum(), x, create_graph=True)[0][:, k] for k in range(2))
    return (lap + 1).pow(2).mean() + model(torch.zeros(1, 2)).pow(2).sum()


@pytest.mark.parametrize(("scale", "passes"), [(1.1, False), (1.0, True)])
def test_poisson_loss_wrong_double_backward_baked_into_the_loss(scale, passes):
    """The Laplacian's value itself uses the wrong double backward, so finite differences of the loss
    agree with autograd; the model's own second derivatives w.r.t. its input do not."""
    model, x = PoissonMLP(scale), torch.rand(10, 2)
    before = snapshot(model)
    report = verify_module(model, None, x, forward=poisson_loss, mode="full", localise=False)
    assert report.passed == passes, report
    row = {r.name: r for r in report.results}["model input[0] (Hv)"]
    assert row.status == ("ok" if passes else "mismatch")
    assert_unchanged(before, model)


def test_second_order_relu_exactly_at_a_kink_is_not_a_false_alarm():
    model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():  # unit 0's pre-activation is exactly 0 for the first sample
        model[0].weight.copy_(torch.tensor([[1.0], [0.5]]))
        model[0].bias.copy_(torch.tensor([-1.0, 0.3]))
    batch = (torch.tensor([[1.0], [2.0], [-1.0]]), torch.randn(3, 1))
    report = verify_module(model, nn.MSELoss(), batch, mode="full", second_order=True, localise=False)
    assert report.passed, report
    assert {r.status for r in report.results if r.kind == "second order"} <= {"ok", "inconclusive"}

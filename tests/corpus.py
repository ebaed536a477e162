"""The corpus: planted bugs and tricky-but-correct models, each a factory returning (model, loss_fn, batch).

Every `BUGS` entry must fail with default options and every `CORRECT` entry must pass; the state
snapshot must be unchanged after each. Add a case here whenever a feature lands.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class _Linear(torch.autograd.Function):
    """x @ w.T + b with a hand-written backward; `bug` edits (grad_x, grad_w, grad_b)."""

    @staticmethod
    def forward(ctx, x, w, b, bug):
        ctx.save_for_backward(x, w)
        ctx.bug = bug
        return x @ w.T + b

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx, gw, gb = g @ w, g.T @ x, g.sum(0)
        if ctx.bug is not None:
            gx, gw, gb = ctx.bug(gx, gw, gb)
        return gx, gw, gb, None


class HandLinear(nn.Linear):
    def __init__(self, n_in, n_out, bug=None):
        super().__init__(n_in, n_out)
        self.bug = bug

    def forward(self, x):
        return _Linear.apply(x, self.weight, self.bias, self.bug)


class _Scale(torch.autograd.Function):
    """y = x * c, with the backward using a rounded constant."""

    @staticmethod
    def forward(ctx, x, c, c_backward):
        ctx.c = c_backward
        return x * c

    @staticmethod
    def backward(ctx, g):
        return g * ctx.c, None, None


def _one_element(gx, gw, gb):
    gw = gw.clone()
    gw[3, 7] *= 1.01
    return gx, gw, gb


def mlp(bug=None, sizes=(40, 50, 10), batch=16) -> tuple:
    """Hand-written-backward first layer (2,000 weights), tanh, Linear; cross-entropy."""
    model = nn.Sequential(HandLinear(sizes[0], sizes[1], bug), nn.Tanh(), nn.Linear(sizes[1], sizes[2]))
    x = torch.randn(batch, sizes[0])
    y = torch.randint(0, sizes[2], (batch,))
    return model, nn.CrossEntropyLoss(), (x, y)


def one_element_wrong():
    """One weight element among 2,000 has a 1 % error."""
    return mlp(_one_element)


def rounded_constant():
    """Backward multiplies by 0.7071 where the forward uses sqrt(0.5): a uniform 1.5e-5 relative error."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(20, 20)

        def forward(self, x):
            return _Scale.apply(torch.tanh(self.fc(x)), 0.5**0.5, 0.7071)

    return M(), lambda out: (out**2).sum(), torch.randn(8, 20)


def tiny_gradients(bug=True):
    """Gradients of magnitude ~1e-8, 10 % wrong in the hand-written backward of the first layer."""
    model, _, (x, y) = mlp((lambda gx, gw, gb: (gx, gw * 1.1, gb)) if bug else None, sizes=(10, 12, 3))
    return model, lambda out, t: 1e-8 * F.cross_entropy(out, t), (x, y)


def cut_off():
    """A misplaced .detach() cuts the first layer off: .grad stays None but the loss depends on it."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)).detach())

    return M(), nn.MSELoss(), (torch.randn(5, 6), torch.randn(5, 2))


def doubling_hook():
    """A tensor hook on a parameter doubles its gradient: loss.backward() writes a wrong .grad."""
    model, loss, batch = mlp(None, sizes=(6, 7, 3))
    model[2].weight.register_hook(lambda g: 2 * g)
    return model, loss, batch


def wrong_module_backward_hook():
    """A full backward hook that scales grad_input by 0.9 on the middle activation."""
    model, loss, batch = mlp(None, sizes=(6, 7, 3))
    model[1].register_full_backward_hook(lambda mod, gin, gout: (gin[0] * 0.9,))
    return model, loss, batch


BUGS: dict[str, Callable[[], tuple]] = {
    "one_element_wrong": one_element_wrong,
    "rounded_constant": rounded_constant,
    "tiny_gradients": tiny_gradients,
    "cut_off": cut_off,
    "doubling_hook": doubling_hook,
    "wrong_module_backward_hook": wrong_module_backward_hook,
}

# ---------------------------------------------------------------------------------------- correct


def correct_mlp():
    return mlp(None)


def offset_loss():
    """A constant offset of 1e6 on the loss: cancellation noise ~1e-4 must not fail it."""
    model, _, batch = mlp(None, sizes=(10, 12, 3))
    return model, lambda out, t: 1e6 + F.cross_entropy(out, t), batch


def tiny_gradients_correct():
    return tiny_gradients(bug=False)


def zero_gradients():
    """The first layer sees an all-zero input: its weight gradient is exactly zero."""
    model, loss, (x, y) = mlp(None, sizes=(6, 7, 3))
    return model, loss, (torch.zeros_like(x), y)


def unused_parameter():
    """A registered parameter the forward never touches: .grad None, numerically zero."""
    model, loss, batch = mlp(None, sizes=(6, 7, 3))
    model.register_parameter("spare", nn.Parameter(torch.randn(4)))
    return model, loss, batch


def dropout_train():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.GELU(), nn.Linear(16, 4)).train()
    return model, nn.CrossEntropyLoss(), (torch.randn(10, 8), torch.randint(0, 4, (10,)))


def batchnorm_train():
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).train()
    return model, nn.MSELoss(), (torch.randn(7, 5), torch.randn(7, 2))


def tied_weights():
    emb = nn.Embedding(11, 6)
    head = nn.Linear(6, 11, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Tanh(), head)
    x = torch.randint(0, 11, (9,))
    return model, nn.CrossEntropyLoss(), (x, torch.randint(0, 11, (9,)))


def sparse_embedding():
    model = nn.Sequential(nn.Embedding(12, 5, sparse=True), nn.Flatten(), nn.Linear(15, 2))
    return model, nn.MSELoss(), (torch.randint(0, 12, (4, 3)), torch.randn(4, 2))


def float32_model():
    model, loss, batch = mlp(None, sizes=(6, 7, 3))
    return model.float(), loss, batch


def conv_net():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    return model, nn.CrossEntropyLoss(), (torch.randn(3, 2, 6, 6), torch.randint(0, 2, (3,)))


def identity_hook():
    """A parameter hook that only observes: the gradient is unchanged and must pass."""
    model, loss, batch = mlp(None, sizes=(6, 7, 3))
    seen = []
    model[0].weight.register_hook(lambda g: seen.append(g.dtype))
    return model, loss, batch


CORRECT: dict[str, Callable[[], tuple]] = {
    "correct_mlp": correct_mlp,
    "offset_loss": offset_loss,
    "tiny_gradients_correct": tiny_gradients_correct,
    "zero_gradients": zero_gradients,
    "unused_parameter": unused_parameter,
    "dropout_train": dropout_train,
    "batchnorm_train": batchnorm_train,
    "tied_weights": tied_weights,
    "sparse_embedding": sparse_embedding,
    "float32_model": float32_model,
    "conv_net": conv_net,
    "identity_hook": identity_hook,
}

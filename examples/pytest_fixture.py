"""The `gradcheck` pytest fixture (the plugin is registered when torchgradcheck is installed).

Run it with pytest (``python -m pytest examples/pytest_fixture.py``); run as a script, it runs pytest on
itself.
"""

import sys

import pytest
import torch
from torch import nn


class MyLayer(nn.Module):
    """A residual block with a hand-written activation gradient (correct)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class MyFunction(torch.autograd.Function):
    """x * w (w broadcast over the batch), its backward written by hand."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, (g * x).sum(0)  # w was broadcast over the batch: sum its gradient back


torch.manual_seed(0)
x, y = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6)
w = torch.randn(6, requires_grad=True)


def test_my_layer_gradients(gradcheck):
    gradcheck(MyLayer(), nn.MSELoss(), (x, y))  # returns the Report; raises on mismatch
    gradcheck.function(MyFunction.apply, x, w)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))

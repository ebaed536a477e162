"""Gradient accumulation: a backward that assigns w.grad instead of returning the gradient.

One backward is right, so a gradient check passes it; a second backward (gradient accumulation,
micro-batches) replaces .grad instead of adding to it. verify_module runs one extra backward by
default and catches it (accumulation=False turns that off).
"""

import torch
from torch import nn

from torchgradcheck import verify_module

torch.manual_seed(0)


class LinearAssignsGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        ctx.w = w
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        ctx.w.grad = g.t() @ x  # bug: assigns .grad; should `return g @ w, g.t() @ x`
        return g @ w, None


class HandLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4) / 2)

    def forward(self, x):
        return LinearAssignsGrad.apply(x, self.weight)


model = nn.Sequential(HandLinear(), nn.Tanh())
batch = (torch.randn(8, 4), torch.randn(8, 3))
report = verify_module(model, nn.MSELoss(), batch, mode="full", localise=False)
print(report.headline())
print(report.table())
print(report.results[0].note)

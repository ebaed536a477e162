"""A hand-written Swish whose backward is 10 % off for x > 2: the check fails and names the module."""

import torch
from torch import nn

from torchgradcheck import verify_module


class Swish(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return g * s * (1 + x * (1 - s)) * torch.where(x > 2, 0.9, 1.0)  # bug: 10 % off for x > 2


class Act(nn.Module):
    def forward(self, x):
        return Swish.apply(x)


torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), Act(), nn.Linear(32, 4))
x, y = 2 * torch.randn(64, 16), torch.randint(0, 4, (64,))  # inputs large enough that some x > 2

report = verify_module(model, nn.CrossEntropyLoss(), (x, y))
print(report)
assert not report.passed  # the planted bug is caught

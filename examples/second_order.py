"""Second order of a module: a custom Function whose backward detaches its input.

Its first derivative is right, so a first-order check passes. Its double backward (gradient
penalties, Hessian-vector products) is wrong: second_order=True checks Hessian-vector products
of the loss against finite differences of the gradient and names the tensors.
"""

import torch
from torch import nn

from torchgradcheck import verify_module

torch.manual_seed(0)


class Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 3 * (x * x).detach()  # bug: .detach() cuts the second derivative


class Act(nn.Module):
    def forward(self, x):
        return Cube.apply(x)


model = nn.Sequential(nn.Linear(3, 5), Act(), nn.Linear(5, 2))
batch = (torch.randn(8, 3), torch.randn(8, 2))
print(verify_module(model, nn.MSELoss(), batch, mode="full").headline())
report = verify_module(model, nn.MSELoss(), batch, mode="full", second_order=True, localise=False)
print(report.headline())
print(report.table())

"""A loss that differentiates inside: a physics-informed residual u'(x) = cos(x), u(0) = 0.

The loss calls torch.autograd.grad(..., create_graph=True), so its gradient w.r.t. the weights
goes through the activation's double backward: the first-order check of this loss is a
second-order check of the model. The perturbed losses are evaluated with grad enabled (noted).
"""

import torch
from torch import nn

from torchgradcheck import verify_module

torch.manual_seed(0)


class Softplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, detach):
        ctx.save_for_backward(x)
        ctx.detach = detach
        return nn.functional.softplus(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x.detach() if ctx.detach else x)  # detach=True: double backward wrong
        return g * s, None


class MLP(nn.Module):
    def __init__(self, detach: bool) -> None:
        super().__init__()
        self.fc1, self.fc2, self.detach = nn.Linear(1, 16), nn.Linear(16, 1), detach

    def forward(self, x):
        return self.fc2(Softplus.apply(self.fc1(x), self.detach))


def pinn_loss(model, x):
    x = x.clone().requires_grad_(True)
    u = model(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    return ((du - torch.cos(x)) ** 2).mean() + model(torch.zeros(1, 1)).pow(2).sum()


x = torch.linspace(-2, 2, 32).unsqueeze(1)
for detach in (False, True):
    report = verify_module(MLP(detach), None, x, forward=pinn_loss, mode="full", localise=False)
    print(f"detach={detach}: {report.headline()}")
print(*report.notes, sep="\n")

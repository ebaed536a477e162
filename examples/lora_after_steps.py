"""Zero at init: a LoRA adapter with B = 0 hides a 3 % bug in its activation's backward.

At initialisation A's gradient is exactly 0 on both sides (B = 0 blocks it): the check passes and
warns that nothing was tested for A. Three optimizer steps later (on a private copy: the model is
never stepped) the bug shows.
"""

import torch
from torch import nn

from torchgradcheck import verify_module

torch.manual_seed(0)


class AdapterTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y) * 1.03  # bug: 3 % off


class LoRALinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int) -> None:
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False)  # frozen pretrained weight
        self.A = nn.Parameter(torch.randn(rank, d_in) / d_in**0.5)
        self.B = nn.Parameter(torch.zeros(d_out, rank))  # LoRA's zero init

    def forward(self, x):
        return self.base(x) + AdapterTanh.apply(x @ self.A.t()) @ self.B.t()


model = LoRALinear(6, 4, rank=2)
batch = (torch.randn(16, 6), torch.randn(16, 4))

at_init = verify_module(model, nn.MSELoss(), batch, mode="full")
print(at_init.headline())
print(at_init.table())

later = verify_module(model, nn.MSELoss(), batch, mode="full", after_steps=3, localise=False)
print(later.headline())
print(later.table())
print(*later.notes, sep="\n")

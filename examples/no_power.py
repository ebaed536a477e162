"""Never OK without power: noise from Python's `random` swamps the gradient, so nothing was tested."""

import random

import torch
from torch import nn

from torchgradcheck import verify_module


class Jittery(nn.Module):
    """A forward with noise outside torch's RNG (the check re-seeds torch, not Python's random)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) * (1 + 1e-4 * random.random())


torch.manual_seed(0)
random.seed(0)
x, y = torch.randn(5, 4), torch.randn(5, 3)

report = verify_module(Jittery(), nn.MSELoss(), (x, y), localise=False)
print(report)
assert not report.passed  # not a pass: a backward 2x wrong would look the same

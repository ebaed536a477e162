"""Quickstart: a correct model passes (README, first example)."""

import torch
from torch import nn

from torchgradcheck import verify_module

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))

report = verify_module(model, nn.CrossEntropyLoss(), (x, y))
print(report)
report.assert_passed()  # in tests: raises an AssertionError that carries the whole table

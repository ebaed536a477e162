"""verify_module on a torch.compile'd model: your parameter names, the compiled backward checked."""

# example: slow (one Inductor compile, 10-30 s on a 2-core CPU)

import torch
from torch import nn

from torchgradcheck import verify_module

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
compiled = torch.compile(model)  # what you train with
x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))

report = verify_module(compiled, nn.CrossEntropyLoss(), (x, y), mode="full")
print(report)
assert report.passed, report

"""A factory for the command line: ``torchgradcheck check examples/cli_factory.py:factory``.

Run as a script, it runs that command and prints what it prints.
"""

import subprocess
import sys

import torch
from torch import nn


def factory():
    """Return (model, loss_fn, batch) for `torchgradcheck check`."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    return model, nn.CrossEntropyLoss(), (torch.randn(10, 8), torch.randint(0, 3, (10,)))


if __name__ == "__main__":
    command = [sys.executable, "-m", "torchgradcheck", "check", f"{__file__}:factory", "--mode", "full"]
    done = subprocess.run(command, capture_output=True, text=True)
    print(done.stdout, end="")
    sys.exit(done.returncode)

"""The embedded demo: a correct model passes, the same model with a planted wrong backward fails."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["demo_cases"]


class _SiLU(torch.autograd.Function):
    """SiLU with a hand-written backward; `slip=True` drops a term of the derivative for x > 2."""

    @staticmethod
    def forward(ctx, x, slip):
        ctx.save_for_backward(x)
        ctx.slip = slip
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        d = s * (1 + x * (1 - s))
        if ctx.slip:  # the kind of bug that still trains: only large activations get a wrong slope
            d = torch.where(x > 2, s, d)
        return g * d, None


class _Act(nn.Module):
    def __init__(self, slip: bool) -> None:
        super().__init__()
        self.slip = slip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SiLU.apply(x, self.slip)


def _model(slip: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32),
        _Act(slip),
        nn.Dropout(0.1),
        nn.Linear(32, 32),
        nn.LayerNorm(32),
        _Act(slip),
        nn.Linear(32, 4),
    )


def demo_cases() -> list[tuple[str, nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor], bool]]:
    """(title, model, loss_fn, batch, expected verdict) for the correct and the buggy model."""
    gen = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(64, 16, generator=gen)
    y = torch.randint(0, 4, (64,), generator=gen)
    return [
        (
            "a correct MLP with a hand-written SiLU backward, dropout on",
            _model(False),
            nn.CrossEntropyLoss(),
            (x, y),
            True,
        ),
        ("the same MLP whose SiLU backward is wrong for x > 2", _model(True), nn.CrossEntropyLoss(), (x, y), False),
    ]

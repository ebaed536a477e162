"""Deep models for localisation: each factory returns (model, loss_fn, batch, expected culprit or None).

A block is ``x + drop(norm(act(fc(x))))`` with a custom-Function activation (`MySwish`); the model
is ``encoder.layers.0..N-1`` then a ``head``. A wrong backward anywhere in the middle makes every
parameter upstream of it look wrong to `verify_module`; localisation must name the culprit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from corpus import HandLinear
from torch import nn


class _SwishFn(torch.autograd.Function):
    """x * sigmoid(x) with a hand-written backward; ``bug`` drops the ``x * s * (1 - s)`` term."""

    @staticmethod
    def forward(ctx, x, bug):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        slope = s if ctx.bug else s * (1 + x * (1 - s))
        return g * slope, None


class MySwish(nn.Module):
    """A parameter-free activation module whose forward calls a custom autograd.Function."""

    def __init__(self, bug: bool = False) -> None:
        super().__init__()
        self.bug = bug

    def forward(self, x):
        return _SwishFn.apply(x, self.bug)


class Block(nn.Module):
    def __init__(self, width: int, act_bug: bool = False, linear_bug=None, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = HandLinear(width, width, linear_bug) if linear_bug is not None else nn.Linear(width, width)
        self.act = MySwish(act_bug)
        self.norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x):
        return x + self.drop(self.norm(self.act(self.fc(x))))


class Encoder(nn.Module):
    def __init__(self, blocks: list[Block]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(blocks)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class DeepNet(nn.Module):
    def __init__(
        self,
        depth: int = 8,
        width: int = 12,
        classes: int = 3,
        *,
        act_bug_at: int | None = None,
        linear_bug_at: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        blocks = [
            Block(
                width,
                act_bug=i == act_bug_at,
                linear_bug=_weight_grad_2pc if i == linear_bug_at else None,
                dropout=dropout,
            )
            for i in range(depth)
        ]
        self.encoder = Encoder(blocks)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.encoder(x))


def _weight_grad_2pc(gx, gw, gb):
    return gx, gw * 1.02, gb


def _data(width: int = 12, classes: int = 3, batch: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, width), torch.randint(0, classes, (batch,))


def deep_buggy_activation():
    """8 blocks; block 3's parameter-free activation has a wrong backward."""
    return DeepNet(act_bug_at=3), nn.CrossEntropyLoss(), _data(), "encoder.layers.3.act"


def deep_buggy_linear():
    """8 blocks; block 5's hand-written Linear returns a weight gradient 2 % too large."""
    return DeepNet(linear_bug_at=5), nn.CrossEntropyLoss(), _data(), "encoder.layers.5.fc"


def deep_dropout_buggy_activation():
    """8 blocks with train-mode dropout (p=0.2); block 4's activation has a wrong backward."""
    return DeepNet(act_bug_at=4, dropout=0.2).train(), nn.CrossEntropyLoss(), _data(), "encoder.layers.4.act"


def deep_correct():
    """8 correct blocks, every activation a custom Function: nothing to localise."""
    return DeepNet(), nn.CrossEntropyLoss(), _data(), None


def deep_dropout_correct():
    return DeepNet(dropout=0.2).train(), nn.CrossEntropyLoss(), _data(), None


DEEP: dict[str, Callable[[], tuple]] = {
    "deep_buggy_activation": deep_buggy_activation,
    "deep_buggy_linear": deep_buggy_linear,
    "deep_dropout_buggy_activation": deep_dropout_buggy_activation,
    "deep_correct": deep_correct,
    "deep_dropout_correct": deep_dropout_correct,
}

"""Benchmark the cost of the gradient-accumulation check (one extra backward) on the 100k-parameter MLP.

In one run, on the same model and batch (MLP 256-256-128-10, batch 16, cross-entropy, float64):

* one forward + backward, and one extra backward through the retained graph (what the check adds),
  medians of 50 repetitions;
* ``verify_module`` with ``accumulation=True`` (the default) and ``accumulation=False``, in
  directional mode (a fixed plan, so the two runs do the same work), medians of 5;
* ``torch.autograd.gradcheck(fast_mode=True)`` on the same model, for scale (it has no such check).

Before timing, the verdicts are checked: the correct model passes with the check on, and a
Function that assigns ``w.grad`` instead of returning it fails only with the check on.

    python benchmarks/bench_accumulation.py
    pytest benchmarks/bench_accumulation.py -m benchmark     # the verdict check only
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from torchgradcheck import verify_module

pytestmark = pytest.mark.benchmark(group="accumulation")


def _mlp100k() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    sizes = (256, 256, 128, 10)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]), (torch.randn(16, 256), torch.randint(0, 10, (16,)))


class _AssignsGrad(torch.autograd.Function):
    """x @ w.T whose backward assigns w.grad (the bug the check exists for)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        ctx.w = w
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        ctx.w.grad = g.t() @ x
        return g @ w, None


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(10, 256) / 16)

    def forward(self, x):
        return _AssignsGrad.apply(x, self.weight)


def _median(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def test_bench_accumulation_verdicts():
    """Benchmark precondition: the correct MLP passes, the grad-assigning Function fails only with the check."""
    model, batch = _mlp100k()
    assert verify_module(model, F.cross_entropy, batch, mode="directional", progress=False).passed
    bug = nn.Sequential(_Layer())
    assert verify_module(bug, F.cross_entropy, batch, mode="full", accumulation=False, progress=False).passed
    assert not verify_module(bug, F.cross_entropy, batch, mode="full", progress=False).passed


def main() -> None:
    torch.set_num_threads(1)
    test_bench_accumulation_verdicts()
    model, (x, y) = _mlp100k()
    model = model.double()
    x = x.double()
    n = sum(p.numel() for p in model.parameters())

    def forward_backward() -> None:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    def extra_backward() -> float:
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward(retain_graph=True)
        t = time.perf_counter()
        loss.backward()
        return time.perf_counter() - t

    for _ in range(5):
        forward_backward()
    fb = _median(forward_backward, 50)
    extra = statistics.median(extra_backward() for _ in range(50))
    model32, batch = _mlp100k()
    on = _median(lambda: verify_module(model32, F.cross_entropy, batch, mode="directional", progress=False), 5)
    off = _median(
        lambda: verify_module(model32, F.cross_entropy, batch, mode="directional", accumulation=False, progress=False),
        5,
    )
    params = dict(model.named_parameters())

    def loss_of(*values: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, dict(zip(params, values)), (x,)), y)

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in params.values())
    fast = _median(lambda: torch.autograd.gradcheck(loss_of, inputs, fast_mode=True), 3)
    print(f"MLP 256-256-128-10, {n:,} parameters, batch 16, float64, 1 thread, torch {torch.__version__}")
    print("| what | time (ms) |")
    print("|---|---|")
    print(f"| one forward + backward | {fb * 1e3:.2f} |")
    print(f"| the extra backward (accumulation check) | {extra * 1e3:.2f} |")
    print(f"| verify_module directional, accumulation=True (default) | {on * 1e3:.1f} |")
    print(f"| verify_module directional, accumulation=False | {off * 1e3:.1f} |")
    print(f"| difference | {(on - off) * 1e3:.1f} ({(on - off) / off * 100:+.1f} %) |")
    print(f"| torch.autograd.gradcheck fast_mode=True (no such check) | {fast * 1e3:.1f} |")


if __name__ == "__main__":
    main()

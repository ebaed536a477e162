"""Benchmark verify_module on a torch.compile'd model against the eager-only check and gradcheck.

For each MLP, in one run: verify_module on the eager model, verify_module on ``torch.compile(model)``
(default Inductor backend; the time includes the one float64 compile the check triggers), the time
of that compile alone (first forward + backward of a fresh compiled float64 copy), and
``torch.autograd.gradcheck`` (slow mode) on the eager and on the compiled model, through a
``functional_call`` adapter over float64 copies of the parameters. Each is also run on the same
model with a planted bug, a tanh Function whose backward is 2 % off (traced into the compiled
graph), and its verdict is reported: a wrong verdict is a failure, never a speed.

Inductor's caches are disabled (``torch._inductor.config.force_disable_caches``), so every compile is
a cold one, as on a user's first run: the timed compiled check pays one full compile.

    python benchmarks/bench_compile.py
    pytest benchmarks/bench_compile.py -m benchmark     # the verdicts, on the small MLP
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call

from torchgradcheck import verify_module

pytestmark = pytest.mark.benchmark(group="compile")


class _Tanh(torch.autograd.Function):
    generate_vmap_rule = True  # so the eager numerical side can use vmap

    @staticmethod
    def forward(x, scale):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.scale = inputs[1]
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y) * ctx.scale, None


class _Act(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Tanh.apply(x, self.scale)


WORKLOADS = {"MLP 4-8-2": (4, 8, 2), "MLP 32-64-64-10": (32, 64, 64, 10)}


def _build(sizes: tuple[int, ...], bug: bool) -> tuple[nn.Module, Any, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(_Act(1.02 if bug else 1.0))
    x, y = torch.randn(64, sizes[0]), torch.randn(64, sizes[-1])
    return nn.Sequential(*layers), nn.MSELoss(), (x, y)


def _timed(fn: Callable[[], bool]) -> tuple[bool, float]:
    start = time.perf_counter()
    passed = fn()
    return passed, time.perf_counter() - start


def _ours(sizes: tuple[int, ...], bug: bool, compiled: bool) -> tuple[bool, float, str]:
    model, loss_fn, batch = _build(sizes, bug)
    torch._dynamo.reset()  # no cache entries (or recompile counts) left from an earlier run
    target = torch.compile(model) if compiled else model
    start = time.perf_counter()
    report = verify_module(target, loss_fn, batch, mode="full", progress=False)
    return report.passed, time.perf_counter() - start, report.engine


def _compile_alone(sizes: tuple[int, ...]) -> float:
    model, loss_fn, (x, y) = _build(sizes, False)
    torch._dynamo.reset()
    compiled = torch.compile(model.double())
    start = time.perf_counter()
    loss_fn(compiled(x.double()), y.double()).backward()
    return time.perf_counter() - start


def _gradcheck(sizes: tuple[int, ...], bug: bool, compiled: bool) -> tuple[bool, float]:
    model, loss_fn, (x, y) = _build(sizes, bug)
    model = model.double()
    torch._dynamo.reset()
    target = torch.compile(model) if compiled else model
    names = [n for n, _ in target.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in target.named_parameters())
    x, y = x.double(), y.double()

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(target, dict(zip(names, ps)), (x,)), y)

    def run() -> bool:
        try:
            return bool(torch.autograd.gradcheck(f, params))
        except RuntimeError:
            return False

    return _timed(run)


def _verdict(passed: bool, bug: bool) -> str:
    right = passed != bug
    return ("pass" if passed else "FAIL") + ("" if right else " (wrong)")


def _warm_up_inductor() -> None:
    """One throwaway compile, untimed: the first in a process also imports Inductor (10-20 s)."""
    tiny = torch.compile(nn.Linear(2, 1).double())
    tiny(torch.zeros(1, 2, dtype=torch.float64)).sum().backward()


def rows(only: str = "") -> list[str]:
    _warm_up_inductor()
    out = [
        "| workload | params | method | engine | time correct (s) | verdict correct | verdict bug |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, sizes in WORKLOADS.items():
        if only not in name:
            continue
        n = sum(p.numel() for p in _build(sizes, False)[0].parameters())
        _ours(sizes, False, compiled=False)  # warm-up (imports, first kernels), untimed
        for label, compiled in (("verify_module, eager model", False), ("verify_module, torch.compile(model)", True)):
            ok, t, engine = _ours(sizes, False, compiled)
            bad, _, _ = _ours(sizes, True, compiled)
            out.append(
                f"| {name} | {n:,} | {label} | {engine} | {t:.2f} | {_verdict(ok, False)} | {_verdict(bad, True)} |"
            )
        alone = _compile_alone(sizes)
        out.append(f"| {name} | {n:,} | one compile alone (float64 forward + backward) | - | {alone:.2f} | - | - |")
        for label, compiled in (("gradcheck slow, eager model", False), ("gradcheck slow, torch.compile(model)", True)):
            ok, t = _gradcheck(sizes, False, compiled)
            bad, _ = _gradcheck(sizes, True, compiled)
            out.append(f"| {name} | {n:,} | {label} | - | {t:.2f} | {_verdict(ok, False)} | {_verdict(bad, True)} |")
    return out


def test_bench_compile_verdicts():
    """The small MLP: every verdict right, eager and compiled (a wrong verdict is a failure, not a speed)."""
    lines = rows(only="4-8-2")
    assert not any("(wrong)" in line for line in lines if "verify_module" in line), "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run only the workloads whose name contains this text")
    args = parser.parse_args()
    import torch._inductor.config

    torch._inductor.config.force_disable_caches = True  # every compile cold (see the docstring)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for line in rows(args.only):
        print(line, flush=True)

"""Benchmark verify_module's modes against torch.autograd.gradcheck (slow and fast mode) on five workloads.

For each workload, in one run on the same model and batch: wall time, loss evaluations, the verdict
on the correct model and on the same model with a planted one-element bug (1 % on element [3, 7] of
the first weight, planted with a custom autograd.Function that both tools see), and the ratio of
the time to that of 2N plain batched forwards (vmap over functional_call: the floor of a full check).
gradcheck is called on ``functional_call`` over the float64 parameters; its exception counts as FAIL.

    python benchmarks/bench_speed.py                 # all workloads, CPU
    python benchmarks/bench_speed.py --device cuda   # on a GPU
    python benchmarks/bench_speed.py --quick         # the 7k-parameter MLP only
    pytest benchmarks -m benchmark                   # quick verdict check of this script
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.utils import parametrize

from torchgradcheck import verify_module

pytestmark = pytest.mark.benchmark(group="speed")


class _OneElementBug(torch.autograd.Function):
    """Identity forward; the backward scales element [3, 7] of the gradient (as rows x rest) by 1.01."""

    generate_vmap_rule = True

    @staticmethod
    def forward(w):
        return w.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g.view(g.shape[0], -1)[3, 7] *= 1.01
        return g


class _Bug(nn.Module):
    def forward(self, w):
        return _OneElementBug.apply(w)


class _HandTanh(torch.autograd.Function):
    """A custom Function with a hand-written backward (old style: not vmap-able, so the loop runs)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _HandTanhModule(nn.Module):
    def forward(self, x):
        return _HandTanh.apply(x)


def _mlp(sizes: tuple[int, ...], act: Callable[[], nn.Module] = nn.Tanh) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1])


@dataclass
class Workload:
    name: str
    make: Callable[[], tuple[nn.Module, Callable[..., Any], tuple[Any, ...]]]
    first: Callable[[nn.Module], nn.Module]  # the layer whose weight gets the planted bug


def _workloads() -> list[Workload]:
    def mlp7k():
        return _mlp((32, 64, 64, 10)), F.cross_entropy, (torch.randn(16, 32), torch.randint(0, 10, (16,)))

    def mlp100k():
        return _mlp((256, 256, 128, 10)), F.cross_entropy, (torch.randn(16, 256), torch.randint(0, 10, (16,)))

    def convbn():
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.BatchNorm2d(8),
            nn.GELU(),
            nn.Conv2d(8, 16, 3),
            nn.BatchNorm2d(16),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(64, 10),
        ).train()
        return model, F.cross_entropy, (torch.randn(8, 3, 12, 12), torch.randint(0, 10, (8,)))

    def transformer():
        # Regress onto a random target: after the final LayerNorm, out.pow(2).mean() would be ~1 whatever
        # the weights, leaving gradients at the noise floor (nothing to check, nothing to catch).
        layer = nn.TransformerEncoderLayer(128, 4, dim_feedforward=256, dropout=0.1, batch_first=True).train()
        return layer, F.mse_loss, (torch.randn(4, 8, 128), torch.randn(4, 8, 128))

    def custom_function():
        model = nn.Sequential(
            nn.Linear(32, 64), _HandTanhModule(), nn.Linear(64, 64), _HandTanhModule(), nn.Linear(64, 10)
        )
        return model, F.cross_entropy, (torch.randn(16, 32), torch.randint(0, 10, (16,)))

    return [
        Workload("MLP 32-64-64-10", mlp7k, lambda m: m[0]),
        Workload("MLP 256-256-128-10", mlp100k, lambda m: m[0]),
        Workload("conv net + BatchNorm (train)", convbn, lambda m: m[0]),
        Workload("TransformerEncoderLayer d128, dropout", transformer, lambda m: m.linear1),
        Workload("MLP with custom Function", custom_function, lambda m: m[0]),
    ]


def _build(w: Workload, device: str, bug: bool) -> tuple[nn.Module, Callable[..., Any], tuple[Any, ...]]:
    torch.manual_seed(0)
    model, loss_fn, batch = w.make()
    if bug:
        parametrize.register_parametrization(w.first(model), "weight", _Bug())
    model = model.to(device)
    batch = tuple(b.to(device) for b in batch)
    return model, loss_fn, batch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _ours(w: Workload, device: str, bug: bool, **options: Any) -> tuple[bool, float, int, str]:
    model, loss_fn, batch = _build(w, device, bug)
    _sync(device)
    start = time.perf_counter()
    report = verify_module(model, loss_fn, batch if len(batch) > 1 else batch[0], progress=False, **options)
    _sync(device)
    return report.passed, time.perf_counter() - start, report.evaluations, report.engine


def _functional(model: nn.Module, loss_fn: Callable[..., Any], batch: tuple[Any, ...]):
    model = model.double()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = tuple(p.detach().clone().requires_grad_() for n, p in model.named_parameters() if p.requires_grad)
    inputs = [b.double() if b.is_floating_point() else b for b in batch]
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def f(*ps: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)  # the same dropout mask in every evaluation, as verify_module does
        state = {**dict(zip(names, ps)), **{n: b.clone() for n, b in buffers.items()}}
        out = functional_call(model, state, (inputs[0],))
        return loss_fn(out, *inputs[1:])

    return f, params, names


def _gradcheck(w: Workload, device: str, bug: bool, fast: bool) -> tuple[bool, float, int]:
    model, loss_fn, batch = _build(w, device, bug)
    f, params, _ = _functional(model, loss_fn, batch)
    calls = [0]

    def counted(*ps: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return f(*ps)

    _sync(device)
    start = time.perf_counter()
    try:
        passed = bool(torch.autograd.gradcheck(counted, params, fast_mode=fast))
    except RuntimeError:
        passed = False
    _sync(device)
    return passed, time.perf_counter() - start, calls[0]


def _floor(
    w: Workload, device: str, chunk_elements: int = 1 << 22, max_chunk: int = 256, sample_chunks: int = 8
) -> tuple[float, str]:
    """Seconds for 2N plain batched forwards: one perturbed copy per row, vmap over functional_call.

    Same chunking as torchgradcheck's vmap engine, nothing else: no seeding, no buffer resets, no
    comparison; the floor any full check through vmap has to pay. Timed on up to `sample_chunks`
    chunks per tensor and scaled to 2N rows. A model vmap cannot run (train-mode BatchNorm updates
    its running stats in place) gets the floor of 2N plain forwards in a loop instead, also sampled.
    """
    model, loss_fn, batch = _build(w, device, False)
    model = model.double()
    inputs = [b.double() if b.is_floating_point() else b for b in batch]
    total = 0.0
    how = "vmap"
    with torch.no_grad():
        for name, p in model.named_parameters():

            def row(q: torch.Tensor, name: str = name) -> torch.Tensor:
                return loss_fn(functional_call(model, {name: q}, (inputs[0],)), *inputs[1:])

            size = max(1, min(max_chunk, chunk_elements // p.numel()))
            rows = p.detach().reshape(1, -1).expand(size, -1).clone().view(size, *p.shape)
            fn = vmap(row, randomness="same")
            try:
                fn(rows)  # warm-up
            except RuntimeError:
                how, size, fn, rows = "loop", 1, row, p.detach().clone()
                fn(rows)
            chunks = -(-2 * p.numel() // size)
            timed = min(chunks, sample_chunks)
            _sync(device)
            start = time.perf_counter()
            for _ in range(timed):
                fn(rows)
            _sync(device)
            total += (time.perf_counter() - start) * chunks / timed
    return total, how


def _verdict(passed: bool, bug: bool) -> str:
    right = passed != bug
    return ("FAIL" if not passed else "pass") + ("" if right else " (wrong)")


def run(device: str = "cpu", quick: bool = False, slow_limit: int = 20_000) -> list[str]:
    """The whole table as a list of markdown lines."""
    return list(rows(device, quick, slow_limit))


def rows(
    device: str = "cpu", quick: bool = False, slow_limit: int = 20_000, only: str = "", full_limit: int = 110_000
) -> Iterator[str]:
    """The table's markdown lines, each as soon as it is measured (`only`: workloads whose name contains it)."""
    yield (
        "| workload | params | method | engine | time correct (s) | evaluations | verdict correct | "
        "verdict bug | time / 2N batched forwards |"
    )
    yield "|---|---|---|---|---|---|---|---|---|"
    for w in _workloads()[:1] if quick else [w for w in _workloads() if only.lower() in w.name.lower()]:
        model, _, _ = _build(w, device, False)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        floor, how = _floor(w, device)
        _ours(w, device, False, mode="directional")  # warm-up: first-call costs of vmap and the ops, untimed
        for label, options in (
            ("torchgradcheck auto (default)", {}),
            ("torchgradcheck full", {"mode": "full"}),
            ("torchgradcheck directional", {"mode": "directional"}),
        ):
            if options.get("mode") == "full" and n > full_limit:
                yield f"| {w.name} | {n:,} | {label} | - | skipped (N > {full_limit:,}) | | | | |"
                continue
            ok, t, evals, engine = _ours(w, device, False, **options)
            bad, _, _, _ = _ours(w, device, True, **options)
            yield (
                f"| {w.name} | {n:,} | {label} | {engine} | {t:.2f} | {evals:,} | {_verdict(ok, False)} | "
                f"{_verdict(bad, True)} | {t / floor:.2f} |"
            )
        for label, fast in (("gradcheck slow", False), ("gradcheck fast", True)):
            if not fast and n > slow_limit:
                yield (f"| {w.name} | {n:,} | {label} | - | skipped (N > {slow_limit:,}) | | | | |")
                continue
            ok, t, evals = _gradcheck(w, device, False, fast)
            bad, _, _ = _gradcheck(w, device, True, fast)
            yield (
                f"| {w.name} | {n:,} | {label} | - | {t:.2f} | {evals:,} | {_verdict(ok, False)} | "
                f"{_verdict(bad, True)} | {t / floor:.2f} |"
            )
        yield (f"| {w.name} | {n:,} | 2N plain forwards (floor) | {how} | {floor:.2f} | {2 * n:,} | | | 1.00 |")


def test_bench_speed_quick_verdicts():
    """Benchmark the 7k MLP quickly; every verdict must be right (a wrong verdict is a failure, not a speed)."""
    lines = run(quick=True)
    assert not any("(wrong)" in line for line in lines if "torchgradcheck" in line), "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--slow-limit",
        type=int,
        default=20_000,
        help="skip gradcheck slow above this many params (it takes minutes there)",
    )
    parser.add_argument("--only", default="", help="run only the workloads whose name contains this text")
    parser.add_argument(
        "--full-limit",
        type=int,
        default=110_000,
        help="skip torchgradcheck's full mode above this many params (minutes on a CPU)",
    )
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available on this machine; run without --device cuda")
    print(
        f"device: {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}), "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    for line in rows(args.device, args.quick, args.slow_limit, args.only, args.full_limit):
        print(line, flush=True)

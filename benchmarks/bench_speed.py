"""Benchmark verify_module's modes and engines against torch.autograd.gradcheck on the same models, in one run.

For each workload, in one process on the same model and batch: wall time, loss evaluations, the
verdict on the correct model and on the same model with a planted one-element bug (1 % on element
[3, 7] of the first weight, planted with a custom autograd.Function that both tools see), the ratio
of the time to the naive floor, and how many times faster than plain gradcheck slow mode it is.

* The naive floor: 2N plain perturbed forwards, batched (vmap over functional_call, the chunking of
  the vmap engine), timed on up to 8 chunks per tensor and scaled; a loop where vmap can't run.
* "gradcheck slow (plain)": what a careful user writes for a model without randomness:
  ``gradcheck(lambda *ps: loss_fn(functional_call(model, dict(zip(names, ps)), x), y), params)``
  over float64 copies of the parameters. "gradcheck slow with reseeding" also calls
  ``torch.manual_seed(0)`` and clones the buffers in every evaluation (what a model with dropout or
  train-mode BatchNorm needs). gradcheck's exception counts as FAIL.
* The key timings (floor, full check on the cone engine and on the vmap engine, plain gradcheck
  slow) are taken `--repeats` times, interleaved, after one untimed warm-up of each; the median is shown.
  The cone engine is named explicitly: under ``engine="auto"`` a check uses it once the plan holds
  100,000 evaluations or ``torch._dynamo`` (which capturing needs, a one-off import) is loaded.

    python benchmarks/bench_speed.py                  # the issue-13 workloads, CPU, 1 thread
    python benchmarks/bench_speed.py --all            # also the older ones (100k MLP, train-mode models)
    python benchmarks/bench_speed.py --device cuda    # on a GPU ("not measured" rows without one)
    python benchmarks/bench_speed.py --quick          # the 6.9k-parameter MLP only
    pytest benchmarks -m benchmark                    # quick verdict check of this script
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
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
    random: bool = False  # dropout or train-mode BatchNorm: plain gradcheck can't check it (no reseeding)
    issue13: bool = True  # one of the issue-13 workloads (the default run)


def _workloads() -> list[Workload]:
    def mlp7k():
        return _mlp((32, 64, 64, 10)), F.cross_entropy, (torch.randn(16, 32), torch.randint(0, 10, (16,)))

    def deep_mlp():
        return _mlp((32, *[64] * 8, 10)), F.cross_entropy, (torch.randn(8, 32), torch.randint(0, 10, (8,)))

    def transformer_stack():
        # dropout=0 (no randomness) in train mode: in eval mode under no_grad torch takes its fused
        # inference kernel, which vmap runs row by row. Regress onto a random target (after the last
        # LayerNorm, out.pow(2).mean() would be ~1 whatever the weights).
        layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        model = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False).train()
        return model, F.mse_loss, (torch.randn(2, 4, 64), torch.randn(2, 4, 64))

    def cnn_eval():
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(128, 10),
        ).eval()
        return model, F.cross_entropy, (torch.randn(8, 3, 12, 12), torch.randint(0, 10, (8,)))

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
        layer = nn.TransformerEncoderLayer(128, 4, dim_feedforward=256, dropout=0.1, batch_first=True).train()
        return layer, F.mse_loss, (torch.randn(4, 8, 128), torch.randn(4, 8, 128))

    def custom_function():
        model = nn.Sequential(
            nn.Linear(32, 64), _HandTanhModule(), nn.Linear(64, 64), _HandTanhModule(), nn.Linear(64, 10)
        )
        return model, F.cross_entropy, (torch.randn(16, 32), torch.randint(0, 10, (16,)))

    return [
        Workload("MLP 32-64-64-10", mlp7k, lambda m: m[0]),
        Workload("deep MLP 32-8x64-10, batch 8", deep_mlp, lambda m: m[0]),
        Workload("transformer stack 4 x d64, dropout 0", transformer_stack, lambda m: m.layers[0].linear1),
        Workload("CNN conv + BatchNorm (eval)", cnn_eval, lambda m: m[0]),
        Workload("MLP 256-256-128-10", mlp100k, lambda m: m[0], issue13=False),
        Workload("conv net + BatchNorm (train)", convbn, lambda m: m[0], random=True, issue13=False),
        Workload("TransformerEncoderLayer d128, dropout", transformer, lambda m: m.linear1, True, False),
        Workload("MLP with custom Function", custom_function, lambda m: m[0], issue13=False),
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
    if bug:
        options.setdefault("localise", False)  # only the verdict counts for the planted bug
    _sync(device)
    start = time.perf_counter()
    report = verify_module(model, loss_fn, batch if len(batch) > 1 else batch[0], progress=False, **options)
    _sync(device)
    return report.passed, time.perf_counter() - start, report.evaluations, report.engine


def _functional(model: nn.Module, loss_fn: Callable[..., Any], batch: tuple[Any, ...], reseed: bool):
    model = model.double()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = tuple(p.detach().clone().requires_grad_() for n, p in model.named_parameters() if p.requires_grad)
    inputs = [b.double() if b.is_floating_point() else b for b in batch]
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def plain(*ps: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, dict(zip(names, ps)), (inputs[0],)), *inputs[1:])

    def reseeding(*ps: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)  # the same dropout mask in every evaluation, as verify_module does
        state = {**dict(zip(names, ps)), **{n: b.clone() for n, b in buffers.items()}}
        out = functional_call(model, state, (inputs[0],))
        return loss_fn(out, *inputs[1:])

    return (reseeding if reseed else plain), params, names


def _gradcheck(w: Workload, device: str, bug: bool, fast: bool, reseed: bool = False) -> tuple[bool, float, int]:
    model, loss_fn, batch = _build(w, device, bug)
    f, params, _ = _functional(model, loss_fn, batch, reseed)
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
    comparison: the naive floor of a full check. Timed on up to `sample_chunks` chunks per tensor
    and scaled to 2N rows. A model vmap cannot run (train-mode BatchNorm updates its running stats in
    place) gets the floor of 2N plain forwards in a loop instead, also sampled.
    """
    model, loss_fn, batch = _build(w, device, False)
    model = model.double()
    inputs = [b.double() if b.is_floating_point() else b for b in batch]
    total = 0.0
    how = "vmap"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap's "performance drop" notice for ops without a batching rule
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


HEADER = (
    "| workload | params | method | engine | time correct (s) | evaluations | verdict correct | verdict bug | "
    "time / naive floor | gradcheck slow (plain) / time |"
)


def run(device: str = "cpu", quick: bool = False, slow_limit: int = 20_000) -> list[str]:
    """The whole table as a list of markdown lines."""
    return list(rows(device, quick, slow_limit, repeats=1))


def _median_interleaved(jobs: dict[str, Callable[[], float]], repeats: int, warm: bool = True) -> dict[str, float]:
    """Each job once untimed (warm-up, if `warm`), then `repeats` rounds of all of them in turn; the median of each."""
    if warm:
        for job in jobs.values():
            job()
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(repeats):
        for key, job in jobs.items():
            times[key].append(job())
    return {k: statistics.median(v) for k, v in times.items()}


def rows(
    device: str = "cpu",
    quick: bool = False,
    slow_limit: int = 20_000,
    only: str = "",
    full_limit: int = 140_000,
    *,
    repeats: int = 3,
    everything: bool = False,
    summary: list[str] | None = None,
) -> Iterator[str]:
    """The table's markdown lines, each as soon as it is measured (`only`: workloads whose name contains it).

    `summary` (if given) receives the ratios the issue-13 acceptance is judged on.
    """
    yield HEADER
    yield "|---|---|---|---|---|---|---|---|---|---|"
    chosen = [w for w in _workloads() if (everything or w.issue13) and only.lower() in w.name.lower()]
    for w in _workloads()[:1] if quick else chosen:
        yield from _workload_rows(w, device, slow_limit, full_limit, repeats, summary)


def _workload_rows(
    w: Workload, device: str, slow_limit: int, full_limit: int, repeats: int, summary: list[str] | None
) -> Iterator[str]:
    """The rows of one workload; the key timings interleaved and repeated."""
    model, _, _ = _build(w, device, False)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    full = n <= full_limit
    slow = n <= slow_limit and not w.random
    info: dict[str, Any] = {}

    def floor_job() -> float:
        info["floor"] = _floor(w, device)
        return info["floor"][0]

    def full_job(engine: str) -> Callable[[], float]:
        def job() -> float:
            ok, t, evals, used = _ours(w, device, False, mode="full", engine=engine)
            info[engine] = (ok, evals, used)
            return t

        return job

    def slow_job() -> float:
        ok, t, evals = _gradcheck(w, device, False, fast=False)
        info["slow"] = (ok, evals)
        return t

    before = "vmap" if not w.random else "auto"  # train-mode models: vmap can't run them, the loop does
    no_vmap = _vmap_refuses(w, device) if before == "vmap" else ""
    jobs: dict[str, Callable[[], float]] = {"floor": floor_job}
    if full:
        jobs["full auto"] = full_job("cone" if not w.random else "auto")
        if before != "auto" and not no_vmap:
            jobs["full vmap"] = full_job(before)
    if slow:
        jobs["slow"] = slow_job
    # Jobs of minutes (N > 50k) are warmed up by a directional check instead of running twice.
    if n > 50_000:
        _ours(w, device, False, mode="directional", engine="cone" if not w.random else "auto")
    med = _median_interleaved(jobs, repeats, warm=n <= 50_000)
    if full and before == "auto":
        med["full vmap"] = med["full auto"]
    floor, how = med["floor"], info["floor"][1]
    plain_slow = med.get("slow")

    def line(label: str, engine: str, t: float, evals: int, ok: bool, bad: bool) -> str:
        speedup = f"{plain_slow / t:.1f}x" if plain_slow else ""
        return (
            f"| {w.name} | {n:,} | {label} | {engine} | {t:.3f} | {evals:,} | {_verdict(ok, False)} | "
            f"{_verdict(bad, True)} | {t / floor:.2f} | {speedup} |"
        )

    _ours(w, device, False, mode="directional")  # warm-up of the cheap modes, untimed
    for label, options in (
        ("torchgradcheck auto (default)", {}),
        ("torchgradcheck directional", {"mode": "directional"}),
    ):
        ok, t, evals, engine = _ours(w, device, False, **options)
        bad, _, _, _ = _ours(w, device, True, **options)
        yield line(label, engine, t, evals, ok, bad)
    now = "cone" if not w.random else "auto"
    for key, label, engine_name in (
        ("full auto", f"torchgradcheck full, engine='{now}'", now),
        ("full vmap", f"torchgradcheck full, engine='{before}' (before)", before),
    ):
        if key not in med:
            why = f"not run: {no_vmap}" if full and no_vmap else f"skipped (N > {full_limit:,})"
            yield f"| {w.name} | {n:,} | {label} | - | {why} | | | | | |"
            continue
        ok, evals, engine = info[engine_name]
        bad, _, _, _ = _ours(w, device, True, mode="full", engine=engine_name)
        yield line(label, engine, med[key], evals, ok, bad)
    if slow:
        ok, evals = info["slow"]
        bad, _, _ = _gradcheck(w, device, True, fast=False)
        yield line("gradcheck slow (plain)", "-", med["slow"], evals, ok, bad)
    else:
        why = "randomness: needs reseeding" if w.random else f"N > {slow_limit:,}"
        yield f"| {w.name} | {n:,} | gradcheck slow (plain) | - | skipped ({why}) | | | | | |"
    if n <= slow_limit:
        ok, t, evals = _gradcheck(w, device, False, fast=False, reseed=True)
        bad, _, _ = _gradcheck(w, device, True, fast=False, reseed=True)
        yield line("gradcheck slow with reseeding", "-", t, evals, ok, bad)
    ok, t, evals = _gradcheck(w, device, False, fast=True, reseed=w.random)
    bad, _, _ = _gradcheck(w, device, True, fast=True, reseed=w.random)
    yield line("gradcheck fast" + (" with reseeding" if w.random else ""), "-", t, evals, ok, bad)
    yield line("2N plain forwards (naive floor)", how, floor, 2 * n, True, True).replace(
        "| pass | pass (wrong) |", "| | |"
    )
    if summary is not None and "full auto" in med:
        text = f"{w.name}: full ({now}) {med['full auto']:.3f} s = {med['full auto'] / floor:.2f}x the naive floor"
        if "full vmap" in med:
            text += f" (engine='{before}': {med['full vmap'] / floor:.2f}x)"
        if plain_slow:
            text += f"; {plain_slow / med['full auto']:.1f}x faster than gradcheck slow (plain)"
        summary.append(text)


def _vmap_refuses(w: Workload, device: str) -> str:
    """Why ``engine="vmap"`` can't check this workload ("" if it can): e.g. an op without a batching rule."""
    from torchgradcheck import InvalidArgumentError

    try:
        _ours(w, device, False, mode="directional", engine="vmap")
    except InvalidArgumentError as exc:
        reason = str(exc).split("is not usable here: ")[-1].split("; use engine=")[0]
        return reason.split(" (torch.library")[0]
    return ""


def not_measured(device: str) -> Iterator[str]:
    """The table's rows when `device` is not available on this machine: the code path exists, no numbers."""
    yield HEADER
    yield "|---|---|---|---|---|---|---|---|---|---|"
    for w in _workloads():
        if w.issue13:
            yield f"| {w.name} | | all methods | | not measured (no {device} device on this machine) | | | | | |"


def test_bench_speed_quick_verdicts():
    """Benchmark the 6.9k MLP quickly; every verdict must be right (a wrong verdict is a failure, not a speed)."""
    lines = run(quick=True)
    assert not any("(wrong)" in line for line in lines if "torchgradcheck" in line), "\n".join(lines)
    assert any("| cone |" in line for line in lines if "engine='cone' |" in line), "\n".join(lines)


def _load() -> str:
    try:
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--all", action="store_true", help="also the older workloads (100k MLP, train-mode models)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the issue-13 setting)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds of the key timings")
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
        default=140_000,
        help="skip torchgradcheck's full mode above this many params (minutes on a CPU)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    name = torch.cuda.get_device_name() if cuda and torch.cuda.is_available() else "CPU"
    print(f"device: {args.device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, {_load()}")
    if cuda and not torch.cuda.is_available():
        for text in not_measured(args.device):
            print(text, flush=True)
        raise SystemExit(0)
    acceptance: list[str] = []
    for text in rows(
        args.device,
        args.quick,
        args.slow_limit,
        args.only,
        args.full_limit,
        repeats=args.repeats,
        everything=args.all,
        summary=acceptance,
    ):
        print(text, flush=True)
    print()
    for text in acceptance:
        print("- " + text)
    print(f"(finished with {_load()})")

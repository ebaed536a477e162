"""Benchmark verify_distributed(split=True): a full check of one replicated MLP on 1 vs 2 gloo ranks (CPU).

Each configuration is spawned fresh (torch.multiprocessing, gloo, file:// rendezvous, one thread per
rank); the time is the check's own (``report.seconds``: the slowest rank, process start excluded), and
the CPU time of the busiest rank's main thread (``time.thread_time``: gloo's own threads excluded),
and the evaluations on the busiest rank. On a machine shared with other jobs the wall times say
little; the evaluation count must halve. Correctness first: every configuration must reach the
expected verdict (the correct MLP passes; the same MLP with one weight gradient 1 % wrong fails on
exactly that element), else the benchmark fails.

Run: ``python -m pytest benchmarks/bench_distributed.py -s`` or ``python benchmarks/bench_distributed.py``.
"""

from __future__ import annotations

import datetime
import pickle
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.benchmark(group="distributed")

SIZES = (32, 64, 64, 10)  # 6,922 parameters: 13,844 perturbed forwards in a full check
BATCH = 16
DEADLINE = 600.0


def _problem(bug: bool) -> tuple[nn.Module, Any, Any]:
    torch.manual_seed(0)  # the same model and batch on every rank
    layers: list[nn.Module] = []
    for a, b in zip(SIZES[:-1], SIZES[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1]).double()
    if bug:  # one weight element's gradient 1 % wrong
        model[0].weight.register_hook(lambda g: g.index_put((torch.tensor(3), torch.tensor(7)), g[3, 7] * 1.01))
    batch = (torch.randn(BATCH, SIZES[0], dtype=torch.float64), torch.randint(0, SIZES[-1], (BATCH,)))
    return model, nn.CrossEntropyLoss(), batch


def _entry(rank: int, world: int, init: str, out: str, engine: str, threads: int, bug: bool) -> None:
    from torchgradcheck import verify_distributed

    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=DEADLINE)
    )
    try:
        model, loss_fn, batch = _problem(bug)
        cpu = time.thread_time()
        report = verify_distributed(model, loss_fn, batch, split=True, engine=engine)
        cpu = time.thread_time() - cpu
    finally:
        dist.destroy_process_group()
    (Path(out) / f"rank{rank}.pkl").write_bytes(pickle.dumps((report, cpu)))


def sharded_check(world: int, engine: str, threads: int = 1, bug: bool = False) -> tuple[Any, float]:
    """The report of rank 0 of a `world`-rank sharded check, and the CPU seconds of the busiest rank."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _entry,
            args=(world, f"file://{tmp}/pg", tmp, engine, threads, bug),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + DEADLINE
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.terminate()
                raise TimeoutError(f"{world} ranks did not finish within {DEADLINE} s")
        outs = [pickle.loads((Path(tmp) / f"rank{r}.pkl").read_bytes()) for r in range(world)]
    return outs[0][0], max(cpu for _, cpu in outs)


def _expect(report: Any, bug: bool) -> None:
    """The verdict of a single process: the correct MLP passes; the bug fails at 0.weight[3, 7]."""
    assert report.passed is not bug, report
    if bug:
        (failure,) = report.failures
        assert failure.name == "0.weight", report
        assert failure.worst[0].index == (3, 7), report


def measure(engine: str) -> list[tuple[int, float, float, int]]:
    """(ranks, wall seconds, CPU seconds of the busiest rank, its evaluations) for 1 and 2 ranks."""
    rows = []
    for world in (1, 2):
        report, cpu = sharded_check(world, engine)
        _expect(report, bug=False)
        note = next(n for n in report.notes if n.startswith("split:"))
        busiest = int(re.search(r"at most ([0-9,]+) evaluations", note)[1].replace(",", ""))
        rows.append((world, report.seconds, cpu, busiest))
    _expect(sharded_check(2, engine, bug=True)[0], bug=True)
    return rows


@pytest.mark.parametrize("engine", ["loop", "auto"])
def test_bench_split_full_check_1_vs_2_ranks(engine):
    """Benchmark a full check of a 6.9k-parameter MLP split over 1 and 2 gloo ranks (speed-up of 2 ranks)."""
    rows = measure(engine)
    print()
    _print(engine, rows)
    # The work of the busiest rank must halve; the times depend on what else the machine runs.
    assert rows[1][3] < 0.55 * rows[0][3], rows


def _print(engine: str, rows: list[tuple[int, float, float, int]]) -> None:
    for world, wall, cpu, busiest in rows:
        print(
            f"engine={engine:5s} ranks={world}  wall {wall:6.2f} s (x{rows[0][1] / wall:.2f})  "
            f"busiest rank CPU {cpu:6.2f} s (x{rows[0][2] / cpu:.2f})  "
            f"{busiest:,} evaluations (x{rows[0][3] / busiest:.2f})"
        )


# ------------------------------------------------------------------ DTensor: tensor parallel and FSDP2


def _dtensor_problem(kind: str, rank: int, world: int, bug: bool) -> tuple[nn.Module, Any, Any]:
    """The same MLP, tensor parallel (Colwise 0, Rowwise 2, layer 4 plain) or FSDP2 (every Linear + root)."""
    from torch.distributed.device_mesh import init_device_mesh

    model, loss_fn, batch = _problem(bug=False)
    mesh = init_device_mesh("cpu", (world,))
    if kind == "tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in (0, 2, 4):
            fully_shard(model[layer], mesh=mesh)
        fully_shard(model, mesh=mesh)
    if bug and rank == 1:  # a bug on one rank only: rank 1 scales its shard's gradient of 0.weight by 1.01
        if kind == "tp":
            model[0].weight.register_hook(lambda g: g * 1.01)
        else:
            model[0].weight.register_post_accumulate_grad_hook(lambda p: p.grad.mul_(1.01))
    return model, loss_fn, batch


def _dtensor_entry(rank: int, world: int, init: str, out: str, kind: str, bug: bool) -> None:
    from torchgradcheck import verify_distributed

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=DEADLINE)
    )
    try:
        model, loss_fn, batch = _dtensor_problem(kind, rank, world, bug)
        report = verify_distributed(model, loss_fn, batch)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    (Path(out) / f"rank{rank}.pkl").write_bytes(pickle.dumps(report))


def dtensor_check(kind: str, bug: bool = False) -> Any:
    """Rank 0's report of a 2-rank check of the DTensor model (`kind` "tp" or "fsdp2")."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _dtensor_entry, args=(2, f"file://{tmp}/pg", tmp, kind, bug), nprocs=2, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + DEADLINE
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.terminate()
                raise TimeoutError(f"the {kind} check did not finish within {DEADLINE} s")
        return pickle.loads((Path(tmp) / "rank0.pkl").read_bytes())


def measure_dtensor() -> list[tuple[str, float, int]]:
    """(what, seconds, evaluations per rank): one process (loop engine), then TP and FSDP2 on 2 ranks."""
    from torchgradcheck import verify_module

    torch.set_num_threads(1)
    model, loss_fn, batch = _problem(bug=False)
    single = verify_module(model, loss_fn, batch, mode="full", engine="loop")
    assert single.passed, single
    rows = [("1 process, plain MLP (loop)", single.seconds, single.evaluations)]
    for kind in ("tp", "fsdp2"):
        report = dtensor_check(kind)
        assert report.passed, report
        buggy = dtensor_check(kind, bug=True)
        assert [f.name for f in buggy.failures] == ["0.weight"], buggy
        assert "failing elements on rank 1 only" in buggy.failures[0].note, buggy
        rows.append((f"2 ranks, {kind} (lockstep)", report.seconds, report.evaluations))
    return rows


def test_bench_dtensor_tp_and_fsdp2():
    """Benchmark the 2-rank DTensor checks (TP, FSDP2) against the single-process loop check of the same MLP."""
    rows = measure_dtensor()
    print()
    _print_dtensor(rows)


def _print_dtensor(rows: list[tuple[str, float, int]]) -> None:
    for what, seconds, evaluations in rows:
        print(f"{what:30s} {seconds:7.2f} s (x{seconds / rows[0][1]:.2f})  {evaluations:,} evaluations per rank")


if __name__ == "__main__":
    if sys.argv[1:] == ["dtensor"]:
        _print_dtensor(measure_dtensor())
    else:
        for eng in sys.argv[1:] or ["loop", "auto"]:
            _print(eng, measure(eng))

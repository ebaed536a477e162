"""Spawn gloo ranks for a test module and collect their pickled outcomes (test_distributed, test_dtensor)."""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch.multiprocessing as mp


def spawn_ranks(
    entry: Callable[..., None], extra: tuple[Any, ...], tmp: Path, world: int, deadline: float, tries: int = 2
) -> list[Any]:
    """``entry(rank, world, init, out, *extra)`` on `world` ranks; each pickles its outcome to ``out/rank{r}.pkl``.

    A rank that aborts in C++ ("terminate called without an active exception", SIGABRT: seen in two
    of six full suite runs on a 2-core machine, never alone) after it wrote its outcome has done its
    work: its outcome counts. An abort before that: the spawn is tried once more.
    """
    for attempt in range(tries):
        where = tmp / f"try{attempt}"
        where.mkdir()
        args = (world, f"file://{where}/pg", str(where), *extra)
        ctx = mp.start_processes(entry, args=args, nprocs=world, join=False, start_method="spawn")
        stop = time.monotonic() + deadline
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > stop:
                    for p in ctx.processes:
                        if p.is_alive():
                            p.terminate()
                    pytest.fail(f"the ranks did not finish within {deadline} s")
        except mp.ProcessExitedException as exc:
            done = all((where / f"rank{r}.pkl").exists() for r in range(world))
            if not done and (exc.signal_name != "SIGABRT" or attempt + 1 == tries):
                raise
            if not done:
                continue
        return [pickle.loads((where / f"rank{r}.pkl").read_bytes()) for r in range(world)]
    raise AssertionError("unreachable: the last try returns or raises")

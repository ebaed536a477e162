"""verify_function on PyTorch's op_db: real ops, correct once-differentiable wrappers, planted mutants.

Run the way PyTorch's own gradient tests run them (`tests/opdb_corpus.py`): every OpInfo with a
float64 backward on CPU, its sample inputs, float64, CPU, after ``import op_db`` has called
``torch.backends.disable_global_flags()``. Default options of `verify_function` throughout.

Classes and what counts:

* real ops, the first ``--samples`` samples of each op: ``pass``; ``FAIL`` is a false alarm, any
  exception other than `InvalidArgumentError` a crash;
* the correct once-differentiable wrapper of the first sample of each op: same;
* planted mutants of that wrapper (`opdb_corpus.mutants`): ``caught`` (the report fails),
  ``missed``, ``vacuous`` (the planted change is nothing or below 1e-12: not counted), crash.

    python benchmarks/opdb_sweep.py [--samples 3] [--ops add,mul] [--out results.jsonl] [--flags-workaround]

One JSON line per check goes to ``--out``; the summary is printed at the end. ``--flags-workaround``
re-allows plain backend-flag assignment after the import (needed by versions that assign
``allow_tf32`` directly, e.g. commit 180b14f, to get any verdict at all).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import opdb_corpus as oc

from torchgradcheck import InvalidArgumentError, verify_function


class _TimeoutError(BaseException):  # not caught by the checker's own `except Exception`
    pass


def _alarm(signum, frame):
    raise _TimeoutError


def _verdict(fn, args, mutant=None, timeout: int = 0) -> tuple[str, str]:
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        return _judge(fn, args)
    except _TimeoutError:
        return "timeout", f"no verdict within {timeout} s"
    finally:
        signal.alarm(0)


def _judge(fn, args) -> tuple[str, str]:
    try:
        # PyTorch's test processes don't turn warnings into errors; the op's own deprecation
        # warnings (torch.cholesky) are not the checker's to silence. Recorded, not raised.
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            report = verify_function(fn, *args)
    except _TimeoutError:
        raise
    except InvalidArgumentError as exc:
        return "invalid", str(exc).splitlines()[0][:300]
    except Exception as exc:  # a crash: the checker raised on legal input
        tb = traceback.extract_tb(exc.__traceback__)
        where = f"{tb[-1].filename.split('/')[-1]}:{tb[-1].lineno}" if tb else ""
        return "crash", f"{type(exc).__name__}: {str(exc).splitlines()[0][:240] if str(exc) else ''} @ {where}"
    rows = "; ".join(f"{r.name}: {r.status}" for r in report.failures)[:400]
    if report.passed:
        return "pass", "; ".join(getattr(report, "warnings", ()))[:400]
    if not report.failures:  # every row passed but nothing had power (a zero gradient): no verdict
        return "nopower", report.headline()[:300]
    return "FAIL", rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--ops", default="")
    p.add_argument("--fast", action="store_true", help="only the ops of opdb_corpus.FAST")
    p.add_argument("--out", default="opdb_results.jsonl")
    p.add_argument("--flags-workaround", action="store_true")
    p.add_argument("--no-mutants", action="store_true")
    p.add_argument("--timeout", type=int, default=120, help="seconds per check (0: none); recorded as timeout")
    p.add_argument("--resume", action="store_true", help="append to --out, skipping the ops already there")
    a = p.parse_args()
    torch.set_num_threads(1)
    ops = oc.load_ops()
    oc.frozen_flags().__enter__()  # as in PyTorch's test processes, for the whole sweep
    if a.flags_workaround:
        torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
    if a.ops:
        wanted = set(a.ops.split(","))
        ops = [op for op in ops if oc.op_id(op) in wanted]
    elif a.fast:
        ops = [op for op in ops if oc.op_id(op) in oc.FAST]
    counts: dict[str, Counter] = {"real": Counter(), "once": Counter(), "mutant": Counter(), "skipped": Counter()}
    start = time.perf_counter()
    done = set()
    if a.resume and Path(a.out).exists():
        done = {json.loads(line)["op"] for line in open(a.out)}
    with open(a.out, "a" if a.resume else "w") as out:

        def record(kind: str, op: str, i: int, verdict: str, detail: str, seconds: float, **extra) -> None:
            counts[kind][verdict] += 1
            row = {"class": kind, "op": op, "sample": i, "verdict": verdict, "detail": detail, "s": round(seconds, 3)}
            out.write(json.dumps({**row, **extra}) + "\n")
            out.flush()
            if verdict not in ("pass", "caught", "vacuous", "invalid", "skipped", "timeout", "nopower"):
                print(f"{kind:7s} {op:40s} #{i} {verdict}: {detail[:200]}", flush=True)

        for n, op in enumerate(ops):
            name = oc.op_id(op)
            if name in done:
                continue
            why = oc.pytorch_skips(op)
            if why is not None:
                record("skipped", name, -1, "skipped", why, 0.0)
                continue
            try:
                sams = oc.samples(op, a.samples)
            except Exception as exc:
                print(f"{name}: no samples ({exc})")
                continue
            first = None
            for i, s in enumerate(sams):
                fn, args = oc.case(op, s)
                if not args:
                    continue
                if first is None:
                    first = (i, fn, args)
                t = time.perf_counter()
                v, d = _verdict(fn, args, timeout=a.timeout)
                record("real", name, i, v, d, time.perf_counter() - t)
            if first is None:
                continue
            i, fn, args = first
            t = time.perf_counter()
            v, d = _verdict(oc.wrapped(fn, len(args), oc.Mutant(None, 0)), args, timeout=a.timeout)
            record("once", name, i, v, d, time.perf_counter() - t)
            if a.no_mutants:
                continue
            for m in oc.mutants(len(args)):
                t = time.perf_counter()
                v, d = _verdict(oc.wrapped(fn, len(args), m), args, m, timeout=a.timeout)
                if v in ("pass", "nopower"):
                    vacuous = m.changed <= 1e-12 * max(1.0, m.scale)
                    v = "vacuous" if vacuous else ("missed" if v == "pass" else "nopower")
                elif v == "FAIL":
                    v = "caught"
                record(
                    "mutant",
                    name,
                    i,
                    v,
                    d,
                    time.perf_counter() - t,
                    mutation=m.mutation,
                    target=m.target,
                    changed=m.changed,
                    scale=m.scale,
                )
            if n % 20 == 0:
                print(
                    f"[{n}/{len(ops)}] {time.perf_counter() - start:.0f}s {dict(counts['real'])} "
                    f"{dict(counts['once'])} {dict(counts['mutant'])}",
                    flush=True,
                )
    print(f"\n{len(ops)} ops, {time.perf_counter() - start:.0f} s")
    for kind, c in counts.items():
        print(kind, dict(c))
    m = counts["mutant"]
    counted = m["caught"] + m["missed"]
    if counted:
        print(f"mutants caught: {m['caught']}/{counted} = {100 * m['caught'] / counted:.2f} %")


if __name__ == "__main__":
    main()

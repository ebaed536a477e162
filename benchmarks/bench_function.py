"""Benchmark verify_function on the planted-bug corpus against torch.autograd.gradcheck (slow and fast mode).

For each case of ``tests/function_corpus.py``: the verdict and wall time of ``verify_function`` with
default options, of ``torch.autograd.gradcheck`` (slow mode) and of ``gradcheck(fast_mode=True)``.
gradcheck gets float64 copies of the same inputs (it wants double precision) and its exception
counts as a FAIL verdict (any other exception,
e.g. its refusal of an expanded input, as "raised"). A verdict is right when a bug FAILs and a correct twin passes.

Run ``python benchmarks/bench_function.py`` for the markdown table (one thread, after an untimed
warm-up run of each case),
or ``pytest benchmarks`` (verify_function's verdicts asserted, gradcheck's recorded).
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.autograd.gradcheck import GradcheckError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from function_corpus import BUGS, CORRECT

from torchgradcheck import verify_function

pytestmark = pytest.mark.benchmark(group="function")

CASES: dict[str, tuple[bool, Callable[[], Any]]] = {
    **{name: (True, factory) for name, factory in BUGS.items()},
    **{name: (False, factory) for name, factory in CORRECT.items()},
}


def _ours(case: str) -> tuple[bool, float]:
    torch.manual_seed(0)
    fn, args, kwargs = CASES[case][1]()
    start = time.perf_counter()
    passed = verify_function(fn, *args, **kwargs).passed
    return passed, time.perf_counter() - start


def _gradcheck(case: str, fast: bool) -> tuple[bool | str, float]:
    torch.manual_seed(0)
    fn, args, kwargs = CASES[case][1]()
    where = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    where_kw = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    inputs = [args[i].detach().double().requires_grad_(True) for i in where]
    inputs += [kwargs[k].detach().double().requires_grad_(True) for k in where_kw]

    def call(*ts: torch.Tensor) -> Any:
        a, kw = list(args), dict(kwargs)
        for i, t in zip(where, ts[: len(where)]):
            a[i] = t
        for k, t in zip(where_kw, ts[len(where) :]):
            kw[k] = t
        return fn(*a, **kw)

    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            passed = bool(torch.autograd.gradcheck(call, inputs, fast_mode=fast))
    except GradcheckError:
        passed = False
    except Exception as exc:  # gradcheck refused the case (e.g. an expanded input): no verdict, counted wrong
        return type(exc).__name__, time.perf_counter() - start  # type: ignore[return-value]
    return passed, time.perf_counter() - start


def _right(passed: bool | str, is_bug: bool) -> bool:
    return isinstance(passed, bool) and passed != is_bug


def _verdict(passed: bool | str, is_bug: bool) -> str:
    if isinstance(passed, str):
        return f"raised {passed}"
    word = "pass" if passed else "FAIL"
    return word + ("" if _right(passed, is_bug) else " (wrong)")


def table() -> str:
    """The markdown table: one row per corpus case, then the count of right verdicts per checker."""
    # One thread: on a loaded 2-core machine two OpenMP threads make a tiny matmul ~1000x slower.
    torch.set_num_threads(1)
    for case in CASES:  # untimed warm-up: torch's first vmap of an op in a process costs up to seconds
        _ours(case)
    rows = [
        "| case | planted bug | verify_function | time | gradcheck | time | gradcheck fast | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    right = [0, 0, 0]
    for case, (is_bug, _) in CASES.items():
        results = [_ours(case), _gradcheck(case, False), _gradcheck(case, True)]
        cells = []
        for j, (passed, seconds) in enumerate(results):
            right[j] += _right(passed, is_bug)
            cells += [_verdict(passed, is_bug), f"{seconds * 1e3:.0f} ms"]
        rows.append(f"| {case} | {'yes' if is_bug else 'no'} | " + " | ".join(cells) + " |")
    n = len(CASES)
    rows.append(f"| **right verdicts** | | **{right[0]}/{n}** | | **{right[1]}/{n}** | | **{right[2]}/{n}** | |")
    return "\n".join(rows)


@pytest.mark.parametrize("case", list(CASES))
def test_bench_verify_function(case):
    """Benchmark verify_function on one corpus case; its verdict must be right."""
    passed, seconds = _ours(case)
    print(f"verify_function {case}: {_verdict(passed, CASES[case][0])} in {seconds * 1e3:.0f} ms")
    assert _right(passed, CASES[case][0])


@pytest.mark.parametrize("fast", [False, True], ids=["slow", "fast"])
@pytest.mark.parametrize("case", list(CASES))
def test_bench_gradcheck(case, fast):
    """Benchmark torch.autograd.gradcheck on one corpus case (the baseline: its verdict is recorded, not asserted)."""
    passed, seconds = _gradcheck(case, fast)
    print(f"gradcheck(fast_mode={fast}) {case}: {_verdict(passed, CASES[case][0])} in {seconds * 1e3:.0f} ms")
    assert isinstance(passed, (bool, str))


def scaling() -> str:
    """A larger correct case (2,576 inputs): the hand-written Linear (loop engine) and F.linear (vmap engine)."""
    import torch.nn.functional as F
    from function_corpus import Linear

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    shapes = [(64, 32), (16, 32), (16,)]
    rows = ["| fn (x 64x32, w 16x32, b 16) | checker | verdict | time |", "|---|---|---|---|"]
    for label, fn in [
        ("Linear.apply (old-style Function)", lambda x, w, b: Linear.apply(x, w, b, None)),
        ("F.linear (built-in)", F.linear),
    ]:
        inputs = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_(True) for s in shapes]
        runs = [
            ("verify_function", lambda fn=fn, inputs=inputs: verify_function(fn, *inputs).passed),
            (
                "verify_function(second_order=False)",
                lambda fn=fn, inputs=inputs: verify_function(fn, *inputs, second_order=False).passed,
            ),
            ("gradcheck", lambda fn=fn, inputs=inputs: torch.autograd.gradcheck(fn, inputs)),
            (
                "gradcheck(fast_mode=True)",
                lambda fn=fn, inputs=inputs: torch.autograd.gradcheck(fn, inputs, fast_mode=True),
            ),
        ]
        for name, run in runs:
            run()  # untimed warm-up (torch's first-use costs)
            start = time.perf_counter()
            ok = run()
            rows.append(f"| {label} | {name} | {'pass' if ok else 'FAIL'} | {time.perf_counter() - start:.2f} s |")
    return "\n".join(rows)


if __name__ == "__main__":
    out = table()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), after one untimed run of each case\n")
    print(out)
    if "--no-scaling" not in sys.argv:
        print()
        print(scaling())

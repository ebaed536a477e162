"""verify_function's verdicts on the published-Function and custom-op corpora, with default options.

For each case of ``tests/published_functions.py`` and ``tests/custom_ops_corpus.py``: the correct
original (must pass; second-order trouble only as warnings) and its buggy twin (must fail). Prints
one line per case and the counts; a crash (any exception) is counted as such.

    python benchmarks/corpus_verdicts.py
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import custom_ops_corpus
import published_functions

from torchgradcheck import verify_function


def verdict(case) -> tuple[str, str]:
    fn, args, kwargs = case
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            report = verify_function(fn, *args, **kwargs)
    except Exception as exc:
        return "crash", f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
    rows = "; ".join(f"{r.name}: {r.status}" for r in report.failures)
    warned = " | ".join(getattr(report, "warnings", ()))
    return ("pass" if report.passed else "FAIL"), (rows + (" WARN: " + warned if warned else ""))[:300]


def main() -> None:
    torch.set_num_threads(1)
    for label, corpus in (("published", published_functions), ("custom_op", custom_ops_corpus)):
        counts: Counter = Counter()
        for name in corpus.CORRECT:
            for kind, factory in (("correct", corpus.CORRECT[name]), ("buggy", corpus.BUGGY[name])):
                v, detail = verdict(factory())
                right = (v == "pass") if kind == "correct" else (v == "FAIL")
                counts[(kind, v)] += 1
                mark = "ok " if right else "BAD"
                print(f"{mark} {label:9s} {kind:7s} {name:22s} {v:5s} {detail}", flush=True)
        print(label, {f"{k}/{v}": n for (k, v), n in sorted(counts.items())}, "of", len(corpus.CORRECT), "pairs\n")


if __name__ == "__main__":
    main()

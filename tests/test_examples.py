"""Every example runs as printed: each ``examples/*.py`` exits 0, and the README shows its real output.

How the README points at an example (HTML comments, invisible on GitHub):

* ``<!-- example: examples/NAME.py -->`` right before a fenced code block: every non-blank line of that
  block must appear in the file, in order (the README may show an excerpt, never code that isn't run);
* ``<!-- output: examples/NAME.py -->`` right before a fenced block: the example's printed output.

Output rule (timings and rounding differ between machines): both sides are normalised, every number
becomes ``N``, runs of spaces become one, and the auto-mode coverage phrase (``16 dirs + 32 elems /
512``, which depends on the machine's speed) becomes ``<coverage>``. Every line of the README block
except ``...`` elisions must then appear in the real output, in order. So a verdict, a status, a
tensor name or a note that differs fails the test; a different timing does not.

Markers in an example file (a comment line): ``# example: not-run-by-test-examples`` (run by its
owner's test instead, e.g. it needs torchrun), ``# example: slow`` (marked slow: several seconds).
Every fenced ``python`` block of the README must be an example (``<!-- example: ... -->``) or say why
not (``<!-- not-an-example: reason -->``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
README = ROOT / "README.md"
SKIP_MARKER = "# example: not-run-by-test-examples"
SLOW_MARKER = "# example: slow"
TIMEOUT = 300

_MARKER = re.compile(r"<!--\s*(example|output|not-an-example):\s*(.*?)\s*-->")
_FENCE = re.compile(r"^(```|~~~)")
_NUMBER = re.compile(r"(?<![A-Za-z_\d])[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:e[-+]?\d+)?")
_COVERAGE = re.compile(r"\b(?:N dirs(?: \+ N elems)?|N elems)(?: \+ N narrowed)?(?: / N)?|\bfull\b")


def _blocks(text: str) -> list[tuple[str, str, str, str]]:
    """(marker kind, marker argument, fence info string, block text) for every marked fenced block."""
    lines = text.splitlines()
    out = []
    pending: tuple[str, str] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _MARKER.search(line)
        if m and not _FENCE.match(line.strip()):
            pending = (m.group(1), m.group(2))
            i += 1
            continue
        if _FENCE.match(line.strip()):
            fence = line.strip()[:3]
            info = line.strip()[3:].strip()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(fence):
                j += 1
            out.append((*(pending or ("", "")), info, "\n".join(lines[i + 1 : j])))
            pending = None
            i = j + 1
            continue
        if line.strip():
            pending = None if not m else pending
        i += 1
    return out


def normalise(line: str) -> str:
    line = " ".join(line.split())
    line = _NUMBER.sub("N", line)
    return _COVERAGE.sub("<coverage>", line)


def missing_lines(shown: str, real: str) -> list[str]:
    """The lines of `shown` (README) that do not appear, in order, in `real` (after normalising)."""
    real_lines = [normalise(x) for x in real.splitlines()]
    missing, at = [], 0
    for line in shown.splitlines():
        want = normalise(line)
        if not want or want == "...":
            continue
        try:
            at = real_lines.index(want, at) + 1
        except ValueError:
            missing.append(line)
    return missing


@cache
def run_example(path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, env=env
    )


def _params():
    for path in EXAMPLES:
        text = path.read_text()
        if SKIP_MARKER in text:
            continue
        marks = [pytest.mark.slow] if SLOW_MARKER in text else []
        yield pytest.param(path, id=path.name, marks=marks)


@pytest.mark.parametrize("path", list(_params()))
def test_example_runs_and_readme_shows_its_output(path):
    done = run_example(path)
    assert done.returncode == 0, f"{path.name} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    rel = path.relative_to(ROOT).as_posix()
    for kind, arg, _, block in _blocks(README.read_text()):
        if kind == "output" and arg == rel:
            missing = missing_lines(block, done.stdout)
            assert not missing, (
                f"README output of {rel} differs from the real output; rerun it and paste:\n"
                + "\n".join(f"  README: {m}" for m in missing)
                + f"\n--- real output ---\n{done.stdout}"
            )


def test_readme_code_blocks_are_examples():
    blocks = _blocks(README.read_text())
    unmarked = [b for kind, _, info, b in blocks if info.startswith("python") and kind == ""]
    assert not unmarked, (
        "README has python blocks that are neither <!-- example: examples/X.py --> nor "
        "<!-- not-an-example: reason -->:\n" + "\n---\n".join(b[:200] for b in unmarked)
    )
    for kind, arg, _, block in blocks:
        if kind not in ("example", "output"):
            continue
        path = ROOT / arg
        assert path.is_file(), f"README points at {arg}, which does not exist"
        if kind == "example":
            code = [x.strip() for x in path.read_text().splitlines()]
            at = 0
            for line in block.splitlines():
                if not line.strip():
                    continue
                try:
                    at = code.index(line.strip(), at) + 1
                except ValueError:
                    pytest.fail(f"README shows a line that {arg} does not run (in this order): {line.strip()!r}")


def test_every_readme_output_belongs_to_a_run_example():
    run = {p.relative_to(ROOT).as_posix() for p in EXAMPLES if SKIP_MARKER not in p.read_text()}
    for kind, arg, _, _ in _blocks(README.read_text()):
        if kind == "output":
            assert arg in run, f"README shows the output of {arg}, which test_examples does not run"


def test_output_rule_catches_a_changed_verdict():
    """The comparison can fail: a different status or verdict word is caught, a different timing is not."""
    real = "verify_module: OK, 4 tensors (676 elements) agree\n  0.weight  (32, 16)  ok  full  8.52e-10\nin 0.60 s"
    assert missing_lines("verify_module: OK, 4 tensors (99 elements) agree\nin 9.99 s", real) == []
    assert missing_lines("  0.weight (32, 16) ok 16 dirs + 32 elems / 512 1.0e-3", real) == []
    assert missing_lines("verify_module: FAILED, 4 tensors (676 elements) agree", real)
    assert missing_lines("  0.weight  (32, 16)  mismatch  full  8.52e-10", real)
    assert missing_lines("  0.bias  (32, 16)  ok  full  8.52e-10", real)

"""What a check found: frozen dataclasses, a compact table for humans, a dict for machines."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ._errors import GradientMismatchError
from ._types import PASSING, Status

__all__ = ["ElementResult", "ParameterResult", "Report", "TensorResult"]

DETAIL_SHOWN = 3  # worst elements listed per failing tensor ...
DETAIL_TENSORS = 3  # ... for this many failing tensors, the worst first


_CAUSES = """\
This usually means one of:
  1. a custom autograd.Function or hand-written backward returns a wrong gradient;
  2. a .detach(), torch.no_grad() or .data cuts a parameter off from the loss (status "no gradient");
  3. the loss is computed differently with and without autograd (e.g. branches on requires_grad).
Elements at kinks (relu/abs/max at 0) are listed as "not differentiable here", never as failures."""

_NO_POWER = """Nothing was tested with power: every tolerance (set by the measured noise of the loss) is large next to
its gradient, or both sides are zero, so a wrong backward could not have failed. This usually means one of:
  1. the forward is nondeterministic beyond torch's RNG (Python's random, numpy, atomics): seed that
     source inside the forward, or make it deterministic;
  2. the loss sits at the noise floor (e.g. the mean of squares right after a LayerNorm): check a loss
     that depends on the parameters (an MSE against a target);
  3. the gradients are exactly zero at this point (e.g. a LoRA B initialised to zero): check after a few
     optimiser steps."""


def _fmt(x: float | None, spec: str = ".2e") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    return format(x, spec)


def _num(x: float) -> str:
    return f"{x:.6g}"


def element_name(name: str, index: tuple[int, ...]) -> str:
    return f"{name}[{', '.join(map(str, index))}]" if index else name


@dataclass(frozen=True)
class ElementResult:
    """One element of a checked tensor: both values, the gap and the tolerance it was judged by."""

    index: tuple[int, ...]
    numerical: float
    analytical: float
    abs_error: float
    tolerance: float

    @property
    def score(self) -> float:
        return self.abs_error / self.tolerance if self.tolerance > 0 else math.inf


@dataclass(frozen=True)
class ElementErrors:
    """Per-element outcome of one tensor, flat float32 numpy arrays, kept only for pictures (`Report.plot`)."""

    abs_error: Any  # |autograd - numerical|
    tolerance: Any
    excluded: Any  # bool: not differentiable here (kink), excluded from the verdict


@dataclass(frozen=True)
class TensorResult:
    """The verdict for one row: a tensor (parameter, batch input, function input) or an extra check of one."""

    name: str
    shape: tuple[int, ...]
    status: Status  # see `_types.Status`; `passed` is true for the statuses in `_types.PASSING`
    relative_error: float | None = None
    max_abs_error: float | None = None
    checked: int = 0  # elements compared
    failed: int = 0  # elements over tolerance
    worst: tuple[ElementResult, ...] = ()  # worst first (by error / tolerance)
    not_differentiable: tuple[tuple[int, ...], ...] = ()  # elements with a kink inside the step
    noise: float | None = None  # measured noise (std) of the loss while moving this tensor
    kind: str = "parameter"
    note: str = ""
    coverage: str = "full"  # "full", or what a cheap mode covered (e.g. "16 directions + 32 elements")
    norms: tuple[float, float] | None = None  # (||a||, ||n||) over the checked elements
    # max |numerical| / tol over the checked elements: a backward wrong by more than 1/power (uniformly)
    # fails in at least one of them; "ok" needs power >= 10 (else "weak"). None: nothing compared.
    power: float | None = None
    # Every element's |a - n| and tolerance, for `Report.plot`; None for large tensors. Not in to_dict/str.
    errors: ElementErrors | None = field(default=None, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        return self.status in PASSING

    @property
    def excluded(self) -> int:
        return len(self.not_differentiable)


ParameterResult = TensorResult  # the old name, kept as an alias


@dataclass(frozen=True, repr=False)
class Report:
    """Everything a check found. ``str(report)`` is a table; ``report.assert_passed()`` raises on failure."""

    call: str
    results: tuple[TensorResult, ...]
    relative_error: float
    # The `_options.CheckOptions` the check ran with (resolved); a plain dict in hand-built reports.
    options: Any = field(default_factory=dict)
    evaluations: int = 0
    seconds: float = 0.0
    engine: str = "loop"
    notes: tuple[str, ...] = ()
    localisation: Any = None  # a `Localisation` when verify_module looked for the wrong backward
    # Full sentences about something the user should act on although the verdict stands (the
    # pytest plugin re-emits them as `GradcheckWarning`). Filled by whichever check finds them.
    warnings: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        """Every tensor passed, and at least one was tested with power (status "ok")."""
        return all(r.passed for r in self.results) and self.powered

    @property
    def powered(self) -> bool:
        """Whether anything could have failed: a tensor "ok", or a finding (a failing tensor)."""
        return any(r.status == "ok" or not r.passed for r in self.results)

    @property
    def failures(self) -> tuple[TensorResult, ...]:
        return tuple(r for r in self.results if not r.passed)

    def __bool__(self) -> bool:  # `assert report` reads naturally; the message is `str(report)`
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (no tensors; non-finite floats as strings)."""

        def clean(x: Any) -> Any:
            if isinstance(x, float) and not math.isfinite(x):
                return str(x)
            if isinstance(x, dict):
                return {str(k): clean(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            return x

        out = asdict(self)
        out["options"] = self.options.to_dict() if hasattr(self.options, "to_dict") else dict(self.options)
        out["passed"] = self.passed
        for res, d in zip(self.results, out["results"]):
            d["passed"] = res.passed
            d.pop("errors", None)  # arrays for pictures, not data for machines
        return clean(out)

    def assert_passed(self) -> None:
        """Raise `GradientMismatchError` (an AssertionError) carrying this table if the check failed."""
        __tracebackhide__ = True
        if not self.passed:
            raise GradientMismatchError(str(self), report=self)

    def __repr__(self) -> str:
        """Short enough for pytest's assertion messages (cut at 240 characters): verdict and worst element."""
        worst = [(r.worst[0].score, r.name, r.worst[0]) for r in self.failures if r.worst]
        where = ""
        if worst:
            _, name, w = max(worst, key=lambda t: t[0])
            where = (
                f"; worst {element_name(name, w.index)}: numerical {_num(w.numerical)}, autograd {_num(w.analytical)}"
            )
        first = getattr(self.localisation, "first_wrong", None)
        blame = f"; first wrong backward: {first}" if first else ""
        text = f"<Report {self.headline()}{where}{blame}>"
        return text if len(text) <= 240 else text[:236] + "...>"

    def headline(self) -> str:
        checked = sum(r.checked for r in self.results)
        tensors = [r for r in self.results if r.status != "skipped"]
        if self.passed:
            ok = (
                f"{self.call}: OK, {len(tensors)} tensor{'' if len(tensors) == 1 else 's'} "
                f"({checked:,} elements) agree "
                f"(relative error {_fmt(self.relative_error)})"
            )
            if self.warnings:
                more = f" (+{len(self.warnings) - 1} more)" if len(self.warnings) > 1 else ""
                ok = ok.replace(": OK,", f": OK — WARNING: {self.warnings[0]}{more};", 1)
            return ok
        if not self.powered:
            counts: dict[str, int] = {}
            for r in tensors:
                counts[r.status] = counts.get(r.status, 0) + 1
            summary = ", ".join(f"{k} {v}" for k, v in counts.items()) or "no tensors"
            return f"{self.call}: NOT PASSED, nothing was tested with power ({checked:,} elements compared; {summary})"
        statuses = {r.status for r in self.failures}
        if statuses <= {"does not accumulate", "backward not repeatable"}:  # the values agree; the sum does not
            return (
                f"{self.call}: FAILED, {' / '.join(sorted(statuses))} for {len(self.failures)} of {len(tensors)} "
                f"tensors (relative error {_fmt(self.relative_error)})"
            )
        return (
            f"{self.call}: FAILED, gradients disagree for {len(self.failures)} of {len(tensors)} tensors "
            f"(relative error {_fmt(self.relative_error)})"
        )

    def table(self) -> str:
        header = (
            "tensor",
            "shape",
            "status",
            "coverage",
            "rel.err",
            "max|a-n|",
            "worst element",
            "numerical",
            "autograd",
            "tol",
        )
        rows = [header]
        for r in self.results:
            w = r.worst[0] if r.worst else None
            rows.append(
                (
                    r.name,
                    str(tuple(r.shape)).replace(",)", ")"),
                    r.status + (f" ({r.failed}/{r.checked})" if r.failed else ""),
                    r.coverage if r.status != "skipped" else "-",
                    _fmt(r.relative_error),
                    _fmt(r.max_abs_error),
                    (element_name("", w.index) or "()") if w else "-",  # "()": the element of a 0-dim tensor
                    _num(w.numerical) if w else "-",
                    _num(w.analytical) if w else "-",
                    _fmt(w.tolerance) if w else "-",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)

    def details(self) -> list[str]:
        lines = []
        failing = sorted(self.failures, key=lambda r: -(r.worst[0].score if r.worst else 0.0))
        shown_failures = {id(r) for r in failing[:DETAIL_TENSORS]}
        for r in self.results:
            if not r.passed and r.worst and id(r) in shown_failures:
                shown = [w for w in r.worst if w.abs_error > w.tolerance][:DETAIL_SHOWN] or list(r.worst[:1])
                lines.append(f"  {r.name}: {r.failed} element(s) over tolerance; worst:")
                for w in shown:
                    lines.append(
                        f"    {element_name(r.name, w.index)}: numerical {_num(w.numerical)}, autograd "
                        f"{_num(w.analytical)}, |diff| {_fmt(w.abs_error)} > tol {_fmt(w.tolerance)}"
                    )
            if r.note:
                lines.append(f"  {r.name}: {r.note}")
            if r.not_differentiable:
                shown = ", ".join(element_name(r.name, i) for i in r.not_differentiable[:3])
                more = f" and {r.excluded - 3} more" if r.excluded > 3 else ""
                lines.append(f"  {r.name}: {r.excluded} element(s) not differentiable here (excluded): {shown}{more}")
        if len(failing) > DETAIL_TENSORS:
            lines.append(f"  ... and {len(failing) - DETAIL_TENSORS} more failing tensor(s): see the table")
        return lines

    def __str__(self) -> str:
        opts = " ".join(f"{k}={v}" for k, v in self.options.items())
        parts = [self.headline(), self.table()]
        if self.localisation is not None:
            parts.append(str(self.localisation))
        parts += [*self.details(), *(f"  WARNING: {w}" for w in self.warnings), *(f"  note: {n}" for n in self.notes)]
        parts.append(
            f"Checked with: {opts} engine={self.engine}; {self.evaluations:,} evaluations in {self.seconds:.2f} s"
        )
        if not self.passed:
            parts.append(_CAUSES if self.powered else _NO_POWER)
        return "\n".join(parts)

    def plot(self, path: str | os.PathLike[str] | None = None, *, max_heatmaps: int = 3) -> Any:
        """Draw error / tolerance of every element per tensor, and a heatmap of |a - n| per failing tensor.

        Needs matplotlib (``pip install torchgradcheck[plot]``). Returns the matplotlib Figure; saves it
        to `path` if given (the suffix picks the format). See `torchgradcheck._plot.plot_report`.
        """
        from ._plot import plot_report

        return plot_report(self, path, max_heatmaps=max_heatmaps)


for _cls in (ElementResult, TensorResult, Report):
    _cls.__module__ = "torchgradcheck"

"""Gradient accumulation: ``.grad`` after two backward passes must be twice ``.grad`` after one.

Gradient accumulation (micro-batches, several losses, ``backward()`` called more than once) relies on
every ``.grad`` being *added to*. A custom backward, a hook or a Function that assigns
``p.grad = ...`` instead silently keeps only the last micro-batch, and the gradient check itself
cannot see it: one backward is right. So `verify_module` runs one more backward through the same
(retained) graph without clearing ``.grad``, and compares:

* ``.grad`` = 2 G (within rounding): accumulates;
* ``.grad`` = G: the second backward *overwrote* ``.grad``: status "does not accumulate";
* anything else: the second backward through the same graph gave another gradient (a backward that
  mutates what it saved on ``ctx``): status "backward not repeatable".

It costs one backward pass (no forward); ``accumulate=False`` turns it off.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._noise import unit_roundoff
from ._params import Target, dense_grad
from ._report import TensorResult

__all__ = ["AccumulationVerdict", "apply_accumulation", "check_accumulation"]

ROUNDING_UNITS = 64.0  # |S - 2G| up to this many unit roundoffs of max|2G| is rounding (atomics, fused adds)


@dataclass(frozen=True)
class AccumulationVerdict:
    """The outcome of the second backward for one tensor (only failures are reported)."""

    status: str  # "does not accumulate" | "backward not repeatable"
    note: str


def check_accumulation(
    loss: torch.Tensor, targets: Sequence[Target], first: dict[str, torch.Tensor | None], rtol: float
) -> tuple[dict[str, AccumulationVerdict], str | None]:
    """Backward through `loss`'s retained graph again, ``.grad`` left in place; judge each target.

    `first` holds each target's flat float64 ``.grad`` after the first backward (None: no gradient).
    Returns the failing targets by name, and a note if the second backward could not run at all
    (then nothing is judged).
    """
    try:
        loss.backward()
    except Exception as exc:  # e.g. a backward that frees what it saved (del ctx.x): the check can't be made
        return {}, f"gradient accumulation not checked: a second backward raised ({str(exc).splitlines()[0][:160]})"
    failures: dict[str, AccumulationVerdict] = {}
    for t in targets:
        g1 = first.get(t.name)
        if g1 is None or t.param is None:
            continue
        total = dense_grad(t.param.grad)
        if total is None:
            failures[t.name] = AccumulationVerdict(
                "does not accumulate", ".grad is None after a second backward (something reset it to None)"
            )
            continue
        failures.update(_judge(t, g1, total, rtol))
    return failures, None


def _judge(t: Target, g1: torch.Tensor, total: torch.Tensor, rtol: float) -> dict[str, AccumulationVerdict]:
    u = unit_roundoff(t.tensor.dtype)
    scale = float(g1.abs().max()) if g1.numel() else 0.0
    tol = rtol * 2 * g1.abs() + ROUNDING_UNITS * u * 2 * scale
    off = (total - 2 * g1).abs()
    if bool((off <= tol).all()):
        return {}
    worst = int(torch.argmax(torch.where(torch.isfinite(off), off - tol, torch.full_like(off, math.inf))))
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), t.shape)) if t.shape else ()
    where = f"[{', '.join(map(str, index))}]"
    evidence = (
        f"{t.name}{where}: .grad after one backward {float(g1[worst]):.6g}, after two {float(total[worst]):.6g} "
        f"(expected {2 * float(g1[worst]):.6g})"
    )
    if bool(((total - g1).abs() <= tol).all()):
        note = (
            f".grad after two backward passes equals .grad after one: something overwrites .grad instead of "
            f"adding to it (p.grad = ... in a custom backward or a hook), which breaks gradient accumulation; "
            f"{evidence}"
        )
        return {t.name: AccumulationVerdict("does not accumulate", note)}
    note = (
        f"a second backward through the same graph did not add the same gradient again (a backward that "
        f"mutates tensors it saved on ctx, or a hook that rewrites .grad); {evidence}"
    )
    return {t.name: AccumulationVerdict("backward not repeatable", note)}


def apply_accumulation(result: TensorResult, verdict: AccumulationVerdict | None) -> TensorResult:
    """`result` with the accumulation verdict on it: the status of a tensor that does not accumulate wins
    (overwriting ``.grad`` also explains a first-order mismatch), the first-order finding stays in the note."""
    if verdict is None:
        return result
    note = verdict.note
    if result.status == "mismatch":
        note += f"; also {result.failed} of {result.checked} element(s) disagree with finite differences"
    elif result.note:
        note += f"; {result.note}"
    return dataclasses.replace(result, status=verdict.status, note=note)

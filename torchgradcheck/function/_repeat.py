"""Is the backward repeatable? Call it twice through the same graph and compare.

A backward that changes state saved on ``ctx`` (``ctx.grad *= grad_output``, ``saved.mul_(g)``) is
right the first time and wrong every time after: gradient accumulation over micro-batches with
``retain_graph=True``, a second ``autograd.grad`` on the same loss, or a double backward all see the
wrong value. The first-order check calls the backward once per output and the determinism check
builds a fresh graph, so neither can see it; this check calls ``autograd.grad`` twice on one graph
(``retain_graph=True``) and fails such a backward with its own status, "backward not repeatable".
"""

from __future__ import annotations

import math

import torch

from .._report import TensorResult
from ._extras import DTYPE, Extras, float_outputs, nan_aware_gap

__all__ = ["repeatability_results"]

_NOTE = (
    "a second backward through the same graph (retain_graph=True) returned other gradients (max difference "
    "{diff:.2e}): the backward changes state it saved on ctx (an in-place op on a saved tensor or on ctx.<attr>); "
    "compute into a new tensor instead (grad = ctx.grad * grad_output, not ctx.grad *= grad_output)"
)


def _twice(ex: Extras) -> dict[tuple[int, str], tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Per (output, slot key): the gradient from the first and from the second backward of one graph."""
    call = ex.call
    values = {key: leaf.detach().clone().requires_grad_(True) for key, leaf in call.leaves().items()}
    keys = list(values)
    got: dict[tuple[int, str], tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    with torch.enable_grad():
        call.prepare(ex.seed)
        outs = dict(float_outputs(call.call_with(values)))
        for k, v in ex.cotangents.items():
            loss = (v * outs[k].to(DTYPE)).sum()
            if not loss.requires_grad:
                continue
            runs = []
            for _ in range(2):  # copy each result at once: the second call may write into the first's tensors
                grads = torch.autograd.grad(loss, [values[q] for q in keys], allow_unused=True, retain_graph=True)
                runs.append([None if g is None else g.detach().to(DTYPE).reshape(-1).clone() for g in grads])
            for q, a, b in zip(keys, *runs):
                got[(k, q)] = (a, b)
    return got


def repeatability_results(ex: Extras, nondet_tol: float) -> list[TensorResult]:
    """A failing row per (output, input) whose gradient changes when the backward runs a second time."""
    rows = []
    for (k, key), (a, b) in _twice(ex).items():
        if (a is None) != (b is None):
            diff = math.inf
        else:
            diff = 0.0 if a is None or b is None or a.numel() == 0 else nan_aware_gap(a, b)
        if diff <= nondet_tol:
            continue
        slot = next(s for s in ex.call.slots if s.key == key)
        rows.append(
            TensorResult(
                name=f"backward twice: {ex.pair(k, slot.name)}",
                shape=tuple(slot.original.shape),
                status="backward not repeatable",
                max_abs_error=diff,
                kind="repeatability",
                note=_NOTE.format(diff=diff),
            )
        )
    if not rows:
        ex.notes.append("repeatability: a second backward through the same graph gives the same gradients")
    return rows

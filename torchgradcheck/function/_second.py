"""Second derivatives for verify_function: the backward itself, checked as a function of the inputs.

For output ``k`` with cotangent ``v_k`` the backward computes ``G(x) = J_k(x)^T v_k``, the gradient
of the scalar ``<v_k, out_k(x)>``. Its Jacobian is that scalar's Hessian ``H``, which is symmetric,
so along a random direction ``d`` (components ``+-max(1, |x|)`` over all inputs at once):

* numerically, ``H d = d/dt G(x + t d)`` by central differences of the backward's own output
  (one forward and one backward per point, about 14 points per output, whatever the input size);
* analytically, ``H d = grad_x <G(x), d>``: autograd differentiating the backward's graph
  (``create_graph=True``), which is what double backward and ``gradgradcheck`` rely on.

Every element of ``H d`` is judged with the tolerance model of the first derivatives (measured noise
per element, second look at ``+-2h``). This catches a backward that uses ``.detach()``-ed saved inputs,
``torch.no_grad()`` or ``.data``: its first derivatives are right, its second derivatives are not.
The first derivatives must pass first (then ``G`` is the true gradient and ``H`` symmetric).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .._report import TensorResult
from ._extras import DTYPE, Directional, Extras, direction, float_outputs, judge_directional

__all__ = ["check_second_order", "second_order_warnings"]

_CUT_OFF = (
    "autograd cannot differentiate the backward w.r.t. this input, but its result depends on it: "
    "the backward cuts it off (.detach(), torch.no_grad() or .data on a saved tensor); mark the "
    "backward @once_differentiable if that is intended"
)


def _backward_at(
    call: Any, values: dict[str, torch.Tensor], k: int, v: torch.Tensor, seed: int, create_graph: bool
) -> dict[str, torch.Tensor | None]:
    """``G(x)``: the gradients of ``<v, out_k>`` w.r.t. every checked input, at `values` (leaves)."""
    with torch.enable_grad():
        call.prepare(seed)
        outs = dict(float_outputs(call.call_with(values)))
        first = (v * outs[k].to(DTYPE)).sum()
        keys = list(values)
        if not first.requires_grad:
            return dict.fromkeys(keys)
        got = torch.autograd.grad(first, [values[q] for q in keys], create_graph=create_graph, allow_unused=True)
        return dict(zip(keys, got))


def _double_backward(
    call: Any, base: dict[str, torch.Tensor], d: dict[str, torch.Tensor], k: int, v: torch.Tensor, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    """``H d = grad_x <G(x), d>`` by autograd through the backward's graph (flat float64), and which exist."""
    leaves = {key: x.clone().requires_grad_(True) for key, x in base.items()}
    g = _backward_at(call, leaves, k, v, seed, create_graph=True)
    with torch.enable_grad():
        dot = sum(((d[q] * t.to(DTYPE)).sum() for q, t in g.items() if t is not None), torch.zeros((), dtype=DTYPE))
        got = (
            torch.autograd.grad(dot, list(leaves.values()), allow_unused=True)
            if dot.requires_grad
            else [None] * len(leaves)
        )
    analytical = {q: _flat(a, base[q]) for q, a in zip(leaves, got)}
    return analytical, {q: a is not None for q, a in zip(leaves, got)}


def _flat(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(like.numel(), dtype=DTYPE, device=like.device) if g is None else g.detach().to(DTYPE).reshape(-1)


def _unavailable(ex: Extras, k: int, exc: BaseException) -> list[TensorResult]:
    """Rows for a double backward that raises: a finding about the second order, never a crash."""
    first = (str(exc).splitlines() or [""])[0][:200]
    note = f"the double backward can't be computed ({type(exc).__name__}: {first})"
    return [
        TensorResult(
            name=f"2nd order: {ex.pair(k, s.name)}",
            shape=tuple(s.original.shape),
            status="unavailable",
            kind="second order",
            note=note,
        )
        for s in ex.call.slots
    ]


def check_second_order(ex: Extras) -> list[TensorResult]:
    """One row per (output, input): the double backward along a random direction vs finite differences."""
    call = ex.call
    base = {key: leaf.detach() for key, leaf in call.leaves().items()}
    d = {key: direction(x, ex.generator) for key, x in base.items()}
    shapes = {s.key: tuple(s.original.shape) for s in call.slots}
    rows: list[TensorResult] = []
    for k, v in ex.cotangents.items():
        try:
            analytical, has_grad = _double_backward(call, base, d, k, v, ex.seed)
        except (RuntimeError, NotImplementedError) as exc:  # no double backward: aten::X_backward, in-place
            rows += _unavailable(ex, k, exc)
            continue

        def at(t: float, k: int = k, v: torch.Tensor = v) -> dict[Any, torch.Tensor]:
            moved = {q: (x + t * d[q]).requires_grad_(True) for q, x in base.items()}
            grads = _backward_at(call, moved, k, v, ex.seed, create_graph=False)
            return {q: _flat(g, base[q]) for q, g in grads.items()}

        names = {s.key: f"2nd order: {ex.pair(k, s.name)}" for s in call.slots}
        for row in judge_directional(ex, Directional(at, analytical, has_grad, names, shapes, "second order")):
            if row.status == "no gradient":
                row = dataclasses.replace(row, note=_CUT_OFF)
            elif row.status == "unused":
                row = dataclasses.replace(row, note="the second derivative is zero here (no dependence)")
            rows.append(row)
    ex.notes.append(
        "second order: double backward checked along a random direction against finite differences of the backward"
    )
    return rows


_FIX = (
    "If you never differentiate twice (no gradient penalty, Hessian-vector product or double backward), mark "
    "the backward @once_differentiable (from torch.autograd.function import once_differentiable) to say so; "
    "pass second_order=True to make this a failure, or second_order=False to skip the check."
)


def second_order_warnings(ex: Extras, rows: list[TensorResult]) -> list[TensorResult]:
    """The default (``second_order=None``): failing second-order rows become warnings, the verdict stands.

    The first derivatives are right (second order only runs when they pass), which is all that most
    users need; gradcheck and gradgradcheck keep the two apart for the same reason. Each failing row
    keeps its evidence and gets the status ``warning``; one sentence in `Extras.warnings` names them.
    """
    bad = [r for r in rows if not r.passed]
    if not bad:
        return rows
    wrong = [f'"{r.name}"' for r in bad if r.status != "unavailable"]
    missing = [r for r in bad if r.status == "unavailable"]
    parts = []
    if wrong:
        parts.append(f"wrong in {', '.join(wrong)} (the double backward disagrees with differences of the backward)")
    if missing:
        listed = ", ".join(f'"{r.name}"' for r in missing)
        parts.append(f"unavailable in {listed} ({missing[0].note})")
    ex.warnings.append(f"Second derivatives are {'; and '.join(parts)}. The first derivatives are right. {_FIX}")
    return [
        dataclasses.replace(r, status="warning", note=f"{r.status}, reported as a warning: {r.note}".rstrip(": "))
        if not r.passed
        else r
        for r in rows
    ]

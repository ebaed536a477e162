"""Second derivatives for verify_function: the backward itself, checked as a function of the inputs.

For output ``k`` with cotangent ``v_k``, the backward computes ``g(x) = J_k(x)^T v_k``. With a second
random cotangent ``w``, the scalar ``L2(x) = sum_i <w_i, g_i(x)>`` has the gradient ``H w`` (``H`` the
Hessian of ``<v_k, out_k>``), which autograd gets by differentiating the backward's own graph
(``create_graph=True``). Finite differences of ``L2`` (one forward and one backward per point)
check it element by element, with the same engine and tolerance model as the first derivatives.

This is what catches a backward that uses ``.detach()``-ed saved inputs, ``torch.no_grad()`` or
``.data``: its first derivatives are right, its second derivatives are zero where they shouldn't be.
The loop engine is used: a vmapped batch of backward passes is not worth the fragility.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ._batch import Objective
from ._check import measure, summarise
from ._engines import LoopEngine
from ._function_extras import DTYPE, Extras, float_outputs
from ._params import Lent, Target
from ._report import ParameterResult

__all__ = ["check_second_order"]


def _second_objective(k: int, v: torch.Tensor, w: dict[str, torch.Tensor]) -> Callable[[Any, Any], torch.Tensor]:
    def forward(model: Any, _: Any) -> torch.Tensor:
        with torch.enable_grad():
            leaves = model.leaves()
            outs = dict(float_outputs(model.call_with(leaves)))
            first = (v * outs[k].to(DTYPE)).sum()
            keys = list(leaves)
            if not first.requires_grad:
                return torch.zeros((), dtype=DTYPE)
            grads = torch.autograd.grad(first, [leaves[q] for q in keys], create_graph=True, allow_unused=True)
            total = torch.zeros((), dtype=DTYPE)
            for q, g in zip(keys, grads):
                if g is not None:
                    total = total + (w[q] * g.to(DTYPE)).sum()
            return total

    return forward


def check_second_order(ex: Extras, lent: Lent) -> tuple[list[ParameterResult], int]:
    """One row per (output, input): the gradient of ``<w, vjp(x, v_k)>`` against finite differences."""
    call = ex.call
    w = {s.key: torch.randn(s.original.shape, generator=ex.generator, dtype=DTYPE).to(s.original.device)
         for s in call.slots}
    rows: list[ParameterResult] = []
    evaluations = 0
    for k, v in ex.cotangents.items():
        forward = _second_objective(k, v, w)
        engine = LoopEngine(lent, Objective(None, None, forward), ex.seed)
        torch.set_grad_enabled(True)
        engine._prepare()
        leaves = call.leaves()
        second = forward(call, None)
        keys = list(leaves)
        got = (torch.autograd.grad(second, [leaves[q] for q in keys], allow_unused=True)
               if second.requires_grad else [None] * len(keys))
        torch.set_grad_enabled(False)
        loss0 = second.detach()
        twice = (engine.loss(), engine.loss())
        nondet = abs(float(twice[0]) - float(twice[1]))
        for s, g in zip(call.slots, got):
            target = Target(s.key, getattr(call, s.key).data, kind="parameter", param=getattr(call, s.key))
            a = torch.zeros(s.original.numel(), dtype=DTYPE) if g is None else g.detach().to(DTYPE).reshape(-1)
            check = measure(engine, target, a.to(target.tensor.device), loss0, nondet, ex.settings, ex.generator)
            res = summarise(target, check, g is not None)
            if res.status == "no gradient":
                res = dataclasses.replace(res, note=(
                    "the backward's result does not depend on this input in autograd's eyes, but it does "
                    "numerically: the backward cuts it off (.detach(), torch.no_grad(), .data on a saved "
                    "tensor); mark the backward @once_differentiable if that is intended"))
            rows.append(dataclasses.replace(res, name=f"2nd order: {ex.pair(k, s.name)}", kind="second order"))
        evaluations += engine.evaluations
    ex.notes.append("second order: checked the gradient of <w, vjp(x, v)> (double backward) against finite differences")
    return rows, evaluations

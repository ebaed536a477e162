"""``second_order=True`` for a module: Hessian-vector products of the loss w.r.t. the parameters.

Gradient penalties, Hessian-free methods and meta-learning differentiate the gradient again. For
``k`` random directions ``v`` over all checked parameters (entries ``+-max(1, |theta|)``):

* autograd: ``H v = d/dtheta <grad L(theta), v>``, with ``grad L`` taken with ``create_graph=True``;
* finite differences of the gradient along ``v``: ``(grad L(theta + h v) - grad L(theta - h v)) / 2h``,
  and the same at ``2h``: Richardson-refined, with the truncation estimate ``|D(h) - D(2h)| / 3``.

Each element of ``H v`` is judged like a first-order element: its tolerance is
``atol + rtol |n| + 1.5 * 10 * sqrt(2) * sigma / 2h + truncation``, where ``sigma`` is the measured
noise of that gradient element (ECNoise over 9 gradients at tiny steps along another random
direction, floored by ``u |g|``). A row per parameter tensor names it. A double backward that can't
be computed (not implemented, an in-place error) is noted on the rows, never raised.

A custom Function whose backward detaches its input (first order right) gives a wrong ``H v``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ._batch import Objective, check_loss
from ._compare import NOISE_SIGMAS, relative_error
from ._noise import noise_per_column, unit_roundoff
from ._params import Lent, Target
from ._report import ElementResult, ParameterResult
from ._state import reseed

__all__ = ["DIRECTIONS", "check_input_second_order", "check_second_order"]

DIRECTIONS = 4
_NOISE_POINTS = 9
KINK_SHARE = 0.05  # |D(h) - D(2h)| explaining this share of the disagreement: a kink, not a bug
INCONCLUSIVE_SHARE = 0.5  # more of a tensor's elements at kinks: no verdict for it


class _Grads:
    """Gradients of a scalar function w.r.t. the target tensors (leaves), at their current values."""

    def __init__(self, function: Callable[[], torch.Tensor], targets: Sequence[Target]) -> None:
        self.function, self.targets = function, list(targets)
        self.params = [t.param for t in self.targets]
        self.sizes = [t.tensor.numel() for t in self.targets]
        self.bases = [t.tensor.detach().clone() for t in self.targets]
        self.evaluations = 0

    def _loss(self) -> torch.Tensor:
        self.evaluations += 1
        return self.function()

    def _flat(self, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        return torch.cat(
            [
                torch.zeros(n, dtype=torch.float64, device=t.tensor.device)
                if g is None
                else (g.to_dense() if g.is_sparse else g).detach().to(torch.float64).reshape(-1)
                for g, n, t in zip(grads, self.sizes, self.targets)
            ]
        )

    def gradient(self) -> torch.Tensor:
        with torch.enable_grad():
            loss = self._loss()
            grads = torch.autograd.grad(loss, self.params, allow_unused=True) if loss.requires_grad else []
        return self._flat(grads or [None] * len(self.params))

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            loss = self._loss()
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            _refuse_once_differentiable(grads)
            dot = sum(
                (g.to(torch.float64).reshape(-1) * part).sum()
                for g, part in zip(grads, v.split(self.sizes))
                if g is not None
            )
            if not (isinstance(dot, torch.Tensor) and dot.requires_grad):
                return torch.zeros_like(v)  # nothing in the gradient depends on the parameters
            return self._flat(torch.autograd.grad(dot, self.params, allow_unused=True))

    def move(self, v: torch.Tensor | None, scale: float = 0.0) -> None:
        """Parameters at ``theta + scale * v`` (``v=None``: back at theta, exactly)."""
        with torch.no_grad():
            parts = v.split(self.sizes) if v is not None else [None] * len(self.targets)
            for t, base, part in zip(self.targets, self.bases, parts):
                if part is None or scale == 0.0:
                    t.tensor.copy_(base)
                else:
                    t.tensor.copy_((base.to(torch.float64) + scale * part.view(base.shape)).to(base.dtype))

    def direction(self, generator: torch.Generator) -> torch.Tensor:
        flat = torch.cat([b.to(torch.float64).reshape(-1) for b in self.bases])
        signs = torch.randint(0, 2, (flat.numel(),), generator=generator).to(flat.device, torch.float64) * 2 - 1
        return signs * flat.abs().clamp(min=1.0)


def _refuse_once_differentiable(grads: Sequence[torch.Tensor | None]) -> None:
    """Raise if the gradient's graph goes through a ``@once_differentiable`` backward.

    torch marks such a backward's outputs with a ``DelayedError`` node whose inputs are detached
    leaves: ``loss.backward()`` through it raises, but ``torch.autograd.grad(..., inputs=params)``
    prunes it and silently treats that part of the gradient as a constant (a wrong H v).
    """
    seen: set[int] = set()
    stack = [g.grad_fn for g in grads if g is not None and g.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ in ("DelayedError", "Error"):
            raise RuntimeError("a custom Function's backward is marked @once_differentiable")
        stack.extend(next_node for next_node, _ in node.next_functions)


def check_second_order(
    lent: Lent,
    objective: Objective,
    targets: Sequence[Target],
    seed: int,
    eps: float,
    rtol: float,
    atol: float,
    directions: int = DIRECTIONS,
) -> tuple[list[ParameterResult], int]:
    """One row per parameter target: its block of ``H v`` over `directions` random directions."""
    targets = [t for t in targets if t.kind == "parameter" and t.param is not None and t.tensor.numel() > 0]
    if not targets:
        return [], 0

    def loss() -> torch.Tensor:
        lent.reset_buffers()
        reseed(seed)
        return check_loss(objective(lent.model))

    try:
        return _hvp_rows(_Grads(loss, targets), seed, (eps, rtol, atol), directions)
    finally:
        lent.clear_grads()


def _hvp_rows(grads: _Grads, seed: int, opts: tuple, directions: int) -> tuple[list[ParameterResult], int]:
    """One row per target of `grads`: its block of ``H v`` over `directions` random directions."""
    targets = grads.targets
    generator = torch.Generator().manual_seed(seed + 2)
    try:
        g0 = grads.gradient()
        sigma = _noise(grads, g0, generator)
        rows = [[] for _ in targets]  # per target: (analytical, numerical, tolerance) per direction
        for _ in range(directions):
            v = grads.direction(generator)
            try:
                hv = grads.hvp(v)
            except (RuntimeError, NotImplementedError) as exc:
                grads.move(None)
                return _unavailable(targets, exc), grads.evaluations
            n, tol, kink = _difference(grads, v, hv, g0, sigma, opts)
            for k, part in enumerate(zip(*(x.split(grads.sizes) for x in (hv, n, tol, kink)))):
                rows[k].append(part)
    finally:
        grads.move(None)
    return [_result(t, parts, directions) for t, parts in zip(targets, rows)], grads.evaluations


def _noise(grads: _Grads, g0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-element noise of the gradient (ECNoise along one random direction), floored by ``u |g|``."""
    u = unit_roundoff(grads.targets[0].tensor.dtype)
    w = grads.direction(generator)
    step = 1e-2 * math.sqrt(u)
    values = []
    for t in range(1, _NOISE_POINTS + 1):
        grads.move(w, t * step)
        values.append(grads.gradient())
    grads.move(None)
    return torch.maximum(noise_per_column(torch.stack(values)), u * g0.abs())


def _difference(
    grads: _Grads, v: torch.Tensor, hv: torch.Tensor, g0: torch.Tensor, sigma: torch.Tensor, opts: tuple
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Refined central difference of the gradient along `v`, each element's tolerance, and its kink flag.

    Two signs of a kink inside the step (a ReLU unit at or crossing 0), looked for only where the
    element fails: the gradient jumps, so ``D(h)`` and ``D(2h)`` differ like ``1/h`` instead of
    ``h^2``; or the Hessian jumps, so the one-sided gap ``(g(h) - 2 g(0) + g(-h)) / h`` stays the
    same at ``2h`` instead of doubling (it is ``h`` times a third derivative where the loss is
    smooth). Where either is above the noise and explains a sizeable share of the disagreement with
    autograd, the element is "not differentiable here" (excluded, counted).
    """
    eps, rtol, atol = opts
    at = {}
    for t in (1, -1, 2, -2):
        grads.move(v, t * eps)
        at[t] = grads.gradient()
    grads.move(None)
    d1 = (at[1] - at[-1]) / (2 * eps)
    d2 = (at[2] - at[-2]) / (4 * eps)
    refined = (4 * d1 - d2) / 3
    truncation = (d1 - d2).abs() / 3
    noise = 1.5 * NOISE_SIGMAS * math.sqrt(2.0) * sigma / (2 * eps)
    tol = atol + rtol * refined.abs() + noise + truncation
    off = (hv - refined).abs()
    # smooth: the one-sided gap grows like h (twice as large at 2h); a Hessian jump keeps it constant
    gap_h = (at[1] - 2 * g0 + at[-1]) / eps
    gap_2h = (at[2] - 2 * g0 + at[-2]) / (2 * eps)
    hessian_jump = ((gap_2h - 2 * gap_h).abs() > 0.5 * gap_h.abs()) & (gap_h.abs() >= KINK_SHARE * off)
    hessian_jump &= gap_h.abs() > 2 * noise
    gradient_jump = ((d1 - d2).abs() > 2 * noise) & ((d1 - d2).abs() >= KINK_SHARE * off)
    kink = ~(off <= tol) & (hessian_jump | gradient_jump)  # only a failing element can be a kink
    return refined, tol, kink


def _unavailable(targets: Sequence[Target], exc: BaseException) -> list[ParameterResult]:
    why = f"second order not computable: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return [
        ParameterResult(
            name=f"{t.name} (Hv)", shape=t.shape, status="inconclusive", kind="second order", note=why, coverage="-"
        )
        for t in targets
    ]


def _result(target: Target, parts: list[tuple[torch.Tensor, ...]], directions: int) -> ParameterResult:
    a, n, tol, kink = (torch.stack([p[i] for p in parts]) for i in range(4))  # each (directions, numel)
    err = (a - n).abs()
    judged = ~kink
    failed = int((~(err <= tol) & judged).sum())
    score = torch.where(judged, err / tol.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(err))
    flat = int(torch.argmax(torch.where(torch.isfinite(score), score, torch.full_like(score, math.inf))))
    k, e = divmod(flat, a.shape[1])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(e), target.shape)) if target.shape else ()
    worst = (ElementResult(index, float(n[k, e]), float(a[k, e]), float(err[k, e]), float(tol[k, e])),)
    kinks = int(kink.sum())
    quiet = bool((a.abs() <= tol).all()) and bool((n.abs() <= tol).all())
    if failed:
        status = "mismatch"
        note = "H v disagrees with finite differences of the gradient: the double backward is wrong"
    elif kinks > INCONCLUSIVE_SHARE * a.numel():
        status, note = "inconclusive", f"{kinks} of {a.numel()} elements cross a kink within the step"
    else:
        status, note = ("zero" if quiet else "ok"), ""
    if kinks and status != "inconclusive":
        note = "; ".join(filter(None, [note, f"{kinks} of {a.numel()} elements at kinks, excluded"]))
    return ParameterResult(
        name=f"{target.name} (Hv)",
        shape=target.shape,
        status=status,
        relative_error=relative_error(a[judged], n[judged]),
        max_abs_error=float(err[judged].max()) if bool(judged.any()) else None,
        checked=int(judged.sum()),
        failed=failed,
        worst=worst,
        kind="second order",
        note=note,
        coverage=f"{directions} directions",
        norms=(float(a[judged].norm()), float(n[judged].norm())),
    )


def check_input_second_order(
    lent: Lent, objective: Objective, seed: int, eps: float, rtol: float, atol: float, directions: int = DIRECTIONS
) -> tuple[list[ParameterResult], int]:
    """For a loss that differentiates inside: the model's own second derivatives w.r.t. its input.

    A physics-informed loss takes ``du/dx`` (and ``d2u/dx2``) of the model inside; a wrong double
    backward of the model makes the loss itself wrong, consistently for autograd and finite
    differences, so the first-order check of the loss can't always see it. Here the model's first
    call is replayed alone, as ``f(x) = <model(x), r>`` (``r`` fixed, random), and ``H v`` of ``f``
    w.r.t. ``x`` is checked like the parameters' (rows "model input[k] (Hv)").
    """
    call = _first_call(lent, objective, seed)
    if call is None:
        return [], 0
    leaves, spec = call
    slots = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel()]
    if not slots:
        return [], 0
    for i in slots:
        leaves[i] = leaves[i].detach().clone().requires_grad_(True)
    args, kwargs = pytree.tree_unflatten(leaves, spec)
    weights: list[torch.Tensor] = []

    def f() -> torch.Tensor:
        lent.reset_buffers()
        reseed(seed)
        outs = [t for t in pytree.tree_leaves(lent.model(*args, **kwargs)) if _floating(t)]
        if not weights:
            generator = torch.Generator().manual_seed(seed + 3)
            weights.extend(torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device) for t in outs)
        return sum(
            ((t.to(torch.float64) * w).sum() for t, w in zip(outs, weights)), torch.zeros((), dtype=torch.float64)
        )

    targets = [Target(f"model input[{k}]", leaves[i], kind="input", param=leaves[i]) for k, i in enumerate(slots)]
    try:
        return _hvp_rows(_Grads(f, targets), seed, (eps, rtol, atol), directions)
    finally:
        lent.clear_grads()


def _floating(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _first_call(lent: Lent, objective: Objective, seed: int) -> tuple[list[Any], Any] | None:
    """The flat (args, kwargs) of the model's first call inside the objective (detached copies), or None."""
    seen: list[tuple[list[Any], Any]] = []

    def pre(module: Any, args: tuple, kwargs: dict) -> None:
        if not seen:
            leaves, spec = pytree.tree_flatten((args, kwargs))
            seen.append(([x.detach().clone() if isinstance(x, torch.Tensor) else x for x in leaves], spec))

    handle = lent.model.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)
    try:
        lent.reset_buffers()
        reseed(seed)
        with torch.enable_grad():
            objective(lent.model)
    finally:
        handle.remove()
    return seen[0] if seen else None

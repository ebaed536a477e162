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
from collections.abc import Sequence

import torch

from ._batch import Objective, check_loss
from ._compare import NOISE_SIGMAS, relative_error
from ._noise import noise_per_column, unit_roundoff
from ._params import Lent, Target
from ._report import ElementResult, ParameterResult
from ._state import reseed

__all__ = ["DIRECTIONS", "check_second_order"]

DIRECTIONS = 4
_NOISE_POINTS = 9


class _Grads:
    """Gradients of the loss w.r.t. the checked parameters at the lent model's current point."""

    def __init__(self, lent: Lent, objective: Objective, targets: Sequence[Target], seed: int) -> None:
        self.lent, self.objective, self.targets, self.seed = lent, objective, list(targets), seed
        self.params = [t.param for t in self.targets]
        self.sizes = [t.tensor.numel() for t in self.targets]
        self.bases = [t.tensor.detach().clone() for t in self.targets]
        self.evaluations = 0

    def _loss(self) -> torch.Tensor:
        self.lent.reset_buffers()
        reseed(self.seed)
        self.evaluations += 1
        return check_loss(self.objective(self.lent.model))

    def _flat(self, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        return torch.cat(
            [
                torch.zeros(n, dtype=torch.float64, device=t.tensor.device)
                if g is None
                else g.detach().to(torch.float64).reshape(-1)
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
    grads = _Grads(lent, objective, targets, seed)
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
            n, tol = _difference(grads, v, sigma, eps, rtol, atol)
            for k, (a_part, n_part, t_part) in enumerate(
                zip(hv.split(grads.sizes), n.split(grads.sizes), tol.split(grads.sizes))
            ):
                rows[k].append((a_part, n_part, t_part))
    finally:
        grads.move(None)
        lent.clear_grads()
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
    grads: _Grads, v: torch.Tensor, sigma: torch.Tensor, eps: float, rtol: float, atol: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refined central difference of the gradient along `v`, and each element's tolerance."""
    at = {}
    for t in (1, -1, 2, -2):
        grads.move(v, t * eps)
        at[t] = grads.gradient()
    grads.move(None)
    d1 = (at[1] - at[-1]) / (2 * eps)
    d2 = (at[2] - at[-2]) / (4 * eps)
    refined = (4 * d1 - d2) / 3
    truncation = (d1 - d2).abs() / 3
    tol = atol + rtol * refined.abs() + 1.5 * NOISE_SIGMAS * math.sqrt(2.0) * sigma / (2 * eps) + truncation
    return refined, tol


def _unavailable(targets: Sequence[Target], exc: BaseException) -> list[ParameterResult]:
    why = f"second order not computable: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return [
        ParameterResult(
            name=f"{t.name} (Hv)", shape=t.shape, status="inconclusive", kind="second order", note=why, coverage="-"
        )
        for t in targets
    ]


def _result(
    target: Target, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], directions: int
) -> ParameterResult:
    a = torch.stack([p[0] for p in parts])  # (directions, numel)
    n = torch.stack([p[1] for p in parts])
    tol = torch.stack([p[2] for p in parts])
    err = (a - n).abs()
    over = ~(err <= tol)
    failed = int(over.sum())
    score = err / tol.clamp(min=torch.finfo(torch.float64).tiny)
    flat = int(torch.argmax(torch.where(torch.isfinite(score), score, torch.full_like(score, math.inf))))
    k, e = divmod(flat, a.shape[1])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(e), target.shape)) if target.shape else ()
    worst = (
        ElementResult(
            index=index,
            numerical=float(n[k, e]),
            analytical=float(a[k, e]),
            abs_error=float(err[k, e]),
            tolerance=float(tol[k, e]),
        ),
    )
    quiet = bool((a.abs() <= tol).all()) and bool((n.abs() <= tol).all())
    status = "mismatch" if failed else ("zero" if quiet else "ok")
    note = (
        f"Hessian-vector products disagree in {failed} of {a.numel()} elements: the double backward is wrong "
        "(a backward that detaches or mis-differentiates its inputs); gradient penalties and HVPs through it are wrong"
        if failed
        else ""
    )
    return ParameterResult(
        name=f"{target.name} (Hv)",
        shape=target.shape,
        status=status,
        relative_error=relative_error(a, n),
        max_abs_error=float(err.max()),
        checked=int(a.numel()),
        failed=failed,
        worst=worst,
        kind="second order",
        note=note,
        coverage=f"{directions} directions",
        norms=(float(a.norm()), float(n.norm())),
    )

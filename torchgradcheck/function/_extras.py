"""The checks verify_function runs besides the first derivatives.

* `spy_backward`: what a custom Function's ``backward`` returns, before autograd silently casts it
  (dtype) or reduces it (broadcast shape): a float32 gradient for a float64 input is reported by name;
* `once_differentiable_nodes`: Functions whose backward is marked ``@once_differentiable``
  (second derivatives are then skipped with a note, not failed);
* `judge_directional`: the derivative of a vector function along a direction, element by element,
  against central differences with per-element measured noise and the tolerance model of `_compare`
  (shared by forward mode here and second order in `_second`);
* `check_forward_mode`: ``jvp`` (forward-mode AD) against the numerical directional derivative;
* `check_noncontiguous`: the backward on transposed/strided copies of the inputs, judged against the
  numerical gradient already measured (same values, other memory layout: same Jacobian);
* `determinism_results`: the backward run a second time, compared with the first.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch.autograd.function import once_differentiable

from .._compare import Judgement, first_tolerance, judge_second_look, refine_failures
from .._measure import Settings, TensorCheck, summarise
from .._noise import NOISE_POINTS, noise_per_column, unit_roundoff
from .._params import Target
from .._report import TensorResult

__all__ = [
    "Extras",
    "check_forward_mode",
    "Directional",
    "check_noncontiguous",
    "determinism_results",
    "direction",
    "float_outputs",
    "judge_directional",
    "once_differentiable_nodes",
    "spy_backward",
    "vjp_at",
]

DTYPE = torch.float64
_ONCE_CODE = once_differentiable(lambda ctx: None).__code__


@dataclass
class Extras:
    """What the extra checks need from the first-order check."""

    call: Any  # the `function._verify._Call` module
    cotangents: dict[int, torch.Tensor]
    grads: dict[int, dict[str, torch.Tensor | None]]  # first run: output -> slot key -> flat vjp
    checks: dict[tuple[int, str], TensorCheck]  # first-order outcome per (output, slot key)
    settings: Settings
    seed: int
    generator: torch.Generator
    several: bool  # fn returns several outputs (names say "output k")
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # full sentences for `Report.warnings`
    evaluations: int = 0

    def pair(self, k: int, name: str) -> str:
        return f"grad of output {k} w.r.t. {name}" if self.several else f"grad w.r.t. {name}"

    def output(self, k: int) -> str:
        return f"output {k}" if self.several else "the output"


def float_outputs(out: Any) -> list[tuple[int, torch.Tensor]]:
    """``(index, tensor)`` for every real floating tensor returned by ``fn``."""
    items = [out] if isinstance(out, torch.Tensor) else list(out) if isinstance(out, (tuple, list)) else []
    return [(i, t) for i, t in enumerate(items) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def vjp_at(
    call: Any,
    values: dict[str, torch.Tensor],
    cotangents: dict[int, torch.Tensor],
    seed: int,
    before_backward: Callable[[dict[int, torch.Tensor]], None] | None = None,
) -> tuple[dict[int, torch.Tensor], dict[int, dict[str, torch.Tensor | None]]]:
    """One forward at `values` (leaves requiring grad), then ``J_k^T v_k`` per output: (objectives, grads)."""
    with torch.enable_grad():
        call.prepare(seed)
        outs = dict(float_outputs(call.call_with(values)))
        if before_backward is not None:
            before_backward(outs)
        keys = list(values)
        losses: dict[int, torch.Tensor] = {}
        grads: dict[int, dict[str, torch.Tensor | None]] = {}
        for k, v in cotangents.items():
            loss = (v * outs[k].to(DTYPE)).sum()
            losses[k] = loss.detach()
            got = (
                torch.autograd.grad(loss, [values[q] for q in keys], allow_unused=True, retain_graph=True)
                if loss.requires_grad
                else [None] * len(keys)
            )
            grads[k] = {q: None if g is None else g.detach().to(DTYPE).reshape(-1).clone() for q, g in zip(keys, got)}
    return losses, grads


def _custom_nodes(outputs: list[torch.Tensor]) -> list[Any]:
    """The nodes of custom autograd.Functions in the graph behind `outputs`."""
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    seen: set[int] = set()
    found = []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if getattr(node, "_forward_cls", None) is not None:
            found.append(node)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return found


def once_differentiable_nodes(outputs: list[torch.Tensor]) -> set[str]:
    """Names of the custom Functions behind `outputs` whose backward is ``@once_differentiable``."""
    names = set()
    for node in _custom_nodes(outputs):
        cls = node._forward_cls
        for fn in (cls.backward, cls.vjp):
            if getattr(fn, "__code__", None) is _ONCE_CODE:
                names.add(cls.__name__)
    return names


def spy_backward(
    outputs: list[torch.Tensor],
    leaves: dict[str, torch.Tensor],
    names: dict[str, str],
    found: dict[str, tuple[str, str]],
) -> None:
    """Record into `found` what custom backwards return with a wrong dtype, device or shape.

    Autograd casts a gradient of the wrong dtype to the input's dtype without a word, and sums a
    broadcast-shaped one down; an unfixable shape or device raises. The spy sees the raw return
    value: each custom Function node gets an instance attribute ``apply`` (looked up by autograd
    before the class's) that calls the real one and compares each gradient with what the next node
    expects. Keys of `found`: the slot key when the gradient goes straight to a checked input, else
    ``"<Function>: input <i>"`` (a Function deeper inside ``fn``).
    """
    by_leaf = {id(leaf): key for key, leaf in leaves.items()}
    for node in _custom_nodes(outputs):
        edges: dict[int, tuple[str, str, Any]] = {}  # keyed by the position in what backward returns
        fname = node._forward_cls.__name__
        arg_of = _argument_positions(node)
        for pos, (nxt, nr) in enumerate(node.next_functions):
            if nxt is None or pos not in arg_of:
                continue
            arg = arg_of[pos]
            var = getattr(nxt, "variable", None)
            if var is not None and id(var) in by_leaf:
                key = by_leaf[id(var)]
                edges[arg] = (key, names[key], var)
                continue
            try:  # private, so optional: the shape/dtype/device autograd expects for this edge
                meta = nxt._input_metadata[nr]
            except (AttributeError, IndexError, TypeError):
                continue
            edges[arg] = (f"{fname}: input {arg}", f"input {arg} of {fname}", meta)
        if edges:
            node.apply = _spy(node, fname, edges, found)


def _argument_positions(node: Any) -> dict[int, int]:
    """Edge index (``next_functions``) -> position in the tuple ``backward`` returns.

    ``backward`` returns one entry per argument of ``forward`` (``None`` for non-tensors), while
    ``next_functions`` has one edge per tensor argument. ``needs_input_grad`` (one flag per argument)
    says which arguments are tensors that require grad; those are, in order, the edges that have a
    node. ``forward(ctx, dim, x, scale, w)``: edges 0, 1 -> positions 1, 3.
    """
    edges = [j for j, (nxt, _) in enumerate(node.next_functions) if nxt is not None]
    args = [i for i, needs in enumerate(getattr(node, "needs_input_grad", None) or ()) if needs]
    if len(edges) != len(args):  # not the layout described above: trust no mapping rather than a wrong one
        return {}
    return dict(zip(edges, args))


def _spy(
    node: Any, fname: str, edges: dict[int, tuple[str, str, Any]], found: dict[str, tuple[str, str]]
) -> Callable[..., Any]:
    real = type(node).apply

    def apply(*grad_outputs: Any) -> Any:
        out = real(node, *grad_outputs)
        returned = out if isinstance(out, tuple) else (out,)
        for pos, (key, label, want) in edges.items():
            g = returned[pos] if pos < len(returned) else None
            if not isinstance(g, torch.Tensor):
                continue
            said = f"backward of {fname} returned a gradient for {label}"
            shape = tuple(want.shape)
            if g.dtype != want.dtype:
                found[key] = (
                    "wrong dtype",
                    f"{said} of dtype {_dt(g.dtype)}, but {label} is {_dt(want.dtype)} (autograd casts it silently)",
                )
            elif g.device != torch.device(want.device):
                found[key] = ("wrong device", f"{said} on {g.device}, but {label} is on {want.device}")
            elif tuple(g.shape) != shape and _sums_down(shape, tuple(g.shape)):
                # autograd's validate_outputs sums such a gradient down (PyTorch's own custom_op_db
                # numpy_mul does this): the values are right, so it is a warning, not a failure
                found[key] = (
                    "warning",
                    f"{said} of shape {tuple(g.shape)}, but {label} has shape {shape}: autograd sums it down, "
                    f"so the values are right, but backward builds a gradient larger than {label} "
                    f"(reduce it in backward, e.g. with .sum_to_size({shape}), to save the memory).",
                )
            elif tuple(g.shape) != shape:
                found[key] = ("wrong shape", f"{said} of shape {tuple(g.shape)}, but {label} has shape {shape}")
        return out

    return apply


def _sums_down(shape: tuple[int, ...], grad_shape: tuple[int, ...]) -> bool:
    """True when autograd accepts a gradient of `grad_shape` for `shape` by summing it down (``sum_to``)."""
    try:
        return len(shape) <= len(grad_shape) and torch.broadcast_shapes(shape, grad_shape) == grad_shape
    except RuntimeError:
        return False


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------------------------- forward mode


def _defines_no_jvp(fn: Any) -> str | None:
    cls = getattr(fn, "__self__", None)
    if isinstance(cls, type) and issubclass(cls, torch.autograd.Function) and cls.jvp is torch.autograd.Function.jvp:
        return cls.__name__
    return None


def _own_jvp(fn: Any) -> bool:
    """True when `fn` is the ``apply`` of an autograd.Function that defines its own jvp."""
    cls = getattr(fn, "__self__", None)
    return isinstance(cls, type) and issubclass(cls, torch.autograd.Function) and _defines_no_jvp(fn) is None


def direction(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random direction with components ``+-max(1, |x|)``: no element is invisible, steps stay relative."""
    signs = torch.randint(0, 2, x.shape, generator=generator).to(x.device, x.dtype) * 2 - 1
    return signs * x.abs().clamp(min=1.0)


@dataclass
class Directional:
    """A vector function of ``t`` (the point ``x + t d``) and its derivative at 0 according to autograd."""

    at: Callable[[float], dict[Any, torch.Tensor]]  # flat float64 vectors, one per key
    analytical: dict[Any, torch.Tensor]  # flat float64, same keys
    has_grad: dict[Any, bool]
    names: dict[Any, str]  # row names
    shapes: dict[Any, tuple[int, ...]]
    kind: str


def judge_directional(ex: Extras, problem: Directional) -> list[TensorResult]:
    """Each element of ``d/dt f(x + t d)`` against central differences, with the tolerance model of `_compare`.

    The noise of every element is measured (ECNoise on 9 tiny steps), the first pass uses ``t = +-h``,
    and the elements over tolerance get the second look at ``+-2h`` (Richardson, kink test), as for gradients.
    """
    h = ex.settings.eps
    noise_step = 1e-2 * math.sqrt(unit_roundoff(DTYPE))

    def at(t: float) -> dict[Any, torch.Tensor]:
        ex.evaluations += 1
        return problem.at(t)

    steps = {t: at(t * h) for t in (-2, -1, 1, 2)}
    center = at(0.0)
    noise = [at(j * noise_step) for j in range(-(NOISE_POINTS // 2), NOISE_POINTS // 2 + 1)]
    rows = []
    for key, a in problem.analytical.items():
        # Rounding floor: one unit roundoff of the tensor's largest element, not of each element. An
        # element of a vector output shares intermediates with the others (1 - tanh(x)**2 is tiny
        # at |x| = 9 but carries the rounding of 1), and ECNoise can't see noise that 9 tiny steps
        # don't move: a per-element floor made correct second derivatives of tanh fail at 1e-12.
        floor = unit_roundoff(center[key].dtype) * float(center[key].abs().max()) if center[key].numel() else 0.0
        sigma = noise_per_column(torch.stack([p[key] for p in noise])).clamp(min=floor)
        span = torch.full_like(a, 2 * h)
        numerical = (steps[1][key] - steps[-1][key]) / span
        tol = first_tolerance(numerical, span, sigma, ex.settings.rtol, ex.settings.atol)  # type: ignore[arg-type]

        look = _second_look(steps, center, key, a, numerical, span, sigma, h, ex.settings)
        judged = refine_failures(a, numerical, tol, look)
        numerical, tol, kink = judged.numerical, judged.tolerance, judged.kink
        check = TensorCheck(analytical=a, numerical=numerical, tolerance=tol, kink=kink, sigma=float(sigma.max()))
        target = Target(problem.names[key], center[key].view(problem.shapes[key]), kind=problem.kind)
        rows.append(summarise(target, check, problem.has_grad[key]))
    return rows


def _second_look(
    steps: dict[int, dict[Any, torch.Tensor]],
    center: dict[Any, torch.Tensor],
    key: Any,
    a: torch.Tensor,
    numerical: torch.Tensor,
    span: torch.Tensor,
    sigma: torch.Tensor,
    h: float,
    settings: Settings,
) -> Callable[[torch.Tensor], Judgement]:
    """The second look of `judge_directional` at rows `w`: the points at ``t = +-2h`` are already evaluated."""

    def look(w: torch.Tensor) -> Judgement:
        pts = [steps[-2][key][w], steps[-1][key][w], center[key][w], steps[1][key][w], steps[2][key][w]]
        return judge_second_look(
            a[w],
            numerical[w],
            span[w] / 2,
            span[w],
            torch.stack(pts, 1),
            (pts[4] - pts[0]) / (4 * h),
            sigma[w],
            settings.rtol,
            settings.atol,
        )

    return look


def _tangents(
    ex: Extras, base: dict[str, torch.Tensor], key: str, d: torch.Tensor
) -> tuple[dict[int, torch.Tensor | None], dict[int, tuple[int, ...]]]:
    """Forward-mode AD along `d` for input `key`: each checked output's tangent (None if absent)."""
    with fwAD.dual_level(), torch.enable_grad():
        ex.call.prepare(ex.seed)
        outs = dict(float_outputs(ex.call.call_with({**base, key: fwAD.make_dual(base[key], d)})))
        raw = {k: fwAD.unpack_dual(outs[k]).tangent for k in ex.cotangents}
        tangents = {
            k: None if t is None or t._is_zerotensor() else t.detach().to(DTYPE).reshape(-1).clone()
            for k, t in raw.items()
        }
        return tangents, {k: tuple(outs[k].shape) for k in ex.cotangents}


def _present(ex: Extras, s: Any, tangents: dict[int, torch.Tensor | None]) -> dict[int, torch.Tensor]:
    """The tangents to compare. An absent one (None, or autograd's ZeroTensor) where the backward says
    the output depends on the input means no forward-mode formula (a custom op without a jvp): noted,
    never compared with a zero. Absent where the backward is zero too: nothing to compare."""
    missing = []
    for k, t in tangents.items():
        g = ex.grads.get(k, {}).get(s.key)
        if t is None and g is not None and bool((g != 0).any()):
            missing.append(ex.output(k))
    if missing:
        ex.notes.append(
            f"forward mode unavailable for {s.name}: forward-mode AD gives no tangent for {', '.join(missing)} "
            "(no forward-mode formula registered, as for a custom op without a jvp); not compared"
        )
    return {k: t for k, t in tangents.items() if t is not None}


def _jvp_raised(ex: Extras, s: Any, exc: BaseException) -> list[TensorResult]:
    """Forward-mode AD raised: the Function's own jvp crashing is a finding; AD being absent is a note."""
    first = (str(exc).splitlines() or [""])[0][:160]
    if _own_jvp(ex.call.fn) and not isinstance(exc, NotImplementedError):
        return [
            TensorResult(
                name=f"jvp: w.r.t. {s.name}",
                shape=tuple(s.original.shape),
                status="error",
                kind="forward mode",
                note=f"the jvp raised {type(exc).__name__}: {first}",
            )
        ]
    ex.notes.append(f"forward mode unavailable for {s.name}: not compared ({type(exc).__name__}: {first})")
    return []


def check_forward_mode(ex: Extras) -> list[TensorResult]:
    """One row per (output, input): ``jvp`` along a random direction vs the numerical directional derivative."""
    call = ex.call
    missing = _defines_no_jvp(call.fn)
    if missing:
        ex.notes.append(f"forward mode unavailable: {missing} defines no jvp; not compared")
        return []
    base = {key: leaf.detach() for key, leaf in call.leaves().items()}
    rows: list[TensorResult] = []
    for s in call.slots:
        x = base[s.key]
        d = direction(x, ex.generator)
        try:
            raw, shapes = _tangents(ex, base, s.key, d)
        except (NotImplementedError, RuntimeError) as exc:
            rows += _jvp_raised(ex, s, exc)
            continue
        tangents = _present(ex, s, raw)
        if not tangents:
            continue

        def at(
            t: float, s: Any = s, x: torch.Tensor = x, d: torch.Tensor = d, keys: Any = tuple(tangents)
        ) -> dict[Any, torch.Tensor]:
            with torch.no_grad():
                call.prepare(ex.seed)
                out = dict(float_outputs(call.call_with({**base, s.key: x + t * d})))
                return {k: out[k].detach().to(DTYPE).reshape(-1) for k in keys}

        names = {k: f"jvp of {ex.output(k)} along {s.name}" for k in tangents}
        problem = Directional(at, tangents, dict.fromkeys(tangents, True), names, shapes, "forward mode")
        rows += judge_directional(ex, problem)
    if rows:
        ex.notes.append("forward mode: jvp checked against directional finite differences")
    return rows


# ------------------------------------------------------------------------------------ non-contiguous


def noncontiguous_copy(t: torch.Tensor) -> torch.Tensor | None:
    """Same values, other layout: transposed memory for matrices, every other element otherwise."""
    if t.dim() >= 2 and t.shape[-1] > 1 and t.shape[-2] > 1:
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif t.numel() > 1:
        strides, step = [], 2
        for size in reversed(t.shape):
            strides.insert(0, step)
            step *= size
        out = t.new_empty(2 * t.numel()).as_strided(t.shape, strides)
        out.copy_(t)
    else:
        return None
    return out.detach().requires_grad_(True)


def _layout_problem(ex: Extras, values: dict[str, torch.Tensor], names: str) -> str | None:
    """Why a backward on these non-contiguous inputs can't be judged against the first run, or None.

    Two legal reasons: the forward itself rejects the layout (``.view`` on a transposed tensor: its
    contract, not a gradient bug), or its value depends on the layout (``as_strided``, ``rand_like``
    noise laid out like the input): the rerun is then a different function, whose differences were
    not taken. Such a check is skipped with this reason as its note.
    """
    call = ex.call
    try:
        moved = _plain_outputs(ex, {k: v.detach() for k, v in values.items()})
    except Exception as exc:  # the forward's own refusal of the layout
        first = (str(exc).splitlines() or [""])[0][:160]
        return (
            f"fn requires contiguous inputs (its forward raised {type(exc).__name__} with transposed/strided "
            f"copies of {names}: {first})"
        )
    same = _plain_outputs(ex, {k: v.detach() for k, v in call.leaves().items()})
    for k in ex.cotangents:
        a, b = moved.get(k), same.get(k)
        if a is None or b is None or a.shape != b.shape:
            return f"with transposed/strided copies of {names}, fn returns other outputs"
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        scale = max(float(a.abs().max()), float(b.abs().max())) if a.numel() else 0.0
        if diff > math.sqrt(unit_roundoff(b.dtype)) * scale:
            return (
                f"fn's value depends on the memory layout of its inputs (with transposed/strided copies of "
                f"{names}, {ex.output(k)} differs by {diff:.1e}): its gradients there are another function's"
            )
    return None


def _plain_outputs(ex: Extras, values: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    with torch.no_grad():
        ex.call.prepare(ex.seed)
        return {k: t.detach() for k, t in float_outputs(ex.call.call_with(values)) if k in ex.cotangents}


def check_noncontiguous(ex: Extras) -> list[TensorResult]:
    """Rerun the backward with non-contiguous copies of every checked input; judge it as the first run."""
    call = ex.call
    values = {key: leaf.detach().clone().requires_grad_(True) for key, leaf in call.leaves().items()}
    changed = []
    for s in call.slots:
        nc = noncontiguous_copy(values[s.key].detach())
        if nc is not None:
            values[s.key] = nc
            changed.append(s)
    if not changed:
        ex.notes.append("non-contiguous inputs: not checked (no input has more than one element)")
        return []
    names = ", ".join(s.name for s in changed)
    problem = _layout_problem(ex, values, names)
    if problem is not None:
        ex.notes.append(f"non-contiguous inputs: not compared: {problem}")
        return []
    try:
        _, grads = vjp_at(call, values, ex.cotangents, ex.seed)
    except Exception as exc:  # the point of this check: a backward that can't take strided inputs
        first = (str(exc).splitlines() or [""])[0][:200]
        return [
            TensorResult(
                name=f"non-contiguous: {ex.pair(k, s.name)}",
                shape=tuple(s.original.shape),
                status="error",
                kind="non-contiguous",
                note=f"fn raised {type(exc).__name__} with non-contiguous inputs ({names}): {first}",
            )
            for k in ex.cotangents
            for s in changed
        ]
    ex.notes.append(f"non-contiguous inputs: backward rerun with transposed/strided copies of {names}")
    rows = []
    for k in ex.cotangents:
        for s in changed:
            a = grads[k][s.key]
            check = ex.checks[(k, s.key)]
            a_checked = a if a is None or check.index is None else a[check.index]  # skipped elements: not judged
            redo = dataclasses.replace(
                check, analytical=torch.zeros_like(check.analytical) if a_checked is None else a_checked
            )
            target = Target(f"non-contiguous: {ex.pair(k, s.name)}", values[s.key].detach(), kind="non-contiguous")
            rows.append(summarise(target, redo, a is not None))
    return rows


# --------------------------------------------------------------------------------------- determinism


def determinism_results(ex: Extras, nondet_tol: float) -> list[TensorResult]:
    """Run forward and backward again; a row per (output, input) that differs by more than `nondet_tol`."""
    call = ex.call
    values = call.leaves()
    _, again = vjp_at(call, values, ex.cotangents, ex.seed)
    rows, worst = [], 0.0
    for k in ex.cotangents:
        for s in call.slots:
            a, b = ex.grads[k][s.key], again[k][s.key]
            if (a is None) != (b is None):
                diff = math.inf
            else:
                # NaN in the same places on both runs (NaN inputs) is the same gradient
                diff = 0.0 if a is None or b is None or a.numel() == 0 else nan_aware_gap(a, b)
            worst = max(worst, diff)
            if not diff <= nondet_tol:
                rows.append(
                    TensorResult(
                        name=f"determinism: {ex.pair(k, s.name)}",
                        shape=tuple(s.original.shape),
                        status="nondeterministic",
                        max_abs_error=diff,
                        kind="determinism",
                        note=f"two runs of the backward differ by up to {diff:.2e} > nondet_tol={nondet_tol:g}",
                    )
                )
    if not rows:
        same = "identical gradients" if worst == 0 else f"gradients within {worst:.1e} (nondet_tol={nondet_tol:g})"
        ex.notes.append(f"determinism: the backward run twice gives {same}")
    return rows


def nan_aware_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|``, where NaN in the same places on both sides (NaN inputs, as nansum takes) counts as equal."""
    gap = (a - b).abs()
    return float(gap.masked_fill(torch.isnan(a) & torch.isnan(b), 0.0).max())

"""verify_batch_independence: output sample i must not depend on input sample j != i.

Karpathy's "use backprop to chart dependencies", made exact and confirmed:

1. **Autograd.** One forward with the batch's floating tensors as leaves; for each checked output
   sample ``i`` the gradient of ``s_i = <out[i], r[i]>`` (``r`` a fixed random weighting, so no
   dependence cancels by accident) w.r.t. the whole batch. Its norm per input sample ``j`` charts
   which samples feed output ``i``. For a batch of at most `ALL_SAMPLES` every output sample is
   checked, else `SAMPLED` random ones (seeded).
2. **Finite differences**, so that a wrong backward cannot hide a leak: every *other* sample is
   moved at once along a random direction ``d`` (sample ``i`` stays put), at ``+-h`` and ``+-2h``.
   Central differences of ``s_i`` give the cross-sample derivative, Richardson-refined, with a
   truncation estimate; the tolerance is the same noise model as everywhere else (the noise of
   ``s_i`` is measured with ECNoise, floored by ``u * |s_i|``). A model whose samples are
   independent gives exactly 0 here: changing other rows does not change row ``i``'s arithmetic.
3. **Verdict per output sample.** It leaks if the finite difference is significant, or if autograd
   shows a dependence that the finite difference confirms (agrees with). Which samples leak into
   it comes from autograd when autograd and finite differences agree, else from one finite
   difference per other sample. If autograd claims a dependence that the forward does not have,
   the status is "mismatch" (a wrong backward across samples).
4. **Where.** Forward hooks record every module call's output at row ``i`` during the ``+-h``
   forwards (finite differences again, so a wrong backward cannot mislead it): the first module,
   in order of completion (innermost first), whose output row ``i`` moved is the first module that
   mixes samples. Train-mode batch normalisation gets the hint to check in eval mode.

The model is lent exactly as for `verify_module` (float64 working copies; buffers reset before
every forward, so BatchNorm's running statistics never drift) and comes back bit-exactly.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ._compare import NOISE_SIGMAS
from ._errors import InvalidArgumentError, InvalidArgumentTypeError
from ._noise import noise_per_column, unit_roundoff
from ._options import check_options, reject_unknown, resolve_tolerances
from ._params import Lent, lend_model
from ._report import ParameterResult, Report, _fmt, _num
from ._state import preserved_global_state, reseed

__all__ = ["BatchReport", "verify_batch_independence"]

_CALL = "verify_batch_independence(model, batch)"
_OPTIONS = (
    "batch_dim",
    "forward",
    "samples",
    "dtype",
    "seed",
    "eps",
    "rtol",
    "atol",
    "progress",
    "mode",
    "budget",
    "engine",
)
ALL_SAMPLES = 16  # batches up to this size: every output sample is checked
SAMPLED = 8  # larger batches: this many random output samples
AUTOGRAD_FLOOR = 1e3  # autograd dependence below this many unit roundoffs of the row's gradient is rounding
PER_SAMPLE_FD = 32  # most other samples probed one by one when autograd can't say which leak
_NOISE_POINTS = 9
# Layers that mix samples by design in train mode: the check names them and says to use eval mode.
_MIXES_IN_TRAIN = (nn.modules.batchnorm._BatchNorm,)

_LEAK_CAUSES = """\
This usually means one of:
  1. a reshape/view across the batch dimension where a transpose/permute was meant
     (e.g. x.reshape(seq, batch, d) on a (batch, seq, d) tensor);
  2. a reduction or normalisation over the whole batch instead of per sample (x.mean(0), x / x.norm());
  3. a layer that mixes samples by design in train mode (BatchNorm): check in eval mode.
A model trained on mixed samples learns from its neighbours; its eval-time outputs change with the batch."""


@dataclass(frozen=True, repr=False)
class BatchReport(Report):
    """A `Report` whose rows are output samples; adds which samples leak into which, and where they mix."""

    leaks: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (output sample, input samples that leak into it)
    mixing_module: str | None = None  # first module (forward order) whose output mixes samples
    mixing_type: str | None = None
    hint: str = ""
    batch_size: int = 0

    def headline(self) -> str:
        rows = [r for r in self.results if r.status != "skipped"]
        if self.passed:
            return (
                f"{self.call}: OK, {len(rows)} of {self.batch_size} output samples depend only on their own "
                f"input sample (autograd and finite differences agree)"
            )
        leaking = [r for r in rows if r.status == "leaks"]
        where = ""
        if self.mixing_module is not None:
            where = f"; first module whose output mixes samples: {self.mixing_module} ({self.mixing_type})"
        if leaking:
            return f"{self.call}: FAILED, {len(leaking)} of {len(rows)} output samples depend on other samples{where}"
        return f"{self.call}: FAILED, the backward disagrees with finite differences across samples{where}"

    def table(self) -> str:
        rows = [("output", "status", "depends on samples", "cross-sample d/dx", "autograd", "tol")]
        leaks = dict(self.leaks)
        for r in self.results:
            w = r.worst[0] if r.worst else None
            src = leaks.get(_sample_of(r.name), ())
            shown = ", ".join(map(str, src[:6])) + (f" +{len(src) - 6}" if len(src) > 6 else "") if src else "-"
            rows.append(
                (
                    r.name,
                    r.status,
                    shown,
                    _num(w.numerical) if w else "-",
                    _num(w.analytical) if w else "-",
                    _fmt(w.tolerance) if w else "-",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)

    def details(self) -> list[str]:
        # the table lists who leaks into whom; a note adds something only when the backward is wrong
        lines = [f"  {r.name}: {r.note}" for r in self.results if "backward" in r.note][:3]
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return lines

    def __str__(self) -> str:
        opts = " ".join(f"{k}={v}" for k, v in dict(self.options).items())
        parts = [self.headline(), self.table(), *self.details(), *(f"  note: {n}" for n in self.notes)]
        parts.append(f"Checked with: {opts}; {self.evaluations:,} evaluations in {self.seconds:.2f} s")
        if not self.passed:
            parts.append(_LEAK_CAUSES)
        return "\n".join(parts)


BatchReport.__module__ = "torchgradcheck"


def _sample_of(name: str) -> int:
    return int(name[name.index("[") + 1 : name.index("]")])


def _call_model(model: Any, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)) and not hasattr(batch, "_fields"):
        return model(*batch)
    return model(batch)


def _positional(model: nn.Module) -> float:
    """How many positional arguments ``model.forward`` takes (inf with ``*args``; inf if unknown)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return math.inf
    kinds = [p.kind for p in params]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return math.inf
    return sum(k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in kinds)


def model_inputs(model: nn.Module, batch: Any) -> tuple[Any, str]:
    """The part of `batch` the model is called with, and a note if a target was left out.

    A tuple/list is the model's positional arguments, unless the model takes fewer and it is
    ``(inputs, target)``, the batch `verify_module` takes: then the model gets ``inputs`` alone.
    """
    if isinstance(batch, (tuple, list)) and not hasattr(batch, "_fields") and len(batch) == 2:
        if _positional(model) < 2:
            note = "the batch is (inputs, target), as for verify_module: the model was called with the inputs alone"
            return batch[0], note
    return batch, ""


def _validate(model: Any, batch: Any, batch_dim: Any, forward: Any, samples: Any) -> None:
    if not isinstance(model, nn.Module):
        raise InvalidArgumentTypeError(
            f"{_CALL}: expected a torch.nn.Module but got model={model!r} (type={type(model).__name__})."
        )
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
        raise InvalidArgumentError(f"{_CALL}: the model has uninitialized (lazy) parameters; run one forward first.")
    if forward is not None and not callable(forward):
        raise InvalidArgumentTypeError(
            f"{_CALL}: forward= must be a callable (model, batch) -> output, got {forward!r}."
        )
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, int):
        raise InvalidArgumentTypeError(f"{_CALL}: batch_dim={batch_dim!r} must be an int (the batch dimension).")
    if samples is None:
        return
    if isinstance(samples, int) and not isinstance(samples, bool):
        if samples < 1:
            raise InvalidArgumentError(f"{_CALL}: samples={samples!r} must be >= 1 (how many output samples to check).")
        return
    if isinstance(samples, (list, tuple)) and samples and all(isinstance(i, int) for i in samples):
        return
    raise InvalidArgumentTypeError(
        f"{_CALL}: samples= takes a count (int) or a list of sample indices, got {samples!r}; "
        "leave it None to check every sample of a small batch."
    )


def _convert(batch: Any, dtype: torch.dtype | None) -> Any:
    leaves, spec = pytree.tree_flatten(batch)
    out = []
    for i, x in enumerate(leaves):
        if isinstance(x, torch.Tensor):
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise InvalidArgumentError(f"{_CALL}: the batch's tensor #{i} contains NaN or Inf; pass finite inputs.")
            with torch.inference_mode(False):
                x = x.detach().to(dtype=dtype if (dtype is not None and x.is_floating_point()) else x.dtype, copy=True)
        out.append(x)
    return pytree.tree_unflatten(out, spec)


def _batch_axis(t: torch.Tensor, size: int, batch_dim: int) -> int | None:
    """The axis of `t` that holds the batch: `batch_dim` if it has the batch size, else the only such axis."""
    if t.dim() > batch_dim >= -t.dim() and t.shape[batch_dim] == size:
        return batch_dim % t.dim()
    axes = [k for k, n in enumerate(t.shape) if n == size]
    return axes[0] if len(axes) == 1 else None


@dataclass
class _Setup:
    lent: Lent
    batch: Any
    forward: Callable[[Any, Any], Any]
    seed: int
    leaves: list[torch.Tensor]  # the batched floating tensors of the batch (perturbed in place)
    axes: list[int]
    size: int
    batch_dim: int
    grad_mode: bool = False  # the forward needs autograd (it differentiates inside)
    bases: list[torch.Tensor] = field(default_factory=list)  # unperturbed copies of `leaves`
    evaluations: int = 0
    notes: list[str] = field(default_factory=list)

    def outputs(self, record: dict[str, list[torch.Tensor]] | None = None, row: int = 0) -> torch.Tensor:
        """s: (B,) weighted sums of each output sample (after one seeded forward)."""
        self.lent.reset_buffers()
        reseed(self.seed)
        self.evaluations += 1
        with _Recorder(self.lent.model, record, self.size, self.batch_dim, row):
            out = self.forward(self.lent.model, self.batch)
        return _weighted(out, self.size, self.batch_dim, self.seed)


class _Recorder:
    """Forward hooks that keep row `row` of every module call's batched output (flattened), in completion order."""

    def __init__(self, model: nn.Module, record: dict[str, list[torch.Tensor]] | None, size: int, dim: int, row: int):
        self.model, self.record, self.size, self.dim, self.row = model, record, size, dim, row
        self.handles: list[Any] = []

    def __enter__(self) -> _Recorder:
        if self.record is None:
            return self
        names = {id(m): n or "(model)" for n, m in self.model.named_modules()}
        counts: dict[int, int] = {}

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            k = counts[id(module)] = counts.get(id(module), 0) + 1
            key = names[id(module)] + (f"#{k}" if k > 1 else "") + "\0" + type(module).__name__
            rows = []
            for t in pytree.tree_leaves(output):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    axis = _batch_axis(t, self.size, self.dim)
                    if axis is not None:
                        rows.append(t.detach().select(axis, self.row).reshape(-1).to(torch.float64).clone())
            if rows and self.record is not None:
                self.record.setdefault(key, []).append(torch.cat(rows))

        self.handles = [m.register_forward_hook(hook) for m in self.model.modules()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()


def _weighted(out: Any, size: int, batch_dim: int, seed: int) -> torch.Tensor:
    """``s_i = sum_k <out_k[i], r_k[i]>`` over the output tensors that carry the batch, r fixed by `seed`."""
    total = None
    generator = torch.Generator().manual_seed(seed + 1)
    for t in pytree.tree_leaves(out):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            continue
        axis = _batch_axis(t, size, batch_dim)
        if axis is None:
            continue
        rows = t.movedim(axis, 0).reshape(size, -1).to(torch.float64)
        r = torch.randn(rows.shape, generator=generator, dtype=torch.float64).to(rows.device)
        s = (rows * r).sum(1)
        total = s if total is None else total + s
    if total is None:
        raise InvalidArgumentError(
            f"{_CALL}: no floating output tensor has the batch size {size} at dim {batch_dim}; pass batch_dim= "
            "(the batch dimension of inputs and outputs), or forward= returning the batched output."
        )
    return total


def verify_batch_independence(
    model: nn.Module,
    batch: Any,
    *,
    batch_dim: int = 0,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    samples: int | Sequence[int] | None = None,
    dtype: torch.dtype | None = torch.float64,
    seed: int = 0,
    eps: float | None = None,
    rtol: float | None = None,
    atol: float = 0.0,
    progress: bool | None = None,
    mode: str = "auto",
    budget: float = 3.0,
    engine: str = "auto",
    **unknown: Any,
) -> Report:
    """Check that output sample i of `model` depends on input sample i only (no leak across the batch).

    Args:
        model: the module. It runs as it is (train or eval mode): train-mode BatchNorm mixes samples
            by design and fails, with a hint to check in eval mode.
        batch: the model's input: a Tensor (``model(batch)``), a tuple/list (``model(*batch)``) or a
            dict (``model(**batch)``). The batch of `verify_module` works too: ``(inputs, target)``
            for a model that takes one argument calls ``model(inputs)`` (noted). Its floating tensors
            with the batch size at `batch_dim` are perturbed; other tensors (masks, token ids, shared
            tensors) are passed as they are.
        batch_dim: the batch dimension of the inputs and outputs (negative counts from the end).
        forward: instead, ``forward(model, batch) -> output`` (any nesting of tensors).
        samples: how many output samples to check (an int, drawn at random with `seed`), or which
            (a list of indices). Default: all of a batch of up to 16, else 8 random ones.
        dtype: checking precision (float64); None keeps the model's own dtype.
        seed: seeds the RNG before every forward (dropout masks agree) and the random directions.
        eps, rtol, atol: step and tolerance floors, as in `verify_module`.
        progress, mode, budget, engine: the options every ``verify_*`` shares, validated the same way;
            this check always takes the same few forwards per sample (a loop, no progress bar).

    Returns:
        A `Report` (a `BatchReport`): one row per checked output sample, ``leaks`` (which input
        samples leak into which output sample), ``mixing_module`` (the first module whose output
        mixes samples) and a ``hint``.

    Example:
        >>> verify_batch_independence(nn.Linear(3, 2), torch.randn(4, 3)).passed
        True
    """
    start = time.perf_counter()
    reject_unknown("verify_batch_independence", unknown, _OPTIONS)
    _validate(model, batch, batch_dim, forward, samples)
    shared = {"dtype": dtype, "mode": mode, "budget": budget, "seed": seed, "eps": eps, "rtol": rtol}
    check_options("verify_batch_independence", **shared, atol=atol, engine=engine, progress=progress)
    converted = _convert(batch, dtype)
    with preserved_global_state(), lend_model(model, dtype) as lent:
        if dtype == torch.float64:
            torch.set_default_dtype(torch.float64)
        note = ""
        if forward is None:
            converted, note = model_inputs(model, converted)
        setup = _setup(lent, converted, batch_dim, forward or _call_model, seed)
        setup.notes += [note] if note else []
        checked = _choose_samples(setup.size, samples, seed)
        eps_, rtol_ = resolve_tolerances(dtype or setup.leaves[0].dtype, eps, rtol)
        result = _run(setup, checked, eps_, rtol_, float(atol))
    options = {
        "dtype": str(dtype or setup.leaves[0].dtype).replace("torch.", ""),
        "batch_dim": batch_dim,
        "batch_size": setup.size,
        "samples": len(checked),
        "eps": eps_,
        "rtol": rtol_,
        "atol": float(atol),
        "seed": seed,
    }
    return BatchReport(
        call="verify_batch_independence",
        results=tuple(result.rows),
        relative_error=result.relative_error,
        options=options,
        evaluations=setup.evaluations,
        seconds=time.perf_counter() - start,
        engine="loop",
        notes=tuple(setup.notes),
        leaks=tuple(result.leaks),
        mixing_module=result.module,
        mixing_type=result.module_type,
        hint=result.hint,
        batch_size=setup.size,
    )


def _setup(lent: Lent, batch: Any, batch_dim: int, forward: Callable[[Any, Any], Any], seed: int) -> _Setup:
    flat, _ = pytree.tree_flatten(batch)
    floats = [x for x in flat if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() > 0]
    if not floats:
        raise InvalidArgumentError(
            f"{_CALL}: the batch has no floating tensor to perturb (integer token ids can't be); pass the "
            "floating input (e.g. the embeddings) and forward=lambda model, emb: model.rest(emb)."
        )
    first = floats[0]
    if not (first.dim() > batch_dim >= -first.dim()):
        raise InvalidArgumentError(
            f"{_CALL}: batch_dim={batch_dim} is out of range for the first input of shape {tuple(first.shape)}."
        )
    size = first.shape[batch_dim]
    if size < 2:
        raise InvalidArgumentError(f"{_CALL}: the batch has {size} sample(s) at dim {batch_dim}; it needs at least 2.")
    leaves, axes = [], []
    for x in floats:
        if x.dim() > batch_dim >= -x.dim() and x.shape[batch_dim] == size:
            x.requires_grad_(True)
            leaves.append(x)
            axes.append(batch_dim % x.dim())
    setup = _Setup(lent, batch, forward, seed, leaves, axes, size, batch_dim)
    setup.bases = [x.detach().clone() for x in leaves]
    return setup


def _choose_samples(size: int, samples: int | Sequence[int] | None, seed: int) -> list[int]:
    if isinstance(samples, (list, tuple)):
        bad = [i for i in samples if not -size <= i < size]
        if bad:
            raise InvalidArgumentError(f"{_CALL}: samples={list(samples)} has indices outside a batch of {size}.")
        return sorted({i % size for i in samples})
    count = samples if samples is not None else (size if size <= ALL_SAMPLES else SAMPLED)
    if count >= size:
        return list(range(size))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=generator)[:count].tolist())


@dataclass
class _Outcome:
    rows: list[ParameterResult]
    leaks: list[tuple[int, tuple[int, ...]]]
    relative_error: float
    module: str | None
    module_type: str | None
    hint: str


def _evaluate(setup: _Setup, record: dict[str, list[torch.Tensor]] | None = None, row: int = 0) -> torch.Tensor:
    """The weighted output sums, under no_grad unless the forward differentiates inside."""
    with torch.set_grad_enabled(setup.grad_mode):
        return setup.outputs(record, row).detach()


def _autograd(setup: _Setup, checked: list[int]) -> tuple[torch.Tensor, dict[int, list[torch.Tensor]]]:
    """One forward with autograd: s (B,) detached, and the gradient of each checked s_i w.r.t. the batch."""
    with torch.enable_grad():
        s = setup.outputs()
    if not s.requires_grad:
        raise InvalidArgumentError(
            f"{_CALL}: the output does not depend on the batch through autograd (computed under no_grad, or detached?)."
        )
    autograd = {}  # before anything moves the batch or resets a buffer in place (autograd saved them)
    for i in checked:
        grads = torch.autograd.grad(s[i], setup.leaves, retain_graph=True, allow_unused=True)
        autograd[i] = [torch.zeros_like(x) if g is None else g.detach() for g, x in zip(grads, setup.leaves)]
    return s.detach(), autograd


def _grad_mode(setup: _Setup) -> None:
    """Try a no-grad forward; if the forward differentiates inside, run every later forward with grad on."""
    try:
        with torch.no_grad():
            _evaluate(setup)
    except RuntimeError as exc:
        if "grad" not in str(exc):
            raise
        setup.grad_mode = True
        setup.notes.append("the forward differentiates inside: perturbed forwards ran with grad enabled")


def _moved(setup: _Setup, deltas: list[torch.Tensor], scale: float) -> None:
    """Set the batched tensors to ``base + scale * delta`` (``scale=0`` puts them back exactly)."""
    with torch.no_grad():
        for x, base, d in zip(setup.leaves, setup.bases, deltas):
            x.copy_(base if scale == 0 else base + scale * d)


def _directions(setup: _Setup, generator: torch.Generator) -> list[torch.Tensor]:
    """A random +-max(1, |x|) direction per batched tensor (float64 values in the tensor's dtype)."""
    out = []
    for x in setup.leaves:
        signs = torch.randint(0, 2, x.shape, generator=generator).to(x.device, torch.float64) * 2 - 1
        out.append((signs * x.detach().to(torch.float64).abs().clamp(min=1.0)).to(x.dtype))
    return out


def _mask(setup: _Setup, directions: list[torch.Tensor], keep: Sequence[int]) -> list[torch.Tensor]:
    """`directions` with every sample except those in `keep` set to zero."""
    out = []
    for d, axis in zip(directions, setup.axes):
        m = torch.zeros(setup.size, dtype=d.dtype, device=d.device)
        m[list(keep)] = 1.0
        shape = [1] * d.dim()
        shape[axis] = setup.size
        out.append(d * m.view(shape))
    return out


def _noise(setup: _Setup, s0: torch.Tensor, generator: torch.Generator, eps: float) -> torch.Tensor:
    """Per-sample noise of s (ECNoise along one random direction of the whole batch), floored by u*|s|."""
    d = _directions(setup, generator)
    step = 1e-2 * math.sqrt(unit_roundoff(setup.leaves[0].dtype))
    values = []
    try:
        for t in range(1, _NOISE_POINTS + 1):
            _moved(setup, d, t * step)
            values.append(_evaluate(setup))
    finally:
        _moved(setup, d, 0)
    sigma = noise_per_column(torch.stack(values)) if values else torch.zeros_like(s0)
    u = unit_roundoff(setup.leaves[0].dtype)
    return torch.maximum(sigma, u * s0.abs())


@dataclass
class _Sample:
    """One output sample's evidence: autograd's dependence on the others, and the finite difference."""

    i: int
    others: list[int]
    auto_from: list[int]  # other samples autograd says output i depends on
    predicted: float  # autograd's derivative of s_i along the others-only direction
    numerical: float  # Richardson-refined central difference along the same direction
    tol: float
    records: tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]

    @property
    def fd_leak(self) -> bool:
        return abs(self.numerical) > self.tol

    @property
    def agree(self) -> bool:
        return abs(self.predicted - self.numerical) <= self.tol


def _sample(
    setup: _Setup, i: int, grads: list[torch.Tensor], directions: list[torch.Tensor], sigma: float, opts: tuple
) -> _Sample:
    """Autograd and finite differences for output sample i, every other sample moved at once."""
    eps, rtol, atol = opts
    u = unit_roundoff(setup.leaves[0].dtype)
    per_sample = sum(
        (g.to(torch.float64).movedim(a, 0).reshape(setup.size, -1) ** 2).sum(1) for g, a in zip(grads, setup.axes)
    ).sqrt()
    others = [j for j in range(setup.size) if j != i]
    auto_from = [j for j in others if float(per_sample[j]) > AUTOGRAD_FLOOR * u * float(per_sample.norm())]
    d = _mask(setup, directions, others)
    predicted = float(sum((g.to(torch.float64) * dd.to(torch.float64)).sum() for g, dd in zip(grads, d)))
    records: tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]] = ({}, {})
    values = {}
    try:
        for t, rec in ((1, records[0]), (-1, records[1]), (2, None), (-2, None)):
            _moved(setup, d, t * eps)
            values[t] = float(_evaluate(setup, rec, i)[i])
    finally:
        _moved(setup, d, 0)
    span = 2 * eps
    d1 = (values[1] - values[-1]) / span
    d2 = (values[2] - values[-2]) / (2 * span)
    numerical = (4 * d1 - d2) / 3
    truncation = abs(d1 - d2) / 3
    tol = atol + rtol * abs(numerical) + 1.5 * NOISE_SIGMAS * math.sqrt(2.0) * sigma / span + truncation
    return _Sample(i, others, auto_from, predicted, numerical, tol, records)


def _run(setup: _Setup, checked: list[int], eps: float, rtol: float, atol: float) -> _Outcome:
    s0, autograd = _autograd(setup, checked)
    _grad_mode(setup)
    generator = torch.Generator().manual_seed(setup.seed)
    sigma = _noise(setup, s0, generator, eps)
    directions = _directions(setup, generator)
    rows, leaks, num2, den = [], [], 0.0, 0.0
    records: dict[int, tuple[dict, dict]] = {}
    for i in checked:
        e = _sample(setup, i, autograd.pop(i), directions, float(sigma[i]), (eps, rtol, atol))
        num2 += (e.predicted - e.numerical) ** 2
        den += abs(e.predicted) + abs(e.numerical)
        note = ""
        if e.fd_leak or (e.auto_from and e.agree):
            status = "leaks"
            if e.agree and e.auto_from:
                source = e.auto_from
            else:
                source = _probe_each(setup, directions, i, e.others, eps, float(sigma[i]), rtol, atol)
                note = "autograd's backward does not show this dependence: a wrong backward hides the leak; "
            note += f"depends on input sample(s) {_listing(source)} ({len(source)} of {len(e.others)} others)"
            leaks.append((i, tuple(source)))
            if not records:
                records[i] = e.records
        elif not e.agree or e.auto_from:
            status = "mismatch"
            note = (
                f"autograd says this output depends on sample(s) {_listing(e.auto_from)}, but finite differences "
                "see no dependence: the backward is wrong across samples"
            )
        else:
            status = "ok"
        rows.append(_row(i, status, note, e.numerical, e.predicted, e.tol, len(e.others), len(e.auto_from)))
    module, module_type, hint = _first_mixing(setup, records, unit_roundoff(setup.leaves[0].dtype))
    return _Outcome(rows, leaks, math.sqrt(num2) / den if den > 0 else 0.0, module, module_type, hint)


def _probe_each(
    setup: _Setup,
    directions: list[torch.Tensor],
    i: int,
    others: list[int],
    eps: float,
    sigma: float,
    rtol: float,
    atol: float,
) -> list[int]:
    """Which other samples move output i: one central difference per sample (at most PER_SAMPLE_FD)."""
    found = []
    span = 2 * eps
    for j in others[:PER_SAMPLE_FD]:
        d = _mask(setup, directions, [j])
        vals = []
        try:
            for t in (1, -1):
                _moved(setup, d, t * eps)
                vals.append(float(_evaluate(setup)[i]))
        finally:
            _moved(setup, d, 0)
        n = (vals[0] - vals[1]) / span
        if abs(n) > atol + rtol * abs(n) + 1.5 * NOISE_SIGMAS * math.sqrt(2.0) * sigma / span:
            found.append(j)
    if len(others) > PER_SAMPLE_FD:
        setup.notes.append(f"only the first {PER_SAMPLE_FD} other samples were probed one by one")
    return found


def _listing(samples: Sequence[int]) -> str:
    shown = ", ".join(map(str, samples[:10]))
    return shown + (f", ... (+{len(samples) - 10})" if len(samples) > 10 else "")


def _row(
    i: int, status: str, note: str, numerical: float, predicted: float, tol: float, others: int, auto_from: int
) -> ParameterResult:
    from ._report import ElementResult

    err = abs(predicted - numerical)
    worst = (ElementResult(index=(i,), numerical=numerical, analytical=predicted, abs_error=err, tolerance=tol),)
    return ParameterResult(
        name=f"output[{i}]",
        shape=(),
        status=status,
        relative_error=err / (abs(predicted) + abs(numerical)) if abs(predicted) + abs(numerical) > 0 else 0.0,
        max_abs_error=err,
        checked=others,
        failed=auto_from if status != "ok" else 0,
        worst=worst,
        kind="output sample",
        note=note,
        coverage="autograd + finite differences",
    )


def _first_mixing(setup: _Setup, records: dict[int, tuple[dict, dict]], u: float) -> tuple[str | None, str | None, str]:
    """The first module call (completion order) whose output row moved when only other samples moved."""
    if not records:
        return None, None, ""
    plus, minus = next(iter(records.values()))
    modules = dict(setup.lent.model.named_modules())
    for key, before in plus.items():
        after = minus.get(key, [])
        for a, b in zip(before, after):
            if a.shape != b.shape:
                continue
            if float((a - b).norm()) > 64 * u * float(a.norm() + b.norm()) + torch.finfo(torch.float64).tiny:
                name, type_name = key.split("\0")
                module = modules.get(name.split("#")[0] if name != "(model)" else "")
                return name, type_name, _hint(module, name, type_name)
    return None, None, ("no module's output mixes samples: the mixing happens in forward= or outside any module")


def _hint(module: nn.Module | None, name: str, type_name: str) -> str:
    if isinstance(module, _MIXES_IN_TRAIN) and module.training:
        return (
            f"{name} ({type_name}) normalises with batch statistics in train mode, so it mixes samples by "
            "design: check in eval mode (model.eval()), where it uses its running statistics"
        )
    return (
        f"look at {name} ({type_name}): its output row for one sample moved when only the other samples moved "
        "(a reshape where a transpose was meant, or a reduction over the batch dimension?)"
    )

"""verify_function: check a callable of tensors (a custom autograd.Function, a hand-written backward).

The callable becomes a small private module so the `verify_module` engine can run on it unchanged:

* every argument tensor with ``requires_grad=True`` is copied into float64 and held as a Parameter
  ("slot") of `_Call`; `_Call.forward` calls ``fn`` with the slots substituted, every other argument
  passed as given (floating tensors as float64 copies, so dtypes match). The caller's tensors are
  never handed to ``fn``, never converted, never written to;
* each floating output ``k`` is reduced to a scalar with a fixed random cotangent,
  ``objective_k = sum(v_k * out_k)``, and checked as a loss: its gradient is the vector-Jacobian
  product ``J_k^T v_k``, so one backward per output covers the whole Jacobian at a cost linear in the
  input size, and a backward that ignores (or mis-scales) one output's gradient is caught;
* ``_params.lend_model`` / ``_engines`` / ``_measure.measure`` / ``_measure.summarise`` then do what they
  do for `verify_module`, with the same tolerance model, and produce one `TensorResult` per
  (output, input) pair, named like ``grad of output 1 w.r.t. w``.

The extra checks live in `_extras` (forward mode, non-contiguous inputs, determinism, the
dtype/shape/device of what ``backward`` returns) and `_second` (second derivatives).
Old-style Functions (``forward(ctx, ...)``) can't run under vmap: as in `verify_module`, the engine
falls back to the loop (`_engines.choose_engine` decides) and says so in a note.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .._batch import Objective
from .._check import _DTYPE_ERROR, mark_skipped_elements
from .._compare import relative_error
from .._engines import EngineSwitch, LoopEngine, choose_engine
from .._errors import InvalidArgumentError, InvalidArgumentTypeError
from .._measure import Settings, measure, summarise
from .._noise import NOISE_POINTS
from .._options import SHARED_OPTIONS, CheckOptions, check_options
from .._params import Lent, Target, lend_model
from .._progress import progress_bar
from .._report import Report, TensorResult
from .._state import preserved_global_state, reseed
from ._custom_op import as_custom_op, refuse_unsupported, with_opcheck
from ._extras import (
    Extras,
    check_forward_mode,
    check_noncontiguous,
    determinism_results,
    float_outputs,
    once_differentiable_nodes,
    spy_backward,
    vjp_at,
)
from ._repeat import repeatability_results
from ._second import check_second_order, second_order_warnings

__all__ = ["verify_function"]

_CALL = "verify_function(fn, *args, **kwargs)"
OPTIONS = (
    "nondet_tol",
    "second_order",
    "forward_mode",
    "noncontiguous",
    "opcheck",
    *SHARED_OPTIONS,
)
DTYPE = torch.float64
_EXPANDED = "its elements were checked as independent values of a contiguous copy"
_STREAM = 0x5DEECE66D  # offsets the seed of the random cotangents (see _run)


@dataclasses.dataclass
class _Slot:
    """Placeholder in the argument tree for a checked input; `_Call` fills in its Parameter."""

    key: str  # attribute name in `_Call` (``in0``, ``in1``, ...)
    name: str  # the name shown to the user (``w``, ``args[2]``, ``scale``)
    original: torch.Tensor
    expanded: bool


def _fill(tree: Any, values: dict[str, torch.Tensor]) -> Any:
    """`tree` with every `_Slot` replaced by its value."""
    return pytree.tree_map(lambda leaf: values[leaf.key] if isinstance(leaf, _Slot) else leaf, tree)


class _Call(nn.Module):
    """``fn`` with its checked inputs as Parameters (``in0``, ``in1``, ...) and every other argument fixed."""

    def __init__(
        self, fn: Callable[..., Any], args: tuple, kwargs: dict, slots: list[_Slot], work: torch.dtype | None
    ) -> None:
        super().__init__()
        owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
        if isinstance(owner, nn.Module):
            self.owner = owner  # lent with the rest: its parameters are float64 during the check
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "reset_buffers", lambda: None)  # the lent module's, during the check
        self.args, self.kwargs, self.slots = args, kwargs, slots
        for s in slots:
            data = s.original.detach().to(work or s.original.dtype, copy=True).contiguous()
            self.register_parameter(s.key, nn.Parameter(data))

    def prepare(self, seed: int) -> None:
        """Before every call outside the engines: buffers of ``fn``'s module reset, RNG re-seeded."""
        self.reset_buffers()
        reseed(seed)

    def leaves(self) -> dict[str, torch.Tensor]:
        return {s.key: getattr(self, s.key) for s in self.slots}

    def call_with(self, values: dict[str, torch.Tensor]) -> Any:
        return self.fn(*_fill(self.args, values), **_fill(self.kwargs, values))

    def forward(self) -> Any:
        return self.call_with(self.leaves())


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    """The signature naming ``fn``'s inputs: a Function's ``forward`` (less ctx), a module's ``forward``."""
    target: Any = fn
    cls = getattr(fn, "__self__", None)
    drop_ctx = False
    if isinstance(cls, type) and issubclass(cls, torch.autograd.Function):
        target = cls.forward
        drop_ctx = cls.setup_context is torch.autograd.Function.setup_context  # old style: forward(ctx, ...)
    elif isinstance(fn, nn.Module):
        target = fn.forward
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    if drop_ctx:
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    return sig


def _argument_names(fn: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[list[str], dict[str, str]]:
    """Display names of the positional and keyword arguments, from ``fn``'s signature where it has one."""
    pos = [f"args[{i}]" for i in range(len(args))]
    kw = {k: k for k in kwargs}
    sig = _signature(fn)
    if sig is None:
        return pos, kw
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise InvalidArgumentTypeError(f"{_CALL}: fn{sig} does not accept these arguments: {exc}.") from None
    i = 0
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            for j in range(len(value)):
                pos[i] = f"{name}[{j}]"
                i += 1
        elif kind is not inspect.Parameter.VAR_KEYWORD and name not in kwargs and i < len(args):
            pos[i] = name
            i += 1
    return pos, kw


def _reject_typos(fn: Callable[..., Any], kwargs: dict) -> None:
    """A keyword meant as an option (``second_ordr=False``) would silently go to ``fn``: refuse it."""
    sig = _signature(fn)
    named = set(sig.parameters) if sig is not None else set()
    open_ended = sig is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    for key, value in kwargs.items():
        if key in named:
            continue
        close = difflib.get_close_matches(key, OPTIONS, n=1, cutoff=0.75)
        if close or not open_ended:
            hint = f" Did you mean {close[0]}=?" if close else ""
            raise InvalidArgumentTypeError(
                f"{_CALL}: unknown keyword {key}={value!r}: it is not an option of verify_function "
                f"(options: {sorted(OPTIONS)}), and fn does not name such a parameter.{hint}"
            )


def _convert(tree: Any, name: str, slots: list[_Slot], work: torch.dtype | None, empty: list[str]) -> Any:
    """Checked tensors become `_Slot`s; other floating tensors copies in `work`; anything else unchanged.

    An empty tensor (numel 0) that requires grad has nothing to check: passed as a copy, named in `empty`.
    """
    return pytree.tree_map_with_path(
        lambda key, leaf: _convert_leaf(leaf, name + pytree.keystr(key), slots, work, empty), tree
    )


def _convert_leaf(tree: Any, name: str, slots: list[_Slot], work: torch.dtype | None, empty: list[str]) -> Any:
    if not isinstance(tree, torch.Tensor):
        return tree
    if tree.requires_grad and tree.is_complex():
        raise InvalidArgumentError(f"{_CALL}: {name} is complex; complex inputs are not supported yet.")
    if tree.requires_grad and tree.is_floating_point() and tree.numel() == 0:
        empty.append(name)
    elif tree.requires_grad and tree.is_floating_point():
        # NaN/Inf elements (inputs meant for torch.nansum) are legal: never perturbed, listed (`_first_order`)
        expanded = tree.numel() > 1 and any(st == 0 and sz > 1 for st, sz in zip(tree.stride(), tree.shape))
        slots.append(_Slot(f"in{len(slots)}", name, tree, expanded))
        return slots[-1]
    if tree.is_floating_point():
        return tree.detach().to(work or tree.dtype, copy=True)
    return tree


def _validate(fn: Any, args: tuple, kwargs: dict, options: dict[str, Any]) -> None:
    """The options of verify_function only; the shared ones are `check_options`'s."""
    if not callable(fn):
        raise InvalidArgumentTypeError(
            f"{_CALL}: fn must be callable (e.g. MyFunction.apply) but got fn={fn!r} (type={type(fn).__name__})."
        )
    for flag in ("second_order", "forward_mode", "noncontiguous", "opcheck"):
        if not isinstance(options[flag], bool) and not (flag == "second_order" and options[flag] is None):
            allowed = "True, False or None" if flag == "second_order" else "True or False"
            raise InvalidArgumentTypeError(f"{_CALL}: {flag}= must be {allowed}, got {options[flag]!r}.")
    tol = options["nondet_tol"]
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise InvalidArgumentError(f"{_CALL}: nondet_tol={tol!r} must be a number >= 0.")
    _reject_typos(fn, kwargs)


def _supported(shared: CheckOptions) -> None:
    """The shared options verify_function cannot honour yet are refused by name (never ignored)."""
    if shared.mode not in ("auto", "full"):
        raise InvalidArgumentError(
            f"verify_function: mode={shared.mode!r} is not supported yet: every input element is checked; "
            "use mode='auto' or mode='full'."
        )


def verify_function(
    fn: Callable[..., Any],
    /,
    *args: Any,
    dtype: torch.dtype | None = torch.float64,
    mode: str = "auto",
    budget: float = 3.0,
    eps: float | None = None,
    rtol: float | None = None,
    atol: float = 0.0,
    nondet_tol: float = 0.0,
    seed: int = 0,
    engine: str = "auto",
    second_order: bool | None = None,
    forward_mode: bool = True,
    noncontiguous: bool = True,
    opcheck: bool = True,
    progress: bool | None = None,
    **kwargs: Any,
) -> Report:
    """Check the gradients of ``fn(*args, **kwargs)`` w.r.t. its inputs that require grad.

    Every floating output is projected on a fixed random cotangent ``v_k`` and the vector-Jacobian
    product from ``backward`` is compared, element by element, with central differences in float64
    (the tolerance model of `verify_module`). Then, by default, in this order and each in its own rows:
    second derivatives (the double backward along a random direction, against differences of the
    backward; skipped with a note for ``@once_differentiable`` or when the first derivatives already
    fail; a warning, not a failure, unless ``second_order=True``), the ``jvp`` (forward mode; "forward
    mode unavailable" is noted when ``fn`` has none, never compared with a zero), the backward
    on non-contiguous (transposed/strided) copies of the inputs, and determinism (the backward run
    twice; a row only when the runs differ). Before those, the backward is called twice through the
    same graph: one that changes state saved on ``ctx`` fails ("backward not repeatable"). A gradient
    that ``backward`` returns with the wrong dtype, shape or device fails its row by name, even where
    autograd would cast or reduce it.

    Options are keyword-only and their names are reserved: every other keyword goes to ``fn``. A
    keyword that ``fn`` does not name and that looks like an option (``second_ordr=``) is an error.
    To pass ``fn`` a keyword with a reserved name (``fn(x, eps=0.1)``), wrap it:
    ``verify_function(lambda x: fn(x, eps=0.1), x)``.

    Args:
        fn: any callable of tensors: ``MyFunction.apply``, a function built on one, a module.
        dtype: checking precision: float64 (default), another floating dtype, or None to keep every
            input's own dtype (a float32-only kernel; tolerances follow that dtype's measured noise).
        mode: "auto" or "full": every element of every input (the first-order rows). "directional"
            and "sampled" are not supported by verify_function yet and are refused.
        budget: seconds "auto" may plan for (accepted for symmetry with verify_module).
        *args: positional arguments of ``fn``. Tensors with ``requires_grad=True`` (top level or in
            tuples/lists/dicts) are checked, as float64 copies; other floating tensors are passed as
            float64 copies; integer tensors and non-tensors unchanged. The caller's tensors are never
            modified or converted, even if ``fn`` raises. If ``fn`` is a module (or its bound method),
            its parameters hold float64 copies during the check and are restored bit-exactly.
        eps: relative step; the step of element t is ``eps * max(1, |t|)`` (default 6e-6).
        rtol: relative floor of each element's tolerance (default 1e-6).
        atol: absolute floor added to each element's tolerance (default 0: the measured noise sets it).
        nondet_tol: allowed difference between two runs of the backward (default 0: bit-identical).
        seed: the RNG seed set before every evaluation, and the seed of the random cotangents.
        engine: "auto" (vmap, falling back to a loop), "vmap" or "loop".
        second_order: second derivatives (``x -> vjp(x, v)``) when the backward is differentiable.
            None (default): checked, and a wrong or impossible double backward is a warning
            (``report.warnings``, status "warning"), the verdict stands; True: part of the verdict;
            False: not checked.
        forward_mode: also check ``jvp`` (forward-mode AD) where ``fn`` supports it.
        noncontiguous: also run the backward on non-contiguous copies of the inputs.
        progress: show a progress bar (None: when stderr is a terminal).
        **kwargs: keyword arguments of ``fn``, treated like ``args``.

    Returns:
        A `Report` (``call="verify_function"``): one `TensorResult` per (output, input) pair named
        ``grad of output 1 w.r.t. w`` (``grad w.r.t. w`` for a single output), then the rows of the
        extra checks (``2nd order: ...``, ``jvp of ...``, ``non-contiguous: ...``, ``determinism: ...``).

    Raises:
        InvalidArgumentTypeError: ``fn`` is not callable, an option has the wrong type, or a keyword is unknown.
        InvalidArgumentError: no input requires grad, ``fn`` returns nothing differentiable (or a
            non-finite value), a complex or non-finite input, a bad option.
        Any exception ``fn`` itself raises propagates unchanged (the caller's tensors are untouched).

    Sharp edges: complex inputs are not supported; an expanded input (overlapping memory) is checked
    as a contiguous copy whose elements are independent, with a note; nested tensors inside
    tuples/lists/dicts are checked too and named like ``xs[1]``.

    Example:
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> w = torch.randn(2, 3, requires_grad=True)
        >>> verify_function(lambda x, w: x @ w.T, x, w).passed
        True
    """
    start = time.perf_counter()
    if not callable(fn):
        _validate(fn, args, kwargs, {})
    shared = check_options(
        "verify_function",
        dtype=dtype,
        mode=mode,
        budget=budget,
        seed=seed,
        eps=eps,
        rtol=rtol,
        atol=atol,
        engine=engine,
        progress=progress,
    )
    _supported(shared)
    options = {
        "nondet_tol": nondet_tol,
        "second_order": second_order,
        "forward_mode": forward_mode,
        "noncontiguous": noncontiguous,
        "opcheck": opcheck,
    }
    _validate(fn, args, kwargs, options)
    work = shared.dtype  # None: every tensor keeps its own dtype (a float32-only kernel)
    op = as_custom_op(fn, args, kwargs)  # a torch.library op: named by its schema, opcheck'ed at the end
    call = _make_call(fn, args, kwargs, work, op)
    slots = call.slots
    resolved = shared.resolve(work or slots[0].original.dtype, slots[0].original.device)
    with preserved_global_state(), lend_model(call, work) as lent:
        if work is not None:
            torch.set_default_dtype(work)
        report = _run(call, lent, resolved, options, start)
    return report if op is None else with_opcheck(report, op, args, kwargs, enabled=opcheck)


def _make_call(fn: Callable[..., Any], args: tuple, kwargs: dict, work: torch.dtype | None, op: Any) -> _Call:
    """``fn`` with its arguments converted: the inputs that require grad become the `_Call`'s slots."""
    pos_names, kw_names = _argument_names(fn, args, kwargs) if op is None else refuse_unsupported(op, args, kwargs)
    slots: list[_Slot] = []
    empty: list[str] = []
    conv_args = tuple(_convert(a, n, slots, work, empty) for a, n in zip(args, pos_names))
    conv_kwargs = {k: _convert(v, kw_names[k], slots, work, empty) for k, v in kwargs.items()}
    if not slots and empty:
        raise InvalidArgumentError(
            f"{_CALL}: every input that requires grad is empty ({', '.join(empty)} with numel 0), so there "
            "is nothing to check; pass inputs with at least one element."
        )
    if not slots:
        raise InvalidArgumentError(
            f"{_CALL}: no input requires grad, so there is nothing to check; mark the inputs to check "
            "with x.requires_grad_() (integer tensors and tensors without requires_grad are passed through)."
        )
    call = _Call(fn, conv_args, conv_kwargs, slots, work)
    call.empty = tuple(empty)
    return call


def _objective(k: int, v: torch.Tensor) -> Callable[[Any, Any], torch.Tensor]:
    """``forward(model, batch)`` for the Objective: ``sum(v * out_k)`` of whatever module is passed in."""

    def forward(model: Any, _: Any) -> torch.Tensor:
        outs = dict(float_outputs(model()))
        return (v * outs[k].to(DTYPE)).sum()

    return forward


def _outputs(call: _Call, seed: int) -> tuple[Any, list[tuple[int, torch.Tensor]], list[int]]:
    """The first call of ``fn`` (with grad): its raw result, its checked floating outputs, the skipped ones.

    Outputs that autograd marks non-differentiable (``requires_grad=False``: ``ctx.mark_non_differentiable``,
    the mean/rstd of ``native_layer_norm``) are not checked, as gradcheck does; their indices come third.
    """
    with torch.enable_grad():
        call.prepare(seed)
        raw = _first_call(call)
    outs = float_outputs(raw)
    if not outs:
        raise InvalidArgumentError(
            f"{_CALL}: fn returned nothing differentiable (a {type(raw).__name__}); it must return a "
            "floating Tensor or a tuple/list containing some."
        )
    if not any(t.requires_grad for _, t in outs):
        raise InvalidArgumentError(
            f"{_CALL}: no output of fn requires grad: nothing connects the outputs to the inputs "
            "(computed under torch.no_grad(), or detached?)."
        )
    if not any(t.requires_grad and t.numel() > 0 for _, t in outs):
        raise InvalidArgumentError(
            f"{_CALL}: every output of fn that requires grad is empty (numel 0): there is nothing to check."
        )
    for i, t in outs:
        if not bool(torch.isfinite(t.detach()).all()):
            raise InvalidArgumentError(
                f"{_CALL}: output {i} of fn is not finite at the given inputs (NaN/Inf input elements are "
                "legal only where fn ignores them, as torch.nansum does)."
            )
    checked = [(i, t) for i, t in outs if t.requires_grad and t.numel() > 0]
    return raw, checked, [i for i, t in outs if not t.requires_grad or t.numel() == 0]


def _runs_on_own_layout(call: _Call) -> bool:
    """Does ``fn`` run on copies that keep each input's storage, strides and offset (where ours failed)?"""

    def same_layout(t: torch.Tensor) -> torch.Tensor:
        n = t.untyped_storage().nbytes() // t.element_size()
        flat = torch.as_strided(t.detach(), (n,), (1,), 0).clone()  # the whole storage, copied
        return flat.as_strided(t.shape, t.stride(), t.storage_offset())

    values = {s.key: same_layout(s.original) for s in call.slots}
    try:
        with torch.no_grad():
            call.fn(*_fill(call.args, values), **_fill(call.kwargs, values))
    except Exception:
        return False
    return True


def _first_call(call: _Call) -> Any:
    """``fn`` at the given inputs; a kernel that refuses the checking dtype gets an error naming dtype=None."""
    try:
        return call()
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        work = {p.dtype for p in call.leaves().values()}
        own = {s.original.dtype for s in call.slots}
        views = [s for s in call.slots if s.original.storage_offset() or not s.original.is_contiguous()]
        if views and _runs_on_own_layout(call):
            raise InvalidArgumentError(
                f"{_CALL}: fn failed on the contiguous copies that verify_function checks ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}); {views[0].name} is a view into a larger storage (storage "
                f"offset {views[0].original.storage_offset()}, strides {views[0].original.stride()}), which fn "
                "may rely on (as_strided). Pass contiguous inputs, or wrap fn to build the view itself."
            ) from exc
        if own <= work or not _DTYPE_ERROR.search(str(exc)):
            raise  # fn's own error, not our conversion: let it through untouched
        raise InvalidArgumentError(
            f"{_CALL}: fn failed when run in {sorted(map(str, work))} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); its inputs are {sorted(map(str, own))}. If its kernels only "
            "run in that dtype, pass dtype=None (tolerances then follow the measured noise of that dtype)."
        ) from exc


def _bad_returns(
    found: dict[str, tuple[str, str]], results: list[TensorResult], pairs: list[tuple[int, str]], slots: list[_Slot]
) -> list[TensorResult]:
    """Mark the rows of inputs whose gradient ``backward`` returned with a wrong dtype/shape/device.

    A wrong gradient returned by a Function deeper inside ``fn`` (not straight to a checked input)
    gets a row of its own.
    """
    out = []
    for (_, key), r in zip(pairs, results):
        if key in found:
            status, note = found[key]
            if status == "warning" and r.failed:  # a gradient summed down and wrong: the values decide
                r = dataclasses.replace(r, note=note)
            else:  # right values in the wrong dtype/shape: no "worst elements over tolerance" (there are none)
                r = dataclasses.replace(r, status=status, note=note, worst=r.worst if r.failed else ())
        out.append(r)
    keys = {s.key for s in slots}
    for key, (status, note) in found.items():
        if key not in keys:
            out.append(TensorResult(name=f"returned by {key}", shape=(), status=status, kind="input", note=note))
    return out


def _raised_report(call: _Call, found: dict[str, tuple[str, str]], exc: Exception, start: float) -> Report:
    """Autograd refused what backward returned (shape/device): report it by input name."""
    rows = []
    for s in call.slots:
        if s.key in found:
            status, note = found[s.key]
        else:
            status, note = "skipped", "not checked: the backward raised (see the other rows)"
        rows.append(
            TensorResult(
                name=f"grad w.r.t. {s.name}", shape=tuple(s.original.shape), status=status, kind="input", note=note
            )
        )
    rows += _bad_returns({k: v for k, v in found.items() if k not in {s.key for s in call.slots}}, [], [], call.slots)
    first = (str(exc).splitlines() or [""])[0][:200]
    return Report(
        call="verify_function",
        results=tuple(rows),
        relative_error=float("nan"),
        options=CheckOptions(dtype=DTYPE, mode="full", device=str(call.slots[0].original.device)),
        seconds=time.perf_counter() - start,
        notes=(f"autograd raised {type(exc).__name__}: {first}",),
    )


def _extra_checks(ex: Extras, options: dict[str, Any], first_ok: bool) -> list[TensorResult]:
    """Second order, forward mode, non-contiguous inputs, in this order (determinism comes last, in `_run`).

    Second order and non-contiguous inputs are judged against the first derivatives, so they only run
    when those pass: a wrong gradient is reported once, as itself.
    """
    failing = "not checked, because the first derivatives already disagree"
    rows = _second_order(ex, options["second_order"], first_ok)
    if options["forward_mode"]:
        rows += check_forward_mode(ex)
    else:
        ex.notes.append("forward mode: off (forward_mode=False)")
    if not options["noncontiguous"]:
        ex.notes.append("non-contiguous inputs: off (noncontiguous=False)")
    elif not first_ok:
        ex.notes.append(f"non-contiguous inputs: {failing}")
    else:
        rows += check_noncontiguous(ex)
    return rows


def _second_order(ex: Extras, wanted: bool | None, first_ok: bool) -> list[TensorResult]:
    """The second-order rows: part of the verdict if `wanted` is True, warnings if None, none if False."""
    if wanted is False:
        ex.notes.append("second order: off (second_order=False)")
        return []
    if not first_ok:
        ex.notes.append("second order: not checked, because the first derivatives already disagree")
        return []
    once = once_differentiable_nodes([t for _, t in _outputs(ex.call, ex.seed)[1]])
    if once:
        ex.notes.append(
            f"second order: not checked: the backward of {', '.join(sorted(once))} is "
            "@once_differentiable (information, not a failure)"
        )
        return []
    rows = check_second_order(ex)
    return rows if wanted else second_order_warnings(ex, rows)


def _start(call: _Call, seed: int) -> tuple[Extras, dict[int, torch.Tensor], bool]:
    """The first call of ``fn``: the `Extras` every check shares (cotangents drawn), and ``several``."""
    # Not torch.manual_seed(seed)'s stream: a caller who drew x with seed 0 would get v == x, and a
    # transposed gradient of sum(v * (x @ w.T)) (x.T v instead of v.T x) would then go unnoticed.
    generator = torch.Generator().manual_seed((seed ^ _STREAM) & (2**63 - 1))
    raw, outs, skipped = _outputs(call, seed)
    several = len(outs) + len(skipped) > 1 or isinstance(raw, (tuple, list))
    cotangents = {k: torch.randn(t.shape, generator=generator, dtype=DTYPE).to(t.device) for k, t in outs}
    ex = Extras(
        call=call,
        cotangents=cotangents,
        grads={},
        checks={},
        settings=Settings(0.0, 0.0, 0.0),
        seed=seed,
        generator=generator,
        several=several,
    )
    ex.notes += [f"{s.name} is an expanded tensor (overlapping memory): {_EXPANDED}" for s in call.slots if s.expanded]
    ex.notes += [f"{name} is empty (numel 0): nothing to check, skipped" for name in getattr(call, "empty", ())]
    sizes = dict(float_outputs(raw))
    ex.notes += [
        f"{ex.output(i)} is empty (numel 0): nothing to check, skipped"
        if sizes[i].numel() == 0
        else f"{ex.output(i)} is non-differentiable (requires_grad=False: ctx.mark_non_differentiable, or a "
        "statistic such as the mean/rstd of native_layer_norm): not checked, as gradcheck does"
        for i in skipped
    ]
    return ex, cotangents, several


def _run(call: _Call, lent: Lent, shared: CheckOptions, options: dict[str, Any], start: float) -> Report:
    seed = shared.seed
    object.__setattr__(call, "reset_buffers", lent.reset_buffers)
    ex, cotangents, _ = _start(call, seed)
    ex.settings = Settings(eps=float(shared.eps or 0), rtol=float(shared.rtol or 0), atol=shared.atol)
    found: dict[str, tuple[str, str]] = {}
    names = {s.key: s.name for s in call.slots}
    leaves = call.leaves()
    try:
        losses, ex.grads = vjp_at(
            call,
            leaves,
            cotangents,
            seed,
            before_backward=lambda o: spy_backward(list(o.values()), leaves, names, found),
        )
    except RuntimeError as exc:
        if not found:
            raise
        return _raised_report(call, found, exc, start)
    torch.set_grad_enabled(False)
    engines: set[str] = set()
    total = sum(len(cotangents) * (2 * s.original.numel() + NOISE_POINTS) for s in call.slots)
    with progress_bar(total, shared.progress, "verify_function") as bar:
        results, pairs, evaluations = _first_order(ex, lent, losses, shared, bar.update, engines)
    results = _bad_returns(found, results, pairs, call.slots)
    ex.warnings += [note[0].upper() + note[1:] for status, note in found.values() if status == "warning"]
    results += repeatability_results(ex, options["nondet_tol"])
    results += _extra_checks(ex, options, all(r.passed for r in results))
    results += determinism_results(ex, options["nondet_tol"])
    kept = [(c.analytical[~c.kink], c.numerical[~c.kink]) for c in ex.checks.values()]
    return Report(
        call="verify_function",
        results=tuple(results),
        relative_error=relative_error(torch.cat([a for a, _ in kept]), torch.cat([n for _, n in kept])),
        options=dataclasses.replace(shared, mode="full"),
        evaluations=evaluations + ex.evaluations,
        seconds=time.perf_counter() - start,
        engine="vmap" if engines == {"vmap"} else "loop",
        notes=tuple(ex.notes),
        warnings=tuple(ex.warnings),
    )


def _first_order(
    ex: Extras, lent: Lent, losses: dict[int, torch.Tensor], shared: CheckOptions, tick: Any, engines: set[str]
) -> tuple[list[TensorResult], list[tuple[int, str]], int]:
    """Every (output, input) pair's vector-Jacobian product against central differences, in float64.

    Fills ``ex.checks`` (the raw outcome, which the extra checks reuse) and `engines` (names used);
    returns the rows, their (output, slot key) pairs and the evaluations spent.
    """
    call, settings, generator = ex.call, ex.settings, ex.generator
    results: list[TensorResult] = []
    pairs: list[tuple[int, str]] = []
    evaluations = 0
    for k, v in ex.cotangents.items():
        objective = Objective(None, None, _objective(k, v))
        loop = LoopEngine(lent, objective, ex.seed, tick)
        _, nondet = loop.loss_twice()
        if nondet > 0:
            ex.notes.append(
                f"the forward of {ex.output(k)} is nondeterministic: two identical evaluations "
                f"differ by {nondet:.2e}; tolerances widened by this noise"
            )
        for s in call.slots:
            param = getattr(call, s.key)
            target = Target(s.key, param.data, kind="parameter", param=param)
            mark_skipped_elements(target, ex.grads[k][s.key], {}, s.name)  # NaN/Inf input elements: not perturbed
            switch: EngineSwitch = choose_engine(_CALL, loop, target, losses[k], nondet, shared.engine, ex.notes)
            a = ex.grads[k][s.key]
            flat = torch.zeros(param.numel(), dtype=DTYPE, device=param.device) if a is None else a
            check = switch.run(
                s.name,
                lambda e, target=target, flat=flat, k=k, nondet=nondet: measure(
                    e, target, flat, losses[k], nondet, settings, generator
                ),
            )
            ex.checks[(k, s.key)] = check
            if switch.engine is not loop:
                evaluations += switch.engine.evaluations
            engines.add(switch.name)
            res = summarise(target, check, a is not None)
            results.append(dataclasses.replace(res, name=ex.pair(k, s.name), kind="input"))
            pairs.append((k, s.key))
        evaluations += loop.evaluations
    return results, pairs, evaluations

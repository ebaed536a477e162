"""torch.library custom ops as first-class targets of ``verify_function``.

``verify_function(mysin, x)`` with a ``torch.library.custom_op`` object, ``torch.ops.mylib.mysin``
or ``torch.ops.mylib.mysin.default`` checks the autograd formula registered with
``register_autograd`` like any other callable. What is special about an op lives here:

* `as_custom_op` recognises the three spellings and finds the one overload that is called;
* `argument_names` names the inputs after the op's schema (``grad w.r.t. x``, not ``args[0]``);
* `refuse_unsupported` turns an op that can't have a gradient into a clear error: an op that
  mutates its arguments (``mutates_args``) can't have an autograd formula in torch.library (torch
  itself refuses ``register_autograd`` for it), and an op created with ``custom_op`` without
  ``register_autograd`` has none; a gradient check of either has nothing to check;
* `run_opcheck` calls ``torch.library.opcheck`` (schema, fake tensor, autograd registration, AOT
  dispatch) on copies of the user's arguments, so the same report answers "is my custom op right?".
  A failing opcheck test is a warning of the report, not a failed gradient (see `run_opcheck`).

The vmap side (no batching rule: the loop engine, silently, with a note) is in `_engines`: it
concerns every model, not only custom ops.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .._errors import InvalidArgumentError
from .._report import Report
from .._state import preserved_global_state

__all__ = ["CustomOp", "argument_names", "as_custom_op", "refuse_unsupported", "run_opcheck", "with_opcheck"]

_CALL = "verify_function(fn, *args, **kwargs)"
# Namespaces of PyTorch's own operators: checked like any function, without opcheck (it is a tool for
# *custom* ops, and the builtin ones are tested by PyTorch's own op_db tests).
_BUILTIN_NAMESPACES = frozenset({"aten", "prims", "prim", "quantized", "_quantized"})


@dataclass(frozen=True)
class CustomOp:
    """The operator behind ``fn``: what opcheck is given, the overload called, and its name."""

    fn: Any  # what the user passed: a CustomOpDef, an OpOverloadPacket or an OpOverload
    overload: Any  # the torch._ops.OpOverload that runs
    qualname: str  # "mylib::mysin"
    opdef: Any  # the CustomOpDef when the op was made with torch.library.custom_op, else None

    @property
    def builtin(self) -> bool:
        return self.qualname.split("::")[0] in _BUILTIN_NAMESPACES


def as_custom_op(fn: Any, args: tuple, kwargs: dict) -> CustomOp | None:
    """The operator if ``fn`` is one (``custom_op`` object, ``torch.ops.ns.op`` or ``.overload``), else None."""
    from torch._library.custom_ops import CustomOpDef, _maybe_get_opdef

    if isinstance(fn, CustomOpDef):
        overload = fn._opoverload
    elif isinstance(fn, torch._ops.OpOverload):
        overload = fn
    elif isinstance(fn, torch._ops.OpOverloadPacket):
        overload = _resolve(fn, args, kwargs)
    else:
        return None
    qualname = overload._schema.name + (f".{overload._overloadname}" if overload._overloadname != "default" else "")
    return CustomOp(fn=fn, overload=overload, qualname=qualname, opdef=_maybe_get_opdef(overload))


def _resolve(packet: Any, args: tuple, kwargs: dict) -> Any:
    names = packet.overloads()
    if len(names) == 1:
        return getattr(packet, names[0])
    try:  # the overload the dispatcher would pick for these arguments (as opcheck does)
        name = torch._C._jit_resolve_packet(packet._qualified_op_name, *args, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        name = "default" if "default" in names else names[0]
    return getattr(packet, name if name in names else "default" if "default" in names else names[0])


def argument_names(op: CustomOp, args: tuple, kwargs: dict) -> tuple[list[str], dict[str, str]]:
    """Display names from the schema: ``x`` rather than ``args[0]``; keywords keep their own names."""
    positional = [a.name for a in op.overload._schema.arguments if not a.kwarg_only]
    pos = [positional[i] if i < len(positional) else f"args[{i}]" for i in range(len(args))]
    return pos, {k: k for k in kwargs}


def refuse_unsupported(op: CustomOp, args: tuple, kwargs: dict) -> tuple[list[str], dict[str, str]]:
    """The inputs' names (`argument_names`); `InvalidArgumentError` for an op that mutates or has no autograd.

    A mutating op gets an error rather than a copy-in: torch.library refuses ``register_autograd``
    for it ("Please create a functional operator"), so there is no formula of its own to check, and
    a copy-in would only check whatever functional wrapper we invented. The error says how to write
    the functional op that the user can register a gradient for.
    """
    schema = op.overload._schema
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    if mutated:
        raise InvalidArgumentError(
            f"{_CALL}: the custom op {op.qualname} mutates its argument(s) {', '.join(mutated)} "
            f"(mutates_args / schema {schema}); torch.library cannot register an autograd formula for a "
            "mutating op, so it has no gradient to check. Check the functional op instead: one that "
            "returns a new tensor (e.g. out = x.clone(); ...; return out) with register_autograd on it."
        )
    if op.opdef is not None and op.opdef._backward_fn is None:
        raise InvalidArgumentError(
            f"{_CALL}: the custom op {op.qualname} has no autograd formula, so there is no gradient to "
            f"check; register one with {op.qualname.split('::')[-1]}.register_autograd(backward, "
            "setup_context=setup_context)."
        )
    return argument_names(op, args, kwargs)


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    return value


def run_opcheck(op: CustomOp, args: tuple, kwargs: dict) -> tuple[list[str], list[str]]:
    """``torch.library.opcheck`` on copies of the user's arguments: (notes, warnings).

    A failing opcheck test is a *warning* (``report.warnings``, "OK — WARNING: ..." in the headline,
    re-emitted by the pytest fixture), not a failed gradient row. What opcheck tests (the schema, a
    fake-tensor kernel, where autograd is registered, agreement under AOT dispatch) is what
    torch.compile and export need; it is orthogonal to whether the registered backward is the
    derivative of the forward, which the rows decide. An eager-only op without ``register_fake`` has
    right gradients, and failing its gradient check for that would push users to turn opcheck off.
    The warning names the failing test, torch's own message and the fix.
    """
    copies = pytree.tree_map(_copy, (args, kwargs))
    with warnings.catch_warnings():  # opcheck's own machinery may warn (dynamo, deprecations): not the user's
        warnings.simplefilter("ignore")
        try:
            results = torch.library.opcheck(op.fn, copies[0], copies[1], raise_exception=False)
        except Exception as exc:  # opcheck itself could not run (e.g. an op it does not accept)
            first = (str(exc).splitlines() or [""])[0][:200]
            return [f"opcheck: could not run ({type(exc).__name__}: {first})"], []
    passed = [name for name, outcome in results.items() if outcome == "SUCCESS"]
    failed = {name: outcome for name, outcome in results.items() if outcome != "SUCCESS"}
    notes = [f"opcheck: torch.library.opcheck({op.qualname}) passes {', '.join(passed)}"] if passed else []
    by_message: dict[str, list[str]] = {}  # tests failing for the same reason are named together
    for name, exc in failed.items():
        text = " ".join(str(exc).split())
        by_message.setdefault(f"{type(exc).__name__}: {text[:240]}", []).append(name)
    if not by_message:
        return notes, []
    found = "; ".join(f"{', '.join(names)} ({message})" for message, names in by_message.items())
    return notes, [
        f"torch.library.opcheck({op.qualname}) fails {found}. The gradients are checked on their own; "
        "torch.compile and torch.export need this fixed"
    ]


def with_opcheck(report: Report, op: CustomOp, args: tuple, kwargs: dict, *, enabled: bool) -> Report:
    """`report` with opcheck's verdict added: a note when it passes, a warning per failure (`run_opcheck`)."""
    if not enabled:
        return dataclasses.replace(report, notes=(*report.notes, "opcheck: off (opcheck=False)"))
    if op.builtin:
        return report
    start = time.perf_counter()
    with preserved_global_state():  # opcheck draws random numbers and may touch global state
        notes, found = run_opcheck(op, args, kwargs)
    return dataclasses.replace(
        report,
        notes=(*report.notes, *notes),
        warnings=(*report.warnings, *found),
        seconds=report.seconds + time.perf_counter() - start,
    )

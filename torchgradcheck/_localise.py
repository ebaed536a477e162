"""Localise the wrong backward: which submodule's own backward makes the gradients disagree.

One forward of the objective, with hooks registered only for its duration, records every module
call: its inputs (args and kwargs, cloned *before* the call and before the user's pre-hooks, so
in-place modules can't spoil them), which of them carried gradient, which outputs carry gradient,
and the custom autograd.Function nodes the call added to the graph outside its children. The
*sites* are the leaf modules that compute something (not nn.Identity), plus any module whose own
forward calls a custom autograd.Function or which has module backward hooks. Each site is then
checked alone, from the loss backwards, by `verify_module` on a small probe module::

    loss = sum(v * site(*captured_args, **captured_kwargs))      v: a fixed random upstream gradient

perturbing the captured inputs that carried gradient and the site's trainable parameters. A tensor
of at most `max_elements` elements is checked element by element (a parameter as the user's own
Parameter object, so its hooks fire); a larger one along `directions` random directions that span
the whole tensor (entries +-max(1, |x_i|)), so one wrong element anywhere still shows (numerics
notes, section 3) at a cost independent of the tensor's size. If no site is wrong, the containers
are checked too (every input and parameter moved jointly along `directions` directions): a
``.detach()`` or ``torch.no_grad()`` in a container's own forward is found that way.

The first wrong backward is the first failing site in backward order (reverse order of completed
forwards) none of whose own sub-sites fail: the wrong gradient enters the graph there.

Not seen: custom Functions and hooks in `loss_fn` / ``forward=`` or in plain functions outside any
module (unless a container around them fails), tensor hooks on a parameter larger than
`max_elements` (it is substituted by ``functional_call``), and errors that only appear at the
whole model's point but not for the module alone with a random upstream gradient.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from ._batch import Objective, convert_batch, input_targets
from ._check import Checked, check_targets
from ._errors import GradcheckWarning
from ._options import CheckOptions
from ._params import Target, lend_model, select_parameters
from ._report import _fmt
from ._state import preserved_global_state, reseed

__all__ = ["Localisation", "SiteVerdict", "localise"]

_CALL = "localise(model, loss_fn, batch)"

MAX_ELEMENTS = 64  # tensors up to this size are checked element by element
DIRECTIONS = 16  # larger tensors: this many random directions spanning the whole tensor
# Functions torch itself puts in the graph around a module call (full backward hooks): not user code.
_WRAPPERS = ("BackwardHookFunction",)


@dataclass(frozen=True)
class SiteVerdict:
    """The isolated check of one module call (a leaf, or a module calling a custom Function itself)."""

    name: str  # dotted module name; "#2" marks the second call of a module used twice
    type: str  # the module's class name
    passed: bool | None  # None: not checked (status "skipped" or "error")
    relative_error: float | None
    status: str = "ok"  # ok | wrong | inconclusive | skipped | error
    wrong: tuple[str, ...] = ()  # its tensors that disagree, e.g. ("input[0]", "weight")
    functions: tuple[str, ...] = ()  # custom autograd.Functions called by its own forward
    note: str = ""
    seconds: float = 0.0
    evaluations: int = 0  # forwards of this module alone


@dataclass(frozen=True)
class Localisation:
    """Which module's own backward is wrong; ``str()`` is a one-line verdict and a table."""

    first_wrong: str | None
    module_type: str | None
    checked: tuple[SiteVerdict, ...]  # in backward order: the site nearest the loss first
    note: str = ""
    seconds: float = 0.0

    def headline(self) -> str:
        n = sum(s.passed is not None for s in self.checked)
        evaluations = sum(s.evaluations for s in self.checked)
        tail = f"{n} module call(s) checked in isolation ({evaluations:,} evaluations) in {self.seconds:.2f} s"
        if self.first_wrong is None:
            return f"no wrong backward found: {tail}"
        site = next(s for s in self.checked if s.name == self.first_wrong)
        return (
            f"first wrong backward: {self.first_wrong} ({self.module_type}): gradient of "
            f"{', '.join(site.wrong) or 'its output'} disagrees (relative error {_fmt(site.relative_error)}); {tail}"
        )

    def table(self) -> str:
        rows = [("module", "type", "status", "rel.err", "wrong", "custom Function")]
        for s in self.checked:
            rows.append(
                (
                    s.name,
                    s.type,
                    s.status + (f" ({s.note})" if s.note and s.status != "ok" else ""),
                    _fmt(s.relative_error),
                    ", ".join(s.wrong) or "-",
                    ", ".join(s.functions) or "-",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

    def __str__(self) -> str:
        parts = [self.headline(), self.table()]
        if self.note:
            parts.append(f"  note: {self.note}")
        return "\n".join(parts)


@dataclass(eq=False)
class _Call:
    """One module call seen during the capture forward."""

    name: str
    module: nn.Module
    parent: _Call | None
    spec: Any = None  # pytree spec of (args, kwargs)
    leaves: list[Any] | None = None  # cloned flat inputs
    carries: list[bool] | None = None  # which flat inputs carried gradient
    in_nodes: list[Any] | None = None
    out_spec: Any = None
    out_grad: list[int] | None = None  # positions of flat outputs that carry gradient
    out_like: list[tuple[torch.Size, torch.dtype, torch.device]] | None = None  # of those outputs
    out_nodes: list[Any] | None = None
    order: int = -1  # completion order
    versions: dict[int, int] | None = None  # id -> version of the input tensors when the call began
    passthrough: bool = False  # returns its inputs themselves (nn.Identity, eval-mode Dropout): nothing to check
    functions: tuple[str, ...] = ()

    def ancestors(self) -> list[_Call]:
        out, p = [], self.parent
        while p is not None:
            out.append(p)
            p = p.parent
        return out


def _display(name: str) -> str:
    return name or "(model)"


def _capture(model: nn.Module, objective: Objective) -> tuple[list[_Call], Any]:
    """Run the objective once with hooks on every module; hooks are removed before returning."""
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    counts: dict[int, int] = {}
    calls: list[_Call] = []
    stack: list[_Call] = []
    done = [0]

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        k = counts[id(module)] = counts.get(id(module), 0) + 1
        name = _display(names[id(module)]) + (f"#{k}" if k > 1 else "")
        leaves, spec = pytree.tree_flatten((args, kwargs))
        carries = [isinstance(x, torch.Tensor) and x.is_floating_point() and x.requires_grad for x in leaves]
        call = _Call(
            name,
            module,
            stack[-1] if stack else None,
            spec,
            [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in leaves],
            carries,
            [x.grad_fn for x, c in zip(leaves, carries) if c and x.grad_fn is not None],
        )
        call.versions = {id(x): x._version for x in leaves if isinstance(x, torch.Tensor)}
        calls.append(call)
        stack.append(call)

    def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call = stack.pop()
        outs, call.out_spec = pytree.tree_flatten(output)
        call.out_grad = [
            i for i, t in enumerate(outs) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad
        ]
        # returned an input itself, unmodified (in-place modules bump its version: they computed something)
        versions = call.versions or {}
        call.passthrough = bool(call.out_grad) and all(
            versions.get(id(outs[i])) == outs[i]._version for i in call.out_grad
        )
        call.out_like = [(outs[i].shape, outs[i].dtype, outs[i].device) for i in call.out_grad]
        call.out_nodes = [outs[i].grad_fn for i in call.out_grad if outs[i].grad_fn is not None]
        call.order = done[0]
        done[0] += 1

    handles = []
    try:
        for module in model.modules():
            # first of the pre-hooks (the user's run again when the site runs alone), last of the hooks
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True))
        with torch.enable_grad():
            loss = objective(model)
    finally:
        for h in handles:
            h.remove()
    return [c for c in calls if c.order >= 0], loss


def _own_functions(call: _Call, calls: list[_Call]) -> tuple[str, ...]:
    """Custom autograd.Function nodes between the call's inputs and outputs, outside its children."""
    stop = {id(n) for n in call.in_nodes or ()}
    jump: dict[int, list[Any]] = {}
    for child in calls:
        if child.parent is call:
            for node in child.out_nodes or ():
                if all(node is not n for n in child.in_nodes or ()):  # not a pass-through (Identity)
                    jump[id(node)] = list(child.in_nodes or ())
    found: list[str] = []
    seen: set[int] = set()
    todo = list(call.out_nodes or ())
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen or id(node) in stop:
            continue
        seen.add(id(node))
        if id(node) in jump:
            todo.extend(jump[id(node)])
            continue
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            name = type(node).__name__.removesuffix("Backward")
            if name not in found and name not in _WRAPPERS:
                found.append(name)
        todo.extend(n for n, _ in node.next_functions)
    return tuple(found)


class _Dense(torch.autograd.Function):
    """Identity whose backward densifies: Embedding(sparse=True) returns sparse gradients for its weight."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        return None

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g.to_dense() if g.is_sparse else g


class _Probe(nn.Module):
    """``sum(v * site(inputs))`` where every checked tensor is, or is rebuilt from, a probe parameter.

    Per tensor (``joint=False``): a tensor of at most `max_elements` elements is a probe parameter
    itself (a small parameter of the site: the site's own Parameter); a larger one is rebuilt as
    ``base + t @ dirs`` from `directions` coefficients ``t``. Jointly (``joint=True``, for containers):
    every input and parameter moves along the same `directions` coefficients, so the cost does not grow
    with the number of tensors; a failure then says "somewhere in this module", not which tensor.
    """

    def __init__(
        self, call: _Call, generator: torch.Generator, max_elements: int, directions: int, joint: bool = False
    ) -> None:
        super().__init__()
        self.site = call.module
        self.spec, self.leaves = call.spec, list(call.leaves or ())
        self.out_grad = list(call.out_grad or ())
        self.upstream = [
            torch.randn(shape, generator=generator, dtype=dtype).to(device)
            for shape, dtype, device in call.out_like or ()
        ]
        sources: list[tuple[str, int | str, torch.Tensor]] = [
            (_input_name(call, i), i, x) for i, (x, c) in enumerate(zip(self.leaves, call.carries or ())) if c
        ]
        seen: set[int] = set()
        for pname, p in call.module.named_parameters():
            if id(p) not in seen and p.requires_grad and p.is_floating_point():
                seen.add(id(p))
                sources.append((pname, pname, p))
        self.checked: dict[str, str] = {}  # probe parameter name -> what it stands for
        # where (input position or parameter name) -> (probe parameter, base or None, directions attribute)
        self.rebuilds: dict[int | str, tuple[str, torch.Tensor | None, str]] = {}
        if joint and sources:
            first = sources[0][2]
            self.register_parameter(
                "joint", nn.Parameter(torch.zeros(directions, dtype=first.dtype, device=first.device))
            )
            self.checked["joint"] = f"all {len(sources)} tensors (jointly)"
        for j, (label, where, x) in enumerate(sources):
            if joint:
                self.rebuilds[where] = ("joint", x.detach(), self._directions(j, x, directions))
            elif x.numel() <= max_elements and isinstance(where, str):
                self.checked["site." + where] = label  # the site's own Parameter: its hooks fire
            elif x.numel() <= max_elements:
                self.register_parameter(f"t{j}", nn.Parameter(x.detach().clone()))
                self.rebuilds[where] = (f"t{j}", None, "")
                self.checked[f"t{j}"] = label
            else:
                self.register_parameter(f"t{j}", nn.Parameter(torch.zeros(directions, dtype=x.dtype, device=x.device)))
                self.rebuilds[where] = (f"t{j}", x.detach(), self._directions(j, x, directions))
                self.checked[f"t{j}"] = label

    def _directions(self, j: int, x: torch.Tensor, directions: int) -> str:
        """Rows of +-max(1, |x_i|): each element moves by the same relative step as in the engine."""
        g = torch.Generator().manual_seed(1000 + j)
        signs = torch.randint(0, 2, (directions, x.numel()), generator=g).to(x.device, x.dtype) * 2 - 1
        setattr(self, f"_dirs{j}", signs * x.detach().abs().reshape(1, -1).clamp(min=1))
        return f"_dirs{j}"

    def _rebuild(self, where: int | str) -> torch.Tensor:
        key, base, dirs = self.rebuilds[where]
        p = getattr(self, key)
        if base is None:
            return p.clone()  # a non-leaf: in-place modules (ReLU(inplace=True)) may write to it
        return base + (p.to(base.dtype) @ getattr(self, dirs)).view(base.shape)

    def forward(self) -> torch.Tensor:
        leaves = [x.clone() if isinstance(x, torch.Tensor) else x for x in self.leaves]
        swapped = {}
        for where in self.rebuilds:
            if isinstance(where, int):
                leaves[where] = self._rebuild(where)
            else:
                swapped[where] = _Dense.apply(self._rebuild(where))
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        out = functional_call(self.site, swapped, tuple(args), kwargs) if swapped else self.site(*args, **kwargs)
        outs = pytree.tree_flatten(out)[0]
        total = 0
        for j, v in zip(self.out_grad, self.upstream):
            total = total + (v * outs[j]).sum()
        return torch.as_tensor(total)


def _input_name(call: _Call, i: int) -> str:
    path = pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(len(call.leaves or ()))), call.spec))[0][i][0]
    text = pytree.keystr(path)
    return ("input" + text[3:]) if text.startswith("[0]") else ("kwargs" + text[3:])


def _check(
    call: _Call,
    dtype: torch.dtype | None,
    seed: int,
    engine: str,
    max_elements: int,
    directions: int,
    joint: bool = False,
) -> SiteVerdict:
    start = time.perf_counter()
    name, kind = call.name, type(call.module).__name__

    def verdict(status: str, note: str, **kw: Any) -> SiteVerdict:
        return SiteVerdict(
            name,
            kind,
            kw.pop("passed", None),
            kw.pop("rel", None),
            status,
            functions=call.functions,
            note=note,
            seconds=time.perf_counter() - start,
            **kw,
        )

    if not call.out_grad:
        return verdict("skipped", "its output carries no gradient")
    probe = _Probe(call, torch.Generator().manual_seed(seed + call.order), max_elements, directions, joint)
    if not probe.checked:
        return verdict("skipped", "no input carries gradient and it has no trainable parameter")
    try:
        found = _check_probe(probe, dtype, seed, engine)
    except Exception as exc:  # a site that can't run alone must not hide the main report
        return verdict("error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
    wrong = tuple(probe.checked[r.name] for r in found.results if not r.passed)
    status = "wrong" if wrong else ("inconclusive" if any(r.status == "inconclusive" for r in found.results) else "ok")
    return verdict(status, "", passed=not wrong, rel=found.relative_error, wrong=wrong, evaluations=found.evaluations)


def _check_probe(probe: _Probe, dtype: torch.dtype | None, seed: int, engine: str) -> Checked:
    """One site's own backward, every element (the shared middle, not the public `verify_module`)."""
    checked, _ = select_parameters(probe, sorted(probe.checked))
    with preserved_global_state(), lend_model(probe, dtype) as lent:
        if dtype == torch.float64:
            torch.set_default_dtype(torch.float64)
        targets = [Target(name, p.data, kind="parameter", param=p) for name, p in checked]
        options = CheckOptions(dtype=dtype, mode="full", seed=seed, engine=engine)  # type: ignore[arg-type]
        options = options.resolve(targets[0].tensor.dtype, targets[0].tensor.device)
        return check_targets(lent, Objective(None, None, _probe_loss), targets, options, call=_CALL)


def _probe_loss(model: nn.Module, _batch: Any) -> torch.Tensor:
    return model()


def localise(
    model: nn.Module,
    loss_fn: Any = None,
    batch: Any = None,
    *,
    forward: Any = None,
    dtype: torch.dtype | None = torch.float64,
    seed: int = 0,
    engine: str = "auto",
    inputs: bool = False,
    max_elements: int = MAX_ELEMENTS,
    directions: int = DIRECTIONS,
) -> Localisation:
    """Check each leaf module's backward in isolation and name the first wrong one from the loss.

    Takes the same ``(model, loss_fn, batch, forward=, dtype=, seed=, engine=)`` as `verify_module`,
    which calls it when a check fails. Hooks exist only during the one capture forward; the model,
    its buffers, the RNG and the default dtype are handed back bit-exactly.

    Args:
        model: the module whose gradients failed.
        loss_fn: as for `verify_module`.
        batch: as for `verify_module`.
        forward: as for `verify_module`.
        dtype: checking precision (float64); None keeps the model's own dtype.
        seed: the RNG seed set before the capture forward and before every evaluation of a site.
        engine: "auto", "vmap" or "loop", for each site's check.
        inputs: the batch's floating tensors carry gradient too (as with ``verify_module(..., inputs=True)``),
            so the first module's input gradient is checked as well.
        max_elements: tensors up to this size are checked element by element.
        directions: larger tensors are checked along this many random directions spanning them.

    Returns:
        A `Localisation`: ``first_wrong`` (a module name, or None) and every site's verdict.
    """
    start = time.perf_counter()
    with preserved_global_state(), lend_model(model, dtype) as lent, warnings.catch_warnings():
        warnings.simplefilter("ignore", GradcheckWarning)  # the main check has already warned
        if dtype == torch.float64:
            torch.set_default_dtype(torch.float64)
        objective = Objective(loss_fn, convert_batch(batch, dtype), forward)
        if inputs:
            for target in input_targets(objective.batch):
                target.tensor.requires_grad_(True)  # our own copy of the batch
        lent.reset_buffers()
        reseed(seed)
        try:
            calls, loss = _capture(model, objective)
        except Exception as exc:
            return Localisation(
                None,
                None,
                (),
                f"could not localise: the capture forward raised {type(exc).__name__}: {exc}",
                time.perf_counter() - start,
            )
        for call in calls:
            call.functions = _own_functions(call, calls)
        del loss
        lent.reset_buffers()
        backward = sorted(calls, key=lambda c: -c.order)
        sites = [c for c in backward if _is_site(c)]
        verdicts = {id(c): _check(c, dtype, seed, engine, max_elements, directions) for c in sites}
        escalated = not any(v.status == "wrong" for v in verdicts.values())
        if escalated:  # every leaf is right: check the containers, whose own forward may cut or bend gradients
            sites = [c for c in backward if _is_site(c) or not c.passthrough]
            verdicts.update(
                {
                    id(c): _check(c, dtype, seed, engine, max_elements, directions, joint=True)
                    for c in sites
                    if id(c) not in verdicts
                }
            )
    first = _first_wrong(sites, verdicts)
    checked = tuple(verdicts[id(c)] for c in sites)
    return Localisation(
        first.name if first else None,
        type(first.module).__name__ if first else None,
        checked,
        _note(first, checked, escalated),
        time.perf_counter() - start,
    )


def _is_site(call: _Call) -> bool:
    """Leaves that compute something, and modules with custom Functions or backward hooks of their own."""
    module = call.module
    leaf = not any(True for _ in module.children())
    return (leaf and not call.passthrough) or bool(
        call.functions or module._backward_hooks or module._backward_pre_hooks
    )


def _first_wrong(sites: list[_Call], verdicts: dict[int, SiteVerdict]) -> _Call | None:
    """The first wrong site in backward order none of whose own sub-sites is wrong."""
    for c in sites:
        if verdicts[id(c)].status == "wrong" and not any(
            verdicts[id(d)].status == "wrong" for d in sites if c in d.ancestors()
        ):
            return c
    return None


def _note(first: _Call | None, checked: tuple[SiteVerdict, ...], escalated: bool) -> str:
    errors = [s.name for s in checked if s.status == "error"]
    parts = []
    if first is not None and escalated:
        parts.append(
            f"every leaf module is right; the gradient goes wrong in the own forward of {first.name}, "
            "outside its children (e.g. a .detach(), torch.no_grad() or a tensor hook there)"
        )
    if first is None:
        parts.append(
            "every module checked computes its own gradients correctly: look at loss_fn / forward=, hooks on "
            "parameters, or functional code outside modules"
        )
    if errors:
        parts.append(f"{len(errors)} module(s) could not be run alone: {', '.join(errors[:5])}")
    return "; ".join(parts)


for _cls in (SiteVerdict, Localisation):
    _cls.__module__ = "torchgradcheck"

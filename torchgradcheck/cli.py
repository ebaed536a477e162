"""Command line: ``torchgradcheck demo`` and ``torchgradcheck check FILE.py:FACTORY``.

``check`` runs ``verify_module``; ``--after-steps K``, ``--second-order`` and ``--no-accumulation`` are
its options of the same names, and ``--batch-independence`` also runs ``verify_batch_independence``
on the model and the inputs of the batch (both must pass).

Exit status: 0 when the verdicts are as expected (check: the gradients agree), 1 when ``check`` finds a
mismatch, 2 for anything that is not a verdict (a bad FILE.py:FACTORY, a factory or model that raises,
an invalid argument; the message goes to stderr), as for argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._types import ENGINES, MODES

__all__ = ["main"]

EXIT_ERROR = 2  # not a verdict: bad usage, or the user's code raised


class _UsageError(Exception):
    """A message for stderr and exit status 2, without a traceback."""


def _add_check_options(p: argparse.ArgumentParser) -> None:
    """Options shared by the subcommands (and mirrored by the pytest plugin's --gradcheck-*)."""
    p.add_argument("--engine", choices=ENGINES, default=None, help="evaluation engine (auto)")
    p.add_argument("--seed", type=int, default=None, help="RNG seed set before every evaluation (0)")
    p.add_argument("--eps", type=float, default=None, help="relative finite-difference step (per dtype)")
    p.add_argument("--rtol", type=float, default=None, help="relative floor of the tolerance (per dtype)")
    p.add_argument("--atol", type=float, default=None, help="absolute floor of the tolerance (0)")
    p.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="what to check: every element (full), random directions, sampled elements, or auto (default)",
    )
    p.add_argument(
        "--params",
        action="append",
        metavar="PATTERN",
        default=None,
        help="check only parameters matching this name or glob pattern (repeatable)",
    )
    p.add_argument("--inputs", action="store_true", help="also check gradients w.r.t. the batch's floating tensors")
    p.add_argument(
        "--no-localise",
        dest="localise",
        action="store_false",
        default=None,
        help="on a failure, do not check each submodule alone to name the first wrong backward",
    )
    p.add_argument(
        "--after-steps",
        type=int,
        default=None,
        metavar="K",
        help="check after K optimizer steps on a private copy (the model is never stepped): finds bugs hidden at "
        "initialisation, e.g. behind LoRA's B = 0",
    )
    p.add_argument(
        "--second-order",
        action="store_true",
        help="also check Hessian-vector products of the loss (double backward) along random directions",
    )
    p.add_argument(
        "--no-accumulation",
        dest="accumulation",
        action="store_false",
        default=None,
        help="skip the gradient-accumulation check (one extra backward: .grad must double after a second one)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--plot",
        metavar="PATH",
        default=None,
        help="also draw the report (error / tolerance per tensor, heatmaps of failing tensors) to PATH; "
        "needs matplotlib (pip install torchgradcheck[plot])",
    )


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line; unset ones keep verify_module's (or the factory's) values."""
    options = {
        k: getattr(args, k) for k in ("engine", "seed", "eps", "rtol", "atol", "mode") if getattr(args, k) is not None
    }
    if args.params:
        options["params"] = args.params
    if args.inputs:
        options["inputs"] = True
    if args.localise is False:
        options["localise"] = False
    if args.after_steps is not None:
        options["after_steps"] = args.after_steps
    if args.second_order:
        options["second_order"] = True
    if args.accumulation is False:
        options["accumulation"] = False
    return options


def _print(report: Any, as_json: bool) -> None:
    print(json.dumps(report.to_dict(), indent=2) if as_json else str(report))


def _plot(report: Any, path: str | None, case: int | None = None) -> None:
    """Draw `report` to `path` (``out.png`` -> ``out-1.png`` for demo case 1); the note goes to stderr."""
    if path is None:
        return
    if case is not None:
        file = Path(path)
        path = str(file.with_name(f"{file.stem}-{case}{file.suffix or '.png'}"))
    try:
        report.plot(path)
    except ImportError as exc:
        raise _UsageError(f"--plot: {exc}") from None
    print(f"plot written to {path}", file=sys.stderr)


def _demo(args: argparse.Namespace) -> int:
    from ._demo import demo_cases
    from ._verify import verify_module

    ok = True
    cases = []
    for case, (title, model, loss_fn, batch, expected) in enumerate(demo_cases(), 1):
        report = verify_module(model, loss_fn, batch, **_options(args))
        if args.json:  # stdout stays one JSON document
            cases.append({"title": title, "expected_pass": expected, "report": report.to_dict()})
        else:
            print(f"== {title} (expected: {'pass' if expected else 'fail'})")
            _print(report, False)
            print()
        _plot(report, args.plot, case)
        ok &= report.passed == expected
    if args.json:
        print(json.dumps({"as_expected": ok, "cases": cases}, indent=2))
    summary = "demo: both verdicts as expected" if ok else "demo: UNEXPECTED verdict"
    print(summary, file=sys.stderr if args.json else sys.stdout)
    return 0 if ok else EXIT_ERROR


def _load_factory(spec: str) -> Any:
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise _UsageError(f"expected FILE.py:FACTORY (e.g. models.py:make_case), got {spec!r}")
    file = Path(path)
    if not file.is_file():
        raise _UsageError(f"no such file {path!r} (from {spec!r}); give a path to a Python file")
    module_spec = importlib.util.spec_from_file_location(file.stem, file)
    if module_spec is None or module_spec.loader is None:
        raise _UsageError(f"cannot import {path!r}; give a path to a Python file (.py)")
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(file.parent.resolve()))  # so the file can import its neighbours
    try:
        module_spec.loader.exec_module(module)
    except Exception:
        traceback.print_exc()
        raise _UsageError(f"importing {path} raised (traceback above)") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise _UsageError(f"{path} has no callable {name!r}; callables there: {names[:10]}")
    return factory


def _check(args: argparse.Namespace) -> int:
    from ._errors import TorchGradcheckError
    from ._verify import verify_module

    saved_path = list(sys.path)
    try:
        factory = _load_factory(args.target)
        try:
            made = factory()
        except Exception:
            traceback.print_exc()
            raise _UsageError(f"{args.target}() raised (traceback above)") from None
        if isinstance(made, dict):
            call_args: tuple[Any, ...] = ()
            kwargs = dict(made)
        elif isinstance(made, (tuple, list)) and len(made) == 3:
            call_args, kwargs = tuple(made), {}
        else:
            raise _UsageError(
                f"{args.target}() must return (model, loss_fn, batch) or a dict of verify_module arguments, "
                f"got {type(made).__name__}"
            )
        try:
            report = verify_module(*call_args, **{**kwargs, **_options(args)})  # the command line wins
            batch_report = _batch_independence(args, call_args, kwargs) if args.batch_independence else None
        except TorchGradcheckError as exc:  # a bad argument: the message says the fix
            raise _UsageError(str(exc)) from None
        except Exception:  # the model or loss raised: show where, but never exit 1 (that means "mismatch")
            traceback.print_exc()
            raise _UsageError("the check raised (traceback above)") from None
    finally:
        sys.path[:] = saved_path
    if batch_report is None:
        _print(report, args.json)
    elif args.json:
        both = {"verify_module": report.to_dict(), "verify_batch_independence": batch_report.to_dict()}
        print(json.dumps(both, indent=2))
    else:
        print(f"{report}\n\n{batch_report}")
    _plot(report, args.plot)
    return 0 if report.passed and (batch_report is None or batch_report.passed) else 1


def _batch_independence(args: argparse.Namespace, call_args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """verify_batch_independence on the factory's model and the inputs part of its batch."""
    from ._batch_independence import verify_batch_independence

    model, batch = (call_args[0], call_args[2]) if call_args else (kwargs.get("model"), kwargs.get("batch"))
    if batch is None:
        raise _UsageError(
            "--batch-independence needs the model's inputs: let the factory return (model, loss_fn, batch) "
            "or a dict with 'model' and 'batch'"
        )
    if isinstance(batch, (tuple, list)) and not hasattr(batch, "_fields") and len(batch) in (1, 2):
        batch = batch[0]  # (inputs,) or (inputs, target): the inputs, unpacked by verify_batch_independence
    options = {k: getattr(args, k) for k in ("seed", "eps", "rtol", "atol") if getattr(args, k) is not None}
    return verify_batch_independence(model, batch, batch_dim=args.batch_dim, **options)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="torchgradcheck",
        description="Check PyTorch gradients against finite differences.",
        epilog="Exit status: 0 pass, 1 gradient mismatch (check), 2 usage error or the checked code raised.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="check an embedded correct model and a planted bug")
    _add_check_options(demo)
    demo.set_defaults(run=_demo)
    check = sub.add_parser("check", help="verify_module on the (model, loss_fn, batch) a factory returns")
    check.add_argument("target", help="path/to/file.py:factory")
    _add_check_options(check)
    check.add_argument(
        "--batch-independence",
        action="store_true",
        help="also check that output sample i depends on input sample i only (verify_batch_independence)",
    )
    check.add_argument("--batch-dim", type=int, default=0, metavar="DIM", help="the batch dimension (0)")
    check.set_defaults(run=_check)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except _UsageError as exc:
        print(f"torchgradcheck {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``torchgradcheck demo`` and ``torchgradcheck check FILE.py:FACTORY``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _add_check_options(p: argparse.ArgumentParser) -> None:
    """Options shared by the subcommands (and mirrored by the pytest plugin's --gradcheck-*)."""
    p.add_argument("--engine", choices=["auto", "vmap", "loop"], default="auto", help="evaluation engine")
    p.add_argument("--seed", type=int, default=0, help="RNG seed set before every evaluation")
    p.add_argument("--eps", type=float, default=None, help="relative finite-difference step")
    p.add_argument("--rtol", type=float, default=None, help="relative floor of the tolerance")
    p.add_argument("--atol", type=float, default=0.0, help="absolute floor of the tolerance")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", metavar="PATH", default=None,
                   help="also draw the report (error / tolerance per tensor, heatmaps of failing tensors) to PATH; "
                   "needs matplotlib (pip install torchgradcheck[plot])")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {"engine": args.engine, "seed": args.seed, "eps": args.eps, "rtol": args.rtol, "atol": args.atol}


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
        raise SystemExit(f"torchgradcheck: --plot: {exc}") from None
    print(f"plot written to {path}", file=sys.stderr)


def _demo(args: argparse.Namespace) -> int:
    from ._demo import demo_cases
    from ._verify import verify_module

    ok = True
    for case, (title, model, loss_fn, batch, expected) in enumerate(demo_cases(), 1):
        print(f"== {title} (expected: {'pass' if expected else 'fail'})")
        report = verify_module(model, loss_fn, batch, **_options(args))
        _print(report, args.json)
        _plot(report, args.plot, case)
        print()
        ok &= report.passed == expected
    print("demo: both verdicts as expected" if ok else "demo: UNEXPECTED verdict")
    return 0 if ok else 2


def _load_factory(spec: str) -> Any:
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise SystemExit(f"torchgradcheck check: expected FILE.py:FACTORY, got {spec!r}")
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"torchgradcheck check: no such file {path!r}")
    module_spec = importlib.util.spec_from_file_location(file.stem, file)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(file.parent.resolve()))
    module_spec.loader.exec_module(module)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise SystemExit(f"torchgradcheck check: {path} has no callable {name!r}")
    return factory


def _check(args: argparse.Namespace) -> int:
    from ._verify import verify_module

    made = _load_factory(args.target)()
    if isinstance(made, dict):
        report = verify_module(**made, **_options(args))
    elif isinstance(made, (tuple, list)) and len(made) == 3:
        report = verify_module(*made, **_options(args))
    else:
        raise SystemExit("torchgradcheck check: the factory must return (model, loss_fn, batch) or a dict of arguments")
    _print(report, args.json)
    _plot(report, args.plot)
    return 0 if report.passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchgradcheck", description="Check PyTorch gradients against finite differences.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="check an embedded correct model and a planted bug")
    _add_check_options(demo)
    demo.set_defaults(run=_demo)
    check = sub.add_parser("check", help="verify_module on the (model, loss_fn, batch) a factory returns")
    check.add_argument("target", help="path/to/file.py:factory")
    _add_check_options(check)
    check.set_defaults(run=_check)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())

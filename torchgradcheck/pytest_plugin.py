"""pytest plugin (entry point ``pytest11``): the ``gradcheck`` fixture and the ``--gradcheck-*`` options.

Use the fixture in a test; a failing check fails the test with the report table in its output::

    def test_my_layer_gradients(gradcheck):
        model, batch = MyLayer().double(), (torch.randn(8, 4), torch.randn(8, 2))
        gradcheck(model, nn.MSELoss(), batch)            # verify_module; raises on failure
        gradcheck.function(my_op, torch.randn(3, requires_grad=True))   # verify_function
        gradcheck.batch_independence(model.eval(), batch[0])              # verify_batch_independence

Command-line options rerun the same tests differently, without editing them:

* ``--gradcheck-mode=full`` passes ``mode="full"`` to every ``verify_module`` call made through the
  fixture, overriding the test's own ``mode=`` (e.g. a nightly exhaustive run of cheap CI checks);
* ``--gradcheck-device=cuda`` moves the model (in place, and back bit-exactly afterwards) and the
  batch to the device before checking; tests using the fixture are skipped where it is unavailable.

Loading the plugin imports neither torch nor the checker (``torchgradcheck`` is lazy), so it adds
nothing to pytest's start-up; torch is imported when a test first uses the fixture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from ._types import MODES

if TYPE_CHECKING:
    from torch import nn

    from ._report import Report

__all__ = ["MODES", "Gradcheck", "gradcheck"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradcheck", "gradient checks (torchgradcheck)")
    group.addoption(
        "--gradcheck-mode",
        choices=MODES,
        default=None,
        help="run every verify_module call made through the gradcheck fixture in this mode, overriding "
        "the tests' own mode= (e.g. full: check every element).",
    )
    group.addoption(
        "--gradcheck-device",
        default=None,
        metavar="DEVICE",
        help="move models and batches to DEVICE (e.g. cuda, cuda:1) before checking; tests using the "
        "gradcheck fixture are skipped when DEVICE is not available.",
    )


def pytest_report_header(config: pytest.Config) -> str | None:
    mode, device = config.getoption("gradcheck_mode"), config.getoption("gradcheck_device")
    if mode is None and device is None:
        return None
    return f"torchgradcheck: mode={mode or 'as in each test'}, device={device or 'as in each test'}"


def _to(tree: Any, device: Any) -> Any:
    """A copy of `tree` with every tensor on `device` (leaves that required grad still do)."""
    import torch
    import torch.utils._pytree as pytree

    def move(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        moved = leaf.detach().to(device)
        return moved.requires_grad_(leaf.requires_grad) if moved.is_floating_point() else moved

    return pytree.tree_map(move, tree)


@contextlib.contextmanager
def moved_model(model: nn.Module, device: Any) -> Iterator[None]:
    """Move `model` to `device` in place with ``model.to``; give back the originals on exit.

    ``model.to`` keeps the Parameter objects (and their hooks) between CPU and CUDA; on exit the
    original Parameter objects, their data, gradients and the buffers are re-attached, not copied
    back, so the model ends bit-exactly as it started, on its own devices.
    """
    slots = [(m, name, p) for m in model.modules() for name, p in m._parameters.items() if p is not None]
    saved = [(p, p.data, p.grad) for p in {id(p): p for _, _, p in slots}.values()]
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    try:
        model.to(device)
        yield
    finally:
        for m, name, p in slots:  # `to` may have swapped in new Parameter objects (e.g. to "meta")
            m._parameters[name] = p
        for p, data, grad in saved:
            p.grad = None
            p.data = data
            p.grad = grad
        for m, name, b in buffers:
            m._buffers[name] = b


class Gradcheck:
    """What the ``gradcheck`` fixture returns: `verify_module` / `verify_function` that fail the test.

    ``gradcheck(model, loss_fn, batch, **options)`` runs ``verify_module`` and raises
    ``GradientMismatchError`` (an AssertionError) carrying the report table if the check fails;
    otherwise it returns the `Report`. ``gradcheck.function(fn, *args, **kwargs)`` does the same with
    ``verify_function``, ``gradcheck.batch_independence(model, batch, **options)`` with
    ``verify_batch_independence``. The command-line options (`mode`, `device`) apply to every call.
    """

    def __init__(
        self,
        mode: str | None = None,
        device: str | None = None,
        *,
        verify_module: Callable[..., Report] | None = None,
        verify_function: Callable[..., Report] | None = None,
    ) -> None:
        self.mode = mode
        self.device = device
        self._verify_module = verify_module
        self._verify_function = verify_function

    def __repr__(self) -> str:
        return f"Gradcheck(mode={self.mode!r}, device={self.device!r})"

    def __call__(
        self, model: nn.Module, loss_fn: Callable[..., Any] | None = None, batch: Any = None, **options: Any
    ) -> Report:
        """``verify_module(model, loss_fn, batch, **options)``; raises if the gradients disagree."""
        __tracebackhide__ = True
        verify = self._verify_module
        if verify is None:
            from ._verify import verify_module as verify
        if self.mode is not None:
            options["mode"] = self.mode  # the command line wins: that is how a suite is rerun in full
        if self.device is None:
            report = verify(model, loss_fn, batch, **options)
        else:
            with moved_model(model, self.device):
                report = verify(model, loss_fn, _to(batch, self.device), **options)
        _warn(report)
        report.assert_passed()
        return report

    module = __call__

    def function(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Report:
        """``verify_function(fn, *args, **kwargs)``; raises if the gradients disagree.

        `--gradcheck-device` moves the tensor arguments; `--gradcheck-mode` does not apply (every
        input element of a function is always checked).
        """
        __tracebackhide__ = True
        verify = self._verify_function
        if verify is None:
            from .function import verify_function as verify
        if self.device is not None:
            args, kwargs = _to(args, self.device), _to(kwargs, self.device)
        report = verify(fn, *args, **kwargs)
        _warn(report)
        report.assert_passed()
        return report

    def batch_independence(self, model: nn.Module, batch: Any, /, **options: Any) -> Report:
        """``verify_batch_independence(model, batch, **options)``; raises if a sample leaks into another.

        `--gradcheck-device` moves the model and the batch; `--gradcheck-mode` does not apply.
        """
        __tracebackhide__ = True
        from ._batch_independence import verify_batch_independence as verify

        if self.device is None:
            report = verify(model, batch, **options)
        else:
            with moved_model(model, self.device):
                report = verify(model, _to(batch, self.device), **options)
        _warn(report)
        report.assert_passed()
        return report


def _warn(report: Report) -> None:
    """Each of ``report.warnings`` as a `GradcheckWarning` (pytest shows them; ``-W error`` fails on them)."""
    import warnings

    from ._errors import GradcheckWarning

    for text in report.warnings:
        warnings.warn(f"{report.call}: {text}", GradcheckWarning, stacklevel=3)


def _skip_if_unavailable(device: str) -> None:
    import torch

    try:
        torch.empty(1, device=torch.device(device))
    except (RuntimeError, AssertionError) as exc:  # unknown name, CUDA absent, index out of range
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        pytest.skip(f"--gradcheck-device={device}: not available here ({first})")


@pytest.fixture
def gradcheck(request: pytest.FixtureRequest) -> Gradcheck:
    """Check gradients inside a test: ``gradcheck(model, loss_fn, batch)``, ``gradcheck.function(fn, x)``.

    A failing check raises ``GradientMismatchError`` whose message is the report table. Honours
    ``--gradcheck-mode`` and ``--gradcheck-device``.
    """
    mode = request.config.getoption("gradcheck_mode")
    device = request.config.getoption("gradcheck_device")
    if device is not None:
        _skip_if_unavailable(device)
    return Gradcheck(mode=mode, device=device)

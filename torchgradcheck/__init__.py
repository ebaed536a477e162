"""torchgradcheck: prove that your gradients are right.

Compares the gradients autograd produces (``loss.backward()``) with central finite differences,
element by element, with tolerances derived from a measured estimate of the finite-difference error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "ElementResult",
    "GradcheckWarning",
    "GradientMismatchError",
    "InvalidArgumentError",
    "InvalidArgumentTypeError",
    "Localisation",
    "ParameterResult",
    "Report",
    "SiteVerdict",
    "TensorResult",
    "TorchGradcheckError",
    "__version__",
    "plot_step_sweep",
    "verify_batch_independence",
    "verify_distributed",
    "verify_function",
    "verify_module",
]

# Lazy attributes (PEP 562): `import torchgradcheck` (e.g. by the pytest plugin) does not import torch.
_WHERE = {
    "ElementResult": "._report",
    "ParameterResult": "._report",
    "TensorResult": "._report",
    "Report": "._report",
    "GradcheckWarning": "._errors",
    "GradientMismatchError": "._errors",
    "InvalidArgumentError": "._errors",
    "InvalidArgumentTypeError": "._errors",
    "TorchGradcheckError": "._errors",
    "Localisation": "._localise",
    "SiteVerdict": "._localise",
    "plot_step_sweep": "._sweep",
    "verify_batch_independence": "._batch_independence",
    "verify_distributed": ".distributed",
    "verify_function": ".function",
    "verify_module": "._verify",
}

if TYPE_CHECKING:
    from ._batch_independence import verify_batch_independence
    from ._errors import (
        GradcheckWarning,
        GradientMismatchError,
        InvalidArgumentError,
        InvalidArgumentTypeError,
        TorchGradcheckError,
    )
    from ._localise import Localisation, SiteVerdict
    from ._report import ElementResult, ParameterResult, Report, TensorResult
    from ._sweep import plot_step_sweep
    from ._verify import verify_module
    from .distributed import verify_distributed
    from .function import verify_function


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'torchgradcheck' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

"""What a check does to the process around it: backend flags and torch's own warnings.

* **Backend flags.** TF32 rounds CUDA float32 matmuls and convolutions to a 10-bit mantissa, so it is
  off while checking. The flags are changed only through context managers, as PyTorch's own
  ``tf32_off()`` does: ``torch.backends.cudnn.flags(...)`` for cuDNN, which is the only way allowed
  after ``torch.backends.disable_global_flags()`` (PyTorch's test harness calls it), and a saved and
  restored ``torch.backends.cuda.matmul.allow_tf32`` (not frozen by that call). Every flag is put
  back as it was, even on KeyboardInterrupt.
* **Warnings.** Under warnings-as-errors (pytest's ``filterwarnings = error``) a warning that torch
  raises inside the checker's own machinery would turn a verdict into a crash. Such machinery is
  warmed up once with its warnings silenced (forward-mode AD loads its decompositions on first use,
  and ``torch.jit.script`` warns about its own deprecation there). The user's forward is never run
  under a filter: the user's own warnings still reach the user.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

__all__ = ["tf32_off", "warm_up_machinery"]


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """TF32 off for cuDNN and cuBLAS inside; every backend flag as it was outside."""
    matmul = torch.backends.cuda.matmul
    old_matmul = matmul.allow_tf32
    try:
        if old_matmul:
            matmul.allow_tf32 = False
        # None leaves a flag as it is; the context manager restores all of them on exit.
        with torch.backends.cudnn.flags(
            enabled=None,
            benchmark=None,
            benchmark_limit=None,
            deterministic=None,
            allow_tf32=False,
            fp32_precision=None,
            depthwise_kernel=None,
        ):
            yield
    finally:
        if matmul.allow_tf32 != old_matmul:
            matmul.allow_tf32 = old_matmul


_warmed_up = False


def warm_up_machinery() -> None:
    """Run torch machinery the check relies on once, with torch's first-use warnings silenced.

    Forward-mode AD imports ``torch._decomp.decompositions_for_jvp`` on its first ``make_dual``, which
    calls ``torch.jit.script`` (a DeprecationWarning in torch 2.13). Later calls warn no more.
    """
    global _warmed_up
    if _warmed_up:
        return
    import torch.autograd.forward_ad as fwad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fwad.dual_level():
            fwad.make_dual(torch.zeros(1), torch.zeros(1))
    _warmed_up = True

"""Global state that a check touches (RNG, default dtype, grad mode), saved and restored.

A check seeds the RNG before every evaluation so that dropout draws the same mask in the backward
pass and in every perturbed forward. None of that may leak: `preserved_global_state` puts the CPU
and CUDA generators, the default dtype and grad mode back exactly, even on KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ._hygiene import tf32_off, warm_up_machinery

__all__ = ["preserved_global_state", "reseed"]


@contextlib.contextmanager
def preserved_global_state() -> Iterator[None]:
    """Restore RNG states, default dtype and grad mode on exit, whatever happens inside; no inference mode inside."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    default_dtype = torch.get_default_dtype()
    grad_enabled = torch.is_grad_enabled()
    warm_up_machinery()  # torch's first-use warnings, silenced once (see `_hygiene`)
    try:
        # TF32 rounds float32 matmuls to a 10-bit mantissa on recent GPUs: off while checking, through
        # context managers only (legal after torch.backends.disable_global_flags()); see `_hygiene`.
        # Under torch.inference_mode() nothing could be recorded for the backward pass; leave it for the check.
        with tf32_off(), torch.inference_mode(False):
            yield
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        torch.set_default_dtype(default_dtype)
        torch.set_grad_enabled(grad_enabled)


def reseed(seed: int) -> None:
    """Seed the CPU generator and, if CUDA is in use, every CUDA generator."""
    torch.random.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)

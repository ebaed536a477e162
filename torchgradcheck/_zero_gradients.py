"""The warning for tensors that were not tested: their gradient is exactly zero on both sides.

A zero-initialised layer downstream (LoRA's ``B = 0``, a zero-init residual branch, a gate at 0)
makes the gradient of everything upstream of it exactly 0, for autograd *and* for finite
differences: the check compares 0 with 0 and learns nothing about those tensors, however wrong
their backward is. The verdict does not change (nothing failed), but the report says so and names
the fix: check again a few optimizer steps later (``after_steps=``), where the gradients are alive.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["exactly_zero", "zero_gradient_warning"]

_SHOWN = 5


def exactly_zero(result: Any) -> bool:
    """True if both sides of a checked tensor are exactly 0 over every element compared."""
    return (
        getattr(result, "status", None) not in ("skipped", "unused", "no gradient")
        and getattr(result, "checked", 0) > 0
        and getattr(result, "norms", None) == (0.0, 0.0)
    )


def zero_gradient_warning(results: Iterable[Any], after_steps: int = 0) -> str | None:
    """One full sentence naming the tensors whose gradient is exactly 0 on both sides, or None."""
    names = [r.name for r in results if exactly_zero(r)]
    if not names:
        return None
    shown = ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
    one = len(names) == 1
    where = f" after {after_steps} optimizer step(s)" if after_steps else ""
    fix = (
        "check again where the gradients are alive, e.g. verify_module(..., after_steps=3)"
        if not after_steps
        else "take more steps (a larger after_steps=) or pass optimizer= with a larger learning rate"
    )
    return (
        f"nothing was tested for {shown}: {'its' if one else 'their'} gradient is exactly 0 on both sides{where} "
        "(typically a zero-initialised layer downstream, such as LoRA's B = 0, blocks it); " + fix + "."
    )

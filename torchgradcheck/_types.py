"""The names a check speaks in: statuses, modes, engines. Torch-free (the plugin and the CLI import it).

Each name exists once, here. To add a status, add it to `Status` and, if it passes, to `PASSING`;
to add a mode or an engine, add it to `Mode`/`EngineName` and to the tuple below it (a test checks
that the tuples and the Literals agree).
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["ENGINES", "MODES", "PASSING", "STATUSES", "EngineName", "Mode", "Status"]

Status = Literal[
    "ok",  # every checked element within tolerance
    "zero",  # autograd and finite differences both ~0 within tolerance
    "unused",  # .grad is None and the loss does not depend on the tensor
    "skipped",  # not checked (frozen, filtered by params=, or the check could not run)
    "inconclusive",  # too many elements at kinks to judge
    "weak",  # within tolerance, but the tolerance is not small next to the gradient (no power)
    "mismatch",  # elements over tolerance
    "no gradient",  # .grad is None but the loss depends on the tensor
    "diverged",  # a replicated tensor's gradient differs across ranks
    "error",  # an extra check (jvp, non-contiguous) raised
    "nondeterministic",  # two runs of the backward differ beyond nondet_tol
    "wrong dtype",  # backward returned a gradient of the wrong dtype
    "wrong shape",  # ... of the wrong shape
    "wrong device",  # ... on the wrong device
    "does not accumulate",  # .grad after two backward passes equals .grad after one (something assigns .grad)
    "backward not repeatable",  # a second backward through the same graph gives a different gradient
    "leaks",  # verify_batch_independence: this output sample depends on other input samples
    "unavailable",  # a derivative the check needs can't be computed (e.g. no double backward)
    "warning",  # an extra check (second order) failed, reported as a warning: the verdict stands
]
STATUSES: tuple[str, ...] = get_args(Status)
# Statuses that pass; every other status fails the check.
PASSING: tuple[str, ...] = ("ok", "zero", "unused", "skipped", "inconclusive", "weak", "warning")

Mode = Literal["auto", "full", "directional", "sampled"]
MODES: tuple[str, ...] = get_args(Mode)

EngineName = Literal["auto", "vmap", "loop", "cone"]
ENGINES: tuple[str, ...] = get_args(EngineName)

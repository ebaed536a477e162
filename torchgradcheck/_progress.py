"""A tqdm progress bar on stderr for checks that take more than about a second."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["DELAY", "Progress", "progress_bar"]

DELAY = 1.0  # seconds before a bar is drawn: quick checks stay silent


class Progress:
    """``update(n)`` as evaluations finish; ``grow(n)`` when the plan adds work. Silent when disabled."""

    def __init__(self, bar: Any = None) -> None:
        self.bar = bar

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def grow(self, n: int) -> None:
        if self.bar is not None:
            self.bar.total += n  # shown at the next update (refresh() would draw before the delay)


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool | None, desc: str) -> Iterator[Progress]:
    """A `Progress`; ``enabled=None`` means: only when stderr is a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield Progress()
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="eval", delay=DELAY, file=sys.stderr, leave=False) as bar:
        yield Progress(bar)

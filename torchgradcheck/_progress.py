"""A tqdm progress bar on stderr for checks that take more than about a second."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["Progress", "progress_bar"]


class Progress:
    """``update(n)`` as evaluations finish; ``grow(n)`` when the plan adds work. Silent when disabled."""

    def __init__(self, bar: Any = None) -> None:
        self.bar = bar

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def grow(self, n: int) -> None:
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool | None, desc: str) -> Iterator[Progress]:
    """A `Progress`; ``enabled=None`` means: only when stderr is a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield Progress()
        return
    from tqdm.auto import tqdm

    # delay=1: nothing is drawn for checks that finish within a second.
    with tqdm(total=total, desc=desc, unit="eval", delay=1.0, file=sys.stderr, leave=False) as bar:
        yield Progress(bar)

"""A tqdm progress bar on stderr for checks that take more than about a second."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

__all__ = ["progress_bar"]


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool | None, desc: str) -> Iterator[Callable[[int], None]]:
    """Yield ``tick(n)``. ``enabled=None`` means: only when stderr is a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda n: None
        return
    from tqdm.auto import tqdm

    # delay=1: nothing is drawn for checks that finish within a second.
    with tqdm(total=total, desc=desc, unit="eval", delay=1.0, file=sys.stderr, leave=False) as bar:
        yield bar.update

"""Progress."""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import Progress


@contextlib.contextmanager
def progress_bar(label: str, total: int, disable: bool = False) -> Iterator[Callable[[int], None]]:
    """A transient rich bar with ETA on a terminal's stderr; nothing when output is captured (or `disable`)."""
    if disable or not sys.stderr.isatty():
        yield lambda k: None
        return
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda k: progress.advance(task, k)

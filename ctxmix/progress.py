"""Progress on stderr for long runs: the library's ``progress(task, completed, total)`` callback, drawn by rich.

The library never prints; it calls the callback it is given. ``progress_display`` yields such a callback,
or None when nothing should be drawn (``--quiet``, or stderr is not a terminal: logs and pipes stay clean).
The bar appears only once a run has taken ``SHOW_AFTER_S`` seconds, so short commands print nothing extra,
and it is transient: it is erased when the work ends, leaving only the results on stdout.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskID, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

from .errors import printable

if TYPE_CHECKING:
    from .run import ProgressFn

SHOW_AFTER_S = 1.0  # work shorter than this never draws a bar


class BytesRateColumn(ProgressColumn):
    """The task's speed in kB/s (its counts are bytes): what the codec's progress reports."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed / 1000:,.1f} kB/s")


class ProgressDisplay:
    """Callable ``(task, completed, total)``: one bar per task description, started lazily. ``unit="bytes"``:
    the counts are bytes, shown with their rate and the time left (``compress`` / ``decompress``)."""

    def __init__(self, console: Console, show_after_s: float = SHOW_AFTER_S, unit: str = ""):
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        if unit == "bytes":
            columns += [BytesRateColumn(), TimeRemainingColumn()]
        self._progress = Progress(*columns, console=console, transient=True)
        self._show_after_s = show_after_s
        self._created = time.monotonic()
        self._started = False
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, task: str, completed: int, total: int) -> None:
        if not self._started:
            if time.monotonic() - self._created < self._show_after_s:
                return
            self._progress.start()
            self._started = True
        task_id = self._tasks.get(task)
        if task_id is None:
            # Task names hold file and trace names: shown escaped, never as rich markup or terminal controls.
            task_id = self._tasks[task] = self._progress.add_task(escape(printable(task)), total=total)
        self._progress.update(task_id, completed=completed, total=total)

    def close(self) -> None:
        if self._started:
            self._progress.stop()
            self._started = False


@contextlib.contextmanager
def progress_display(quiet: bool = False, console: Console | None = None, unit: str = "") -> Iterator[ProgressFn | None]:
    """Yield a progress callback for the library, or None when progress should not be drawn (``unit``: as
    ``ProgressDisplay``'s)."""
    console = console if console is not None else Console(stderr=True)
    if quiet or not console.is_terminal:
        yield None
        return
    display = ProgressDisplay(console, unit=unit)
    try:
        yield display
    finally:
        display.close()

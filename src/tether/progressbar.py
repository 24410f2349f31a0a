"""Progress bars for ``tether cp`` on a terminal (rich); silence elsewhere."""

from __future__ import annotations

import os
import sys
from types import TracebackType
from typing import Any

from .terminal import printable

__all__ = ["TransferBars"]


class TransferBars:
    """One bar per file plus a total, fed by the API's ``progress`` callback.

    Shown only when stderr is a terminal and ``quiet`` is false: in a pipe or
    a log, ``tether cp`` prints nothing but errors.
    """

    def __init__(self, *, quiet: bool, total: int | None = None) -> None:
        self.enabled = not quiet and sys.stderr.isatty()
        self._tasks: dict[str, Any] = {}
        self._done: dict[str, int] = {}
        self._total_task: Any = None
        self._total = total
        self._progress: Any = None

    def __enter__(self) -> TransferBars:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                # A file name is not markup ("[red]" in one would colour it).
                TextColumn("{task.description}", justify="left", markup=False),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.__exit__(et, e, tb)

    def __call__(self, path: str, done: int, total: int) -> None:
        """The ``progress(path, done, total)`` callback of get/put."""
        if self._progress is None:
            return
        task = self._tasks.get(path)
        if task is None:
            name = os.path.basename(path.rstrip("/")) or path
            task = self._progress.add_task(printable(name), total=total)
            self._tasks[path] = task
            if len(self._tasks) == 2 and self._total_task is None:
                # A second file: it is a tree, show the sum too.
                self._total_task = self._progress.add_task("total", total=self._total)
                self._progress.update(self._total_task, completed=sum(self._done.values()))
        self._progress.update(task, completed=done, total=total)
        self._done[path] = done
        if self._total_task is not None:
            self._progress.update(self._total_task, completed=sum(self._done.values()))

"""Progress bars for ``tether cp`` on a terminal (rich); silence elsewhere."""

from __future__ import annotations

import os
import sys
from types import TracebackType
from typing import Any

from .terminal import printable

__all__ = ["TransferBars"]


class TransferBars:
    """A bar for the file being copied plus, for a tree, a total, fed by the
    API's ``progress`` callback; each finished file of a tree leaves its bar
    for a line above the bars, as scp prints one line per file.

    One bar per file kept for the whole copy made every redraw longer than
    the last: a tree of 1,000 small files took minutes on a terminal where
    ``-q`` took a second.

    Shown only when stderr is a terminal and ``quiet`` is false: in a pipe or
    a log, ``tether cp`` prints nothing but errors.
    """

    def __init__(self, *, quiet: bool, total: int | None = None) -> None:
        self.enabled = not quiet and sys.stderr.isatty()
        self._path: str | None = None  # the file being copied
        self._name = ""
        self._task: Any = None
        self._done = 0  # of the file being copied
        self._finished = 0  # bytes of the files before it
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
        progress = self._progress
        if progress is None:
            return
        if path != self._path:
            if self._path is not None:
                self._leave_a_line()
                if self._total_task is None:  # a second file: it is a tree, show the sum too
                    self._total_task = progress.add_task("total", total=self._total)
            self._path = path
            self._name = printable(os.path.basename(path.rstrip("/")) or path)
            self._task = progress.add_task(self._name, total=total)
        progress.update(self._task, completed=done, total=total)
        self._done = done
        if self._total_task is not None:
            progress.update(self._total_task, completed=self._finished + done)

    def _leave_a_line(self) -> None:
        from rich.filesize import decimal
        from rich.text import Text

        self._progress.remove_task(self._task)
        self._finished += self._done
        # Text, not a string: a file name is not markup either.
        self._progress.console.print(Text(f"{self._name}  {decimal(self._done)}"))

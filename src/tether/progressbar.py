"""Progress bars for ``tether cp`` on a terminal (rich); silence elsewhere."""

from __future__ import annotations

import os
import sys
from types import TracebackType
from typing import Any

from .terminal import printable

__all__ = ["TransferBars"]


class TransferBars:
    """A bar for each file being copied plus, for a tree, a total, fed by the
    API's ``progress`` callback (a tree copies a few files at once). When a
    new file starts, the finished ones leave their bars for a line each
    above the bars, as scp prints one line per file.

    One bar per file kept for the whole copy made every redraw longer than
    the last: a tree of 1,000 small files took minutes on a terminal where
    ``-q`` took a second.

    Shown only when stderr is a terminal and ``quiet`` is false: in a pipe or
    a log, ``tether cp`` prints nothing but errors.
    """

    def __init__(self, *, quiet: bool, total: int | None = None) -> None:
        self.enabled = not quiet and sys.stderr.isatty()
        self._bars: dict[str, _Bar] = {}  # the files shown, by path
        self._files = 0  # files seen
        self._finished = 0  # bytes of the files whose bars have gone
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
        bar = self._bars.get(path)
        if bar is None:
            self._files += 1
            self._leave_lines()
            if self._files == 2:  # a second file: it is a tree, show the sum too
                self._total_task = progress.add_task("total", total=self._total)
            name = printable(os.path.basename(path.rstrip("/")) or path)
            bar = self._bars[path] = _Bar(name, progress.add_task(name, total=total), total)
        progress.update(bar.task, completed=done, total=total)
        bar.done, bar.total = done, total
        if self._total_task is not None:
            shown = sum(bar.done for bar in self._bars.values())  # a few files at most
            progress.update(self._total_task, completed=self._finished + shown)

    def _leave_lines(self) -> None:
        """The finished files leave their bars for a line each."""
        from rich.filesize import decimal
        from rich.text import Text

        for path, bar in list(self._bars.items()):
            if bar.done < bar.total:
                continue
            del self._bars[path]
            self._progress.remove_task(bar.task)
            self._finished += bar.done
            # Text, not a string: a file name is not markup either.
            self._progress.console.print(Text(f"{bar.name}  {decimal(bar.done)}"))


class _Bar:
    __slots__ = ("done", "name", "task", "total")

    def __init__(self, name: str, task: Any, total: int) -> None:
        self.name, self.task, self.total, self.done = name, task, total, 0

"""The agent's log lines, written to stderr by a thread of their own.

Why not ``logging.StreamHandler``: it writes in the thread that logs, and the
agent logs from its event loop. A stderr that nobody reads (a pipe whose
reader only wanted the "listening on" line, a paused pager, a stalled log
collector) then fills after some 64 KiB, and the next log line blocks the
loop: every connection of the agent froze, after about 200 commands.
Here the loop only queues the line; a writer thread blocks instead of it,
and past ``MAX_BACKLOG`` bytes waiting, lines are dropped and counted, and
the count is said once stderr takes lines again.

Why not ``logging.handlers.QueueHandler``: its queue, bounded, reports a full
queue through ``handleError``, which prints a traceback to the same stderr,
synchronously.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable

__all__ = ["CLOSE_TIMEOUT", "MAX_BACKLOG", "LineHandler", "silence", "write_fully"]

MAX_BACKLOG = 1024 * 1024  # bytes of log lines kept while stderr is not read
GATHER = 0.02  # seconds the writer lets lines gather before it writes them
CLOSE_TIMEOUT = 2.0  # seconds close() waits for stderr to take the last lines
RETRY = 1.0  # seconds before writing again after a failure (a full disk)
# Failures after which nothing more is written: the reader is gone for good.
# Any other (ENOSPC, EDQUOT, EIO...) may pass: its lines are counted as
# dropped, and writing goes on.
_FOR_GOOD = frozenset({errno.EPIPE, errno.EBADF})

Dropped = Callable[[int, str], str]  # (lines, why) -> the line that says so
KEPT_UP = "the reader did not keep up"  # why lines were dropped, unless a write failed


def write_fully(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd``: a short write goes on, and EAGAIN (a
    descriptor left non-blocking by whoever started us) waits until the
    reader has made room instead of losing the rest.

    Raises:
        OSError: the write failed (EPIPE: the reader is gone; ENOSPC...).
    """
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [])


class LineHandler(logging.Handler):
    """A logging handler that formats in the caller's thread and never blocks it.

    ``put_line`` queues a line that is not a log record (the agent's
    "listening on", an audit record); ``close`` waits a bounded time for what
    is queued. ``dropped`` makes the line that says how many were lost and
    why (by default a log record of ``tether.log``); ``on_error`` hears of
    the first failure of each spell of failed writes (it must not log
    through this handler).
    """

    def __init__(
        self,
        fd: int,
        max_backlog: int = MAX_BACKLOG,
        *,
        dropped: Dropped | None = None,
        on_error: Callable[[OSError], None] | None = None,
    ) -> None:
        super().__init__()
        self._fd = fd
        self._max_backlog = max_backlog
        self._describe_drop = dropped or self._dropped_record
        self._on_error = on_error
        self._lines: collections.deque[bytes] = collections.deque()
        self._queued = 0  # bytes in _lines
        self._dropped = 0  # lines dropped since the last batch: the backlog was full
        self._lost = 0  # lines of failed writes, and why: said before the next lines
        self._lost_why = ""
        self._failing = False  # the last write failed
        self._closing = False
        self._gone = False  # the reader went away (EPIPE...): nothing more is written
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="tether-log", daemon=True)
        self._thread.start()

    @property
    def reader_gone(self) -> bool:
        """Writing to the descriptor failed: its reader is gone, it is /dev/null now."""
        return self._gone

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.put_line(self.format(record))
        except Exception:  # what logging.StreamHandler does with a bad record
            self.handleError(record)

    def put_line(self, text: str) -> None:
        """Queue ``text`` and a newline, unless too much is waiting already."""
        line = (text + "\n").encode("utf-8", "backslashreplace")
        with self._ready:
            if self._gone or self._closing:
                return
            if self._queued + len(line) > self._max_backlog:
                self._dropped += 1
                return
            self._lines.append(line)
            self._queued += len(line)
            self._ready.notify()

    def _run(self) -> None:
        while (next_batch := self._next_batch()) is not None:
            batch, lines = next_batch
            try:
                write_fully(self._fd, batch)
            except OSError as exc:
                if not self._failing and self._on_error is not None:
                    self._on_error(exc)
                self._failing = True
                if exc.errno in _FOR_GOOD:
                    if exc.errno == errno.EPIPE:
                        # Later writes (the interpreter's last flush of
                        # sys.stderr among them) must not fail on it either.
                        silence(self._fd)
                    with self._ready:
                        self._gone = True
                        self._lines.clear()
                        self._dropped = self._lost = 0
                    return
                with self._ready:
                    self._lost += lines  # a note of N lines stands for N
                    self._lost_why = exc.strerror or str(exc)
                    if self._closing:
                        return  # no retrying for ever after close()
                time.sleep(RETRY)
                continue
            self._failing = False
            if not self._closing:
                # Let the next lines gather: one wake-up of this thread, and
                # one hand-over of the GIL, per batch instead of per line
                # under load (per line, a command's log line cost the agent
                # 5-10% of its exec rate). A line after a quiet spell still
                # goes out at once.
                time.sleep(GATHER)

    def _next_batch(self) -> tuple[bytes, int] | None:
        """What is queued and how many lines it stands for, once there is
        something; None once closed and written."""
        with self._ready:
            while not (self._lines or self._dropped or self._lost or self._closing):
                self._ready.wait()
            if not (self._lines or self._dropped or self._lost):
                return None  # closing, and everything is written
            lines, self._lines, self._queued = self._lines, collections.deque(), 0
            dropped, self._dropped = self._dropped, 0
            lost, self._lost = self._lost, 0
        count = len(lines) + dropped + lost
        if lost:  # before: they came before anything queued now
            lines.appendleft(self._note(lost, self._lost_why))
        if dropped:  # after: the backlog was full after these lines
            lines.append(self._note(dropped, KEPT_UP))
        return b"".join(lines), count

    def _note(self, count: int, why: str) -> bytes:
        return (self._describe_drop(count, why) + "\n").encode("utf-8", "backslashreplace")

    def _dropped_record(self, count: int, why: str) -> str:
        record = logging.makeLogRecord(
            {
                "name": "tether.log",
                "levelno": logging.WARNING,
                "levelname": logging.getLevelName(logging.WARNING),
                "msg": "%d log lines dropped: %s",
                "args": (count, why),
            }
        )
        return self.format(record)

    def close(self) -> None:
        """:meth:`finish`, as ``logging.shutdown`` calls it at exit."""
        self.finish()

    def finish(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Stop taking lines; wait up to ``timeout`` seconds for the queued
        ones to be written (a stderr nobody reads must not hold the exit).
        Called again, it does not wait again.

        Returns whether the writer is done with the descriptor: until then
        it must not be closed (its number could go to another file).
        """
        with self._ready:
            first, self._closing = not self._closing, True
            self._ready.notify()
        if first:
            self._thread.join(timeout)
        super().close()
        return not self._thread.is_alive()


def silence(fd: int) -> None:
    """Point ``fd`` at /dev/null: its reader is gone, and later writes (the
    interpreter's last flush among them) must not fail on it."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)

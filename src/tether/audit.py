"""The audit log: one JSON object per line for every connection, hello, exec and
file change (docs/protocol.md has nothing to say here: this is the agent's own
record). Tokens never appear in it: only the name a token belongs to."""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
from typing import Any

from .logwriter import LineHandler

__all__ = ["AuditLog"]

log = logging.getLogger("tether.audit")


class AuditLog:
    """Writes audit events to a file (if given) and to the ``tether.audit`` logger.

    The file is written by a thread of its own (:class:`LineHandler`): a
    destination that blocks (a FIFO whose reader stalls, a hung network
    file system) froze the agent, whose event loop wrote each line. What
    cannot be written in time is counted, and the file gets a ``lost``
    record saying how many and why.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self._fd = -1
        self._writer: LineHandler | None = None
        if path is not None:
            try:
                # Non-blocking: a FIFO with no reader fails here instead of
                # holding the agent's start for ever.
                flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK
                self._fd = os.open(path, flags, 0o600)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    raise OSError(exc.errno, "a FIFO nobody reads", exc.filename) from None
                raise
            self._writer = LineHandler(self._fd, dropped=_lost, on_error=_cannot_write)

    def record(self, event: str, **fields: Any) -> None:
        """Record ``event`` with ``fields`` (JSON-serializable values)."""
        if self._writer is None and not log.isEnabledFor(logging.INFO):
            return  # nobody reads it: skip the formatting, on every request
        line = _line(event, fields)
        if self._writer is not None:
            self._writer.put_line(line)
        log.info("%s", line)

    def close(self) -> None:
        """Write what is queued (waiting a bounded time), then close the file."""
        writer, self._writer = self._writer, None
        if writer is not None and not writer.finish():
            # Its thread still blocks in a write (a FIFO nobody reads): the
            # descriptor stays open with it, the agent is exiting anyway.
            return
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _line(event: str, fields: dict[str, Any]) -> str:
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    return json.dumps({"time": now, "event": event, **fields}, default=str)


def _lost(count: int, why: str) -> str:
    return _line("lost", {"records": count, "reason": why})


def _cannot_write(exc: OSError) -> None:
    # From the writer's thread; logging is thread-safe, and goes to stderr.
    log.error("cannot write the audit log: %s; events go to the log only", exc.strerror or exc)

"""The audit log: one JSON object per line for every connection, hello, exec and
file change (docs/protocol.md has nothing to say here: this is the agent's own
record). Tokens never appear in it: only the name a token belongs to."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
from typing import IO, Any

__all__ = ["AuditLog"]

log = logging.getLogger("tether.audit")


class AuditLog:
    """Writes audit events to a file (if given) and to the ``tether.audit`` logger."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self._file: IO[str] | None = None
        if path is not None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._file = os.fdopen(fd, "a", encoding="utf-8", buffering=1)  # a line at a time
        self._lost = 0  # events the file could not take

    def record(self, event: str, **fields: Any) -> None:
        """Record ``event`` with ``fields`` (JSON-serializable values)."""
        if self._file is None and not log.isEnabledFor(logging.INFO):
            return  # nobody reads it: skip the formatting, on every request
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        line = json.dumps({"time": now, "event": event, **fields}, default=str)
        if self._file is not None:
            try:
                self._file.write(line + "\n")
            except OSError as exc:
                # A full disk must not hang or fail the connection being
                # recorded (this runs inside connection_made): say it, go on.
                self._lost += 1
                if self._lost == 1:
                    log.error("cannot write the audit log: %s; events go to the log only", exc)
        log.info("%s", line)

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):  # the lines it could not write: said above
                self._file.close()
            self._file = None

"""Every exception tether raises, in one place.

The tree::

    TetherError                      base of everything below; has ``.code``
    ├── ConnectError                 the agent could not be reached (refused, no route,
    │   │                             unknown host, TLS failed); also an OSError
    │   └── CertificateError         the agent's certificate is not the one pinned for it
    │                                 (possible man-in-the-middle), or unknown
    ├── ConnectionClosed             an established connection ended before a reply
    ├── ProtocolError                the peer broke docs/protocol.md; the connection is
    │   │                             failed, later input is discarded
    │   └── FrameTooLarge            a declared length is over its limit (``.size``,
    │                                 ``.limit``, ``.part``)
    ├── RemoteError                  the agent answered a request with an error frame
    │   │                             (``.code``, ``.message``); fails only that request
    │   └── AuthenticationError      the agent refused the token, or hello never succeeded
    ├── TransferError                a file transfer failed on this side (``.code``:
    │   │                             checksum_mismatch, source_changed, no_space, ...)
    │   └── TreeCopyError            entries of a tree copy failed (``.failures``,
    │                                 ``.results``, ``.stopped_by``)
    ├── UsageError                   the caller asked for something malformed (bad host
    │                                 string, no token to be found)
    └── TimeoutError                 an operation ran out of time; also a builtin
                                      TimeoutError (``.seconds``)

A protocol error fails the whole connection; a failed request fails only itself
(docs/protocol.md §6).
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

__all__ = [
    "AuthenticationError",
    "CertificateError",
    "ConnectError",
    "ConnectionClosed",
    "FrameTooLarge",
    "ProtocolError",
    "RemoteError",
    "TetherError",
    "TimeoutError",
    "TransferError",
    "TreeCopyError",
    "UsageError",
]


class TetherError(Exception):
    """Base class of every tether exception.

    ``code`` is one of the wire error codes (docs/protocol.md §6) where one
    applies, otherwise a short local name.
    """

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConnectError(TetherError, OSError):
    """The agent could not be reached."""

    code = "connect_failed"


class CertificateError(ConnectError):
    """The agent's TLS certificate does not match its pin (``certificate_mismatch``),
    or the host is unknown and trust on first use is off (``unknown_host``)."""

    code = "certificate_mismatch"


class ConnectionClosed(TetherError):
    """The connection ended while a request was still waiting for its reply."""

    code = "connection_closed"


class ProtocolError(TetherError):
    """The peer sent something docs/protocol.md does not allow."""

    code = "bad_frame"


class FrameTooLarge(ProtocolError):
    """A declared header or body length is over its limit.

    Raised before any of the oversized part is buffered.
    """

    code = "too_large"

    def __init__(self, part: str, size: int, limit: int) -> None:
        super().__init__(f"{part} of {size} bytes is over the limit of {limit} bytes")
        self.part = part
        self.size = size
        self.limit = limit


class RemoteError(TetherError):
    """The agent answered a request with an ``error`` frame."""

    code = "internal"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


class AuthenticationError(RemoteError):
    """The agent did not accept our ``hello``."""


class TransferError(TetherError):
    """A file could not be read, written or verified on this side of a transfer.

    ``code`` is a wire error code; the agent sends these to the client as
    ``error`` frames.
    """

    code = "io_error"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


class TreeCopyError(TransferError):
    """A tree copy could not copy some of its entries.

    As scp does, an entry that fails for a reason of its own (unreadable,
    vanished, refused) does not stop the rest. ``failures`` holds each such
    error in the order met (every message names its path); ``results`` the
    ``TransferResult`` of every file that was copied. ``code`` is the first
    failure's. When an error that would fail every later entry too (no space
    left, the connection gone) then ended the copy, it is ``stopped_by``, the
    last of ``failures``, and gives the code; otherwise ``stopped_by`` is None
    and the copy went on to its end.
    """

    def __init__(
        self,
        failures: Sequence[TetherError],
        results: Sequence[Any],
        stopped_by: TetherError | None = None,
    ) -> None:
        main = stopped_by or failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        super().__init__(main.code, f"{main}{more}")
        self.failures = list(failures)
        self.results = list(results)
        self.stopped_by = stopped_by


class UsageError(TetherError, ValueError):
    """The caller's own input is malformed."""

    code = "usage"


class TimeoutError(TetherError, builtins.TimeoutError):
    """An operation did not finish within its time limit."""

    code = "timeout"

    def __init__(self, message: str, *, seconds: float | None = None) -> None:
        super().__init__(message)
        self.seconds = seconds

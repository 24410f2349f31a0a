"""Limits checked on declared lengths before anything is buffered (docs/protocol.md §10)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEFAULT_PORT",
    "HELLO_TIMEOUT",
    "MAX_BODY_LEN",
    "MAX_HEADER_LEN",
    "MAX_PING_LEN",
    "PROTOCOL_VERSION",
    "STDIN_WINDOW",
    "Limits",
]

PROTOCOL_VERSION = 1
DEFAULT_PORT = 7447
MAX_HEADER_LEN = 64 * 1024  # 64 KiB of JSON header per frame
MAX_BODY_LEN = 16 * 1024 * 1024  # 16 MiB of body per frame
MAX_PING_LEN = 1024  # bytes per UDP ping datagram; larger ones are ignored
HELLO_TIMEOUT = 10.0  # seconds an unauthenticated connection may live
# Bytes of one exec's stdin a client may send before the agent credits them
# back (docs/protocol.md §4.6): what the agent keeps for a program that does
# not read, without ever having to stop reading the connection.
STDIN_WINDOW = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-frame size limits, and an exec's stdin window, in bytes."""

    max_header: int = MAX_HEADER_LEN
    max_body: int = MAX_BODY_LEN
    stdin_window: int = STDIN_WINDOW

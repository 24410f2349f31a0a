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
    "Limits",
]

PROTOCOL_VERSION = 1
DEFAULT_PORT = 7447
MAX_HEADER_LEN = 64 * 1024  # 64 KiB of JSON header per frame
MAX_BODY_LEN = 16 * 1024 * 1024  # 16 MiB of body per frame
MAX_PING_LEN = 1024  # bytes per UDP ping datagram; larger ones are ignored
HELLO_TIMEOUT = 10.0  # seconds an unauthenticated connection may live


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-frame size limits, in bytes."""

    max_header: int = MAX_HEADER_LEN
    max_body: int = MAX_BODY_LEN

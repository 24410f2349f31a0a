"""UDP ping datagrams (docs/protocol.md §8), without I/O.

A ping is ``b"TPNG"`` + ``u32 sequence`` + ``u64 send time (ns)`` + padding; the
reply is the same datagram with the magic changed to ``b"TPNR"``, so a reply is
never larger than its request and the agent amplifies nothing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .limits import MAX_PING_LEN

__all__ = ["PING_MAGIC", "PONG_MAGIC", "Ping", "encode_ping", "parse_pong", "reply_to"]

PING_MAGIC = b"TPNG"
PONG_MAGIC = b"TPNR"
_BODY = struct.Struct(">IQ")
MIN_PING_LEN = len(PING_MAGIC) + _BODY.size  # 16 bytes


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int
    sent_ns: int


def encode_ping(seq: int, sent_ns: int, size: int = MIN_PING_LEN) -> bytes:
    """A ping datagram of ``size`` bytes (at least 16, at most MAX_PING_LEN)."""
    size = max(MIN_PING_LEN, min(size, MAX_PING_LEN))
    head = PING_MAGIC + _BODY.pack(seq & 0xFFFFFFFF, sent_ns & 0xFFFFFFFFFFFFFFFF)
    return head + bytes(size - len(head))


def reply_to(datagram: bytes) -> bytes | None:
    """The agent's reply to ``datagram``, or ``None`` if it is not a valid ping."""
    if not MIN_PING_LEN <= len(datagram) <= MAX_PING_LEN or not datagram.startswith(PING_MAGIC):
        return None
    return PONG_MAGIC + datagram[len(PING_MAGIC) :]


def parse_pong(datagram: bytes) -> Ping | None:
    """The sequence and send time carried by a reply, or ``None`` if it is not one."""
    if len(datagram) < MIN_PING_LEN or not datagram.startswith(PONG_MAGIC):
        return None
    seq, sent_ns = _BODY.unpack_from(datagram, len(PONG_MAGIC))
    return Ping(seq, sent_ns)

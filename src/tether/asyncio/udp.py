"""UDP ping: the agent's responder and the client's pinger (docs/protocol.md §8)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

from ..addresses import Address
from ..exceptions import ConnectError, UsageError
from ..ping import encode_ping, parse_pong, reply_to

__all__ = ["PingReply", "PingResponder", "ping"]


class PingResponder(asyncio.DatagramProtocol):
    """Answers valid pings; anything else is ignored, never answered."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's: cast, do not assert.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply = reply_to(data)
        if reply is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors from a vanished pinger are not the agent's concern


@dataclass(frozen=True, slots=True)
class PingReply:
    """One ping's outcome: ``rtt`` in seconds, or ``None`` if no reply came;
    ``refused`` when the host said nothing listens on that UDP port (ICMP
    port unreachable), rather than staying silent."""

    seq: int
    rtt: float | None
    size: int
    refused: bool = False


_REFUSED = -1  # in the replies queue: an ICMP port unreachable, not a pong


class _Pinger(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[tuple[int, int, int]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        pong = parse_pong(data)
        if pong is not None:
            self.replies.put_nowait((pong.seq, time.monotonic_ns(), len(data)))

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionRefusedError):  # the ICMP answer to the last ping
            self.replies.put_nowait((_REFUSED, time.monotonic_ns(), 0))


def ping(
    address: Address, *, count: int = 4, interval: float = 1.0, timeout: float = 1.0, size: int = 16
) -> AsyncIterator[PingReply]:
    """Send ``count`` pings ``interval`` seconds apart and yield each outcome.

    Raises:
        UsageError: ``address`` is a Unix socket (ping is UDP only): at once,
            before any iteration.
        ConnectError: the host name does not resolve (while iterating).
    """
    if address.host is None or address.port is None:
        raise UsageError("ping needs a TCP/UDP host, not a Unix socket")
    return _pings(address, count, interval, timeout, size)


async def _pings(
    address: Address, count: int, interval: float, timeout: float, size: int
) -> AsyncIterator[PingReply]:
    assert address.host is not None and address.port is not None
    loop = asyncio.get_running_loop()
    try:
        transport, pinger = await loop.create_datagram_endpoint(
            _Pinger, remote_addr=(address.host, address.port)
        )
    except OSError as exc:
        raise ConnectError(f"cannot reach {address}: {exc.strerror or exc}") from None
    try:
        for seq in range(count):
            if seq:
                await asyncio.sleep(interval)
            sent = time.monotonic_ns()
            transport.sendto(encode_ping(seq, sent, size))
            yield await _await_reply(pinger, seq, sent, timeout)
    finally:
        transport.close()


async def _await_reply(pinger: _Pinger, seq: int, sent: int, timeout: float) -> PingReply:
    deadline = sent / 1e9 + timeout
    while True:
        remaining = deadline - time.monotonic_ns() / 1e9
        if remaining <= 0:
            return PingReply(seq, None, 0)
        try:
            got_seq, received, size = await asyncio.wait_for(pinger.replies.get(), remaining)
        except TimeoutError:
            return PingReply(seq, None, 0)
        if got_seq == _REFUSED:
            return PingReply(seq, None, 0, refused=True)
        if got_seq == seq:  # late replies to earlier pings are dropped
            return PingReply(seq, (received - sent) / 1e9, size)

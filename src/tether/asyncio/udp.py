"""UDP ping: the agent's responder and the client's pinger (docs/protocol.md §8)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

from ..addresses import Address
from ..exceptions import ConnectError, UsageError
from ..pingwire import encode_ping, parse_pong, reply_to

__all__ = ["PingReply", "PingResponder", "Pings", "ping"]


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
    port unreachable), rather than staying silent; ``peer`` the IP address
    the ping went to (of a name's addresses, the first that did not refuse)."""

    seq: int
    rtt: float | None
    size: int
    refused: bool = False
    peer: str = ""


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
) -> Pings:
    """Send ``count`` pings ``interval`` seconds apart and yield each outcome.

    A name is resolved as TCP's connect does it: its addresses in the
    resolver's order, the next one tried when one refuses (``localhost`` is
    often ``::1`` then ``127.0.0.1``, and an agent may listen on only one).

    Raises:
        UsageError: ``address`` is a Unix socket (ping is UDP only): at once,
            before any iteration.
        ConnectError: the host name does not resolve, or none of its
            addresses can be reached (while iterating).
    """
    if address.host is None or address.port is None:
        raise UsageError("ping needs a TCP/UDP host, not a Unix socket")
    return Pings(address, count, interval, timeout, size)


class Pings(AsyncIterator[PingReply]):
    """What :func:`ping` returns: an async iterator of :class:`PingReply`.

    ``sent`` counts the pings sent so far, the one awaiting its reply
    included: the statistics of a ping interrupted while it waits count it,
    as ping(8) does. ``peer`` is the IP address pinged now (``None`` until
    the first ping is sent).
    """

    def __init__(
        self, address: Address, count: int, interval: float, timeout: float, size: int
    ) -> None:
        self.sent = 0
        self._peers: _Peers | None = None
        self._replies = self._pings(address, count, interval, timeout, size)

    @property
    def peer(self) -> str | None:
        return self._peers.peer if self._peers is not None else None

    def __aiter__(self) -> Pings:
        return self

    async def __anext__(self) -> PingReply:
        return await anext(self._replies)

    async def aclose(self) -> None:
        await self._replies.aclose()

    async def _pings(
        self, address: Address, count: int, interval: float, timeout: float, size: int
    ) -> AsyncGenerator[PingReply, None]:
        self._peers = peers = _Peers(await _resolve(address))
        if not await peers.advance():
            raise ConnectError(f"cannot reach {address}: {peers.error}")
        try:
            for seq in range(count):
                if seq:
                    await asyncio.sleep(interval)
                self.sent = seq + 1
                reply = await peers.ping(seq, timeout, size)
                while reply.refused and await peers.advance():  # bounded: each is a new address
                    reply = await peers.ping(seq, timeout, size)
                yield reply
        finally:
            peers.close()


async def _resolve(address: Address) -> list[tuple[Any, ...]]:
    assert address.host is not None and address.port is not None
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise ConnectError(f"cannot reach {address}: {exc.strerror or exc}") from None
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


class _Peers:
    """A host's addresses, in the resolver's order, and a datagram endpoint
    connected to the current one."""

    def __init__(self, addresses: list[tuple[Any, ...]]) -> None:
        self._addresses = addresses
        self._index = -1
        self._transport: asyncio.DatagramTransport | None = None
        self._pinger: _Pinger | None = None
        self.error = "no address"  # why the last address could not be used

    async def advance(self) -> bool:
        """Move on to the next address that a socket can be connected to;
        ``False``, staying where it is, if there is none."""
        loop = asyncio.get_running_loop()
        while self._index + 1 < len(self._addresses):
            self._index += 1
            family, sockaddr = self._addresses[self._index]
            try:
                sock = _connected_socket(family, sockaddr)
            except OSError as exc:  # no IPv6 here, no route...
                self.error = exc.strerror or str(exc)
                continue
            self.close()
            self._transport, self._pinger = await loop.create_datagram_endpoint(_Pinger, sock=sock)
            return True
        return False

    async def ping(self, seq: int, timeout: float, size: int) -> PingReply:
        assert self._transport is not None and self._pinger is not None
        sent = time.monotonic_ns()
        self._transport.sendto(encode_ping(seq, sent, size))
        return await _await_reply(self._pinger, seq, sent, timeout, self.peer)

    @property
    def peer(self) -> str:
        return str(self._addresses[self._index][1][0])

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


def _connected_socket(family: int, sockaddr: tuple[Any, ...]) -> socket.socket:
    # Connected to the exact address resolved: remote_addr= would resolve the
    # name again and take its first address.
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.connect(sockaddr)  # UDP: no packet, at once
    except BaseException:
        sock.close()
        raise
    return sock


async def _await_reply(
    pinger: _Pinger, seq: int, sent: int, timeout: float, peer: str
) -> PingReply:
    deadline = sent / 1e9 + timeout
    while True:
        remaining = deadline - time.monotonic_ns() / 1e9
        if remaining <= 0:
            return PingReply(seq, None, 0, peer=peer)
        try:
            got_seq, received, size = await asyncio.wait_for(pinger.replies.get(), remaining)
        except TimeoutError:
            return PingReply(seq, None, 0, peer=peer)
        if got_seq == _REFUSED:
            return PingReply(seq, None, 0, refused=True, peer=peer)
        if got_seq == seq:  # late replies to earlier pings are dropped
            return PingReply(seq, (received - sent) / 1e9, size, peer=peer)

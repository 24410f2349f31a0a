"""One minimal echo load generator for two servers: tether's agent and a minimal echo server.

Not a benchmark itself (``bench/run_echo.py`` and ``bench/bench_requests.py`` use it;
``bench/bench_idle.py`` uses its ``tether_frame``).
A ``LoadConnection`` is an asyncio protocol with TCP_NODELAY that keeps ONE
64-byte echo in flight: it writes a request, waits for the whole reply, checks
it, and goes on. Only the framing differs between the two servers (a ``Codec``):

- ``LengthCodec``: ``u32 length | payload``, what ``bench_requests.PeerEchoServer``
  echoes back as it is. The request is built once.
- ``TetherCodec``: a tether frame (docs/protocol.md §2): ``u32 header length |
  JSON header {"op":"echo","id":N,"body_len":64} | body``, after a ``hello`` with
  the token. The agent answers ``ok`` with the same id and body. Per request it
  does what the protocol requires and no more: a fresh id in the header, and
  ``json.loads`` of the reply's header to find its body length and check it.

So, driving both servers with it, the rates differ by what the servers do.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any, Protocol, cast

PAYLOAD = b"x" * 64  # bytes per echo
LENGTH = struct.Struct(">I")  # both framings start with a u32 length
CONNECT_TIMEOUT = 30.0  # seconds to open (and for tether, authenticate) one connection
PROTOCOL_VERSION = 1  # the hello's version (tether.limits.PROTOCOL_VERSION)


def tether_frame(header: dict[str, Any], body: bytes = b"") -> bytes:
    """A tether frame (docs/protocol.md §2): u32 header length, JSON header, body."""
    if body:
        header = {**header, "body_len": len(body)}
    raw = json.dumps(header, separators=(",", ":")).encode("ascii")
    return LENGTH.pack(len(raw)) + raw + body


def no_delay(transport: asyncio.BaseTransport) -> asyncio.Transport:
    """Turn Nagle's algorithm off on a connection's socket, as tether does; return the
    transport as a stream transport (uvloop's do not subclass asyncio's: cast)."""
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return cast(asyncio.Transport, transport)


class Codec(Protocol):
    def hello(self) -> bytes | None: ...
    def request(self) -> bytes: ...
    def reply_end(self, buffer: bytearray) -> int: ...
    def check(self, reply: bytes) -> None: ...


class LengthCodec:
    """``u32 length | payload``; the reply is the request."""

    def __init__(self) -> None:
        self.frame = LENGTH.pack(len(PAYLOAD)) + PAYLOAD

    def hello(self) -> bytes | None:
        return None

    def request(self) -> bytes:
        return self.frame

    def reply_end(self, buffer: bytearray) -> int:
        """The length of the complete reply at the start of ``buffer``; 0 if incomplete."""
        if len(buffer) < LENGTH.size:
            return 0
        end = LENGTH.size + LENGTH.unpack_from(buffer)[0]
        return end if len(buffer) >= end else 0

    def check(self, reply: bytes) -> None:
        if reply != self.frame:
            raise AssertionError("the echo came back different")


class TetherCodec:
    """tether frames: a hello with ``token``, then echo requests with fresh ids.

    A reply that is byte for byte the frame the reference agent writes for this
    id (``{"op":"ok","id":N,"body_len":64}`` and the payload) is recognised by
    comparing bytes, as ``LengthCodec`` does; any other reply is parsed as JSON
    and checked field by field, so a conforming agent that writes its header
    differently is still understood, only more slowly.
    """

    def __init__(self, token: str) -> None:
        self.token = token
        self.id = 0
        self.header: dict[str, Any] = {}  # of the last complete reply
        self.expected = b""  # the reference agent's whole reply to the last request

    def hello(self) -> bytes | None:
        return tether_frame(
            {"op": "hello", "id": 0, "version": PROTOCOL_VERSION, "token": self.token}
        )

    def request(self) -> bytes:
        self.id += 1
        header = b'{"op":"echo","id":%d,"body_len":%d}' % (self.id, len(PAYLOAD))
        reply = b'{"op":"ok","id":%d,"body_len":%d}' % (self.id, len(PAYLOAD))
        self.expected = LENGTH.pack(len(reply)) + reply + PAYLOAD
        return LENGTH.pack(len(header)) + header + PAYLOAD

    def reply_end(self, buffer: bytearray) -> int:
        if self.id and buffer.startswith(self.expected):
            self.header = {"op": "ok", "id": self.id}
            return len(self.expected)
        if len(buffer) < LENGTH.size:
            return 0
        start = LENGTH.size + LENGTH.unpack_from(buffer)[0]
        if len(buffer) < start:
            return 0
        self.header = json.loads(buffer[LENGTH.size : start])
        end = start + int(self.header.get("body_len", 0))
        return end if len(buffer) >= end else 0

    def check(self, reply: bytes) -> None:
        header, expected = self.header, ("ok", self.id)
        if self.id == 0:  # the hello's reply
            expected = ("hello", 0)
        if (header.get("op"), header.get("id")) != expected:
            raise AssertionError(f"the agent answered {header}, not {expected}")
        if self.id and not reply.endswith(PAYLOAD):
            raise AssertionError("the echo came back different")


class LoadConnection(asyncio.Protocol):
    """One connection with one request in flight at a time."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.buffer = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = no_delay(transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.codec.reply_end(self.buffer)
        if end and self.waiter is not None:
            reply = bytes(self.buffer[:end])
            del self.buffer[:end]
            self.waiter.set_result(reply)
            self.waiter = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"the server closed the connection: {exc}"))

    async def send(self, frame: bytes) -> None:
        """Write ``frame``, wait for the whole reply and check it."""
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(frame)
        self.codec.check(await self.waiter)

    async def round_trip(self) -> None:
        """One echo: request out, reply in and checked."""
        await self.send(self.codec.request())

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_load(port: int, codec: Codec) -> LoadConnection:
    """A connection to 127.0.0.1:``port``; the codec's hello sent and answered first."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(CONNECT_TIMEOUT):
        _, conn = await loop.create_connection(lambda: LoadConnection(codec), "127.0.0.1", port)
        try:
            if (hello := codec.hello()) is not None:
                await conn.send(hello)
        except BaseException:  # refused or timed out: not left open
            conn.close()
            raise
    return conn

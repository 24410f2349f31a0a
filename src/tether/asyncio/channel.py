"""The client's end of one connection: the socket, the protocol, the waiting requests.

:class:`Channel` is the asyncio protocol under a :class:`~.client.Connection`:
it feeds received bytes to a sans-I/O :class:`ClientProtocol`, hands each
reply to the future or queue of its request, writes what the protocol queues,
and stops reading while too much output waits unread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import cast

from ..exceptions import (
    AuthenticationError,
    ConnectionClosed,
    ProtocolError,
    RemoteError,
    TetherError,
    UsageError,
)
from ..limits import Limits
from ..messages import Credit, Error, ErrorCode, Exit, HelloReply, Message
from ..protocol import ClientProtocol, ConnectionFailed, ReplyReceived
from . import wire

__all__ = ["Channel", "Closed", "StdinWindow"]

READ_HIGH_WATER = 8 * 1024 * 1024  # 8 MiB of unread output: stop reading the socket
READ_LOW_WATER = 2 * 1024 * 1024  # 2 MiB: start again
_ENDS_A_COMMAND = (Exit, Error)  # an exec's final frames
_AUTH_CODES = frozenset({ErrorCode.AUTH_FAILED, ErrorCode.UNAUTHENTICATED, ErrorCode.HELLO_TIMEOUT})


class Closed:
    """Queue marker: the connection ended with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class StdinWindow:
    """How much more of one command's stdin may be sent: the agent's window,
    less what was sent, plus what the agent has credited back (§4.6)."""

    def __init__(self, size: int) -> None:
        self.available = size
        self.closed = False  # the command ended, or the connection did
        self._changed: asyncio.Event | None = None

    def grant(self, nbytes: int) -> None:
        self.available += nbytes
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def take(self, wanted: int) -> int:
        """Up to ``wanted`` bytes, once any may be sent; 0 once closed."""
        while not self.available and not self.closed:
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()
        if self.closed:
            return 0
        granted = min(wanted, self.available)
        self.available -= granted
        return granted


class Channel(asyncio.BufferedProtocol):
    """Moves bytes between a socket and a :class:`ClientProtocol`; routes each
    reply to the request waiting for it (a future or a queue)."""

    def __init__(self, limits: Limits) -> None:
        self.protocol = ClientProtocol(limits)
        # Large bodies (a get's data) are read straight into their own buffer.
        # Bound here, not a method: the loop calls it for every read.
        self.get_buffer = self.protocol.get_buffer  # type: ignore[method-assign]
        self.transport: asyncio.Transport | None = None
        # Kept: every request makes a future on it.
        self.loop = loop = asyncio.get_running_loop()
        self.hello: asyncio.Future[HelloReply] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()  # set by connection_lost
        self.closing = False  # our side closes it (Connection.close)
        self.queues: dict[int, asyncio.Queue[Message | Closed]] = {}
        # Requests answered by exactly one frame (echo, stat...): a future is
        # a good deal cheaper than a queue on the busiest path there is.
        self.replies: dict[int, asyncio.Future[Message]] = {}
        # Running commands' stdin windows, which credit frames open further.
        self.windows: dict[int, StdinWindow] = {}
        self.error: Exception | None = None
        self._unread = 0
        self._reading_paused = False
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's: cast, do not assert.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def buffer_updated(self, nbytes: int) -> None:
        protocol = self.protocol
        protocol.buffer_updated(nbytes)
        for event in protocol.events_received():
            if type(event) is ReplyReceived:
                self._route(event.message)
            elif isinstance(event, ConnectionFailed):
                self._fail(_connection_error(event))
        wire.flush(protocol, self.transport)

    def _route(self, msg: Message) -> None:
        # The one-frame replies first: the busiest case (echo, stat...).
        waiter = self.replies.pop(msg.id, None)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(msg)
            return
        if isinstance(msg, HelloReply):
            if not self.hello.done():
                self.hello.set_result(msg)
            return
        if type(msg) is Credit:
            # Taken here, not queued behind output nobody may be reading yet:
            # a writer waiting for credit must not wait for the reader.
            if (window := self.windows.get(msg.id)) is not None:
                window.grant(msg.bytes)
            return
        queue = self.queues.get(msg.id)
        if queue is None:
            return  # a late frame for a request we gave up on
        queue.put_nowait(msg)
        body = getattr(msg, "body", b"")
        if body:
            self._unread += len(body)
            paused = self._reading_paused
            if self._unread > READ_HIGH_WATER and not paused and (transport := self._live()):
                self._reading_paused = True
                transport.pause_reading()
        elif type(msg) in _ENDS_A_COMMAND and (window := self.windows.pop(msg.id, None)):
            # The command has ended (§4.6): a write waiting for credit must
            # not wait until someone reads this frame.
            window.close()

    def forget(self, request_id: int) -> None:
        """Stop routing frames to a request; what it left unread no longer counts."""
        window = self.windows.pop(request_id, None)
        if window is not None:
            window.close()
        queue = self.queues.pop(request_id, None)
        while queue is not None and not queue.empty():
            msg = queue.get_nowait()
            if isinstance(msg, Message):
                self.consumed(msg)  # or reading could stay paused for good

    def consumed(self, msg: Message) -> None:
        """A queued message was taken by its reader."""
        body = getattr(msg, "body", b"")
        if body:
            self._unread -= len(body)
            if self._reading_paused and self._unread < READ_LOW_WATER:
                self._reading_paused = False
                if transport := self._live():
                    transport.resume_reading()

    def _live(self) -> asyncio.Transport | None:
        # A closing transport must not be paused, resumed or closed again
        # (asyncio's SSL transport has dropped its protocol by then).
        transport = self.transport
        return transport if transport is not None and not transport.is_closing() else None

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        if not self.hello.done():
            self.hello.set_exception(self.error)
            self.hello.exception()  # retrieved: connect() may already be gone
        for queue in self.queues.values():
            queue.put_nowait(Closed(self.error))
        for window in self.windows.values():
            window.close()
        for waiter in self.replies.values():
            if not waiter.done():
                waiter.set_exception(self.error)
        self._writable.set()
        if transport := self._live():
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if self.closing:  # Connection.close() did it
            message = "the connection was closed"
        else:
            message = "connection closed by the agent" + (f": {exc}" if exc else "")
        self._fail(ConnectionClosed(message))

    def on_its_loop(self) -> bool:
        """Whether the running event loop is the one this connection was made on."""
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:  # no loop runs at all
            return False

    def check_loop(self) -> None:
        """Raise unless running on this connection's event loop.

        Made in one ``asyncio.run()`` and used in another, a request would be
        written through the ended loop's transport (reaching the agent, which
        ran it) and then wait for a reply no loop will ever deliver.
        """
        if self.on_its_loop():
            return
        if self.loop.is_closed() or not self.loop.is_running():
            raise ConnectionClosed("this connection belongs to an event loop that has ended")
        raise UsageError("this connection belongs to the event loop of another thread")

    def cut_from_elsewhere(self) -> None:
        """Close a connection from outside its event loop, which may be closed.

        Its transport cannot be used (it would schedule on that loop): the
        socket is shut down instead, so the agent sees us gone and ends our
        commands; the descriptor stays the transport's to close (closing it
        here, the transport's finalizer could close a reused number).
        """
        self.closing = True
        if self.error is None:
            self.error = ConnectionClosed("the connection was closed")
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def send(self, msg: Message) -> None:
        if self.error is not None:
            raise self.error
        self.protocol.send(msg)
        wire.flush(self.protocol, self.transport)

    def send_echo(self, request_id: int, body: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.protocol.send_echo(request_id, body)
        wire.flush(self.protocol, self.transport)

    def flush(self) -> None:
        wire.flush(self.protocol, self.transport)

    async def drain(self) -> None:
        await self._writable.wait()
        if self.error is not None:
            raise self.error


def _connection_error(event: ConnectionFailed) -> TetherError:
    if event.by_peer:
        if event.code in _AUTH_CODES:
            return AuthenticationError(event.code, event.message)
        return RemoteError(event.code, event.message)
    return ProtocolError(f"the agent broke the protocol: {event.message}", code=event.code)

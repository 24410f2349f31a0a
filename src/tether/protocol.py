"""Connection state machines, without I/O (docs/protocol.md §4).

Bytes go in with ``receive_data()``, events come out of ``events_received()``,
bytes to write come out of ``data_to_send()``. The asyncio layer only moves
bytes and makes no protocol decision; this module never raises on bad input:
a violation becomes an ``error`` frame with id 0, a :class:`ConnectionFailed`
event and a closed state in which later input is discarded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .codec import (
    decode_client_message,
    decode_server_message,
    echo_reply_head,
    echo_request_head,
    encode_message,
)
from .exceptions import FrameTooLarge, ProtocolError
from .frames import Body, Frame, FrameDecoder
from .limits import PROTOCOL_VERSION, Limits
from .messages import (
    Credit,
    Echo,
    Error,
    ErrorCode,
    Exec,
    Get,
    Hello,
    HelloReply,
    ListDir,
    Message,
    Mkdir,
    Ok,
    Put,
    SetAttr,
    Stat,
    Stdin,
    Symlink,
)

__all__ = [
    "ClientProtocol",
    "ConnectionFailed",
    "ControlReceived",
    "Event",
    "HelloReceived",
    "ReplyReceived",
    "RequestReceived",
    "ServerProtocol",
    "State",
]


# Events are plain slotted dataclasses, not frozen ones: one is made per
# frame (a frozen __init__ sets each field through object.__setattr__), and
# each frozen class compiles two more methods at import.


class State(Enum):
    AWAIT_HELLO = "await_hello"
    OPEN = "open"
    CLOSED = "closed"


# The states as plain names: every frame checks the state a few times, and
# reading a member off an Enum class costs ten times a global here (3.11).
_AWAIT_HELLO, _OPEN, _CLOSED = State.AWAIT_HELLO, State.OPEN, State.CLOSED


@dataclass(slots=True)
class HelloReceived:
    """The client's hello; answer with ``accept_hello`` or ``reject_hello``."""

    hello: Hello


@dataclass(slots=True)
class RequestReceived:
    """A new request (``exec``, ``echo``) under a fresh id."""

    request: Message


@dataclass(slots=True)
class ControlReceived:
    """A follow-up frame (``stdin``, ``signal``) for a request still running."""

    message: Message


@dataclass(slots=True)
class ReplyReceived:
    """A frame from the agent: the hello reply (id 0) or part of a reply."""

    message: Message


@dataclass(slots=True)
class ConnectionFailed:
    """The connection is over: flush ``data_to_send()`` and close.

    ``by_peer`` tells an ``error`` frame received from the peer apart from a
    violation detected here.
    """

    code: str
    message: str
    by_peer: bool = False


Event = HelloReceived | RequestReceived | ControlReceived | ReplyReceived | ConnectionFailed

MAX_ERROR_MESSAGE = 1024  # characters of an error message we send
_JOIN_BELOW = 16 * 1024  # a body shorter than this is joined to its header

# Requests start under a fresh id; everything else a client sends after hello
# (stdin, signal, data, done, cancel) is a control frame for a running one.
_REQUESTS = (Exec, Echo, Stat, ListDir, Get, Put, Mkdir, Symlink, SetAttr)
_REQUEST_OPS = frozenset(cls.OP.value for cls in _REQUESTS)


class _Base:
    def __init__(self, limits: Limits | None) -> None:
        self.limits = limits or Limits()
        self.state = _AWAIT_HELLO
        self._decoder = FrameDecoder(self.limits)
        self._events: list[Event] = []
        self._out: list[Body] = []
        # Set while a hello waits for its verdict: the input behind it stays
        # unread until then, so packing many hellos gets one token check.
        self._waiting = False
        # Where to read the next bytes into (asyncio's BufferedProtocol);
        # never empty. A large body is read straight into its own buffer: the
        # only copy. The decoder's own method, not a wrapper: called per read.
        self.get_buffer: Callable[..., memoryview] = self._decoder.get_buffer

    @property
    def closed(self) -> bool:
        return self.state is _CLOSED

    def events_received(self) -> list[Event]:
        """Events produced by input so far; each is returned once."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[Body]:
        """Buffers to write, in order; each is returned once."""
        out, self._out = self._out, []
        return out

    def send(self, msg: Message) -> None:
        """Queue ``msg`` for writing.

        Raises:
            FrameTooLarge: the message does not fit the limits (a local bug or
                an oversized caller argument, never the peer's fault).
        """
        if isinstance(msg, Error) and len(msg.message) > MAX_ERROR_MESSAGE:
            # Messages may quote the peer (a program name): never let one
            # push a reply over the header limit.
            msg = Error(msg.id, msg.code, msg.message[: MAX_ERROR_MESSAGE - 3] + "...")
        self._queue(*encode_message(msg, self.limits))

    def _queue(self, head: bytes, body: Body) -> None:
        if len(body) >= _JOIN_BELOW:
            self._out += (head, body)  # written from where it lies: no copy
        else:
            self._out.append(head + body)  # one buffer: cheaper to write than two

    def _fail(self, code: str, message: str) -> None:
        if self.state is _CLOSED:
            return
        try:
            self.send(Error(0, code, message))
        except FrameTooLarge:
            # Limits this small leave no room for the message; the code is
            # what matters, and this method must never raise.
            with contextlib.suppress(FrameTooLarge):
                self.send(Error(0, code))
        self.state = _CLOSED
        self._events.append(ConnectionFailed(code, message))

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read elsewhere; never raises."""
        if self.state is _CLOSED:
            return
        self._decoder.receive_data(data)
        self._handle_frames()

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were read into the last :meth:`get_buffer`; never raises."""
        if self.state is _CLOSED:
            return  # later input is discarded
        self._decoder.buffer_updated(nbytes)
        self._handle_frames()

    def reuse_body(self, body: Body) -> None:
        """A received body is no longer used: its buffer may take a later one
        (see :meth:`FrameDecoder.reuse_body`)."""
        self._decoder.reuse_body(body)

    def drop_spare_bodies(self) -> None:
        """A transfer ended: the buffers kept for reuse go (an idle connection holds none)."""
        self._decoder.drop_spare_bodies()

    def _handle_frames(self) -> None:
        if self._waiting:
            return
        next_frame = self._decoder.next_frame
        try:
            while (frame := next_frame()) is not None:
                self._handle(frame)
                if self.state is _CLOSED or self._waiting:
                    # Closed: later input is discarded. Waiting: the rest
                    # stays buffered until the hello is decided, so packing
                    # many hellos into one write gets one token check.
                    return
        except FrameTooLarge as exc:
            self._fail(ErrorCode.TOO_LARGE, str(exc))
        except ProtocolError as exc:  # bad_frame, or the first frame refused from its header
            self._fail(exc.code, str(exc))
        except Exception as exc:  # a decoding path we did not foresee: still never raise
            self._fail(ErrorCode.BAD_FRAME, f"malformed frame ({type(exc).__name__})")

    def _handle(self, frame: Frame) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class ServerProtocol(_Base):
    """The agent's side of one connection."""

    def __init__(self, limits: Limits | None = None) -> None:
        super().__init__(limits)
        self._active: dict[int, None] = {}  # ids of running requests; a set costs 4x the memory
        # Running execs: the bytes of stdin received and not yet credited (§4.6).
        self._stdin_unacked: dict[int, int] = {}
        # An echo has no side effects and is the busiest request there is (a
        # keepalive, a latency probe): when this is set, it is answered here,
        # with no event for it. The agent sets it while it takes requests.
        self.answer_echo = False
        self._decoder.check_header = self._check_first_header

    @property
    def active_requests(self) -> frozenset[int]:
        return frozenset(self._active)

    def accept_hello(self, reply: HelloReply) -> None:
        """Open the connection for requests and answer the hello."""
        if self.state is _AWAIT_HELLO:
            self.send(reply)
            self.state = _OPEN
            self._waiting = False
            self._decoder.release()
            self._handle_frames()  # requests pipelined behind the hello

    def reject_hello(self, code: str, message: str) -> None:
        """Refuse the hello: error frame, then closed."""
        self._fail(code, message)

    def fail(self, code: str, message: str) -> None:
        """Fail the whole connection from the I/O side (e.g. hello timeout)."""
        self._fail(code, message)

    def credit_stdin(self, request_id: int, nbytes: int) -> None:
        """``nbytes`` of an exec's stdin went into its pipe, or were dropped:
        let the client send as many more (a ``credit`` frame)."""
        unacked = self._stdin_unacked.get(request_id)
        if unacked is not None and 0 < nbytes <= unacked and self.state is _OPEN:
            self._stdin_unacked[request_id] = unacked - nbytes
            self.send(Credit(request_id, nbytes))

    def finish_request(self, request_id: int, final: Message) -> None:
        """Send a request's last frame and forget its id."""
        if request_id in self._active:
            del self._active[request_id]
            self._stdin_unacked.pop(request_id, None)
            if self.state is _OPEN:
                self.send(final)

    def _handle(self, frame: Frame) -> None:
        if self.state is _AWAIT_HELLO:
            self._handle_hello(frame)
            return
        header = frame.header
        if self.answer_echo and header["op"] == "echo":
            # The busiest request there is, answered without making an Echo
            # or an Ok (an echo has no fields to check): a third of the cost
            # of decoding it. An id of 0 or in use takes the general path
            # below, and its errors.
            ident = header["id"]
            if ident and ident not in self._active:
                body = frame.body
                self._queue(echo_reply_head(ident, len(body), self.limits), body)
                return
        try:
            msg = decode_client_message(frame)
        except ProtocolError as exc:
            if exc.code == ErrorCode.BAD_REQUEST and frame.op in _REQUEST_OPS:
                # A known request with bad fields fails only itself, as long
                # as its id is usable (docs/protocol.md §4.2).
                if frame.id == 0 or frame.id in self._active:
                    self._fail(ErrorCode.PROTOCOL_ERROR, f"request id {frame.id} is not usable")
                else:
                    self.send(Error(frame.id, exc.code, str(exc)))
                return
            self._fail(exc.code, str(exc))
            return
        if isinstance(msg, Hello):
            self._fail(ErrorCode.PROTOCOL_ERROR, "hello was already received")
        elif msg.id == 0:
            self._fail(ErrorCode.PROTOCOL_ERROR, f"{msg.OP} needs a request id > 0")
        elif isinstance(msg, _REQUESTS):
            if msg.id in self._active:
                self._fail(ErrorCode.PROTOCOL_ERROR, f"request id {msg.id} is already in use")
            else:
                self._active[msg.id] = None
                if isinstance(msg, Exec):
                    self._stdin_unacked[msg.id] = 0
                self._events.append(RequestReceived(msg))
        elif msg.id in self._active:
            if isinstance(msg, Stdin) and msg.id in self._stdin_unacked:
                unacked = self._stdin_unacked[msg.id] + len(msg.body)
                if unacked > self.limits.stdin_window:
                    self._fail(
                        ErrorCode.PROTOCOL_ERROR,
                        f"stdin of request {msg.id}: {unacked} bytes not credited, over "
                        f"the window of {self.limits.stdin_window}",
                    )
                    return
                self._stdin_unacked[msg.id] = unacked
            self._events.append(ControlReceived(msg))
        # else: a control frame for a request that has just finished raced
        # with its last frame; it is dropped, not an error (docs/protocol.md §4.3).

    def _check_first_header(self, header: dict[str, Any]) -> None:
        """Refuse a first frame from its header alone when it cannot be a good
        hello: its body is then never buffered. A 41-byte header declaring
        16 MiB would otherwise have the agent allocate 16 MiB for a client
        that has not authenticated, until its hello timeout."""
        self._decoder.check_header = None  # the first frame only
        if header["op"] != "hello":
            raise ProtocolError("the first frame must be hello", code=ErrorCode.UNAUTHENTICATED)
        if header.get("body_len", 0) > 0:
            raise ProtocolError("hello: takes no body", code=ErrorCode.BAD_REQUEST)
        # The frames behind it stay unparsed bytes until the hello is accepted
        # (accept_hello): not even their bodies' buffers are made before that.
        self._decoder.hold = True

    def _handle_hello(self, frame: Frame) -> None:
        # Only the first frame comes here, and only if it is a hello without a
        # body (_check_first_header): nothing else is decoded before
        # authentication.
        try:
            msg = decode_client_message(frame)
        except ProtocolError as exc:
            self._fail(exc.code, str(exc))
            return
        assert isinstance(msg, Hello)
        if msg.id != 0:
            self._fail(ErrorCode.PROTOCOL_ERROR, "hello must have id 0")
        elif msg.version != PROTOCOL_VERSION:
            self._fail(
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {msg.version} is not supported "
                f"(this agent speaks {PROTOCOL_VERSION})",
            )
        else:
            self._waiting = True
            self._events.append(HelloReceived(msg))


class ClientProtocol(_Base):
    """The client's side of one connection."""

    def __init__(self, limits: Limits | None = None) -> None:
        super().__init__(limits)
        self._next_id = 1

    def send_hello(self, token: str, version: int = PROTOCOL_VERSION) -> None:
        self.send(Hello(0, version, token))

    def send_echo(self, ident: int, body: Body) -> None:
        """Queue ``Echo(ident, body)``: the same frame as ``send`` makes, without
        the message object (keepalives and latency probes are the busiest
        request a client sends).

        Raises:
            FrameTooLarge: ``body`` is over the limit.
        """
        self._queue(echo_request_head(ident, len(body), self.limits), body)

    def new_request_id(self) -> int:
        """A fresh request id (ids are never reused on a connection)."""
        ident = self._next_id
        self._next_id += 1
        return ident

    def _handle(self, frame: Frame) -> None:
        if frame.header["op"] == "ok" and self.state is _OPEN:
            # The answer to every echo: ok has no field but its body, so this
            # is all decoding would do (other header fields are ignored).
            self._events.append(ReplyReceived(Ok(frame.header["id"], frame.body)))
            return
        try:
            msg = decode_server_message(frame)
        except ProtocolError as exc:
            self._fail(exc.code, str(exc))
            return
        if self.state is _AWAIT_HELLO:
            if isinstance(msg, HelloReply):
                self.state = _OPEN
            elif not (isinstance(msg, Error) and msg.id == 0):
                self._fail(ErrorCode.PROTOCOL_ERROR, f"expected hello, got {msg.OP}")
                return
        if isinstance(msg, Error) and msg.id == 0:
            # The agent failed the connection; nothing more will come.
            self.state = _CLOSED
            self._events.append(ConnectionFailed(msg.code, msg.message, by_peer=True))
            return
        self._events.append(ReplyReceived(msg))


def encode_messages(messages: Iterable[Message], limits: Limits | None = None) -> bytes:
    """Encode ``messages`` back to back (a convenience for tests and tools)."""
    out = bytearray()
    for msg in messages:
        head, body = encode_message(msg, limits)
        out += head
        out += body
    return bytes(out)

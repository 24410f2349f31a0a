"""One client connection on the agent: its protocol state and running requests.

:class:`ServerConnection` feeds bytes to a :class:`tether.protocol.ServerProtocol`
(which makes every protocol decision), answers the hello, starts a task per
request from the op table (:data:`HANDLERS`), routes control frames to the
request they belong to, holds input while too much waits, and audits each
request's outcome.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

from ..auth import AuthFailure
from ..exceptions import ConnectionClosed, RemoteError, TransferError
from ..limits import PROTOCOL_VERSION
from ..messages import (
    Cancel,
    Error,
    ErrorCode,
    Exec,
    Exit,
    Hello,
    HelloReply,
    Message,
    Put,
)
from ..protocol import (
    ConnectionFailed,
    ControlReceived,
    Event,
    HelloReceived,
    RequestReceived,
    ServerProtocol,
)
from .execution import handle_exec
from .files import FILE_HANDLERS
from .wire import flush, reset

# Seconds a closing connection gets to send what it queued to a client that
# reads slowly (its last output, an error frame) before it is cut.
CLOSE_GRACE = 5.0
PEER_WATCH = 0.5  # seconds between looks for a client gone while its input is held
# Output waiting for a client that does not read is bounded by flow control
# for commands and transfers (they pause); answers to echo and the like are
# written at once. Past this much waiting, the connection's input is held
# until the socket drains: a client that sends requests and reads none of
# the answers (1 MiB echoes, say) would otherwise pile them up in the
# agent's memory without bound (§4.6).
OUTPUT_HOLD = 8 * 1024 * 1024
_OUTPUT_BLOCKED = object()
# get and list requests of one connection that send at once; the others wait
# their turn (holding no file, no chunk, no listing) so that a client asking
# for 200 files at once does not make the agent hold 200 MiB of chunks.
MAX_SENDING = 8

if TYPE_CHECKING:
    from .server import Server

__all__ = ["CONTROLLED", "HANDLERS", "Controller", "Handler", "ServerConnection", "format_peer"]

log = logging.getLogger("tether.server")

AUTH_FAILURE_DELAY = 0.2  # seconds before a refused hello is answered
EARLY_CONTROL_BYTES = 16 * 1024 * 1024  # 16 MiB of frames waiting for a handler: stop reading


Handler = Callable[["ServerConnection", Any], Awaitable[Message]]


class Controller(Protocol):
    """A running request that takes control frames (stdin, signal, data, done)."""

    def control(self, msg: Message) -> None: ...
    def pause_output(self) -> None: ...
    def resume_output(self) -> None: ...


class ServerConnection(asyncio.BufferedProtocol):
    """One client connection: its protocol state, its running requests."""

    def __init__(self, server: Server) -> None:
        # Made at accept time, before a TLS handshake: from now on this
        # connection counts as unauthenticated.
        self.server = server
        server.handshaking[self] = time.monotonic()
        self.protocol = ServerProtocol(server.config.limits)
        self.protocol.answer_echo = not server.stopping
        # Large bodies (a put's data) are read straight into their own buffer.
        # Bound here, not a method: the loop calls it for every read.
        self.get_buffer = self.protocol.get_buffer  # type: ignore[method-assign]
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.identity: str | None = None
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.controllers: dict[int, Controller] = {}
        self._cancelled: dict[int, Cancel] = {}
        # Per-connection memory counts: an agent may hold 10,000 idle
        # connections. The writers' wake-up event is made when one first
        # has to wait; idle time is checked by one sweep for the whole agent.
        self.writing_paused = False
        self._write_wakeup: asyncio.Event | None = None
        self._hello_timer: asyncio.TimerHandle | None = None
        self._input_holders: dict[object, None] = {}  # a set, in a quarter of the memory
        self._early_controls: dict[int, list[Message]] = {}
        self._early_bytes = 0
        self._early_key = object()  # holds input while early frames pile up
        self._takes_controls: dict[int, bool] = {}
        self._last_input = 0.0
        self.address_key: str | None = None  # what failed hellos are counted by
        self.execs = 0
        self._notes: dict[int, dict[str, Any]] = {}
        self.closed = False
        self._sending: asyncio.Semaphore | None = None  # made by the first get or list
        self._peer_watch: asyncio.TimerHandle | None = None  # while input is held

    # asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's: cast, do not assert.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = format_peer(peer)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _enable_keepalive(sock)
            self.address_key = str(peer[0])
        server = self.server
        server.handshaking.pop(self, None)
        server.connections.add(self)
        server.audit.record(
            "connect", peer=self.peer, tls=transport.get_extra_info("ssl_object") is not None
        )
        if server.authenticating() > server.config.max_unauthenticated:
            # Authenticated clients keep working; strangers wait their turn.
            self.protocol.fail(
                ErrorCode.BUSY, "too many connections are authenticating; retry later"
            )
            server.audit.record("refused", peer=self.peer, reason="busy")
            self._close()
            return
        server.unauthenticated.add(self)
        loop = asyncio.get_running_loop()
        self._hello_timer = loop.call_later(server.config.hello_timeout, self._hello_timeout)

    def buffer_updated(self, nbytes: int) -> None:
        self._last_input = time.monotonic()
        self.protocol.buffer_updated(nbytes)
        self._process_events()

    def eof_received(self) -> bool | None:
        # End-of-file from the client ends the session: a client that was
        # killed sends the same FIN as one that half-closed, and a killed
        # client's commands must not keep running (docs/protocol.md §4.7).
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.unauthenticated.discard(self)
        self.server.audit.record("disconnect", peer=self.peer, identity=self.identity)
        self._wake_writers()  # drain() now raises
        self._cancel_hello_timer()
        for task in self.tasks.values():
            task.cancel()
        self.server.connections.discard(self)
        log.debug("%s: disconnected", self.peer)

    def pause_writing(self) -> None:
        self.writing_paused = True
        for controller in self.controllers.values():
            controller.pause_output()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.release_input(_OUTPUT_BLOCKED)
        self._wake_writers()
        for controller in self.controllers.values():
            controller.resume_output()

    def _wake_writers(self) -> None:
        if self._write_wakeup is not None:
            self._write_wakeup.set()
            self._write_wakeup = None

    # What handlers and runners use ----------------------------------------------

    def send(self, msg: Message) -> None:
        if self.closed:
            return
        self.protocol.send(msg)
        self._flush()

    def credit_stdin(self, request_id: int, nbytes: int) -> None:
        """``nbytes`` of an exec's stdin were taken: the client may send more."""
        if not self.closed:
            self.protocol.credit_stdin(request_id, nbytes)
            self._flush()

    def hold_input(self, key: object) -> None:
        """Stop reading from the client until ``release_input(key)``."""
        if not self._input_holders and self.transport is not None and not self.closed:
            self.transport.pause_reading()
            if self._peer_watch is None:
                self._peer_watch = asyncio.get_running_loop().call_later(
                    PEER_WATCH, self._watch_peer
                )
        self._input_holders[key] = None

    def _watch_peer(self) -> None:
        # Not reading, we would not see the client go (its reset, or the end
        # of its stream): a command would run on for nobody. Look, while held.
        # One look at a time per connection, however often input is held.
        self._peer_watch = None
        if self.closed or not self._input_holders:
            return
        if self._peer_gone():
            log.info("%s: closing connection: the client went away", self.peer)
            if self.transport is not None:
                self.transport.abort()
            return
        self._peer_watch = asyncio.get_running_loop().call_later(PEER_WATCH, self._watch_peer)

    def release_input(self, key: object) -> None:
        if key not in self._input_holders:
            return
        del self._input_holders[key]
        if not self._input_holders and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def sending(self) -> asyncio.Semaphore:
        """The turn a get or list takes before it opens or reads anything."""
        if self._sending is None:
            self._sending = asyncio.Semaphore(MAX_SENDING)
        return self._sending

    def track(self, task: asyncio.Task[Any]) -> None:
        self.server.track(task)

    async def drain(self) -> None:
        """Wait while the socket's write buffer is full.

        Raises:
            ConnectionClosed: the client is gone.
        """
        while self.writing_paused and not self.closed:
            if self._write_wakeup is None:
                self._write_wakeup = asyncio.Event()
            await self._write_wakeup.wait()
        if self.closed:
            raise ConnectionClosed("the client went away")

    def attach(self, request_id: int, controller: Controller) -> None:
        """Route this request's control frames to ``controller``, early ones first."""
        self.controllers[request_id] = controller
        if self.writing_paused:  # the socket is full right now
            controller.pause_output()
        for msg in self._drop_early_controls(request_id):
            controller.control(msg)

    def _drop_early_controls(self, request_id: int) -> list[Message]:
        early = self._early_controls.pop(request_id, [])
        self._early_bytes -= sum(len(getattr(msg, "body", b"")) for msg in early)
        if self._early_bytes <= EARLY_CONTROL_BYTES:
            self.release_input(self._early_key)
        return early

    def cancel_of(self, request_id: int) -> Cancel | None:
        """The ``cancel`` frame the client sent for this request, if any."""
        return self._cancelled.get(request_id)

    # Internals ----------------------------------------------------------------------

    def _flush(self) -> None:
        transport = self.transport
        flush(self.protocol, transport)
        if (
            self.writing_paused
            and transport is not None
            and transport.get_write_buffer_size() > OUTPUT_HOLD
        ):
            self.hold_input(_OUTPUT_BLOCKED)  # released by resume_writing

    def _process_events(self) -> None:
        # Handling an event may produce more (accepting a hello releases the
        # requests pipelined behind it): loop until there are none.
        protocol = self.protocol
        while events := protocol.events_received():
            self._handle_events(events)
        self._flush()

    def _handle_events(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, RequestReceived):
                self._start_request(event.request)
            elif isinstance(event, ControlReceived):
                msg = event.message
                controller = self.controllers.get(msg.id)
                if isinstance(msg, Cancel):
                    task = self.tasks.get(msg.id)
                    if task is not None:
                        self._cancelled[msg.id] = msg
                        task.cancel()
                elif controller is not None:
                    controller.control(msg)
                elif self._takes_controls.get(msg.id):
                    # Its handler has not run yet: keep the frame for it, and
                    # stop reading while too much waits (a put's first data).
                    self._early_controls.setdefault(msg.id, []).append(msg)
                    self._early_bytes += len(getattr(msg, "body", b""))
                    if self._early_bytes > EARLY_CONTROL_BYTES:
                        self.hold_input(self._early_key)
                # else: a control for a request that takes none, or has ended.
            elif isinstance(event, HelloReceived):
                self._on_hello(event.hello)
            elif isinstance(event, ConnectionFailed):
                log.info("%s: closing connection: %s: %s", self.peer, event.code, event.message)
                self._close()

    def _close(self) -> None:
        # Its --max-unauthenticated slot is free now, not when a TLS peer that
        # never reads finally lets the close complete.
        self.server.unauthenticated.discard(self)
        # Running requests end now too: a peer that does not read would
        # otherwise keep them alive until the close completes (§4.7).
        for task in self.tasks.values():
            task.cancel()
        self._flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
            # A client that reads nothing would hold the close, and this
            # connection's memory, for ever.
            asyncio.get_running_loop().call_later(CLOSE_GRACE, self._cut)

    def _cut(self) -> None:
        # A stopping agent drains its connections itself (Server.close).
        if not self.closed and self.transport is not None and not self.server.stopping:
            reset(self.transport)

    def _hello_timeout(self) -> None:
        if self.identity is None and not self.closed:
            self.protocol.fail(ErrorCode.HELLO_TIMEOUT, "no successful hello in time")
            log.info("%s: closing connection: no hello in time", self.peer)
            self._close()

    def _on_hello(self, hello: Hello) -> None:
        result = self.server.authenticate(hello.token, self.address_key)
        if isinstance(result, AuthFailure):
            # Answer late, and read nothing meanwhile, to slow token guessing.
            if self.transport is not None:
                self.transport.pause_reading()
            log.warning("%s: %s", self.peer, result.reason)
            self.server.audit.record("auth", peer=self.peer, ok=False, reason=result.reason)
            asyncio.get_running_loop().call_later(
                AUTH_FAILURE_DELAY, self._reject_hello, result.reason
            )
            return
        identity = result
        self.identity = identity
        self.server.unauthenticated.discard(self)
        self._cancel_hello_timer()
        self._last_input = time.monotonic()
        config = self.server.config
        self.protocol.accept_hello(
            HelloReply(
                0,
                version=PROTOCOL_VERSION,
                server=config.name,
                encoding=self.server.encoding,
                max_header=config.limits.max_header,
                max_body=config.limits.max_body,
                stdin_window=config.limits.stdin_window,
                idle_timeout=config.idle_timeout,
            )
        )
        self.server.audit.record("auth", peer=self.peer, ok=True, identity=identity)

    def _reject_hello(self, reason: str) -> None:
        self.protocol.reject_hello(ErrorCode.AUTH_FAILED, reason)
        self._close()

    def _cancel_hello_timer(self) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None  # a cancelled handle still holds memory

    def check_idle(self, now: float) -> None:
        """Close the connection if it was idle for the whole ``idle_timeout``.

        Idle means nothing received and nothing running; a client keeps a
        quiet connection alive with echo (its keepalive).
        """
        if self.closed or self.identity is None:
            return
        if self.transport is None or self.transport.is_closing():
            return  # closing already (and cut after CLOSE_GRACE): not idle, not again
        if self.tasks:
            self._last_input = now  # running is not idle
            return
        timeout = self.server.config.idle_timeout
        if now - self._last_input < timeout:
            return
        self.protocol.fail(ErrorCode.IDLE_TIMEOUT, f"idle for {timeout:g}s")
        self.server.audit.record("idle_timeout", peer=self.peer, identity=self.identity)
        self._close()

    def _peer_gone(self) -> bool:
        """Whether the client closed or reset the connection, seen without
        reading from it (poll: hang-up, error, or the peer's end of writing)."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(0))

    def _start_request(self, request: Message) -> None:
        if self.server.stopping:
            self._finish(
                request.id, Error(request.id, ErrorCode.SHUTTING_DOWN, "agent is stopping")
            )
            return
        handler = HANDLERS[type(request)]
        task = asyncio.get_running_loop().create_task(self._run_request(handler, request))
        self.tasks[request.id] = task
        self._takes_controls[request.id] = isinstance(request, CONTROLLED)
        task.add_done_callback(lambda _: self._request_done(request.id))

    def _request_done(self, request_id: int) -> None:
        # A task cancelled before it ever ran skipped _run_request entirely:
        # it still owes its final frame.
        self.tasks.pop(request_id, None)
        self._takes_controls.pop(request_id, None)
        self._drop_early_controls(request_id)
        if self._cancelled.pop(request_id, None) is not None:
            self._finish(
                request_id, Error(request_id, ErrorCode.CANCELLED, "cancelled by the client")
            )

    async def _run_request(self, handler: Handler, request: Message) -> None:
        started = time.monotonic()
        final: Message | None = None
        try:
            final = await handler(self, request)
        except (RemoteError, TransferError) as exc:
            final = Error(request.id, exc.code, exc.message)
        except asyncio.CancelledError:
            if self._cancelled.pop(request.id, None) is not None:
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()  # handled: the request ends, the task does not
                final = Error(request.id, ErrorCode.CANCELLED, "cancelled by the client")
                self._finish(request.id, final)
                return
            if self.server.stopping:
                # Past the grace period: the request still gets its last frame,
                # and the audit record says what the client was told.
                final = Error(request.id, ErrorCode.SHUTTING_DOWN, "the agent is stopping")
                self._finish(request.id, final)
            raise
        except Exception:
            log.exception("%s: request %d (%s) failed", self.peer, request.id, request.OP)
            final = Error(request.id, ErrorCode.INTERNAL, "internal error in the agent")
        finally:
            self.tasks.pop(request.id, None)
            self.controllers.pop(request.id, None)
            self._audit(request, final, time.monotonic() - started)
        self._finish(request.id, final)

    def note(self, request_id: int, **fields: Any) -> None:
        """Add facts to the audit record of a running request (bytes, digest...)."""
        self._notes.setdefault(request_id, {}).update(fields)

    def _audit(self, request: Message, final: Message | None, seconds: float) -> None:
        notes = self._notes.pop(request.id, {})
        record: dict[str, Any] = {"peer": self.peer, "identity": self.identity}
        record |= {"op": request.OP.value, "id": request.id, **_audit_fields(request), **notes}
        if isinstance(final, Exit):
            record |= {"status": final.status, "signal": final.signal_name or final.signal}
            record |= {"timed_out": final.timed_out}
        elif isinstance(final, Error):
            record |= {"outcome": final.code, "message": final.message}
        else:
            record["outcome"] = "ok" if final is not None else "ended"
        record["seconds"] = round(seconds, 3)
        self.server.audit.record("request", **record)

    def _finish(self, request_id: int, final: Message) -> None:
        if not self.closed:
            self.protocol.finish_request(request_id, final)
            self._flush()


def _enable_keepalive(sock: socket.socket) -> None:
    # A peer that vanished (cable, crash) is noticed in about two minutes
    # even on a connection that is waiting for a long command.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def format_peer(peer: Any) -> str:
    """A socket address as logs show it: ``host:port``, ``[v6]:port`` or ``unix``."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "unix" if not peer else str(peer)


def _audit_fields(request: Message) -> dict[str, Any]:
    """What a request asked for, for the audit log: never a body, never env values."""
    fields = {
        f.name: getattr(request, f.name)
        for f in request.FIELDS
        if f.name not in ("id", "body", "env") and getattr(request, f.name) is not None
    }
    if isinstance(request, Exec) and request.env:
        fields["env"] = sorted(request.env)  # names only: values may be secrets
    return fields


# Handlers: the explicit op table (docs/protocol.md §3). Nothing else dispatches.
CONTROLLED = (Exec, Put)  # requests that take control frames besides cancel

# No handler for echo: the protocol answers it (ServerProtocol.answer_echo), and
# while the agent stops, _start_request refuses it as every other request.
HANDLERS: dict[type[Message], Handler] = {
    Exec: handle_exec,
    **FILE_HANDLERS,
}

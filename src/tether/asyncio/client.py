"""The client API: :func:`connect`, :class:`Connection`, :class:`RemoteProcess`."""

from __future__ import annotations

import asyncio
import builtins
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, cast

from ..addresses import Address, parse_address
from ..exceptions import (
    AuthenticationError,
    CertificateError,
    ConnectError,
    ConnectionClosed,
    ProtocolError,
    RemoteError,
    TetherError,
    TimeoutError,
    UsageError,
)
from ..known_hosts import (
    add_known_host,
    default_known_hosts,
    fingerprint,
    lookup_known_host,
    normalize_fingerprint,
)
from ..limits import Limits
from ..messages import (
    SIGNAL_NAMES,
    Cancel,
    Echo,
    Error,
    ErrorCode,
    Exec,
    Exit,
    HelloReply,
    Message,
    Ok,
    Signal,
    Stderr,
    Stdin,
    Stdout,
)
from ..protocol import ClientProtocol, ConnectionFailed, ReplyReceived
from ..tokens import find_client_token
from . import tls, wire

if TYPE_CHECKING:
    from . import transfer
    from .transfer import RemoteStat

__all__ = ["CommandResult", "Connection", "ExitStatus", "Output", "RemoteProcess", "connect"]

DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds for TCP connect plus hello
READ_HIGH_WATER = 8 * 1024 * 1024  # 8 MiB of unread output: stop reading the socket
READ_LOW_WATER = 2 * 1024 * 1024  # 2 MiB: start again
_AUTH_CODES = frozenset({ErrorCode.AUTH_FAILED, ErrorCode.UNAUTHENTICATED, ErrorCode.HELLO_TIMEOUT})


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How a remote command ended."""

    status: int | None
    signal: int | None = None
    signal_name: str | None = None
    timed_out: bool = False

    @property
    def returncode(self) -> int:
        """The shell convention: the exit status, or 128 + the signal number."""
        if self.status is not None:
            return self.status
        if self.signal is not None:
            return 128 + self.signal
        return 255


@dataclass(frozen=True, slots=True)
class CommandResult:
    """Everything a finished command produced."""

    stdout: bytes
    stderr: bytes
    exit: ExitStatus
    encoding: str

    @property
    def returncode(self) -> int:
        return self.exit.returncode

    @property
    def timed_out(self) -> bool:
        return self.exit.timed_out

    @property
    def stdout_text(self) -> str:
        """stdout decoded with the agent's console encoding; bad bytes replaced."""
        return self.stdout.decode(self.encoding, errors="replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode(self.encoding, errors="replace")


@dataclass(frozen=True, slots=True)
class Output:
    """A piece of a remote command's output, as it arrived."""

    stream: Literal["stdout", "stderr"]
    data: bytes


class _Closed:
    """Queue marker: the connection ended with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class _ClientConnection(asyncio.BufferedProtocol):
    """Moves bytes between a socket and a :class:`ClientProtocol`."""

    def __init__(self, limits: Limits) -> None:
        self.protocol = ClientProtocol(limits)
        # Large bodies (a get's data) are read straight into their own buffer.
        # Bound here, not a method: the loop calls it for every read.
        self.get_buffer = self.protocol.get_buffer  # type: ignore[method-assign]
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.hello: asyncio.Future[HelloReply] = loop.create_future()
        self.queues: dict[int, asyncio.Queue[Message | _Closed]] = {}
        # Requests answered by exactly one frame (echo, stat...): a future is
        # a good deal cheaper than a queue on the busiest path there is.
        self.replies: dict[int, asyncio.Future[Message]] = {}
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
        self.protocol.buffer_updated(nbytes)
        for event in self.protocol.events_received():
            if isinstance(event, ReplyReceived):
                self._route(event.message)
            elif isinstance(event, ConnectionFailed):
                self._fail(_connection_error(event))
        self.flush()

    def _route(self, msg: Message) -> None:
        if isinstance(msg, HelloReply):
            if not self.hello.done():
                self.hello.set_result(msg)
            return
        waiter = self.replies.pop(msg.id, None)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(msg)
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

    def forget(self, request_id: int) -> None:
        """Stop routing frames to a request; what it left unread no longer counts."""
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
            queue.put_nowait(_Closed(self.error))
        for waiter in self.replies.values():
            if not waiter.done():
                waiter.set_exception(self.error)
        self._writable.set()
        if transport := self._live():
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self._fail(ConnectionClosed(f"connection closed by the agent{reason}"))

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def send(self, msg: Message) -> None:
        if self.error is not None:
            raise self.error
        self.protocol.send(msg)
        self.flush()

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


class RemoteProcess:
    """A running remote command: write its stdin, iterate over its output.

    ``async for out in proc`` yields :class:`Output` until the command ends;
    then :attr:`exit_status` is set. Use it as ``async with`` to make sure the
    command is ended if the block is left early.
    """

    def __init__(self, conn: Connection, request_id: int, queue: asyncio.Queue[Message | _Closed]):
        self._conn = conn
        self._wire = conn._wire
        self.id = request_id
        self._queue = queue
        self.exit_status: ExitStatus | None = None

    def __aiter__(self) -> AsyncIterator[Output]:
        return self

    async def __anext__(self) -> Output:
        if self.exit_status is not None:
            raise StopAsyncIteration
        while True:
            msg = await self._queue.get()
            if isinstance(msg, _Closed):
                self._forget()
                raise msg.error
            self._wire.consumed(msg)
            if isinstance(msg, Stdout):
                return Output("stdout", bytes(msg.body))
            if isinstance(msg, Stderr):
                return Output("stderr", bytes(msg.body))
            if isinstance(msg, Exit):
                self._forget()
                self.exit_status = ExitStatus(
                    msg.status, msg.signal, msg.signal_name, msg.timed_out
                )
                raise StopAsyncIteration
            if isinstance(msg, Error):
                self._forget()
                raise RemoteError(msg.code, msg.message)

    def _forget(self) -> None:
        self._wire.forget(self.id)

    def abandon(self) -> None:
        """Give up on the command: the agent ends its process group (``cancel``)."""
        if not self.finished:
            self._forget()
            if self._wire.error is None:
                self._wire.send(Cancel(self.id))

    @property
    def finished(self) -> bool:
        return self.id not in self._wire.queues

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` to the command's stdin (in frames of at most max_body)."""
        view = memoryview(data)
        step = self._conn.max_body
        for start in range(0, len(view), step):
            if self.finished:
                return  # the command has ended; its stdin is gone
            self._wire.send(Stdin(self.id, body=bytes(view[start : start + step])))
            await self._wire.drain()

    async def close_stdin(self) -> None:
        """Deliver end-of-file to the command's stdin."""
        if not self.finished:
            self._wire.send(Stdin(self.id, eof=True))
            await self._wire.drain()

    async def send_signal(self, name: str) -> None:
        """Send signal ``name`` (``"TERM"``, ``"INT"``, ...) to the command's process group."""
        name = name.upper().removeprefix("SIG")
        if name not in SIGNAL_NAMES:
            raise UsageError(f"unknown signal {name!r}; one of {', '.join(sorted(SIGNAL_NAMES))}")
        if not self.finished:
            self._wire.send(Signal(self.id, name))
            await self._wire.drain()

    async def wait(self) -> ExitStatus:
        """Wait for the command to end, discarding output nobody read."""
        async for _ in self:
            pass
        assert self.exit_status is not None
        return self.exit_status

    async def __aenter__(self) -> RemoteProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self.finished and self._wire.error is None:
            await self.send_signal("KILL")
            await self.wait()


class Connection:
    """An authenticated connection to one agent; many requests may run at once."""

    def __init__(
        self,
        wire: _ClientConnection,
        address: Address,
        hello: HelloReply,
        *,
        fingerprint: str | None = None,
        new_host: bool = False,
    ) -> None:
        self._wire = wire
        self.address = address
        self.fingerprint = fingerprint  # the agent's TLS certificate; None for plaintext
        self.new_host = new_host  # pinned just now, on first use
        self._keepalive: asyncio.Task[None] | None = None
        if hello.idle_timeout:
            # The agent closes connections silent for idle_timeout: a held,
            # quiet connection stays open by echoing well within it.
            interval = hello.idle_timeout / 3
            self._keepalive = asyncio.get_running_loop().create_task(self._keep_alive(interval))
        self.server_name = hello.server
        self.encoding = hello.encoding
        self.max_body = min(hello.max_body, wire.protocol.limits.max_body)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _keep_alive(self, interval: float) -> None:
        while self._wire.error is None:
            await asyncio.sleep(interval)
            try:
                await self.echo(b"")
            except TetherError:
                return  # the connection is over; its users see why

    async def close(self) -> None:
        """Close the connection; the agent ends any command still running."""
        if self._keepalive is not None:
            self._keepalive.cancel()
        transport = self._wire.transport
        if transport is not None and not transport.is_closing():
            transport.close()
        await asyncio.sleep(0)

    def _open(self, msg_factory: Any) -> tuple[int, asyncio.Queue[Message | _Closed]]:
        if self._wire.error is not None:
            raise self._wire.error
        request_id = self._wire.protocol.new_request_id()
        queue: asyncio.Queue[Message | _Closed] = asyncio.Queue()
        self._wire.queues[request_id] = queue
        self._wire.send(msg_factory(request_id))
        return request_id, queue

    def _forget(self, request_id: int) -> None:
        self._wire.forget(request_id)

    async def _request(self, msg_factory: Callable[[int], Message]) -> Message:
        """Send a request that is answered by one frame, and return that frame.

        Raises:
            RemoteError: the answer is an ``error`` frame.
            TetherError: the connection ended first.
        """
        wire = self._wire
        if wire.error is not None:
            raise wire.error
        request_id = wire.protocol.new_request_id()
        waiter: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        wire.replies[request_id] = waiter
        try:
            wire.send(msg_factory(request_id))
            msg = await waiter
        finally:
            wire.replies.pop(request_id, None)
        if isinstance(msg, Error):
            raise RemoteError(msg.code, msg.message)
        return msg

    # Files (docs/protocol.md §5) -------------------------------------------------

    async def stat(self, path: str, *, follow: bool = False) -> RemoteStat:
        """Describe ``path`` on the agent; a final symlink itself unless ``follow``
        (then its target, which must lie inside the agent's root)."""
        from . import transfer  # here: commands that move no files never load it

        return await transfer.stat_path(self, path, follow=follow)

    async def listdir(self, path: str) -> list[RemoteStat]:
        """The entries of a remote directory, sorted by name, each with ``name`` set."""
        from . import transfer

        return await transfer.listdir(self, path)

    async def mkdir(self, path: str, mode: int | None = None) -> None:
        """Make a remote directory (an existing one is fine)."""
        from . import transfer

        await transfer.mkdir(self, path, mode)

    async def get(
        self,
        remote: str,
        local: str | os.PathLike[str],
        *,
        resume: bool = False,
        progress: transfer.Progress | None = None,
    ) -> transfer.TransferResult:
        """Download the file ``remote`` to the local path ``local``.

        The bytes go to a hidden partial file beside ``local``, are checked
        against the agent's BLAKE3 digest, and only then renamed over
        ``local`` with the remote mode and mtime. With ``resume`` a partial
        file left by an interrupted get is continued after its prefix is
        verified (or started over, ``restarted=True``, if the file changed).

        Raises:
            RemoteError: the agent refused (``not_found``, ``path_outside_root``...).
            TransferError: ``checksum_mismatch``, ``source_changed``, ``no_space``...
        """
        from . import transfer

        return await transfer.get_file(
            self, remote, os.fspath(local), resume=resume, progress=progress
        )

    async def put(
        self,
        local: str | os.PathLike[str],
        remote: str,
        *,
        resume: bool = False,
        progress: transfer.Progress | None = None,
    ) -> transfer.TransferResult:
        """Upload the local file ``local`` to ``remote`` (see :meth:`get`)."""
        from . import transfer

        return await transfer.put_file(
            self, os.fspath(local), remote, resume=resume, progress=progress
        )

    async def get_tree(
        self,
        remote: str,
        local: str | os.PathLike[str],
        *,
        resume: bool = False,
        progress: transfer.Progress | None = None,
    ) -> list[transfer.TransferResult]:
        """Download the directory ``remote`` as ``local``: files, empty
        directories, symlinks (as links), modes and mtimes."""
        from . import transfer

        return await transfer.get_tree(
            self, remote, os.fspath(local), resume=resume, progress=progress
        )

    async def put_tree(
        self,
        local: str | os.PathLike[str],
        remote: str,
        *,
        resume: bool = False,
        progress: transfer.Progress | None = None,
    ) -> list[transfer.TransferResult]:
        """Upload the directory ``local`` as ``remote`` (see :meth:`get_tree`)."""
        from . import transfer

        return await transfer.put_tree(
            self, os.fspath(local), remote, resume=resume, progress=progress
        )

    async def echo(self, data: str | bytes) -> str | bytes:
        """Send ``data`` to the agent and return what came back (same type)."""
        # surrogateescape: a command-line argument that is not UTF-8 echoes as its bytes.
        body = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else bytes(data)
        msg = await self._request(lambda i: Echo(i, body=body))
        if not isinstance(msg, Ok):
            raise ProtocolError(f"echo answered with {msg.OP}")
        if isinstance(data, str):
            return msg.body.decode("utf-8", "surrogateescape")
        return bytes(msg.body)

    async def exec(
        self,
        argv: Sequence[str] | None = None,
        *,
        shell: str | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stdin: bool = False,
    ) -> RemoteProcess:
        """Start a command and return it while it runs.

        Give ``argv`` (run directly, no shell) or ``shell`` (run with
        ``/bin/sh -c``). With ``stdin=True`` the command reads what you
        :meth:`RemoteProcess.write`; otherwise its stdin is empty.
        ``timeout`` (seconds) is enforced by the agent, which then ends the
        command's whole process group.

        Errors of the request itself (``not_found``...) are raised as
        :class:`RemoteError` while iterating.
        """
        if isinstance(argv, (str, bytes)):
            raise UsageError("argv must be a sequence of strings; use shell= for a command line")
        if (argv is None) == (shell is None):
            raise UsageError("give exactly one of argv and shell")
        argv_list = list(argv) if argv is not None else None
        env_dict = dict(env) if env is not None else None
        request_id, queue = self._open(
            lambda i: Exec(
                i, argv=argv_list, shell=shell, cwd=cwd, env=env_dict, timeout=timeout, stdin=stdin
            )
        )
        await self._wire.drain()
        return RemoteProcess(self, request_id, queue)

    async def run(
        self,
        argv: Sequence[str] | None = None,
        *,
        shell: str | None = None,
        input: bytes | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> CommandResult:
        """Run a command to its end and collect its output.

        ``input`` is sent to its stdin, followed by end-of-file.

        Raises:
            RemoteError: the command could not be started (``not_found``,
                ``permission_denied``, ``forbidden``...).
            ConnectionClosed: the connection ended first.
        """
        proc = await self.exec(
            argv, shell=shell, cwd=cwd, env=env, timeout=timeout, stdin=input is not None
        )
        feeder = None
        if input is not None:
            feeder = asyncio.get_running_loop().create_task(_feed(proc, input))
        out, err = bytearray(), bytearray()
        try:
            async for chunk in proc:
                (out if chunk.stream == "stdout" else err).extend(chunk.data)
        finally:
            # Cancelled or failed before the end: the command must not run on,
            # and its output must not pile up unread on this connection.
            proc.abandon()
            if feeder is not None:
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)
        assert proc.exit_status is not None
        return CommandResult(bytes(out), bytes(err), proc.exit_status, self.encoding)


async def _feed(proc: RemoteProcess, data: bytes) -> None:
    await proc.write(data)
    await proc.close_stdin()


class _Connect:
    """What :func:`connect` returns: await it, or use it with ``async with``."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._conn: Connection | None = None

    def __await__(self) -> Generator[Any, None, Connection]:
        return _open_connection(**self._kwargs).__await__()

    async def __aenter__(self) -> Connection:
        self._conn = await _open_connection(**self._kwargs)
        return self._conn

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            await self._conn.close()


def connect(
    host: str | Address,
    *,
    token: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    limits: Limits | None = None,
    insecure_plaintext: bool = False,
    fingerprint: str | None = None,
    cacert: str | os.PathLike[str] | None = None,
    known_hosts: str | os.PathLike[str] | None = None,
    trust_on_first_use: bool = True,
) -> _Connect:
    """Connect to an agent and authenticate.

    ``host`` is ``name[:port]``, ``[v6addr]:port`` or ``unix:/path``. The token
    is ``token``, else read from ``token_file``, else ``$TETHER_TOKEN``, else
    the local agent's token file.

    TCP is TLS unless ``insecure_plaintext`` (the agent must say so too). The
    agent's certificate is checked before the token is sent: against
    ``fingerprint`` if given, else against a CA if ``cacert`` is given, else
    against the pin for this host in ``known_hosts`` (default
    ``~/.config/tether/known_hosts``); an unknown host is pinned on first use
    (``Connection.new_host`` tells) unless ``trust_on_first_use`` is false.
    Unix sockets are plaintext (their file mode guards them).

    Use as ``async with connect(host) as conn:`` or ``conn = await connect(host)``.

    Raises:
        ConnectError: the agent cannot be reached, or TLS failed.
        CertificateError: the certificate is not the pinned one.
        AuthenticationError: the agent refused the token.
        TimeoutError: no connection and hello within ``connect_timeout`` seconds.
        UsageError: bad ``host`` or ``fingerprint``, or no token anywhere.
    """
    return _Connect(
        host=host,
        token=token,
        token_file=token_file,
        connect_timeout=connect_timeout,
        limits=limits or Limits(),
        trust=_Trust(insecure_plaintext, fingerprint, cacert, known_hosts, trust_on_first_use),
    )


@dataclass(frozen=True, slots=True)
class _Trust:
    insecure_plaintext: bool
    fingerprint: str | None
    cacert: str | os.PathLike[str] | None
    known_hosts: str | os.PathLike[str] | None
    trust_on_first_use: bool


async def _open_connection(
    *,
    host: str | Address,
    token: str | None,
    token_file: str | os.PathLike[str] | None,
    connect_timeout: float,
    limits: Limits,
    trust: _Trust,
) -> Connection:
    address = parse_address(host) if isinstance(host, str) else host
    secret = find_client_token(token, token_file)
    pinned = None
    if trust.fingerprint is not None:
        try:
            pinned = normalize_fingerprint(trust.fingerprint)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    use_tls = address.path is None and not trust.insecure_plaintext
    loop = asyncio.get_running_loop()
    wire: _ClientConnection | None = None
    seen: str | None = None
    new_host = False
    try:
        async with asyncio.timeout(connect_timeout):
            if address.path is not None:
                _, wire = await loop.create_unix_connection(
                    lambda: _ClientConnection(limits), address.path
                )
            else:
                assert address.host is not None and address.port is not None
                ctx = tls.client_context(trust.cacert) if use_tls else None
                _, wire = await loop.create_connection(
                    lambda: _ClientConnection(limits),
                    address.host,
                    address.port,
                    ssl=ctx,
                    server_hostname=address.host if trust.cacert is not None else None,
                )
            if use_tls:
                seen = _peer_fingerprint(wire)
                if pinned is not None or trust.cacert is None:  # a pin holds even with a CA
                    new_host = _check_pin(address, seen, pinned, trust)
            wire.protocol.send_hello(secret)  # only now: the agent is who we think
            wire.flush()
            try:
                hello = await wire.hello
            except (ProtocolError, ConnectionClosed) as exc:
                if use_tls:
                    raise
                raise ConnectError(
                    f"cannot connect to {address}: no tether hello came back ({exc}); "
                    "if the agent uses TLS (the default), drop --insecure-plaintext"
                ) from None
    except TetherError:
        _abort(wire)
        raise
    except builtins.TimeoutError:
        _abort(wire)
        raise TimeoutError(
            f"connecting to {address} timed out after {connect_timeout:g}s", seconds=connect_timeout
        ) from None
    except ssl.SSLCertVerificationError as exc:
        _abort(wire)
        raise CertificateError(
            f"cannot connect to {address}: its certificate is not trusted by --cacert "
            f"({exc.verify_message or exc.reason})"
        ) from None
    except ssl.SSLError as exc:
        _abort(wire)
        raise ConnectError(
            f"cannot connect to {address}: TLS handshake failed ({exc.reason or exc}); "
            "an agent started with --insecure-plaintext needs --insecure-plaintext here too"
        ) from None
    except OSError as exc:
        _abort(wire)
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConnectError(f"cannot connect to {address}: {reason}") from None
    return Connection(wire, address, hello, fingerprint=seen, new_host=new_host)


def _peer_fingerprint(wire: _ClientConnection) -> str:
    assert wire.transport is not None
    ssl_object = wire.transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise ConnectError("the agent presented no TLS certificate")
    return fingerprint(der)


def _check_pin(address: Address, seen: str, pinned: str | None, trust: _Trust) -> bool:
    """Compare the agent's certificate with its pin; pin it on first use.

    Returns:
        Whether the host was unknown and has just been pinned.

    Raises:
        CertificateError: a mismatch, or an unknown host without trust on first use.
    """
    if pinned is not None:
        if seen != pinned:
            raise CertificateError(
                f"the agent at {address} presented certificate {seen}, "
                f"not {pinned} as --fingerprint requires: refusing to send the token"
            )
        return False
    path = os.fspath(trust.known_hosts) if trust.known_hosts is not None else default_known_hosts()
    known = lookup_known_host(path, str(address))
    if known is not None:
        if known.fingerprint != seen:
            raise CertificateError(
                f"WARNING: THE CERTIFICATE OF THE AGENT AT {address} HAS CHANGED!\n"
                "Someone could be intercepting this connection (man-in-the-middle), or the\n"
                "agent's certificate was replaced. The token was not sent.\n"
                f"Expected {known.fingerprint}, got {seen}.\n"
                f"If the change is expected, remove line {known.line} of {path} and connect again."
            )
        return False
    if not trust.trust_on_first_use:
        error = CertificateError(
            f"{address} is not in {path} (its certificate is {seen}); "
            "pass --fingerprint, or allow trust on first use"
        )
        error.code = "unknown_host"
        raise error
    add_known_host(path, str(address), seen)
    return True


def _abort(wire: _ClientConnection | None) -> None:
    if wire is not None and wire.transport is not None:
        wire.transport.abort()

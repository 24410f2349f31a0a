"""The client API: :class:`Connection`, :class:`RemoteProcess` and their results.

:func:`~.connecting.connect` opens a connection; :mod:`.channel` moves its
bytes and routes the replies.
"""

from __future__ import annotations

import asyncio
import builtins
import math
import os
import signal
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NoReturn, cast

from ..addresses import Address
from ..exceptions import (
    ProtocolError,
    RemoteError,
    TetherError,
    UsageError,
)
from ..messages import (
    SIGNAL_NAMES,
    Cancel,
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
from .channel import Channel, Closed, StdinWindow
from .wire import reset

if TYPE_CHECKING:
    from . import transfer
    from .transfer import RemoteStat

__all__ = ["CommandResult", "Connection", "ExitStatus", "Output", "RemoteProcess"]

CLOSE_TIMEOUT = 5.0  # seconds close() lets queued frames reach the agent before cutting


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


class _Ended:
    """Queue marker: a reader took the command's last frame (or it was
    abandoned); every other reader waiting on the queue wakes to it."""


_ENDED = _Ended()


class RemoteProcess:
    """A running remote command: write its stdin, iterate over its output.

    ``async for out in proc`` yields :class:`Output` until the command ends;
    then :attr:`exit_status` is set. Use it as ``async with`` to make sure the
    command is ended if the block is left early.
    """

    def __init__(
        self,
        conn: Connection,
        request_id: int,
        queue: asyncio.Queue[Message | Closed],
        *,
        stdin: bool = False,
    ) -> None:
        self._conn = conn
        self._wire = conn._wire
        self.id = request_id
        # Also carries _ENDED, which only this class puts there.
        self._queue = cast("asyncio.Queue[Message | Closed | _Ended]", queue)
        # write() and close_stdin() take turns: an end-of-file sent while a
        # write waited for credit cut the data short, and the write returned.
        self._stdin_turn = asyncio.Lock()
        # With stdin=True only. Credit frames open it; the command's end and a
        # failed connection close it.
        self._window: StdinWindow | None = None
        if stdin:
            self._window = self._wire.windows[request_id] = StdinWindow(conn.stdin_window)
        self.exit_status: ExitStatus | None = None
        # How it ended, if not with an exit status: raised again by every later
        # iteration or wait(), which would otherwise wait for a frame that
        # will never come.
        self._failure: Exception | None = None
        # Set by whichever task takes the last frame: other readers and wait()
        # learn the end from it, not from a frame that went to someone else.
        self._over = False
        # Tasks waiting in __anext__ for the next frame: wait() leaves the
        # output to them rather than take their frames. Counted only while
        # they wait: a task that broke out of its loop reads no more.
        self._reading = 0
        self._stirred: asyncio.Event | None = None  # a reader came or went, or the end

    def __aiter__(self) -> AsyncIterator[Output]:
        return self

    async def __anext__(self) -> Output:
        if self._over:
            self._raise_end()
        if self._queue.empty():
            self._wire.check_loop()  # nothing would ever come on an ended loop
            self._reading += 1
            self._stir()
            try:
                msg = await self._queue.get()
            finally:
                self._reading -= 1
                self._stir()
        else:
            msg = self._queue.get_nowait()
        out = self._take(msg)
        if out is None:
            self._raise_end()
        return out

    def _take(self, msg: Message | Closed | _Ended) -> Output | None:
        """The output ``msg`` carries; None once the command has ended."""
        if isinstance(msg, _Ended):
            self._queue.put_nowait(msg)  # for the next reader still waiting
            return None
        if isinstance(msg, Closed):
            self._end(msg.error)
            return None
        self._wire.consumed(msg)
        if isinstance(msg, Stdout):
            return Output("stdout", bytes(msg.body))
        if isinstance(msg, Stderr):
            return Output("stderr", bytes(msg.body))
        if isinstance(msg, Exit):
            self.exit_status = ExitStatus(msg.status, msg.signal, msg.signal_name, msg.timed_out)
            self._end(None)
        elif isinstance(msg, Error):
            self._end(RemoteError(msg.code, msg.message))
        else:  # only a broken agent answers an exec with anything else
            self._end(ProtocolError(f"exec answered with {msg.OP}"))
        return None

    def _end(self, failure: Exception | None) -> None:
        """Record how the command ended and wake everyone waiting for it."""
        if self._over:
            return
        self._over = True
        self._failure = failure
        self._forget()
        self._queue.put_nowait(_ENDED)
        self._stir()

    def _raise_end(self) -> NoReturn:
        if self._failure is not None:
            raise self._failure
        raise StopAsyncIteration

    def _stir(self) -> None:
        if self._stirred is not None:
            self._stirred.set()
            self._stirred = None

    def _forget(self) -> None:
        self._wire.forget(self.id)

    def abandon(self) -> None:
        """Give up on the command: the agent ends its process group (``cancel``)."""
        if not self.finished:
            self._end(RemoteError(ErrorCode.CANCELLED, "the command was abandoned"))
            # Not through a transport whose loop has ended (it would schedule
            # on it); the agent ends the command when that connection goes.
            if self._wire.error is None and self._wire.on_its_loop():
                self._wire.send(Cancel(self.id))

    @property
    def finished(self) -> bool:
        return self.id not in self._wire.queues

    def _has_ended(self) -> bool:
        """Whether the command has ended, so there is nothing to send it.

        Raises:
            ConnectionClosed: the connection ended before the command did
                (or it belongs to an event loop that has ended).
        """
        if self.exit_status is None and self._wire.error is not None:
            raise self._wire.error
        if self.finished:
            return True
        self._wire.check_loop()
        return False

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` to the command's stdin (in frames of at most max_body),
        waiting while the agent holds its window's worth that the command has
        not read yet (§4.6). Once the command has ended, its stdin is gone and
        the data is dropped.

        Raises:
            UsageError: the command was started without ``stdin=True``, or
                ``data`` is not bytes-like.
            ConnectionClosed: the connection ended first.
        """
        window = self._window
        if window is None:
            raise UsageError("the command was started without stdin=True")
        view = _byte_view(data, "write() data")
        async with self._stdin_turn:
            if self._has_ended():
                return
            step = self._conn.max_body
            start = 0
            while start < len(view):
                size = await window.take(min(step, len(view) - start))
                if not size:
                    if self._wire.error is not None:
                        raise self._wire.error
                    return  # the command has ended; its stdin is gone
                self._wire.send(Stdin(self.id, body=bytes(view[start : start + size])))
                start += size
                await self._wire.drain()

    async def close_stdin(self) -> None:
        """Deliver end-of-file to the command's stdin, after what a write()
        still sends (nothing once the command has ended)."""
        async with self._stdin_turn:
            if not self._has_ended():
                self._wire.send(Stdin(self.id, eof=True))
                await self._wire.drain()

    async def send_signal(self, sig: str | int) -> None:
        """Send signal ``sig`` to the command's process group: a name (``"TERM"``,
        ``"SIGINT"``...) or a number of this machine's (``signal.SIGTERM``, 15).
        Nothing is sent once the command has ended."""
        name = _signal_name(sig)
        if not self._has_ended():
            self._wire.send(Signal(self.id, name))
            await self._wire.drain()

    async def wait(self) -> ExitStatus:
        """Wait for the command to end and return how it did.

        While another task waits for the output in ``async for``, the output is
        left to that task; otherwise output nobody reads is discarded (left
        queued, it would stop the connection reading once 8 MiB had piled up).
        So a reader that awaits something else between two pieces may lose
        the pieces that come meanwhile to a ``wait()`` in another task.
        """
        while not self._over:
            if self._reading:
                await self._stirring().wait()
            else:
                await self._discard_next()
        if self._failure is not None:
            raise self._failure
        assert self.exit_status is not None
        return self.exit_status

    def _stirring(self) -> asyncio.Event:
        """The event the next stir sets (made now: a stir before anyone waits counts)."""
        if self._stirred is None:
            self._stirred = asyncio.Event()
        return self._stirred

    async def _discard_next(self) -> None:
        """Take the next frame and drop its output, unless a reader starts
        first: the frame is then left to it."""
        if not self._queue.empty():
            self._take(self._queue.get_nowait())
            return
        self._wire.check_loop()  # nothing would ever come on an ended loop
        getter = asyncio.ensure_future(self._queue.get())
        stirred = asyncio.ensure_future(self._stirring().wait())
        try:
            await asyncio.wait((getter, stirred), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stirred.cancel()
            # Cancelled before it took a frame, a get leaves it queued; one
            # taken is handled here, or the last frame could be lost.
            getter.cancel()
            if getter.done() and not getter.cancelled():
                self._take(getter.result())

    async def __aenter__(self) -> RemoteProcess:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.finished or self._wire.error is not None:
            return
        try:
            await self.send_signal("KILL")
            await self.wait()
        except TetherError:
            # Leaving on an exception of its own, the block's error is the one
            # to see, not that the clean-up failed too (the connection went).
            if et is None:
                raise


def _byte_view(data: Any, what: str) -> memoryview:
    """``data`` as a view of its bytes, counted in bytes whatever its items."""
    try:
        return memoryview(data).cast("B")
    except TypeError:
        raise UsageError(
            f"{what} must be bytes-like (bytes, bytearray, a contiguous buffer), "
            f"not {type(data).__name__}"
        ) from None


def _signal_name(sig: str | int) -> str:
    """The protocol's name of signal ``sig``, a name or a local number."""
    if isinstance(sig, int) and not isinstance(sig, bool):
        try:
            name = signal.Signals(sig).name
        except ValueError:
            raise UsageError(f"unknown signal number {sig}") from None
    elif isinstance(sig, str):
        name = sig
    else:
        raise UsageError(f"a signal is a name or a number, not {sig!r}")
    name = name.upper().removeprefix("SIG")
    if name not in SIGNAL_NAMES:
        raise UsageError(f"unknown signal {name!r}; one of {', '.join(sorted(SIGNAL_NAMES))}")
    return name


class Connection:
    """An authenticated connection to one agent; many requests may run at once."""

    def __init__(
        self,
        wire: Channel,
        address: Address,
        hello: HelloReply,
        *,
        fingerprint: str | None = None,
        new_host: bool = False,
        pin_error: str | None = None,
    ) -> None:
        self._wire = wire
        self.address = address
        self.fingerprint = fingerprint  # the agent's TLS certificate; None for plaintext
        self.new_host = new_host  # pinned just now, on first use
        # Trusted on first use but not pinned: why the known-hosts file could not be written.
        self.pin_error = pin_error
        self._keepalive: asyncio.Task[None] | None = None
        if hello.idle_timeout:
            # The agent closes connections silent for idle_timeout: a held,
            # quiet connection stays open by echoing well within it.
            interval = hello.idle_timeout / 3
            self._keepalive = asyncio.get_running_loop().create_task(self._keep_alive(interval))
        self.server_name = hello.server
        self.encoding = hello.encoding
        self.max_body = min(hello.max_body, wire.protocol.limits.max_body)
        self.stdin_window = hello.stdin_window

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _keep_alive(self, interval: float) -> None:
        wire = self._wire
        while wire.error is None:
            await asyncio.sleep(interval)
            try:
                # Sent, not awaited: the agent only needs to hear from us, and
                # the answer may wait behind output nobody has read yet (reading
                # paused); it is dropped when it comes, as no request waits.
                wire.send_echo(wire.protocol.new_request_id(), b"")
            except TetherError:
                return  # the connection is over; its users see why

    async def close(self) -> None:
        """Close the connection; the agent ends any command still running.

        What is still queued for the agent is sent first, for at most
        ``CLOSE_TIMEOUT`` seconds (an agent that does not read it, for a
        program that does not read its stdin, would hold it forever); then
        the connection is cut. It is cut at once when requests are left
        running and frames wait unsent: those can only be for them (stdin
        the command is not reading), and the agent ends them when we are gone.
        """
        wire = self._wire
        if not wire.on_its_loop():
            wire.cut_from_elsewhere()  # its transport and keepalive went with that loop
            return
        if self._keepalive is not None:
            self._keepalive.cancel()
        wire.closing = True
        transport = wire.transport
        if transport is not None and not transport.is_closing():
            if wire.queues and transport.get_write_buffer_size() > 0:
                reset(transport)
            else:
                transport.close()
        if transport is not None:
            try:
                await asyncio.wait_for(asyncio.shield(wire.lost), CLOSE_TIMEOUT)
            except builtins.TimeoutError:
                reset(transport)
        await asyncio.sleep(0)

    def _open(self, msg_factory: Any) -> tuple[int, asyncio.Queue[Message | Closed]]:
        if self._wire.error is not None:
            raise self._wire.error
        self._wire.check_loop()
        request_id = self._wire.protocol.new_request_id()
        queue: asyncio.Queue[Message | Closed] = asyncio.Queue()
        self._wire.send(msg_factory(request_id))  # may refuse it (too large): nothing to undo
        self._wire.queues[request_id] = queue
        return request_id, queue

    def _forget(self, request_id: int) -> None:
        self._wire.forget(request_id)

    async def _request(self, msg_factory: Callable[[int], Message]) -> Message:
        """Send a request that is answered by one frame, and return that frame.

        Raises:
            RemoteError: the answer is an ``error`` frame.
            TetherError: the connection ended first.
        """
        return await self._exchange(lambda i: self._wire.send(msg_factory(i)))

    async def _exchange(self, send: Callable[[int], None]) -> Message:
        """``_request`` with ``send(request_id)`` sending the request itself."""
        wire = self._wire
        if wire.error is not None:
            raise wire.error
        wire.check_loop()
        request_id = wire.protocol.new_request_id()
        waiter: asyncio.Future[Message] = wire.loop.create_future()
        wire.replies[request_id] = waiter
        try:
            send(request_id)
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
        skipped: transfer.Skipped | None = None,
    ) -> list[transfer.TransferResult]:
        """Download the directory ``remote`` as ``local``: files, empty
        directories, symlinks (as links), modes and mtimes.

        An entry that cannot be copied (unreadable, vanished...) does not stop
        the rest: :class:`~tether.TreeCopyError` at the end names each one.
        Sockets, FIFOs and devices are left out, each passed to ``skipped``.
        """
        from . import transfer

        return await transfer.get_tree(
            self, remote, os.fspath(local), resume=resume, progress=progress, skipped=skipped
        )

    async def put_tree(
        self,
        local: str | os.PathLike[str],
        remote: str,
        *,
        resume: bool = False,
        progress: transfer.Progress | None = None,
        skipped: transfer.Skipped | None = None,
    ) -> list[transfer.TransferResult]:
        """Upload the directory ``local`` as ``remote`` (see :meth:`get_tree`)."""
        from . import transfer

        return await transfer.put_tree(
            self, os.fspath(local), remote, resume=resume, progress=progress, skipped=skipped
        )

    async def echo(self, data: str | bytes) -> str | bytes:
        """Send ``data`` to the agent and return what came back (str for str,
        else bytes).

        Raises:
            UsageError: ``data`` is neither str nor bytes-like, or is text
                that UTF-8 cannot carry (a lone surrogate).
        """
        if type(data) is bytes:
            body = data
        elif isinstance(data, str):
            body = _utf8(data, "echo text")
        else:  # bytes(5) would be five zero bytes
            body = bytes(_byte_view(data, "echo data"))
        wire = self._wire
        msg = await self._exchange(lambda i: wire.send_echo(i, body))
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
        _check_timeout(timeout)
        argv_list = list(argv) if argv is not None else None
        env_dict = dict(env) if env is not None else None
        request_id, queue = self._open(
            lambda i: Exec(
                i, argv=argv_list, shell=shell, cwd=cwd, env=env_dict, timeout=timeout, stdin=stdin
            )
        )
        proc = RemoteProcess(self, request_id, queue, stdin=stdin)
        try:
            await self._wire.drain()
        except BaseException:
            # Cancelled (or the connection failed) before the caller has the
            # process: nobody would end it, nor read its output.
            proc.abandon()
            raise
        return proc

    async def run(
        self,
        argv: Sequence[str] | None = None,
        *,
        shell: str | None = None,
        input: bytes | bytearray | memoryview | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> CommandResult:
        """Run a command to its end and collect its output.

        ``input`` (bytes-like) is sent to its stdin, followed by end-of-file.
        Text is refused rather than encoded: which encoding the command
        expects is the caller's to know (the output, too, is bytes).

        Raises:
            UsageError: ``input`` is not bytes-like (checked before the start).
            RemoteError: the command could not be started (``not_found``,
                ``permission_denied``, ``forbidden``...).
            ConnectionClosed: the connection ended first.
        """
        if input is not None:
            _byte_view(input, "input")
        proc = await self.exec(
            argv, shell=shell, cwd=cwd, env=env, timeout=timeout, stdin=input is not None
        )
        feeder = None
        if input is not None:
            feeder = asyncio.get_running_loop().create_task(_feed(proc, input))
            # A feeder that fails ends the run: the command would wait for the
            # rest of its stdin for ever.
            feeder.add_done_callback(lambda task: _abandon_on_failure(task, proc))
        out, err = bytearray(), bytearray()
        try:
            async for chunk in proc:
                (out if chunk.stream == "stdout" else err).extend(chunk.data)
        except TetherError:
            # Abandoned for the feeder's failure: that is the error to see.
            if feeder is not None and (failed := _failure(feeder)) is not None:
                raise failed from None
            raise
        finally:
            # Cancelled or failed before the end: the command must not run on,
            # and its output must not pile up unread on this connection.
            proc.abandon()
            if feeder is not None:
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)
        assert proc.exit_status is not None
        return CommandResult(bytes(out), bytes(err), proc.exit_status, self.encoding)


async def _feed(proc: RemoteProcess, data: bytes | bytearray | memoryview) -> None:
    await proc.write(data)
    await proc.close_stdin()


def _abandon_on_failure(feeder: asyncio.Task[None], proc: RemoteProcess) -> None:
    if _failure(feeder) is not None:
        proc.abandon()


def _failure(task: asyncio.Task[Any]) -> BaseException | None:
    """The exception ``task`` ended with; None while it runs, or if it was cancelled."""
    if not task.done() or task.cancelled():
        return None
    return task.exception()


def _check_timeout(timeout: object) -> None:
    # A bool is an int, but True seconds is a mistake; nan fails the comparison.
    if timeout is None:
        return
    if (
        isinstance(timeout, (int, float))
        and not isinstance(timeout, bool)
        and 0 < timeout < math.inf
    ):
        return
    raise UsageError(f"timeout must be a finite number of seconds > 0, not {timeout!r}")


def _utf8(text: str, what: str) -> bytes:
    # surrogateescape: a command-line argument that is not UTF-8 goes as its bytes.
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise UsageError(f"{what} cannot be sent as UTF-8: {e.reason} at {e.start}") from None

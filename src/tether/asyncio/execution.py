"""Running one ``exec`` request as a child process group (docs/protocol.md §4.4).

Output is pushed, not pulled: the child's pipes feed ``stdout``/``stderr``
frames straight into the connection, and are paused while the connection's
socket buffer is full, so a slow client slows the command instead of growing
the agent's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
from typing import TYPE_CHECKING, Any, Protocol, cast

from ..exceptions import RemoteError
from ..messages import ErrorCode, Exec, Exit, Message, Signal, Stderr, Stdin, Stdout, shorten
from .child import Child, spawn

if TYPE_CHECKING:
    from .session import ServerConnection

__all__ = ["ExecRunner", "OutputSink"]

log = logging.getLogger("tether.exec")

OUTPUT_GRACE = 0.5  # seconds a pipe may stay silent after the main process exits
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL for the process group
_STDIN, _STDOUT, _STDERR = 0, 1, 2


class OutputSink(Protocol):
    """What a runner needs from its connection."""

    def send(self, msg: Message) -> None: ...
    def credit_stdin(self, request_id: int, nbytes: int) -> None: ...
    def hold_input(self, key: object) -> None: ...
    def release_input(self, key: object) -> None: ...
    def track(self, task: asyncio.Task[Any]) -> None: ...


class _ChildProtocol(asyncio.SubprocessProtocol):
    def __init__(self, runner: ExecRunner) -> None:
        self.runner = runner

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        assert isinstance(data, bytes)
        self.runner._on_output(fd, data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 0:
            # What the pipe still held is dropped: credited, so that a
            # client still writing is not left waiting for credit.
            self.runner._credit_stdin()
        self.runner._on_pipe_closed(fd)

    def process_exited(self) -> None:
        self.runner._on_exit()

    # The child's stdin pipe filling up never stops the connection: the
    # client sends no more than its stdin window ahead of the credits
    # (§4.6), which the pipe earns back as it drains. So a child that stops
    # reading, or closes its stdin, cannot keep cancel and signal frames, or
    # the client's going away, from being read.
    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        self.runner._credit_stdin()


class ExecRunner:
    """One child process group and the frames that describe it."""

    def __init__(
        self, request: Exec, sink: OutputSink, *, cwd: str, env: dict[str, str] | None
    ) -> None:
        self.request = request
        self.sink = sink
        self.cwd = cwd
        self.env = env
        self.transport: Child | None = None
        self.timed_out = False
        self._open_pipes = {_STDOUT, _STDERR}
        self._exited = asyncio.get_running_loop().create_future()
        self._done = asyncio.get_running_loop().create_future()
        self._output_paused = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._terminating: asyncio.Task[None] | None = None
        self._abandoned = False
        self._early: list[Message] = []
        self._starting = object()  # holds the connection's input while starting
        self._stdin_taken = 0  # bytes of stdin received: written to the pipe, or dropped
        self._stdin_credited = 0  # of which the client was told (credit frames)
        self.started = time.monotonic()

    @property
    def argv(self) -> list[str]:
        if self.request.shell is not None:
            return ["/bin/sh", "-c", self.request.shell]
        return list(self.request.argv or [])

    async def run(self) -> Exit:
        """Start the program, stream its output, and return its ``exit`` frame.

        Raises:
            RemoteError: the program could not be started.
        """
        loop = asyncio.get_running_loop()
        argv = self.argv
        program = shorten(argv[0])  # the client's text, quoted back (§3.3)
        if not argv[0]:
            # execvp("") searches PATH and fails with EACCES: "permission
            # denied: " for a program nobody named. A shell says not found.
            raise RemoteError(ErrorCode.NOT_FOUND, "no such program: ''")
        try:
            # A new session: its own process group, so all of it can be signalled.
            transport = await spawn(
                _ChildProtocol(self), argv, stdin=self.request.stdin, cwd=self.cwd, env=self.env
            )
        except OSError as exc:
            if exc.filename is not None and exc.filename == self.cwd:
                # The child could not enter the directory: not the program's fault.
                raise RemoteError(
                    ErrorCode.EXEC_FAILED,
                    f"cannot enter {shorten(self.request.cwd or '.')}: {exc.strerror}",
                ) from None
            if isinstance(exc, FileNotFoundError):
                raise RemoteError(
                    ErrorCode.NOT_FOUND, f"no such program: {shorten(program)}"
                ) from None
            if isinstance(exc, PermissionError):
                raise RemoteError(
                    ErrorCode.PERMISSION_DENIED, f"permission denied: {program}"
                ) from None
            raise RemoteError(
                ErrorCode.EXEC_FAILED, f"cannot run {program}: {exc.strerror}"
            ) from None
        finally:
            # Reading resumes only once this returns to the loop, after the
            # early controls below have been applied.
            self.sink.release_input(self._starting)
        self.transport = transport
        if self._output_paused:  # the socket was already full when we started
            self._set_reading(False)
        for early in self._early:
            self.control(early)
        self._early.clear()
        timer = None
        if self.request.timeout is not None:
            timer = loop.call_later(self.request.timeout, self._on_timeout)
        try:
            await asyncio.shield(self._done)
        except asyncio.CancelledError:
            # The client went away or the agent is stopping: nothing of the
            # command may outlive the request.
            self._abandoned = True
            self._start_terminating()
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if self._idle_timer is not None:
                self._idle_timer.cancel()
        transport.close()
        return self._exit_message()

    def control(self, msg: Message) -> None:
        """Apply a ``stdin`` or ``signal`` frame for this request."""
        if self.transport is None:
            # Controls may arrive while the child is being started: keep them,
            # and read no more until it has started.
            self._early.append(msg)
            self.sink.hold_input(self._starting)
        elif isinstance(msg, Stdin):
            self._write_stdin(msg)
        elif isinstance(msg, Signal):
            # The core admits only names in SIGNAL_NAMES, all of which exist here.
            self._kill(signal.Signals["SIG" + msg.signal])

    # Output ---------------------------------------------------------------

    def _on_output(self, fd: int, data: bytes) -> None:
        self.sink.send((Stdout if fd == _STDOUT else Stderr)(self.request.id, data))
        if self._exited.done():
            self._arm_idle_timer()

    def _on_pipe_closed(self, fd: int) -> None:
        self._open_pipes.discard(fd)
        self._maybe_done()

    def _on_exit(self) -> None:
        if not self._exited.done():
            self._exited.set_result(None)
        self._arm_idle_timer()
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._exited.done() and not self._open_pipes and not self._done.done():
            self._done.set_result(None)

    def pause_output(self) -> None:
        self._output_paused = True
        self._set_reading(False)
        if self._idle_timer is not None:
            self._idle_timer.cancel()  # paused is not idle: the pipe may still hold output

    def resume_output(self) -> None:
        self._output_paused = False
        self._set_reading(True)
        if self._exited.done():
            self._arm_idle_timer()

    def _set_reading(self, on: bool) -> None:
        if self.transport is None:
            return
        for fd in (_STDOUT, _STDERR):
            # uvloop's pipes do not subclass asyncio's transports: cast, do not check.
            pipe = cast(asyncio.ReadTransport | None, self.transport.get_pipe_transport(fd))
            if pipe is not None and not pipe.is_closing():
                if on and not pipe.is_reading():
                    pipe.resume_reading()
                elif not on and pipe.is_reading():
                    pipe.pause_reading()

    def _arm_idle_timer(self) -> None:
        # After the main process exits, a pipe that stays silent for
        # OUTPUT_GRACE is held open by something else (``sleep 60 &``): stop
        # waiting for it rather than hang the call.
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self._open_pipes and not self._output_paused:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(OUTPUT_GRACE, self._close_output)

    def _close_output(self) -> None:
        if self.transport is None:
            return
        for fd in list(self._open_pipes):
            pipe = self.transport.get_pipe_transport(fd)
            if pipe is not None:
                pipe.close()
            self._open_pipes.discard(fd)
        self._maybe_done()

    # Input ----------------------------------------------------------------

    def _write_stdin(self, msg: Stdin) -> None:
        self._stdin_taken += len(msg.body)
        pipe = self._stdin_pipe()
        # With no pipe (no stdin asked for, or the child closed it) the input
        # is dropped, and credited below all the same.
        if pipe is not None and not pipe.is_closing():
            if msg.body:
                pipe.write(msg.body)
            if msg.eof:
                pipe.close()  # flushes what is buffered, then closes
        self._credit_stdin()

    def _credit_stdin(self) -> None:
        """Credit the client with the stdin that has left the pipe's buffer
        (into the pipe, or dropped) since the last credit."""
        pipe = self._stdin_pipe()
        waiting = pipe.get_write_buffer_size() if pipe is not None else 0
        amount = self._stdin_taken - waiting - self._stdin_credited
        if amount > 0:
            self._stdin_credited += amount
            self.sink.credit_stdin(self.request.id, amount)

    def _stdin_pipe(self) -> asyncio.WriteTransport | None:
        pipe = self.transport.get_pipe_transport(_STDIN) if self.transport else None
        return cast(asyncio.WriteTransport | None, pipe)

    # Termination -----------------------------------------------------------

    def _kill(self, sig: int) -> None:
        if self.transport is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
            os.killpg(self.transport.pid, sig)

    def _on_timeout(self) -> None:
        if self._exited.done():
            # It exited in time, by itself: its status stands, the rest of its
            # group is left alone, and the output still to come is the output
            # grace's to end (§4.4), never cut here (the pipes may hold what
            # flow control held back).
            return
        self.timed_out = True
        self._start_terminating()

    def _start_terminating(self) -> None:
        if self._terminating is None:
            self._terminating = asyncio.get_running_loop().create_task(self._terminate())
            self.sink.track(self._terminating)

    async def _terminate(self) -> None:
        """SIGTERM to the group; SIGKILL to whatever is left after KILL_GRACE."""
        self._kill(signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE
        await asyncio.wait([self._exited], timeout=KILL_GRACE)
        while self._group_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._kill(signal.SIGKILL)
        await asyncio.wait([self._exited], timeout=KILL_GRACE)
        if self._abandoned and self.transport is not None:
            self.transport.close()  # the request is gone: nobody else will

    def _group_alive(self) -> bool:
        if self.transport is None:
            return False
        try:
            os.killpg(self.transport.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def _exit_message(self) -> Exit:
        assert self.transport is not None
        code = self.transport.returncode
        if code is not None and code < 0:
            try:
                name: str | None = signal.Signals(-code).name.removeprefix("SIG")
            except ValueError:
                name = None
            return Exit(self.request.id, signal=-code, signal_name=name, timed_out=self.timed_out)
        return Exit(self.request.id, status=code, timed_out=self.timed_out)


# The request handler (session.HANDLERS) -------------------------------------------


async def handle_exec(conn: ServerConnection, request: Exec) -> Message:
    server, config = conn.server, conn.server.config
    # Without variables of its own the child inherits the agent's environment as
    # it is: copying os.environ into a dict costs more than the rest of the check.
    env = {**os.environ, **request.env} if request.env else None
    program = request.argv[0] if request.argv is not None else "/bin/sh"
    resolved = None
    if config.allow:  # only an allow-list needs the path: a lookup costs stat calls
        # Looked up in the agent's own PATH: a client's PATH must not pick the binary.
        resolved = shutil.which(program, path=os.environ.get("PATH", os.defpath))
        resolved = os.path.abspath(resolved) if resolved is not None else None
    refusal = server.policy.refusal(program, resolved) or server.policy.env_refusal(
        sorted(request.env or {})
    )
    if refusal is not None:
        raise RemoteError(ErrorCode.FORBIDDEN, refusal)
    if config.allow and request.argv is not None:
        if resolved is None:
            # Never let the request's own PATH find a program the list allowed by name.
            raise RemoteError(ErrorCode.NOT_FOUND, f"no such program: {program}")
        request = request.replace(argv=[resolved, *request.argv[1:]])
    if conn.execs >= config.max_execs_per_connection or server.execs >= config.max_execs:
        raise RemoteError(
            ErrorCode.BUSY,
            f"too many commands running (at most {config.max_execs_per_connection} per "
            f"connection, {config.max_execs} on the agent)",
        )
    root = config.root
    cwd = os.path.join(root, request.cwd) if request.cwd else os.fspath(root)
    if not os.path.isdir(cwd):
        shown = shorten(request.cwd or ".")
        if os.path.exists(cwd):  # a file: it exists, and cannot be entered
            raise RemoteError(ErrorCode.EXEC_FAILED, f"cannot enter {shown}: not a directory")
        raise RemoteError(ErrorCode.NOT_FOUND, f"no such directory: {shown}")
    runner = ExecRunner(request, conn, cwd=cwd, env=env)
    conn.attach(request.id, runner)
    conn.note(request.id, cwd=cwd)
    conn.execs += 1
    server.execs += 1
    try:
        return await runner.run()
    finally:
        conn.execs -= 1
        server.execs -= 1

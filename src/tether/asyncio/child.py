"""A child process whose pipes and exit the event loop watches.

Why not ``loop.subprocess_exec``: uvloop starts children with fork (libuv),
the subprocess module with vfork. In an agent-sized process, spawning
``true`` ran at about 320/s through uvloop and 1,200/s through
``subprocess.Popen`` here; and uvloop's children keep extra copies of their
pipe ends, so a child closing its stdin went unnoticed while it lived. Here
the pipes are the subprocess module's own (close-on-exec, closed in the
parent after the spawn), attached to the loop with ``connect_read_pipe`` and
``connect_write_pipe``; the exit is watched with a pidfd where Linux has one,
else by a thread blocked in ``waitpid``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from typing import Any

__all__ = ["Child", "spawn"]


class _Pipe(asyncio.Protocol):
    """One of the child's pipes, reporting to the child's protocol."""

    def __init__(self, child: Child, fd: int) -> None:
        self.child = child
        self.fd = fd

    def data_received(self, data: bytes) -> None:
        self.child.protocol.pipe_data_received(self.fd, data)

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost reports it

    def connection_lost(self, exc: Exception | None) -> None:
        self.child.pipes.pop(self.fd, None)
        self.child.protocol.pipe_connection_lost(self.fd, exc)

    def pause_writing(self) -> None:
        self.child.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.child.protocol.resume_writing()


class Child:
    """A running program: its pid, its pipes (0, 1, 2) as transports, its exit status."""

    def __init__(self, proc: subprocess.Popen[bytes], protocol: asyncio.SubprocessProtocol):
        self.proc = proc
        self.protocol = protocol
        self.pipes: dict[int, asyncio.BaseTransport] = {}
        self.returncode: int | None = None  # as subprocess: -N for signal N
        self._pidfd = -1
        self._loop = asyncio.get_running_loop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def get_pipe_transport(self, fd: int) -> Any:
        """The transport of pipe ``fd`` while it is open, else None."""
        return self.pipes.get(fd)

    async def _attach(self) -> None:
        loop = self._loop
        if self.proc.stdin is not None:
            stdin, _ = await loop.connect_write_pipe(lambda: _Pipe(self, 0), self.proc.stdin)
            # Every drain of its buffer is reported (resume_writing), not only
            # one from above 64 KiB: stdin is credited back to the client as it
            # leaves the buffer (§4.6), and a window of 64 KiB or less would
            # otherwise wait for credit that never came.
            stdin.set_write_buffer_limits(high=0)
            self.pipes[0] = stdin
        for fd, pipe in ((1, self.proc.stdout), (2, self.proc.stderr)):
            transport, _ = await loop.connect_read_pipe(functools.partial(_Pipe, self, fd), pipe)
            self.pipes[fd] = transport
        self._watch_exit()

    def _watch_exit(self) -> None:
        try:
            self._pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):  # not Linux, or a kernel before 5.3
            threading.Thread(target=self._wait_in_thread, daemon=True).start()
            return
        self._loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.proc.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.proc.pid, 255 << 8  # reaped by someone else: unknown
        if pid == 0:
            return  # not yet
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        self._exited(status)

    def _wait_in_thread(self) -> None:
        try:
            _, status = os.waitpid(self.proc.pid, 0)
        except ChildProcessError:
            status = 255 << 8
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(self._exited, status)

    def _exited(self, status: int) -> None:
        self.returncode = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.returncode  # Popen must not wait for it again
        self.protocol.process_exited()

    def close(self) -> None:
        """Close the pipes; a program still running is killed (as asyncio does)."""
        for transport in list(self.pipes.values()):
            transport.close()
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)


async def spawn(
    protocol: asyncio.SubprocessProtocol,
    argv: Sequence[str],
    *,
    stdin: bool,
    cwd: str,
    env: dict[str, str] | None,
) -> Child:
    """Start ``argv`` in a new session (its own process group) with piped output.

    Its stdin is a pipe when ``stdin``, else ``/dev/null``; its environment is
    ``env``, or this process's own when None.

    Raises:
        OSError: the program could not be started (FileNotFoundError,
            PermissionError...), as ``subprocess.Popen`` raises it.
    """
    # Blocking, but only until the program is exec'd (vfork): about a millisecond.
    proc = subprocess.Popen(  # noqa: ASYNC220
        argv,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=env,
        start_new_session=True,
        bufsize=0,
    )
    child = Child(proc, protocol)
    try:
        await child._attach()
    except BaseException:
        attached = set(child.pipes)
        child.close()  # the transports close their own pipes
        for fd, pipe in enumerate((proc.stdin, proc.stdout, proc.stderr)):
            if pipe is not None and fd not in attached:
                pipe.close()  # not handed to a transport: ours to close
        with contextlib.suppress(ChildProcessError):
            proc.wait()  # killed just now: does not block for long
        raise
    return child

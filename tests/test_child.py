"""tether.asyncio.child: real programs, their pipes and their exit, with a pidfd and without."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tether.asyncio.child import Child, spawn
from tether.asyncio.loop import run

pytestmark = pytest.mark.timeout(30)


class Recorder(asyncio.SubprocessProtocol):
    """Collects what a child's pipes carry and when they close and it exits."""

    def __init__(self) -> None:
        self.out: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        self.closed: set[int] = set()
        self.exited = asyncio.get_running_loop().create_future()

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        assert isinstance(data, bytes)
        self.out[fd] += data

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self.closed.add(fd)

    def process_exited(self) -> None:
        self.exited.set_result(None)

    async def finished(self, child: Child) -> None:
        await asyncio.wait_for(self.exited, 10)
        for _ in range(200):  # the pipes' last bytes may come after the exit
            if {1, 2} <= self.closed:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"pipes still open: {set(child.pipes)}")


@pytest.fixture(params=["pidfd", "thread"])
def exit_watch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the exit is watched: a pidfd (Linux), and a thread in waitpid (elsewhere)."""
    if request.param == "thread":
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    elif not hasattr(os, "pidfd_open"):
        pytest.skip("no pidfd_open on this platform")
    return str(request.param)


def test_output_both_streams_and_exit_status(exit_watch: str) -> None:
    async def main() -> tuple[bytes, bytes, int | None]:
        rec = Recorder()
        script = "printf out; printf err >&2; exit 3"
        child = await spawn(rec, ["sh", "-c", script], stdin=False, cwd="/", env=dict(os.environ))
        await rec.finished(child)
        child.close()
        return bytes(rec.out[1]), bytes(rec.out[2]), child.returncode

    assert run(main()) == (b"out", b"err", 3)


def test_stdin_pipe_reaches_the_program(exit_watch: str) -> None:
    async def main() -> bytes:
        rec = Recorder()
        child = await spawn(rec, ["cat"], stdin=True, cwd="/", env=dict(os.environ))
        stdin = child.get_pipe_transport(0)
        stdin.write(b"x" * 300_000)  # more than a pipe holds: flushed as cat reads
        stdin.close()
        await rec.finished(child)
        assert child.returncode == 0
        return bytes(rec.out[1])

    assert run(main()) == b"x" * 300_000


def test_a_signal_is_a_negative_status_and_close_kills(exit_watch: str) -> None:
    async def main() -> tuple[int | None, int | None]:
        rec = Recorder()
        child = await spawn(rec, ["sleep", "30"], stdin=False, cwd="/", env=dict(os.environ))
        os.kill(child.pid, signal.SIGTERM)
        await rec.finished(child)
        terminated = child.returncode
        rec = Recorder()
        child = await spawn(rec, ["sleep", "30"], stdin=False, cwd="/", env=dict(os.environ))
        child.close()  # still running: killed, and still reaped
        await asyncio.wait_for(rec.exited, 10)
        return terminated, child.returncode

    assert run(main()) == (-signal.SIGTERM, -signal.SIGKILL)


def test_a_missing_program_raises_and_leaves_nothing_open() -> None:
    async def main() -> None:
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(FileNotFoundError):
            await spawn(Recorder(), ["/no/such/program"], stdin=True, cwd="/", env={})
        assert len(os.listdir("/proc/self/fd")) == before

    run(main())


def test_the_program_runs_in_its_own_session() -> None:
    async def main() -> tuple[int, int, int]:
        rec = Recorder()
        child = await spawn(
            rec, ["sh", "-c", "cat /proc/$$/stat"], stdin=False, cwd="/", env=dict(os.environ)
        )
        await rec.finished(child)
        # /proc/PID/stat after the name: state, ppid, pgrp, session, ...
        pgrp, session = (int(x) for x in rec.out[1].rsplit(b")", 1)[1].split()[2:4])
        return child.pid, pgrp, session

    pid, pgrp, session = run(main())
    assert pgrp == pid and session == pid  # its own session and process group

"""The transfer files' threads: a cancelled caller never leaves a thread
working on a closed (or reused) descriptor, nor a commit still running with
its partial file's name free for another transfer.

Real files in a temporary directory and real worker threads; a thread is held
inside its work by an event, so the cancellation lands while it runs. Every
wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import resource
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tether.asyncio.fileio import FileSource, PartialFile, partial_path
from tether.exceptions import TransferError
from tether.messages import ErrorCode

HOLD = 5.0  # seconds a held thread waits for its gate at most


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def test_a_cancelled_caller_leaves_the_descriptor_to_its_thread(tmp_path: Path) -> None:
    partial = PartialFile(str(tmp_path / "dest"), "dest", resume=False)
    fd = partial.fd
    entered, gate = threading.Event(), threading.Event()
    seen: list[bool] = []

    def work() -> None:  # a write that takes its time, then uses the descriptor
        entered.set()
        gate.wait(HOLD)
        seen.append(is_open(fd))

    caller = asyncio.ensure_future(partial._in_thread(work))
    assert await asyncio.to_thread(entered.wait, HOLD)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    # The request is gone; the agent closes the file as it cleans up.
    settled = asyncio.ensure_future(partial.settle())
    partial.close()
    await asyncio.sleep(0.05)
    assert not settled.done(), "settle() returned while the thread was still working"
    assert is_open(fd), "the descriptor was closed under a running thread"

    gate.set()
    async with asyncio.timeout(HOLD):
        await settled
    assert seen == [True]
    await asyncio.sleep(0.05)  # the close runs as a callback of the thread's end
    assert not is_open(fd), "the descriptor was not closed after its thread ended"
    partial.discard()


async def hold_in_thread(partial: PartialFile, work: Callable[[], None]) -> threading.Event:
    """Start ``work`` in the file's thread behind a gate, then cancel its caller,
    as a cancelled request does; returns the gate that lets the thread go on."""
    entered, gate = threading.Event(), threading.Event()

    def held() -> None:
        entered.set()
        gate.wait(HOLD)
        work()

    caller = asyncio.ensure_future(partial._in_thread(held))
    assert await asyncio.to_thread(entered.wait, HOLD)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    return gate


async def test_discard_lets_a_running_commit_finish_first(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    partial = PartialFile(str(dest), "dest", resume=False)
    os.write(partial.fd, b"verified bytes")
    gate = await hold_in_thread(partial, lambda: partial._commit(0o644, None))
    partial.discard()  # the request's cleanup, while the commit's thread still runs
    # The name stays taken, and locked: a transfer to the same destination is
    # refused instead of creating a partial file the late rename would install.
    assert os.path.exists(partial.path)
    with pytest.raises(TransferError) as refused:
        PartialFile(str(dest), "dest", resume=False)
    assert refused.value.code == ErrorCode.BUSY
    gate.set()
    async with asyncio.timeout(HOLD):
        await partial.settle()
    await asyncio.sleep(0.05)  # the deferred discard runs as a callback
    assert dest.read_bytes() == b"verified bytes"
    assert not os.path.exists(partial.path)


async def test_discard_removes_the_file_once_its_thread_is_done(tmp_path: Path) -> None:
    partial = PartialFile(str(tmp_path / "dest"), "dest", resume=False)
    gate = await hold_in_thread(partial, lambda: None)  # a write, say
    partial.discard()
    assert os.path.exists(partial.path)
    gate.set()
    async with asyncio.timeout(HOLD):
        await partial.settle()
    await asyncio.sleep(0.05)
    assert not os.path.exists(partial.path)
    assert not (tmp_path / "dest").exists()


async def test_cutting_and_removing_a_partial_file_happen_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Truncating a stale partial file, and the last close of a removed one,
    free its blocks: seconds for gigabytes (ext4), during which an agent on
    the loop would serve nobody. Both run in a worker thread; the name is free
    at once."""
    dest = tmp_path / "dest"
    Path(partial_path(str(dest))).write_bytes(b"stale bytes of an older transfer" * 1000)
    partial = PartialFile(str(dest), "dest", resume=False)
    fd, loop_thread = partial.fd, threading.current_thread()
    calls: list[tuple[str, bool]] = []
    real_ftruncate, real_close = os.ftruncate, os.close

    def ftruncate(descriptor: int, length: int) -> None:
        calls.append(("ftruncate", threading.current_thread() is loop_thread))
        real_ftruncate(descriptor, length)

    def close(descriptor: int) -> None:
        if descriptor == fd:
            calls.append(("close", threading.current_thread() is loop_thread))
        real_close(descriptor)

    monkeypatch.setattr(os, "ftruncate", ftruncate)
    monkeypatch.setattr(os, "close", close)
    await partial.start_at(0)
    assert os.path.getsize(partial.path) == 0
    partial.discard()
    assert not os.path.exists(partial.path)
    async with asyncio.timeout(HOLD):
        while len(calls) < 2:
            await asyncio.sleep(0.01)
    assert calls == [("ftruncate", False), ("close", False)]


async def test_a_partial_file_renamed_away_before_its_lock_is_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes writing one destination (two ``tether cp`` runs): if the
    other one commits, renaming its partial file over the destination, between
    our open and our lock, we would hold the destination itself and write it
    in place. The lock is taken again on the file now at the partial name."""
    dest = tmp_path / "dest"
    part = Path(partial_path(str(dest)))
    part.write_bytes(b"the other transfer's verified bytes")
    real_flock = fcntl.flock
    raced: list[bool] = []

    def flock(fd: int, operation: int) -> None:
        if not raced:  # the other process commits just now
            os.rename(part, dest)
            raced.append(True)
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    partial = PartialFile(str(dest), "dest", resume=True)
    try:
        assert raced
        assert os.fstat(partial.fd).st_ino == os.lstat(part).st_ino
        assert partial.have == 0  # a new, empty partial file: nothing to resume
        await partial.start_at(0)
        await partial.write(b"ours")
        assert dest.read_bytes() == b"the other transfer's verified bytes"
    finally:
        partial.discard()


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_lock_that_fails_otherwise_than_busy_is_an_io_error_and_leaks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")  # NFS without a lock daemon

    monkeypatch.setattr(fcntl, "flock", flock)
    before = open_descriptors()
    with pytest.raises(TransferError) as failed:
        PartialFile(str(tmp_path / "dest"), "dest", resume=False)
    assert failed.value.code == ErrorCode.IO_ERROR
    assert "dest: No locks available" in str(failed.value)
    assert open_descriptors() == before


async def test_a_read_error_while_hashing_a_prefix_is_an_io_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resuming hashes the bytes already there; a failing disk (EIO) fails the
    transfer with io_error, as a failing read of the data does, not internal."""
    dest = tmp_path / "dest"
    Path(partial_path(str(dest))).write_bytes(b"x" * 100)
    source = tmp_path / "source"
    source.write_bytes(b"x" * 200)

    def pread(fd: int, length: int, offset: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    partial = PartialFile(str(dest), "dest", resume=True)
    sending = FileSource(str(source), "source")
    monkeypatch.setattr(os, "pread", pread)
    try:
        with pytest.raises(TransferError) as failed:
            await partial.prefix()
        assert failed.value.code == ErrorCode.IO_ERROR
        with pytest.raises(TransferError) as failed:
            await sending.start_at(100, "0" * 64)
        assert failed.value.code == ErrorCode.IO_ERROR
    finally:
        partial.close()
        sending.close()


def test_a_commit_that_fails_leaves_the_destination_as_it_was(tmp_path: Path) -> None:
    """Out of descriptors at the commit (EMFILE): the commit fails, and the
    destination is still the old file. It was renamed first, then failed to
    open its directory for the fsync: a failure reported with the new file
    already in place."""
    dest = tmp_path / "dest"
    dest.write_bytes(b"the old file")
    partial = PartialFile(str(dest), "dest", resume=False)
    os.write(partial.fd, b"the new file")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
        with contextlib.suppress(OSError):
            while len(held) < 1024:
                held.append(os.open(os.devnull, os.O_RDONLY))
        with pytest.raises(OSError) as failed:
            partial._commit(0o644, None)
        assert failed.value.errno == errno.EMFILE
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert dest.read_bytes() == b"the old file"
    assert not partial.committed
    partial.discard()

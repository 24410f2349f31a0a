"""The transfer files' threads: a cancelled caller never leaves a thread
working on a closed (or reused) descriptor, nor a commit still running with
its partial file's name free for another transfer.

Real files in a temporary directory and real worker threads; a thread is held
inside its work by an event, so the cancellation lands while it runs. Every
wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tether.asyncio.fileio import PartialFile
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

"""The transfer files' threads: a cancelled caller never leaves a thread
working on a closed (or reused) descriptor.

Real files in a temporary directory and real worker threads; a thread is held
inside its work by an event, so the cancellation lands while it runs. Every
wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from tether.asyncio.fileio import PartialFile

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

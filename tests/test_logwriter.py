"""The agent's log handler on real pipes: it never blocks the thread that logs,
drops and counts what does not fit, and gives up on a reader that is gone."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import tmpfs
from tether.audit import AuditLog
from tether.logwriter import LineHandler

LINES = 50_000  # about 550 KB of log: far more than a pipe (64 KiB) and the backlog hold
BACKLOG = 4096


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    log = logging.getLogger("test.logwriter")
    log.propagate = False
    log.setLevel(logging.INFO)
    yield log
    for handler in list(log.handlers):
        log.removeHandler(handler)


def attach(log: logging.Logger, fd: int) -> LineHandler:
    handler = LineHandler(fd, max_backlog=BACKLOG)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    log.addHandler(handler)
    return handler


def test_a_pipe_nobody_reads_drops_lines_and_says_how_many(logger: logging.Logger) -> None:
    read_end, write_end = os.pipe()
    handler = attach(logger, write_end)
    started = time.monotonic()
    for i in range(LINES):
        logger.info("line %05d", i)
    assert time.monotonic() - started < 10, "logging waited for the pipe"

    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(read_all(read_end)))
    reader.start()
    handler.finish(30)
    os.close(write_end)
    reader.join(30)
    os.close(read_end)

    text = received.decode()
    numbers = [int(n) for n in re.findall(r"^test\.logwriter line (\d+)$", text, re.M)]
    dropped = [int(n) for n in re.findall(r"^tether\.log (\d+) log lines dropped: the", text, re.M)]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    assert dropped, "no word of the lines dropped"
    assert len(numbers) + sum(dropped) == LINES
    assert numbers[0] == 0 and len(numbers) < LINES


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_every_line_arrives_in_order_when_the_pipe_is_read(logger: logging.Logger) -> None:
    read_end, write_end = os.pipe()
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(read_all(read_end)))
    reader.start()
    handler = LineHandler(write_end)  # the agent's backlog: 1 MiB
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    for i in range(LINES):
        logger.info("%d", i)
    handler.put_line("tether: stopped")
    handler.finish(30)
    os.close(write_end)
    reader.join(30)
    os.close(read_end)
    assert received.decode().split("\n") == [*map(str, range(LINES)), "tether: stopped", ""]


def test_a_reader_that_went_away_stops_the_writing_quietly(logger: logging.Logger) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    handler = attach(logger, write_end)
    logger.info("into a pipe without a reader")  # EPIPE in the writer thread, not here
    wait_until_gone(handler)
    logger.info("and on")
    os.write(write_end, b"later writes do not fail: the descriptor is /dev/null now\n")
    assert os.stat(write_end).st_rdev == os.stat(os.devnull).st_rdev
    handler.finish(1)
    os.close(write_end)


def test_close_waits_only_so_long_for_a_reader_that_does_not_read(
    logger: logging.Logger,
) -> None:
    read_end, write_end = os.pipe()
    handler = attach(logger, write_end)
    for i in range(LINES):
        logger.info("line %05d", i)
    started = time.monotonic()
    handler.finish(0.5)
    handler.close()  # logging.shutdown's, at exit: no second wait
    assert time.monotonic() - started < 1.5
    os.close(read_end)  # the writer thread, blocked on the full pipe, now fails and ends
    wait_until_gone(handler)  # then the descriptor's number may be reused
    os.close(write_end)


def wait_until_gone(handler: LineHandler) -> None:
    deadline = time.monotonic() + 10
    while not handler.reader_gone:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_close_writes_what_was_logged_just_before(logger: logging.Logger) -> None:
    """An agent that fails to start logs, then exits at once: the line must
    not stay in the writer's queue."""
    read_end, write_end = os.pipe()
    handler = attach(logger, write_end)
    logger.warning("last words")
    handler.finish()
    os.close(write_end)
    assert read_all(read_end) == b"test.logwriter last words\n"
    os.close(read_end)


@dataclass
class FullDisk:
    handler: LineHandler
    errors: list[OSError]  # what on_error heard
    filler: Path  # remove it to make room
    log: Path  # the file the handler writes


@contextlib.contextmanager
def logging_to_a_full_disk(
    logger: logging.Logger, tmp_path: Path, room: int = 0
) -> Iterator[FullDisk]:
    """``logger`` logging through a LineHandler into a file of a 64 KiB
    tmpfs filled up but for about ``room`` bytes."""
    with tmpfs(tmp_path / "small", "size=64k") as small:
        filler = small / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as f:
            while True:
                f.write(b"x" * 4096)
                f.flush()
        os.truncate(filler, max(0, filler.stat().st_size - room))
        log = small / "stderr.log"
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        errors: list[OSError] = []
        handler = LineHandler(fd, on_error=errors.append)
        handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
        logger.addHandler(handler)
        try:
            yield FullDisk(handler, errors, filler, log)
        finally:
            os.close(fd)


def test_a_full_disk_drops_lines_until_there_is_room_again(
    logger: logging.Logger, tmp_path: Path
) -> None:
    """stderr to a file on a full disk: the lines that could not be written
    are counted, and said once there is room. One ENOSPC silenced stderr
    for the rest of the agent's life."""
    with logging_to_a_full_disk(logger, tmp_path, room=4096) as disk:
        for i in range(200):
            logger.info("lost %03d %s", i, "x" * 60)
        deadline = time.monotonic() + 10
        while not disk.errors:
            assert time.monotonic() < deadline, "no write failed"
            time.sleep(0.01)
        disk.filler.unlink()
        logger.info("after the disk had room again")
        disk.handler.finish(10)
        text = disk.log.read_text()
    assert [exc.errno for exc in disk.errors] == [errno.ENOSPC]  # said once per spell
    assert "test.logwriter after the disk had room again" in text
    dropped = re.findall(r"tether\.log (\d+) log lines dropped: No space left on device", text)
    assert dropped and not disk.handler.reader_gone
    written = len(re.findall(r"^test\.logwriter lost", text, re.M))
    assert written + sum(map(int, dropped)) >= 200


def test_lines_dropped_while_the_disk_stays_full_are_all_counted(
    logger: logging.Logger, tmp_path: Path
) -> None:
    """Ten lines lost, then the note that says so fails too, for seconds:
    once there is room, the note still says ten. The failed note counted as
    one line, so it said 1."""
    with logging_to_a_full_disk(logger, tmp_path) as disk:
        for i in range(10):
            logger.info("lost %d", i)
        time.sleep(2.5)  # the first write and two retries of the note fail
        assert disk.errors
        disk.filler.unlink()
        logger.info("after")
        disk.handler.finish(10)
        text = disk.log.read_text()
    assert "tether.log 10 log lines dropped: No space left on device\n" in text, text
    assert text.endswith("test.logwriter after\n")


def test_a_writer_that_cannot_write_ends_once_closed() -> None:
    """/dev/full and close(): the writer gives up at its next failure. It
    retried for ever, at full speed (its retry pause was skipped once
    closing), holding the descriptor."""
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        handler = LineHandler(fd)
        handler.put_line("never written")
        assert handler.finish(5), "the writer was still at it"
    finally:
        os.close(fd)


def test_an_audit_log_closed_writes_nothing_into_the_next_file(tmp_path: Path) -> None:
    """The audit file closed while its writer still failed: its number went
    to the next file opened, which got the audit's records."""
    audit = AuditLog("/dev/full")
    audit.record("connect", peer="x")
    audit.close()
    victim = tmp_path / "victim"
    fd = os.open(victim, os.O_WRONLY | os.O_CREAT, 0o600)
    time.sleep(0.5)
    os.close(fd)
    assert victim.read_bytes() == b""

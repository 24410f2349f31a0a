"""File transfer against the real agent: get, put, trees, resume, confinement, failures.

Every test talks to a real ``tether serve`` child process (the ``agent``
fixture) through the public API, and compares what arrived byte for byte.
Failures are provoked for real: a proxy that flips one bit in transit,
read-only and tiny tmpfs mounts, files changed while they are sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import itertools
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import blake3
import pytest

import tether
from conftest import Agent, check_clean_log, snapshot, start_agent, tmpfs
from tether.asyncio.fileio import CHUNK_SIZE, partial_path

MiB = 1024 * 1024
OLD_MTIME_NS = 1_234_567_890_123_456_789  # 2009, with nanoseconds that must survive
OTHER_MTIME_NS = 1_111_111_111_987_654_321
BIG = 300 * 1000 * 1000  # the 300 MB file
LARGE = 200 * MiB  # long enough to interrupt or modify mid-transfer
ROUNDS = 6  # of a test that a race does not happen

ProgressCall = tuple[str, int, int]


# Helpers ------------------------------------------------------------------------------


def connect(
    agent: Agent, port: int | None = None
) -> contextlib.AbstractAsyncContextManager[tether.Connection]:
    """A connection to ``agent``, or through a relay on ``port`` to it.

    Through a relay the client pins the agent's own certificate (the relay
    only forwards bytes), not whatever an earlier relay on that port was.
    """
    if port is None:
        return tether.connect(agent.host, token=agent.token, insecure_plaintext=not agent.tls)
    if not agent.tls:
        return tether.connect(f"127.0.0.1:{port}", token=agent.token, insecure_plaintext=True)
    return tether.connect(f"127.0.0.1:{port}", token=agent.token, fingerprint=agent.fingerprint)


def write_random(path: Path, size: int, block: int = 4 * MiB) -> None:
    """``size`` random bytes at ``path``, written in blocks (never all in memory)."""
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(block, left)
            f.write(os.urandom(n))
            left -= n


def digests(path: Path | str) -> tuple[str, str]:
    """(sha256, blake3) of a file, read in blocks."""
    sha, b3 = hashlib.sha256(), blake3.blake3()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            sha.update(block)
            b3.update(block)
    return sha.hexdigest(), b3.hexdigest()


def b3(data: bytes) -> str:
    digest: str = blake3.blake3(data).hexdigest()
    return digest


def partials(*tops: Path) -> list[str]:
    """Every hidden partial file (``.NAME.tether-part``) under ``tops``."""
    found = []
    for top in tops:
        for dirpath, _dirs, files in os.walk(top):
            found += [os.path.join(dirpath, f) for f in files if f.endswith(".tether-part")]
    return found


def assert_meta(path: Path, mode: int, mtime_ns: int) -> None:
    st = os.lstat(path)
    assert stat.S_IMODE(st.st_mode) == mode, f"{path}: mode {oct(st.st_mode)}"
    assert st.st_mtime_ns == mtime_ns, f"{path}: mtime {st.st_mtime_ns} != {mtime_ns}"


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)


async def eventually(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Poll ``predicate`` (bounded in time), letting the event loop run meanwhile.

    The loop must run: a closed connection only ends once its buffered
    bytes are flushed.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


def unlocked(path: str) -> bool:
    """Whether nobody holds the flock on ``path`` (the agent has let go of a partial)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


class BitFlipProxy:
    """A TCP relay to the agent that flips one bit at a stream offset.

    ``up`` is the client->agent direction, ``down`` agent->client; the
    offset counts bytes of that direction's stream from the connection's start.
    """

    def __init__(self, target_port: int, *, up: int | None = None, down: int | None = None):
        self.target_port = target_port
        self.offsets = {"up": up, "down": down}
        self.flipped: list[str] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> BitFlipProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            await asyncio.gather(
                self._pump(reader, up_writer, "up"),
                self._pump(up_reader, writer, "down"),
                return_exceptions=True,
            )
            up_writer.close()
        finally:
            writer.close()
            self.tasks.discard(task)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str
    ) -> None:
        flip_at = self.offsets[direction]
        seen = 0
        try:
            while data := await src.read(256 * 1024):
                if flip_at is not None and seen <= flip_at < seen + len(data):
                    changed = bytearray(data)
                    changed[flip_at - seen] ^= 0x10
                    data = bytes(changed)
                    self.flipped.append(direction)
                seen += len(data)
                dst.write(data)
                await dst.drain()
        finally:
            dst.close()


# 1. Files of every interesting size, both ways -----------------------------------------

SIZES = [0, 1, CHUNK_SIZE, CHUNK_SIZE + 1, 5 * MiB + 123]


@pytest.mark.parametrize("size", SIZES, ids=lambda n: f"{n}B")
async def test_put_and_get_byte_exact_with_mode_and_mtime(
    agent: Agent, tmp_path: Path, size: int
) -> None:
    data = os.urandom(size)
    local = tmp_path / "local.bin"
    local.write_bytes(data)
    os.chmod(local, 0o640)
    os.utime(local, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    remote = agent.root / "remote.bin"

    async with connect(agent) as conn:
        put = await conn.put(local, "remote.bin")
        assert remote.read_bytes() == data
        assert_meta(remote, 0o640, OLD_MTIME_NS)
        assert put.digest == b3(data)
        assert (put.size, put.sent, put.resumed_from, put.restarted) == (size, size, 0, False)
        assert put.path == "remote.bin"

        # The other way: a different mode and mtime set on the agent's side.
        os.chmod(remote, 0o604)
        os.utime(remote, ns=(OTHER_MTIME_NS, OTHER_MTIME_NS))
        back = tmp_path / "back.bin"
        got = await conn.get("remote.bin", back)
        assert back.read_bytes() == data
        assert_meta(back, 0o604, OTHER_MTIME_NS)
        assert got.digest == b3(data)
        assert (got.size, got.sent, got.resumed_from, got.restarted) == (size, size, 0, False)

        st = await conn.stat("remote.bin")
        assert (st.type, st.size, st.mode, st.mtime_ns) == ("file", size, 0o604, OTHER_MTIME_NS)
    assert partials(tmp_path) == []


async def test_put_replaces_an_existing_file(agent: Agent, tmp_path: Path) -> None:
    (agent.root / "f").write_bytes(b"old content that is longer than the new one" * 1000)
    local = tmp_path / "f"
    local.write_bytes(b"new")
    async with connect(agent) as conn:
        await conn.put(local, "f")
        assert (agent.root / "f").read_bytes() == b"new"
        (agent.root / "f").write_bytes(b"changed remotely")
        await conn.get("f", local)
    assert local.read_bytes() == b"changed remotely"
    assert partials(tmp_path) == []


# 2. 300 MB both ways ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_300_mb_put_and_get(agent: Agent, tmp_path: Path) -> None:
    local = tmp_path / "big.bin"
    write_random(local, BIG)
    expected = digests(local)
    async with connect(agent) as conn:
        put = await conn.put(local, "big.bin")
        assert put.size == put.sent == BIG
        assert put.digest == expected[1]
        assert digests(agent.root / "big.bin") == expected
        back = tmp_path / "back.bin"
        got = await conn.get("big.bin", back)
        assert got.size == got.sent == BIG
        assert got.digest == expected[1]
    assert digests(back) == expected
    assert partials(tmp_path) == []


# 3. Progress --------------------------------------------------------------------------


def check_progress(calls: list[ProgressCall], size: int) -> None:
    assert calls, "progress was never called"
    assert len({path for path, _, _ in calls}) == 1
    assert all(total == size for _, _, total in calls)
    done = [d for _, d, _ in calls]
    backwards = [(a, b) for a, b in itertools.pairwise(done) if a >= b]
    assert backwards == [], f"done values not increasing: {backwards} in {done}"
    assert all(0 <= d <= size for d in done)
    assert done[-1] == size
    assert done.count(size) == 1
    assert len(calls) >= size / MiB - 1


async def test_idle_connections_keep_no_data_buffers_after_transfers(tmp_path: Path) -> None:
    """Both ends reuse the megabyte buffers of received data frames during a
    transfer; once it is over, neither keeps them: an idle connection (held open
    by keepalives, maybe for days) holds no data buffers on either end."""
    root = tmp_path / "root"
    root.mkdir()
    socket_path = tmp_path / "agent.sock"
    server = tether.Server(
        tether.ServerConfig(
            token="t0ken", tcp=False, udp=False, unix_path=str(socket_path), root=root
        )
    )
    await server.start()
    try:
        local = tmp_path / "local.bin"
        write_random(local, 5 * MiB)
        async with tether.connect(f"unix:{socket_path}", token="t0ken") as conn:
            await conn.put(local, "remote.bin")
            (agent_side,) = server.connections
            assert agent_side.protocol._decoder._spare is None
            await conn.get("remote.bin", tmp_path / "back.bin")
            assert conn._wire.protocol._decoder._spare is None
            assert await conn.echo(b"still open") == b"still open"
        assert digests(tmp_path / "back.bin") == digests(local)
    finally:
        await server.close()


@pytest.mark.parametrize("size", [33 * MiB + 7, 3 * MiB])
async def test_progress_per_mib_and_once_at_the_end(
    agent: Agent, tmp_path: Path, size: int
) -> None:
    local = tmp_path / "p.bin"
    write_random(local, size)
    put_calls: list[ProgressCall] = []
    get_calls: list[ProgressCall] = []
    async with connect(agent) as conn:
        await conn.put(local, "p.bin", progress=lambda *a: put_calls.append(a))
        await conn.get("p.bin", tmp_path / "q.bin", progress=lambda *a: get_calls.append(a))
    check_progress(put_calls, size)
    check_progress(get_calls, size)
    assert digests(tmp_path / "q.bin") == digests(local)


async def test_progress_of_an_empty_file_is_one_call(agent: Agent, tmp_path: Path) -> None:
    local = tmp_path / "empty"
    local.write_bytes(b"")
    put_calls: list[ProgressCall] = []
    get_calls: list[ProgressCall] = []
    async with connect(agent) as conn:
        await conn.put(local, "empty", progress=lambda *a: put_calls.append(a))
        await conn.get("empty", tmp_path / "back", progress=lambda *a: get_calls.append(a))
    assert [(d, t) for _, d, t in put_calls] == [(0, 0)]
    assert [(d, t) for _, d, t in get_calls] == [(0, 0)]
    assert (tmp_path / "back").read_bytes() == b""


# 4. Trees -----------------------------------------------------------------------------


def build_tree(top: Path, outside: Path) -> None:
    """Every case of issue item 6, with bytes paths where names are not UTF-8."""
    top.mkdir()
    (top / "hello.txt").write_text("hello\n")
    (top / "empty.bin").write_bytes(b"")
    (top / ".hidden").write_bytes(b"dot file")
    (top / "with space.txt").write_bytes(b"spaces in the name")
    (top / "é.txt").write_bytes("accent é".encode())
    (top / "中文").mkdir()
    (top / "中文" / "文件 名.txt").write_bytes("中文内容".encode())
    (top / "sub" / "deeper").mkdir(parents=True)
    (top / "sub" / "file.txt").write_bytes(b"in sub")
    (top / "sub" / "deeper" / "nested.bin").write_bytes(os.urandom(CHUNK_SIZE + 5))
    (top / "emptydir").mkdir()
    (top / "emptydir2" / "emptier").mkdir(parents=True)
    (top / "secret.txt").write_bytes(b"private")
    os.chmod(top / "secret.txt", 0o600)
    (top / "script.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(top / "script.sh", 0o751)
    top_b = os.fsencode(top)
    with open(top_b + b"/bad\xffname", "wb") as f:  # not valid UTF-8
        f.write(b"undecodable name")
    os.mkdir(top_b + b"/dir\xfe")
    with open(top_b + b"/dir\xfe/inner\xfd.txt", "wb") as f:
        f.write(b"undecodable dir")
    os.symlink("sub/file.txt", top / "link_rel")
    os.symlink("sub", top / "link_dir")
    os.symlink("/etc/passwd", top / "link_abs")
    os.symlink(str(outside), top / "link_out")
    os.symlink("no/such/target", top / "dangling")
    (top / "readonly").mkdir()
    (top / "readonly" / "ro.txt").write_bytes(b"read only")
    os.chmod(top / "readonly" / "ro.txt", 0o444)
    # Modes and mtimes last, deepest first, so nothing touches them afterwards.
    stamp = OLD_MTIME_NS
    for dirpath, dirnames, filenames in os.walk(top_b, topdown=False):
        for name in filenames + dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path) and not os.path.isdir(path):
                stamp += 1_000_000_007
                os.utime(path, ns=(stamp, stamp))
        if dirpath == top_b + b"/readonly":
            os.chmod(dirpath, 0o555)
        elif dirpath == top_b:
            os.chmod(dirpath, 0o750)
        else:
            os.chmod(dirpath, 0o711 if dirpath.endswith(b"deeper") else 0o755)
        stamp += 1_000_000_007
        os.utime(dirpath, ns=(stamp, stamp))


def tree_files(snap: dict[bytes, tuple[object, ...]]) -> int:
    return sum(1 for entry in snap.values() if entry[0] == "file")


async def test_tree_round_trip_reproduces_everything(agent: Agent, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "treasure").write_bytes(b"must never be copied")
    outside_before = snapshot(outside)
    src = tmp_path / "src"
    build_tree(src, outside)
    expected = snapshot(src)
    # The helper itself must see what the tree is made of.
    assert expected[b"./readonly"][1] == 0o555
    assert expected[b"./secret.txt"][1] == 0o600
    assert expected[b"./link_out"] == ("link", os.fsencode(outside))
    assert b"./bad\xffname" in expected and b"./dir\xfe/inner\xfd.txt" in expected

    async with connect(agent) as conn:
        put_results = await conn.put_tree(src, "tree")
        assert snapshot(agent.root / "tree") == expected
        assert len(put_results) == tree_files(expected)
        for result in put_results:
            assert result.digest == digests(agent.root / result.path)[1]

        listing = {e.name: e for e in await conn.listdir("tree")}
        assert set(listing) == set(os.listdir(src))
        assert listing["bad\udcffname"].type == "file"
        assert listing["link_out"].type == "link"
        assert listing["link_out"].target == str(outside)
        assert listing["readonly"].mode == 0o555
        st = await conn.stat("tree/bad\udcffname")
        assert (st.type, st.size) == ("file", len(b"undecodable name"))

        back = tmp_path / "back"
        get_results = await conn.get_tree("tree", back)
        assert len(get_results) == tree_files(expected)

    assert snapshot(back) == expected
    for copy in (agent.root / "tree", back):
        assert os.path.islink(copy / "link_out")
        assert os.readlink(copy / "link_abs") == "/etc/passwd"
        assert os.readlink(copy / "link_dir") == "sub"
        assert os.path.islink(copy / "dangling")
        assert not os.path.exists(copy / "treasure")
    assert snapshot(outside) == outside_before
    assert partials(tmp_path, agent.root) == []


async def test_get_tree_does_not_follow_links_out_of_the_root(agent: Agent, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "treasure").write_bytes(b"outside the root")
    tree = agent.root / "t"
    tree.mkdir()
    (tree / "file").write_bytes(b"inside")
    os.symlink(str(outside), tree / "escape")
    os.symlink("../../../outside/deep", tree / "relative_escape")
    async with connect(agent) as conn:
        await conn.get_tree("t", tmp_path / "copy")
        for remote in ("t/escape", "t/relative_escape"):
            with pytest.raises(tether.RemoteError) as info:
                await conn.listdir(remote)
            assert info.value.code == "path_outside_root"
    assert os.readlink(tmp_path / "copy" / "escape") == str(outside)
    assert os.readlink(tmp_path / "copy" / "relative_escape") == "../../../outside/deep"
    assert sorted(os.listdir(tmp_path / "copy")) == ["escape", "file", "relative_escape"]
    assert os.listdir(outside / "deep") == ["treasure"]


async def test_failed_get_tree_is_clear_and_creates_nothing(agent: Agent, tmp_path: Path) -> None:
    """A get_tree that cannot start fails with the agent's error and makes no local dir."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (agent.root / "file").write_bytes(b"not a directory")
    os.symlink(str(outside), agent.root / "escape")
    async with connect(agent) as conn:
        cases = [("file", "not_a_directory"), ("missing", "not_found")]
        cases += [("escape", "path_outside_root"), ("../x", "path_outside_root")]
        for remote, code in cases:
            with pytest.raises(tether.RemoteError) as info:
                await conn.get_tree(remote, tmp_path / "copy")
            assert info.value.code == code
            assert not (tmp_path / "copy").exists(), f"get_tree {remote!r} left a directory"
    assert os.listdir(outside) == []


async def test_failed_put_tree_is_clear_and_creates_nothing(agent: Agent, tmp_path: Path) -> None:
    """A put_tree of something that is not a local directory: a TransferError, no remote dir."""
    (tmp_path / "local_file").write_bytes(b"not a directory")
    async with connect(agent) as conn:
        for local, code in [("local_file", "not_a_directory"), ("missing", "not_found")]:
            with pytest.raises(tether.TransferError) as info:
                await conn.put_tree(tmp_path / local, "copy")
            assert info.value.code == code
            assert not (agent.root / "copy").exists(), f"put_tree {local!r} left a directory"
    assert os.listdir(agent.root) == []


async def test_put_tree_goes_past_entries_the_agent_refuses(agent: Agent, tmp_path: Path) -> None:
    """As scp: entries that fail each for a reason of their own do not stop the
    rest of the tree; TreeCopyError names them all at the end, with the results
    of what was copied, and every directory still gets its mode."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "a").write_bytes(b"a")  # sorted first, copied before the failures
    (src / "d" / "f").write_bytes(b"in d")
    (src / "e").write_bytes(b"e")
    (src / "z").write_bytes(b"after them")
    (src / "d").chmod(0o750)
    dest = agent.root / "copy"
    (dest / "e" / "inner").mkdir(parents=True)  # a file's destination is a directory
    (dest / "d").write_bytes(b"a file where the tree has a directory")
    async with connect(agent) as conn:
        with pytest.raises(tether.TreeCopyError) as info:
            await conn.put_tree(src, "copy")
    error = info.value
    assert [(f.code, str(f)) for f in error.failures] == [
        ("not_a_directory", "copy/d: exists and is not a directory"),
        ("is_a_directory", "copy/e: is a directory"),
    ]
    assert error.code == "not_a_directory"
    assert str(error) == "copy/d: exists and is not a directory (and 1 more)"
    assert isinstance(error, tether.TransferError)
    assert [r.path for r in error.results] == ["copy/a", "copy/z"]
    assert (dest / "a").read_bytes() == b"a" and (dest / "z").read_bytes() == b"after them"
    assert stat.S_IMODE(os.stat(dest).st_mode) == stat.S_IMODE(os.stat(src).st_mode)
    assert partials(agent.root) == []


async def test_a_full_disk_ends_a_tree_copy_at_once(agent: Agent, tmp_path: Path) -> None:
    """No space left would fail every later file too: the copy stops there with
    that error, not a TreeCopyError after trying them all."""
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "a-big", 2 * MiB)
    (src / "b-small").write_bytes(b"would fit")
    with tmpfs(agent.root / "small", "size=1m"):
        async with connect(agent) as conn:
            with pytest.raises(tether.RemoteError) as info:
                await conn.put_tree(src, "small/copy")
        assert not isinstance(info.value, tether.TreeCopyError)
        assert info.value.code == "no_space"
        # Nothing half made: a small file in flight beside it may have landed.
        assert set(os.listdir(agent.root / "small" / "copy")) <= {"b-small"}
        # After an entry that failed on its own, the error that ends the copy
        # comes with it: the earlier failure is not lost.
        (src / "0-first").write_bytes(b"its destination is a directory")
        (agent.root / "small" / "copy2" / "0-first" / "inner").mkdir(parents=True)
        async with connect(agent) as conn:
            with pytest.raises(tether.TreeCopyError) as stopped:
                await conn.put_tree(src, "small/copy2")
    error = stopped.value
    assert [f.code for f in error.failures] == ["is_a_directory", "no_space"]
    assert error.stopped_by is error.failures[-1]
    assert error.code == "no_space"
    assert str(error) == f"{error.stopped_by} (and 1 more)"
    assert [r.path for r in error.results] in ([], ["small/copy2/b-small"])


async def test_a_file_too_large_for_the_agent_fails_alone(tmp_path: Path) -> None:
    """A file over a limit of one file (EFBIG: a file-size rlimit here, as a
    FAT file system's 4 GiB) fails that file, io_error; the tree goes on."""
    agent = start_agent(tmp_path, launcher=["prlimit", f"--fsize={MiB}", "--"])
    try:
        src = tmp_path / "src"
        src.mkdir()
        write_random(src / "a-big", 2 * MiB)
        (src / "b-small").write_bytes(b"fits")
        async with connect(agent) as conn:
            with pytest.raises(tether.TreeCopyError) as info:
                await conn.put_tree(src, "copy")
    finally:
        agent.stop()
    check_clean_log(agent)
    assert [(f.code, f.message) for f in info.value.failures] == [
        ("io_error", "copy/a-big: File too large")
    ]
    assert info.value.stopped_by is None
    assert (agent.root / "copy" / "b-small").read_bytes() == b"fits"
    assert partials(agent.root) == []


async def test_a_failed_put_in_a_tree_is_cleaned_up_before_the_tree_goes_on(
    agent: Agent, tmp_path: Path
) -> None:
    """A file that changes while it is sent fails; the agent removes its
    partial file, which changes the directory's mtime. The copy waits for the
    agent to confirm the cancel before it gives the directory its own mtime
    (it could come after, leaving the directory with today's mtime)."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    write_random(src / "d" / "changing", 32 * MiB)
    for path in (src / "d", src):
        os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))

    def change_it(path: str, done: int, total: int) -> None:
        # Found when the whole file has been sent: the agent may still be
        # writing its end, and its cleanup waits for that write (the window).
        if done < total:
            os.utime(src / "d" / "changing", ns=(OTHER_MTIME_NS, OTHER_MTIME_NS))

    async with connect(agent) as conn:
        for attempt in range(ROUNDS):  # a race: a few rounds to see it lost
            with pytest.raises(tether.TreeCopyError) as info:
                await conn.put_tree(src, f"copy{attempt}", progress=change_it)
            assert [f.code for f in info.value.failures] == ["source_changed"]
            # Checked at once: the agent must have finished with the put by now.
            assert partials(agent.root) == [], attempt
            assert os.stat(agent.root / f"copy{attempt}" / "d").st_mtime_ns == OLD_MTIME_NS
            os.utime(src / "d" / "changing", ns=(OLD_MTIME_NS, OLD_MTIME_NS))


# 5 and 6. Integrity: one flipped bit in transit, the old destination kept --------------

FLIP_AT = 200_000 + 4321  # stream offset of the flipped bit: well inside the file's data


@pytest.fixture
def plain_agent(tmp_path: Path) -> Iterator[Agent]:
    """An agent on plain TCP: a flipped bit reaches tether's own checksum, not
    TLS's record MAC, which would catch it first (see the TLS tests below)."""
    a = start_agent(tmp_path, "--insecure-plaintext", name="plain")
    try:
        assert not a.tls, a.addresses
        yield a
    finally:
        a.stop()
        check_clean_log(a)


@pytest.fixture(params=["tls", "plaintext"])
def any_agent(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Agent]:
    """The default TLS agent, then a plain TCP one."""
    args = ["--insecure-plaintext"] if request.param == "plaintext" else []
    a = start_agent(tmp_path, *args, name=request.param)
    try:
        assert a.tls == (request.param == "tls"), a.addresses
        yield a
    finally:
        a.stop()
        check_clean_log(a)


def assert_untouched(dest: Path, existing: bool) -> None:
    """A failed transfer left ``dest`` as it was: its previous content, or absent."""
    if existing:
        assert dest.read_bytes() == b"previous content"
    else:
        assert not dest.exists()


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
async def test_bit_flip_during_put_is_checksum_mismatch(
    plain_agent: Agent, tmp_path: Path, existing: bool
) -> None:
    agent = plain_agent
    local = tmp_path / "src.bin"
    write_random(local, 3 * MiB)
    dest = agent.root / "dest.bin"
    if existing:
        dest.write_bytes(b"previous content")
    async with BitFlipProxy(agent.port, up=FLIP_AT) as proxy:
        async with connect(agent, proxy.port) as conn:
            with pytest.raises(tether.RemoteError) as info:
                await conn.put(local, "dest.bin")
            assert info.value.code == "checksum_mismatch"
            assert await conn.echo("still usable") == "still usable"
        assert proxy.flipped == ["up"]
    assert_untouched(dest, existing)
    assert partials(agent.root) == []
    assert sorted(os.listdir(agent.root)) == (["dest.bin"] if existing else [])


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
async def test_bit_flip_during_get_is_checksum_mismatch(
    plain_agent: Agent, tmp_path: Path, existing: bool
) -> None:
    agent = plain_agent
    write_random(agent.root / "src.bin", 3 * MiB)
    local_dir = tmp_path / "local"
    local_dir.mkdir()
    dest = local_dir / "dest.bin"
    if existing:
        dest.write_bytes(b"previous content")
    async with BitFlipProxy(agent.port, down=FLIP_AT) as proxy:
        async with connect(agent, proxy.port) as conn:
            with pytest.raises(tether.TransferError) as info:
                await conn.get("src.bin", dest)
            assert info.value.code == "checksum_mismatch"
            assert await conn.echo("still usable") == "still usable"
        assert proxy.flipped == ["down"]
    assert_untouched(dest, existing)
    assert os.listdir(local_dir) == (["dest.bin"] if existing else [])


def assert_only_true_prefixes(found: list[str], source: bytes) -> None:
    """Every partial file left behind holds a prefix of ``source``, short of the
    flipped bit: TLS let no corrupted byte through to the disk."""
    for path in found:
        data = Path(path).read_bytes()
        assert len(data) <= FLIP_AT, (path, len(data))
        assert data == source[: len(data)], path


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
async def test_bit_flip_inside_tls_during_put_fails_and_writes_nothing(
    agent: Agent, tmp_path: Path, existing: bool
) -> None:
    """Over TLS a flipped bit breaks a record's MAC: the agent drops the
    connection before the bit reaches a file, and the transfer fails."""
    assert agent.tls
    local = tmp_path / "src.bin"
    write_random(local, 3 * MiB)
    dest = agent.root / "dest.bin"
    if existing:
        dest.write_bytes(b"previous content")
    async with BitFlipProxy(agent.port, up=FLIP_AT) as proxy:
        async with connect(agent, proxy.port) as conn:
            # Not checksum_mismatch: the connection is gone before tether's own check.
            with pytest.raises(tether.ConnectionClosed):
                await conn.put(local, "dest.bin")
        assert proxy.flipped == ["up"]
    assert_untouched(dest, existing)
    assert_only_true_prefixes(partials(agent.root), local.read_bytes())
    async with connect(agent) as conn:  # the agent goes on serving
        assert await conn.echo("after the flip") == "after the flip"


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
async def test_bit_flip_inside_tls_during_get_fails_and_writes_nothing(
    agent: Agent, tmp_path: Path, existing: bool
) -> None:
    assert agent.tls
    write_random(agent.root / "src.bin", 3 * MiB)
    local_dir = tmp_path / "local"
    local_dir.mkdir()
    dest = local_dir / "dest.bin"
    if existing:
        dest.write_bytes(b"previous content")
    async with BitFlipProxy(agent.port, down=FLIP_AT) as proxy:
        async with connect(agent, proxy.port) as conn:
            with pytest.raises(tether.ConnectionClosed) as info:
                await conn.get("src.bin", dest)
            assert "bad record mac" in str(info.value).lower(), info.value  # TLS caught it
        assert proxy.flipped == ["down"]
    assert_untouched(dest, existing)
    left = [name for name in os.listdir(local_dir) if name != "dest.bin"]
    assert_only_true_prefixes(
        [str(local_dir / name) for name in left], (agent.root / "src.bin").read_bytes()
    )
    assert all(name.endswith(".tether-part") for name in left), left
    async with connect(agent) as conn:
        assert await conn.echo("after the flip") == "after the flip"


async def test_proxy_without_a_flip_delivers_intact(any_agent: Agent, tmp_path: Path) -> None:
    """The control for the tests above: the relay itself corrupts nothing."""
    agent = any_agent
    local = tmp_path / "src.bin"
    write_random(local, 3 * MiB)
    async with BitFlipProxy(agent.port) as proxy, connect(agent, proxy.port) as conn:
        await conn.put(local, "dest.bin")
        await conn.get("dest.bin", tmp_path / "back.bin")
    assert proxy.flipped == []
    assert digests(agent.root / "dest.bin") == digests(local) == digests(tmp_path / "back.bin")


async def test_failed_put_leaves_old_destination_and_no_partial(
    agent: Agent, tmp_path: Path
) -> None:
    """The source shrinks mid-put: source_changed; the agent keeps the old file."""
    local = tmp_path / "shrinks.bin"
    write_random(local, 8 * MiB)
    dest = agent.root / "dest.bin"
    dest.write_bytes(b"old and intact")

    def shrink(path: str, done: int, total: int) -> None:
        if done > 0:
            os.truncate(local, 0)

    async with connect(agent) as conn:
        with pytest.raises(tether.TransferError) as info:
            await conn.put(local, "dest.bin", progress=shrink)
        assert info.value.code == "source_changed"
        assert await eventually(lambda: partials(agent.root) == [])
        assert await conn.echo("ok") == "ok"
    assert dest.read_bytes() == b"old and intact"
    assert os.listdir(agent.root) == ["dest.bin"]


async def test_failed_get_leaves_old_destination_and_no_partial(
    agent: Agent, tmp_path: Path
) -> None:
    """The agent's file grows mid-get: source_changed; the local file is kept."""
    source = agent.root / "grows.bin"
    write_random(source, 64 * MiB)  # more than every buffer between the two ends
    dest = tmp_path / "local" / "dest.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"old and intact")

    def grow(path: str, done: int, total: int) -> None:
        with open(source, "ab") as f:
            f.write(b"more")

    async with connect(agent) as conn:
        with pytest.raises(tether.RemoteError) as info:
            await conn.get("grows.bin", dest, progress=grow)
        assert info.value.code == "source_changed"
        assert await conn.echo("ok") == "ok"
    assert dest.read_bytes() == b"old and intact"
    assert os.listdir(dest.parent) == ["dest.bin"]


# 7. Resume ----------------------------------------------------------------------------

RESUME_SIZE = 3 * MiB + 4321
PARTIAL_SIZES = [0, 1, 1024, MiB, RESUME_SIZE - 1, RESUME_SIZE]


@pytest.mark.parametrize("have", PARTIAL_SIZES)
async def test_get_resume_sends_only_the_missing_bytes(
    agent: Agent, tmp_path: Path, have: int
) -> None:
    data = os.urandom(RESUME_SIZE)
    (agent.root / "src.bin").write_bytes(data)
    dest = tmp_path / "dest.bin"
    Path(partial_path(str(dest))).write_bytes(data[:have])
    calls: list[ProgressCall] = []
    async with connect(agent) as conn:
        result = await conn.get("src.bin", dest, resume=True, progress=lambda *a: calls.append(a))
    assert result.resumed_from == have
    assert result.sent == RESUME_SIZE - have
    assert result.restarted is False
    assert result.digest == b3(data)
    assert dest.read_bytes() == data
    assert partials(tmp_path) == []
    assert calls[-1][1:] == (RESUME_SIZE, RESUME_SIZE)


@pytest.mark.parametrize("have", PARTIAL_SIZES)
async def test_put_resume_sends_only_the_missing_bytes(
    agent: Agent, tmp_path: Path, have: int
) -> None:
    data = os.urandom(RESUME_SIZE)
    local = tmp_path / "src.bin"
    local.write_bytes(data)
    dest = agent.root / "dest.bin"
    Path(partial_path(str(dest))).write_bytes(data[:have])
    async with connect(agent) as conn:
        result = await conn.put(local, "dest.bin", resume=True)
    assert result.resumed_from == have
    assert result.sent == RESUME_SIZE - have
    assert result.restarted is False
    assert result.digest == b3(data)
    assert dest.read_bytes() == data
    assert partials(agent.root) == []


def stale_prefix(data: bytes, have: int) -> bytes:
    """``have`` bytes that are not the source's prefix (the source changed since)."""
    stale = bytearray(data[:have])
    stale[have // 2] ^= 0xFF
    return bytes(stale)


@pytest.mark.parametrize("have", [1, MiB + 17, RESUME_SIZE])
async def test_get_resume_restarts_when_the_source_changed(
    agent: Agent, tmp_path: Path, have: int
) -> None:
    data = os.urandom(RESUME_SIZE)
    (agent.root / "src.bin").write_bytes(data)
    dest = tmp_path / "dest.bin"
    Path(partial_path(str(dest))).write_bytes(stale_prefix(data, have))
    async with connect(agent) as conn:
        result = await conn.get("src.bin", dest, resume=True)
    assert (result.restarted, result.resumed_from, result.sent) == (True, 0, RESUME_SIZE)
    assert dest.read_bytes() == data
    assert partials(tmp_path) == []


@pytest.mark.parametrize("have", [1, MiB + 17, RESUME_SIZE])
async def test_put_resume_restarts_when_the_source_changed(
    agent: Agent, tmp_path: Path, have: int
) -> None:
    data = os.urandom(RESUME_SIZE)
    local = tmp_path / "src.bin"
    local.write_bytes(data)
    dest = agent.root / "dest.bin"
    Path(partial_path(str(dest))).write_bytes(stale_prefix(data, have))
    async with connect(agent) as conn:
        result = await conn.put(local, "dest.bin", resume=True)
    assert (result.restarted, result.resumed_from, result.sent) == (True, 0, RESUME_SIZE)
    assert dest.read_bytes() == data
    assert partials(agent.root) == []


@pytest.mark.parametrize("direction", ["get", "put"])
async def test_partial_longer_than_the_source_starts_over(
    agent: Agent, tmp_path: Path, direction: str
) -> None:
    data = os.urandom(MiB + 3)
    (tmp_path / "src.bin").write_bytes(data)
    (agent.root / "src.bin").write_bytes(data)
    dest = (tmp_path if direction == "get" else agent.root) / "dest.bin"
    Path(partial_path(str(dest))).write_bytes(data + b"extra bytes beyond the end")
    async with connect(agent) as conn:
        if direction == "get":
            result = await conn.get("src.bin", dest, resume=True)
        else:
            result = await conn.put(tmp_path / "src.bin", "dest.bin", resume=True)
    assert (result.resumed_from, result.sent) == (0, len(data))
    assert dest.read_bytes() == data
    assert partials(tmp_path, agent.root) == []


@pytest.mark.parametrize("direction", ["get", "put"])
async def test_without_resume_a_stale_partial_is_overwritten(
    agent: Agent, tmp_path: Path, direction: str
) -> None:
    data = os.urandom(2 * MiB + 1)
    (tmp_path / "src.bin").write_bytes(data)
    (agent.root / "src.bin").write_bytes(data)
    dest = (tmp_path if direction == "get" else agent.root) / "dest.bin"
    Path(partial_path(str(dest))).write_bytes(data[:MiB])  # a valid prefix, not used
    async with connect(agent) as conn:
        if direction == "get":
            result = await conn.get("src.bin", dest)
        else:
            result = await conn.put(tmp_path / "src.bin", "dest.bin")
    assert (result.resumed_from, result.sent, result.restarted) == (0, len(data), False)
    assert dest.read_bytes() == data
    assert partials(tmp_path, agent.root) == []


# 8. Confinement -----------------------------------------------------------------------


@pytest.fixture
def escape_setup(agent: Agent, tmp_path: Path) -> Path:
    """An outside directory, and links inside the root that lead to it."""
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "passwd").write_bytes(b"outside secret")
    (agent.root / "a").mkdir()
    (agent.root / "a" / "inside.txt").write_bytes(b"inside")
    os.symlink(str(outside), agent.root / "linkout")
    os.symlink(str(outside / "passwd"), agent.root / "passlink")
    os.symlink("../../outside", agent.root / "rel_escape")  # tmp/agent/root -> tmp/outside
    os.symlink("a", agent.root / "inlink")
    sibling = agent.root.parent / (agent.root.name + "x")  # the prefix trick: .../rootx
    sibling.mkdir()
    (sibling / "file").write_bytes(b"beside the root")
    return outside


def escapes(agent: Agent, outside: Path) -> list[str]:
    sibling = str(agent.root) + "x"
    return [
        "..",
        "../x",
        "../root/a/inside.txt",
        "a/../../x",
        "a/../../root/a",
        "/",
        "/etc",
        "/etc/passwd",
        str(outside),
        str(outside / "passwd"),
        str(outside / "sub" / "new"),
        sibling,
        sibling + "/file",
        str(agent.root) + "/../x",
        "linkout/passwd",
        "linkout/sub",
        "linkout/sub/new",
        "rel_escape/passwd",
        "inlink/../../x",
    ]


OPS = ["stat", "listdir", "get", "put", "mkdir", "get_tree"]


async def attempt(conn: tether.Connection, op: str, path: str, local: Path, tmp: Path) -> object:
    """Run one file op on ``path``; gets land in ``tmp``, puts send ``local``."""
    if op == "stat":
        return await conn.stat(path)
    if op == "listdir":
        return await conn.listdir(path)
    if op == "get":
        return await conn.get(path, tmp / "got")
    if op == "put":
        return await conn.put(local, path)
    if op == "mkdir":
        await conn.mkdir(path)
        return None
    assert op == "get_tree"
    return await conn.get_tree(path, tmp / "gottree")


def outside_state(agent: Agent, tmp_path: Path, outside: Path) -> object:
    """Everything a refused request must leave alone, outside the root."""
    return (
        snapshot(outside),
        snapshot(agent.root.parent / (agent.root.name + "x")),
        sorted(os.listdir(agent.root.parent)),
        sorted(os.listdir(tmp_path)),
    )


async def test_every_escape_is_refused(agent: Agent, tmp_path: Path, escape_setup: Path) -> None:
    outside = escape_setup
    local = tmp_path / "payload"
    local.write_bytes(b"payload")
    before = outside_state(agent, tmp_path, outside)
    failures = []
    async with connect(agent) as conn:
        for path in escapes(agent, outside):
            for op in OPS:
                try:
                    await attempt(conn, op, path, local, tmp_path)
                except tether.RemoteError as exc:
                    if exc.code != "path_outside_root":
                        failures.append(f"{op} {path!r}: {exc.code}: {exc}")
                else:
                    failures.append(f"{op} {path!r}: succeeded")
    assert failures == []
    assert outside_state(agent, tmp_path, outside) == before
    assert (outside / "passwd").read_bytes() == b"outside secret"
    assert not (tmp_path / "got").exists() and not (tmp_path / "gottree").exists()
    assert partials(tmp_path) == []
    check_clean_log(agent)


async def test_links_inside_the_root_and_to_the_outside(
    agent: Agent, tmp_path: Path, escape_setup: Path
) -> None:
    """Links themselves may be looked at; what they lead to outside may not."""
    outside = escape_setup
    local = tmp_path / "payload"
    local.write_bytes(b"payload")
    async with connect(agent) as conn:
        st = await conn.stat("linkout")
        assert (st.type, st.target) == ("link", str(outside))
        assert [e.name for e in await conn.listdir("inlink")] == ["inside.txt"]
        await conn.get("inlink/inside.txt", tmp_path / "inside")
        assert (tmp_path / "inside").read_bytes() == b"inside"
        await conn.put(local, "inlink/new.txt")
        assert (agent.root / "a" / "new.txt").read_bytes() == b"payload"
        inside_abs = os.path.realpath(agent.root) + "/a/inside.txt"
        assert (await conn.stat(inside_abs)).size == len(b"inside")
        for path in ("linkout", "passlink"):
            with pytest.raises(tether.RemoteError) as info:
                await conn.get(path, tmp_path / "nothing")
            assert info.value.code == "path_outside_root"
            with pytest.raises(tether.RemoteError) as info:
                await conn.listdir(path)
            assert info.value.code == "path_outside_root"
        # A put onto a link may replace the link; it must never write through it.
        with contextlib.suppress(tether.RemoteError):
            await conn.put(local, "passlink")
    assert (outside / "passwd").read_bytes() == b"outside secret"
    assert sorted(os.listdir(outside)) == ["passwd", "sub"]
    assert os.listdir(outside / "sub") == []


@pytest.mark.parametrize("op", OPS[:-1])
async def test_nul_in_a_path_is_path_outside_root(agent: Agent, tmp_path: Path, op: str) -> None:
    """Issue item 7 lists NUL bytes among the escapes refused with path_outside_root."""
    local = tmp_path / "payload"
    local.write_bytes(b"payload")
    async with connect(agent) as conn:
        with pytest.raises(tether.RemoteError) as info:
            await attempt(conn, op, "a\0b", local, tmp_path)
        assert await conn.echo("ok") == "ok"
    assert info.value.code == "path_outside_root", info.value
    assert os.listdir(agent.root) == []


async def test_root_slash_allows_absolute_paths(tmp_path: Path) -> None:
    everywhere = start_agent(tmp_path, "--root", "/", name="everywhere")
    try:
        there = tmp_path / "elsewhere"
        there.mkdir()
        data = os.urandom(CHUNK_SIZE + 11)
        (there / "abs.bin").write_bytes(data)
        (tmp_path / "local.bin").write_bytes(data[::-1])
        async with connect(everywhere) as conn:
            assert (await conn.stat(str(there / "abs.bin"))).size == len(data)
            assert (await conn.stat("/etc/passwd")).type == "file"
            assert [e.name for e in await conn.listdir(str(there))] == ["abs.bin"]
            await conn.get(str(there / "abs.bin"), tmp_path / "got.bin")
            await conn.put(tmp_path / "local.bin", str(there / "put.bin"))
            await conn.mkdir(str(there / "newdir"))
        assert (tmp_path / "got.bin").read_bytes() == data
        assert (there / "put.bin").read_bytes() == data[::-1]
        assert (there / "newdir").is_dir()
    finally:
        everywhere.stop()
        check_clean_log(everywhere)


# 9. Failures: clear errors, nothing left behind ---------------------------------------


async def test_not_found_and_directory_errors(agent: Agent, tmp_path: Path) -> None:
    (agent.root / "dir").mkdir()
    (agent.root / "file").write_bytes(b"data")
    local = tmp_path / "local"
    local.write_bytes(b"payload")
    (tmp_path / "localdir").mkdir()
    async with connect(agent) as conn:
        cases: list[tuple[Callable[[], Awaitable[object]], type[tether.TetherError], str]] = [
            (lambda: conn.get("missing", tmp_path / "out"), tether.RemoteError, "not_found"),
            (lambda: conn.stat("missing"), tether.RemoteError, "not_found"),
            (lambda: conn.listdir("missing"), tether.RemoteError, "not_found"),
            (lambda: conn.listdir("file"), tether.RemoteError, "not_a_directory"),
            (lambda: conn.get("dir", tmp_path / "out"), tether.RemoteError, "is_a_directory"),
            (lambda: conn.put(local, "nodir/f"), tether.RemoteError, "not_found"),
            (lambda: conn.put(local, "dir"), tether.RemoteError, "is_a_directory"),
            (lambda: conn.put(local, "file/x"), tether.RemoteError, "not_a_directory"),
            (lambda: conn.mkdir("nodir/sub"), tether.RemoteError, "not_found"),
            (lambda: conn.mkdir("file"), tether.RemoteError, "not_a_directory"),
            (lambda: conn.put(tmp_path / "nope", "x"), tether.TransferError, "not_found"),
            (lambda: conn.put(tmp_path / "localdir", "x"), tether.TransferError, "is_a_directory"),
            (
                lambda: conn.get("file", tmp_path / "nodir" / "out"),
                tether.TransferError,
                "not_found",
            ),
            (
                lambda: conn.get("file", tmp_path / "localdir"),
                tether.TransferError,
                "is_a_directory",
            ),
        ]
        for call, kind, code in cases:
            with pytest.raises(kind) as info:
                await call()
            assert info.value.code == code, info.value
            assert str(info.value)
        assert await conn.echo("still fine") == "still fine"
    assert not (tmp_path / "out").exists()
    assert not (agent.root / "x").exists()
    assert sorted(os.listdir(agent.root)) == ["dir", "file"]
    assert os.listdir(agent.root / "dir") == []
    assert (agent.root / "file").read_bytes() == b"data"
    assert partials(tmp_path, agent.root) == []


async def test_read_only_destination_is_permission_denied(agent: Agent, tmp_path: Path) -> None:
    local = tmp_path / "payload"
    local.write_bytes(b"payload")
    (agent.root / "src").write_bytes(b"remote data")
    with (
        tmpfs(agent.root / "ro", "size=1m") as remote_ro,
        tmpfs(tmp_path / "local_ro", "size=1m") as local_ro,
    ):
        (remote_ro / "existing").write_bytes(b"keep me")
        (local_ro / "existing").write_bytes(b"keep me too")
        remount_read_only(remote_ro)
        remount_read_only(local_ro)
        async with connect(agent) as conn:
            for target in ("ro/new", "ro/existing"):
                with pytest.raises(tether.RemoteError) as info:
                    await conn.put(local, target)
                assert info.value.code == "permission_denied"
            with pytest.raises(tether.RemoteError) as info:
                await conn.mkdir("ro/newdir")
            assert info.value.code == "permission_denied"
            for name in ("new", "existing"):
                with pytest.raises(tether.TransferError) as local_info:
                    await conn.get("src", local_ro / name)
                assert local_info.value.code == "permission_denied"
            assert await conn.echo("ok") == "ok"
        assert os.listdir(remote_ro) == ["existing"]
        assert (remote_ro / "existing").read_bytes() == b"keep me"
        assert os.listdir(local_ro) == ["existing"]
        assert (local_ro / "existing").read_bytes() == b"keep me too"


@pytest.mark.timeout(60)
async def test_remote_disk_full_is_no_space(agent: Agent, tmp_path: Path) -> None:
    local = tmp_path / "big"
    write_random(local, 3 * MiB)
    with tmpfs(agent.root / "small", "size=1m") as small:
        (small / "existing").write_bytes(b"previous")
        async with connect(agent) as conn:
            for target in ("small/new", "small/existing"):
                with pytest.raises(tether.RemoteError) as info:
                    await conn.put(local, target)
                assert info.value.code == "no_space"
                assert "small/" in str(info.value)
            assert await eventually(lambda: partials(small) == [])
            # The agent is healthy: the same connection still transfers.
            assert await conn.echo("ok") == "ok"
            await conn.put(local, "fine")
        assert sorted(os.listdir(small)) == ["existing"]
        assert (small / "existing").read_bytes() == b"previous"
    assert digests(agent.root / "fine") == digests(local)
    async with connect(agent) as conn:  # and takes new connections
        assert (await conn.stat("fine")).size == 3 * MiB


@pytest.mark.timeout(60)
async def test_local_disk_full_is_no_space(agent: Agent, tmp_path: Path) -> None:
    write_random(agent.root / "big", 3 * MiB)
    with tmpfs(tmp_path / "small", "size=1m") as small:
        (small / "existing").write_bytes(b"previous")
        async with connect(agent) as conn:
            for name in ("new", "existing"):
                with pytest.raises(tether.TransferError) as info:
                    await conn.get("big", small / name)
                assert info.value.code == "no_space"
            assert sorted(os.listdir(small)) == ["existing"]
            assert (small / "existing").read_bytes() == b"previous"
            await conn.get("big", tmp_path / "fine")  # the connection goes on
    assert digests(tmp_path / "fine") == digests(agent.root / "big")


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_source_changed_during_put(agent: Agent, tmp_path: Path) -> None:
    """A file appended to by another thread while it is sent: source_changed."""
    local = tmp_path / "growing.bin"
    write_random(local, LARGE)
    started = threading.Event()
    appended = threading.Event()

    def appender() -> None:
        if started.wait(120):
            with open(local, "ab") as f:
                f.write(b"appended while sending")
            appended.set()

    thread = threading.Thread(target=appender)
    thread.start()
    try:
        async with connect(agent) as conn:
            with pytest.raises(tether.TransferError) as info:
                await conn.put(local, "dest.bin", progress=lambda *a: started.set())
            assert info.value.code == "source_changed"
            assert "changed" in str(info.value)
            assert await conn.echo("ok") == "ok"
    finally:
        started.set()
        thread.join(30)
    assert appended.is_set()
    assert not (agent.root / "dest.bin").exists()
    assert await eventually(lambda: partials(agent.root) == [])
    assert os.listdir(agent.root) == []


# 10. Interruptions keep the partial for resume ----------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["close", "cancel"])
async def test_put_interrupted_keeps_partial_then_resumes(
    agent: Agent, tmp_path: Path, how: str
) -> None:
    """A cut connection, or the client's task cancelled (what Ctrl-C does to
    ``tether cp``), leaves the agent's partial file for ``resume``, as a get does."""
    local = tmp_path / "large.bin"
    write_random(local, LARGE)
    part = partial_path(str(agent.root / "dest.bin"))
    task: asyncio.Task[tether.TransferResult] | None = None
    closing: list[asyncio.Task[None]] = []

    async with connect(agent) as conn:

        def progress(path: str, done: int, total: int) -> None:
            # Interrupt once enough has gone and the agent has written some of it.
            if task is None or task.cancelling() or closing:
                return
            if done >= 16 * MiB and os.path.getsize(part) > 0:
                if how == "cancel":
                    task.cancel()
                else:
                    closing.append(asyncio.get_running_loop().create_task(conn.close()))

        task = asyncio.ensure_future(conn.put(local, "dest.bin", progress=progress))
        if how == "cancel":
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            with pytest.raises(tether.ConnectionClosed):
                await task
            await closing[0]

    assert await eventually(lambda: unlocked(part), 30)
    assert not (agent.root / "dest.bin").exists()
    assert os.path.exists(part), f"the agent removed the partial file after a {how}"
    kept = os.path.getsize(part)
    assert 0 < kept < LARGE

    async with connect(agent) as conn:
        result = await conn.put(local, "dest.bin", resume=True)
    assert result.resumed_from == kept
    assert result.sent == LARGE - kept
    assert result.restarted is False
    assert digests(agent.root / "dest.bin") == digests(local)
    assert partials(agent.root) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["cancel", "close"])
async def test_get_interrupted_keeps_partial_then_resumes(
    agent: Agent, tmp_path: Path, how: str
) -> None:
    write_random(agent.root / "large.bin", LARGE)
    dest = tmp_path / "dest.bin"
    part = partial_path(str(dest))
    task: asyncio.Task[tether.TransferResult] | None = None
    closing: list[asyncio.Task[None]] = []

    async with connect(agent) as conn:

        def progress(path: str, done: int, total: int) -> None:
            if done >= 16 * MiB and task is not None and not task.cancelling() and not closing:
                if how == "cancel":
                    task.cancel()
                else:
                    closing.append(asyncio.get_running_loop().create_task(conn.close()))

        task = asyncio.ensure_future(conn.get("large.bin", dest, progress=progress))
        if how == "cancel":
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            with pytest.raises(tether.ConnectionClosed):
                await task
            await closing[0]

    # A chunk already being written in a thread when the get was interrupted
    # lands after it (fileio._ThreadedFile); the partial is final once that
    # write is done and its lock released, as the put test waits for the agent.
    assert await eventually(lambda: unlocked(part), 30)
    kept = os.path.getsize(part)
    assert 16 * MiB <= kept < LARGE
    assert not dest.exists()

    async with connect(agent) as conn:
        result = await conn.get("large.bin", dest, resume=True)
    assert result.resumed_from == kept
    assert result.sent == LARGE - kept
    assert digests(dest) == digests(agent.root / "large.bin")
    assert partials(tmp_path) == []


@pytest.mark.timeout(120)
async def test_get_cut_by_the_agent_stopping_keeps_partial_then_resumes(tmp_path: Path) -> None:
    """An agent stopped mid-get (SIGTERM, its grace period over) ends the get with
    ``shutting_down``: an interruption like a cut connection, so the bytes so far
    stay for --resume (docs/protocol.md §4.7, §5.3), as the agent keeps a put's.
    The error frame reaches this client although it read slowly: the agent
    sends what it queued before it exits."""
    agent = start_agent(tmp_path, "--grace", "0.2")
    size = 64 * MiB
    write_random(agent.root / "large.bin", size)
    dest = tmp_path / "dest.bin"
    part = partial_path(str(dest))

    stopped_at: list[float] = []

    def slow_reader(path: str, done: int, total: int) -> None:
        if done >= 8 * MiB and not stopped_at:
            agent.proc.send_signal(signal.SIGTERM)  # once: a second one stops it at once
            stopped_at.append(time.monotonic())
        if not stopped_at or time.monotonic() < stopped_at[0] + 0.6:
            # Blocks the client's loop: the get outlives the grace period.
            # Then the client reads at full speed again, so what the agent
            # still has to send, its error frame last, arrives before it exits.
            time.sleep(0.05)

    try:
        async with connect(agent) as conn:
            with pytest.raises(tether.RemoteError) as info:
                await conn.get("large.bin", dest, progress=slow_reader)
        assert info.value.code == "shutting_down"
        assert agent.proc.wait(30) == 0  # stopping already: a second SIGTERM would kill it
    finally:
        agent.stop()
    check_clean_log(agent)
    assert await eventually(lambda: unlocked(part), 30)
    kept = os.path.getsize(part)
    assert 8 * MiB <= kept < size
    assert not dest.exists()

    again = start_agent(tmp_path)  # the same root: tmp_path/agent/root
    try:
        async with connect(again) as conn:
            result = await conn.get("large.bin", dest, resume=True)
    finally:
        again.stop()
    assert result.resumed_from == kept
    assert digests(dest) == digests(again.root / "large.bin")
    assert partials(tmp_path) == []

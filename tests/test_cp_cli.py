"""``tether cp`` and ``tether ls`` through the real command line, against the real agent.

Every copy here runs ``python -m tether cp`` as a child process (``tether_cli``
or :func:`run_cli` when a path is bytes or a working directory matters) against
a ``tether serve`` child process on loopback (``conftest.py``), and compares
what arrived byte for byte, with its mode and mtime.

Interruptions need time to happen in: :class:`Proxy` is a small TCP relay on
127.0.0.1 (an asyncio loop in a thread) put between the CLI and the agent. It
counts the bytes in each direction (so a resume can be shown to send only what
was missing) and can hold them to a rate, so a kill lands mid-transfer and a
progress bar stays on screen long enough to be read. The terminal is a real
one: a detached tmux session.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

import pytest

import tether
from conftest import (
    Agent,
    Cli,
    PathArg,
    check_clean_log,
    digest,
    pin_known_host,
    snapshot,
    start_agent,
    tmpfs,
)

MiB = 1024 * 1024
CHUNK = MiB  # bytes per data frame (fileio.CHUNK_SIZE): sizes around it matter
BIG_SIZE = 400_000_000  # bytes: the file the kill tests interrupt
KILL_AT = 32 * MiB  # bytes in the partial file before the kill
KILL_RATE = 64e6  # bytes/s through the proxy while waiting to kill: ~6 s for BIG_SIZE
RESUME_SLACK = MiB  # protocol bytes a resume may add to the missing bytes (headers, hello)
TLS_OVERHEAD = 0.002  # and TLS per byte: 22 bytes of each record of up to 16 KiB, ~0.13%
WAIT = 30.0  # seconds any single wait in these tests may take
PART = ".tether-part"

pytestmark = pytest.mark.timeout(180)


# Helpers ---------------------------------------------------------------------------


def run_cli(
    args: Sequence[PathArg],
    *,
    env: dict[str, str],
    cwd: Path | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[bytes]:
    """``python -m tether ARGS`` like ``Cli.run``, but arguments may be bytes (file names)."""
    return subprocess.run(
        [sys.executable, "-m", "tether", *(os.fsencode(a) for a in args)],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
    )


def spawn_cli(args: Sequence[PathArg], *, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tether", *(os.fsencode(a) for a in args)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def assert_silent_success(proc: subprocess.CompletedProcess[bytes]) -> None:
    """Exit 0 and not a byte on stdout or stderr: not a terminal, nothing but errors."""
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stdout == b""
    assert proc.stderr == b""


def assert_one_line_error(
    proc: subprocess.CompletedProcess[bytes], code: int, *fragments: str
) -> str:
    """Exit ``code`` with exactly one line on stderr, ``tether: ...``, naming ``fragments``."""
    text = proc.stderr.decode(errors="replace")
    assert proc.returncode == code, (proc.returncode, text)
    lines = text.splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith("tether: "), text
    assert "Traceback" not in text
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 4 * MiB))
            f.write(block)
            left -= len(block)


def assert_same_file(copy: Path, original: Path) -> None:
    """Same bytes, same permission bits, same mtime to the nanosecond."""
    a, b = os.lstat(copy), os.lstat(original)
    assert stat.S_ISREG(a.st_mode)
    assert a.st_size == b.st_size
    if a.st_size <= 16 * MiB:
        assert copy.read_bytes() == original.read_bytes()
    else:
        assert digest(copy) == digest(original)
    assert stat.S_IMODE(a.st_mode) == stat.S_IMODE(b.st_mode)
    assert a.st_mtime_ns == b.st_mtime_ns


def partials(*tops: Path) -> list[bytes]:
    """Every ``*.tether-part`` (or leftover link temp) file below ``tops``."""
    found = []
    for top in tops:
        for directory, dirs, files in os.walk(os.fsencode(top)):
            for name in dirs + files:
                if name.endswith(PART.encode()) or name.endswith(b".tether-link"):
                    found.append(os.path.join(directory, name))
    return found


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def unlocked(path: Path) -> bool:
    """Whether nobody holds the flock a transfer keeps on its partial file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also drops our lock
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def resume_bound(missing: int) -> int:
    """The most a resume may move to send ``missing`` bytes of the file."""
    return missing + RESUME_SLACK + int(missing * TLS_OVERHEAD)


def kill_and_reap(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    if proc.poll() is None:
        proc.kill()
    return proc.communicate(timeout=WAIT)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ~400 MB random file for the kill tests, made once."""
    path = tmp_path_factory.mktemp("big") / "big"
    write_random(path, BIG_SIZE)
    os.utime(path, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    return path


def place(source: Path, dest: Path) -> None:
    """Put ``source`` at ``dest`` (a hard link when the file system allows)."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


class Proxy:
    """A TCP relay on 127.0.0.1 to an agent's port: counts bytes, optionally slows them.

    ``rate`` is bytes per second in each direction (None: full speed). The
    relay runs its own event loop in a thread; leaving the ``with`` block
    closes every connection and joins the thread. It relays TLS untouched, so
    its address is pinned to the agent's certificate, as a user who knows the
    relay would pin it (no trust-on-first-use notice, no stale pin of an
    earlier relay on the same port).
    """

    READ = 64 * 1024  # bytes per read: small steps keep the rate smooth

    def __init__(self, agent: Agent, rate: float | None = None) -> None:
        self.agent = agent
        self.target_port = agent.port
        self.rate = rate
        self.up = 0  # bytes client -> agent
        self.down = 0  # bytes agent -> client
        self.connections = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._pumps: set[asyncio.Future[None]] = set()
        self._thread = threading.Thread(target=self._main, name="test-proxy", daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> Proxy:
        self._thread.start()
        if not self._ready.wait(10) or not self.port:
            raise RuntimeError("the proxy did not start")
        if self.agent.tls:
            pin_known_host(self.host, self.agent.fingerprint)
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)
        assert not self._thread.is_alive(), "the proxy thread did not stop"

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            for pump in list(self._pumps):
                pump.cancel()
            await asyncio.gather(*self._pumps, return_exceptions=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            agent_reader, agent_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
        except OSError:
            writer.transport.abort()
            return
        pumps = {
            asyncio.ensure_future(self._pump(reader, agent_writer, "up")),
            asyncio.ensure_future(self._pump(agent_reader, writer, "down")),
        }
        self._pumps |= pumps
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._pumps -= pumps
            # Either side gone: cut the other at once, as a dead process would.
            writer.transport.abort()
            agent_writer.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str
    ) -> None:
        started = time.monotonic()
        moved = 0
        with contextlib.suppress(OSError):
            while data := await reader.read(self.READ):
                moved += len(data)
                if self.rate:
                    delay = started + moved / self.rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
                if direction == "up":
                    self.up += len(data)
                else:
                    self.down += len(data)


# 1. HOST:PATH parsing and usage errors -----------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "path"),
    [
        ("web1:file.txt", "web1", "file.txt"),
        ("web1:/srv/releases/", "web1", "/srv/releases/"),
        ("web1:7447:dir/file", "web1:7447", "dir/file"),
        ("127.0.0.1:7448:x", "127.0.0.1:7448", "x"),
        ("[::1]:7447:path/x", "[::1]:7447", "path/x"),
        ("[::1]:path", "[::1]", "path"),
        ("unix:/run/tether.sock:path/x", "unix:/run/tether.sock", "path/x"),
        ("web1:", "web1", "."),
        ("web1:7447:", "web1:7447", "."),
        ("[::1]:7447:", "[::1]:7447", "."),
        ("unix:/s.sock:", "unix:/s.sock", "."),
        ("web1:a:b:c", "web1", "a:b:c"),  # not digits: part of the path
        ("web1:12ab:x", "web1", "12ab:x"),
    ],
)
def test_parse_remote_path(text: str, host: str, path: str) -> None:
    assert tether.parse_remote_path(text) == tether.RemotePath(host, path)


@pytest.mark.parametrize("text", ["./a:b", "/x:y", "dir/a:b", "plain", "file.txt", ""])
def test_parse_remote_path_local(text: str) -> None:
    assert tether.parse_remote_path(text) is None


@pytest.mark.parametrize(
    "text", ["[::1", "[::1]x", "[::1]", "unix:/sock", "web1:99999:x", "web1:0:x"]
)
def test_parse_remote_path_malformed(text: str) -> None:
    with pytest.raises(tether.UsageError):
        tether.parse_remote_path(text)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["cp", "a", "b"], "exactly one"),
        (["cp", "./a:b", "/tmp/c:d"], "exactly one"),
        (["cp", "h1:a", "h2:b"], "exactly one"),
        (["cp", "[::1:x", "y"], "[::1:x"),
        (["cp", "y", "web1:99999:x"], "port"),
        (["ls", "/some/local/path"], ""),
    ],
    ids=["both-local", "both-local-colons", "both-remote", "bad-bracket", "bad-port", "ls-local"],
)
def test_cp_and_ls_usage_errors_exit_2(
    tether_cli: type[Cli], args: list[str], fragment: str
) -> None:
    env = {**os.environ, "TETHER_TOKEN": "x" * 43}
    proc = tether_cli.run(args, env=env)
    assert_one_line_error(proc, 2, fragment)


def test_cp_without_arguments_is_a_usage_error(tether_cli: type[Cli]) -> None:
    proc = tether_cli.run(["cp", "only-one"])
    assert proc.returncode == 2
    assert b"Usage" in proc.stderr


# 2. Single files both ways -----------------------------------------------------------


def make_source(directory: Path, name: str, size: int, mode: int, mtime_ns: int) -> Path:
    path = directory / name
    write_random(path, size)
    path.chmod(mode)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


@pytest.mark.parametrize("flags", [[], ["-q"]], ids=["default", "quiet"])
def test_cp_put_file_scp_style(
    agent: Agent, tether_cli: type[Cli], tmp_path: Path, flags: list[str]
) -> None:
    local = tmp_path / "local"
    local.mkdir()
    sources = [
        make_source(local, "empty", 0, 0o600, 1_600_000_000_000_000_001),
        make_source(local, "one", 1, 0o640, 1_600_000_000_000_000_002),
        make_source(local, "chunk+1.bin", CHUNK + 1, 0o755, 1_600_000_000_000_000_003),
    ]
    (agent.root / "dir").mkdir()
    (agent.root / "newname").write_bytes(b"old content, replaced")
    cases = [
        (sources[0], f"{agent.host}:", agent.root / "empty"),
        (sources[1], f"{agent.host}:dir/", agent.root / "dir" / "one"),
        (sources[1], f"{agent.host}:dir", agent.root / "dir" / "one"),
        (sources[2], f"{agent.host}:newname", agent.root / "newname"),
        (sources[2], f"{agent.unix}:dir/renamed", agent.root / "dir" / "renamed"),
        (sources[0], f"{agent.host}:{agent.root}/dir/absolute", agent.root / "dir" / "absolute"),
    ]
    for source, dest, arrived in cases:
        assert_silent_success(tether_cli.run(["cp", *flags, str(source), dest], env=agent.env))
        assert_same_file(arrived, source)
    assert partials(agent.root, local) == []


@pytest.mark.parametrize("flags", [[], ["-q"]], ids=["default", "quiet"])
def test_cp_get_file_scp_style(
    agent: Agent, tether_cli: type[Cli], tmp_path: Path, flags: list[str]
) -> None:
    (agent.root / "sub").mkdir()
    remote = [
        make_source(agent.root, "empty", 0, 0o600, 1_600_000_000_000_000_011),
        make_source(agent.root / "sub", "one", 1, 0o444, 1_600_000_000_000_000_012),
        make_source(agent.root, "chunk+1.bin", CHUNK + 1, 0o750, 1_600_000_000_000_000_013),
    ]
    out = tmp_path / "out"
    out.mkdir()
    (out / "existing").write_bytes(b"old content, replaced")
    cases = [
        (f"{agent.host}:empty", out, out / "empty"),
        (f"{agent.host}:sub/one", f"{out}/", out / "one"),
        (f"{agent.host}:chunk+1.bin", out / "existing", out / "existing"),
        (f"{agent.unix}:chunk+1.bin", out / "renamed", out / "renamed"),
        (f"{agent.host}:{agent.root}/sub/one", out / "absolute", out / "absolute"),
    ]
    for (source, dest, arrived), original in zip(
        cases, [remote[0], remote[1], remote[2], remote[2], remote[1]], strict=True
    ):
        assert_silent_success(tether_cli.run(["cp", *flags, source, str(dest)], env=agent.env))
        assert_same_file(arrived, original)
    # A relative destination is relative to where the CLI runs.
    assert_silent_success(
        run_cli(["cp", *flags, f"{agent.host}:sub/one", "."], env=agent.env, cwd=tmp_path)
    )
    assert_same_file(tmp_path / "one", remote[1])
    assert partials(agent.root, tmp_path) == []


def test_cp_non_utf8_file_name_both_ways(agent: Agent, tmp_path: Path) -> None:
    name = b"caf\xe9-latin1.txt"  # Latin-1, not UTF-8
    local = os.path.join(os.fsencode(tmp_path), name)
    with open(local, "wb") as f:
        f.write(b"bytes of a file whose name is not UTF-8\n")
    host = agent.host.encode()
    assert_silent_success(run_cli(["cp", local, host + b":"], env=agent.env))
    arrived = os.path.join(os.fsencode(agent.root), name)
    assert_same_file(Path(os.fsdecode(arrived)), Path(os.fsdecode(local)))
    back = tmp_path / "back"
    back.mkdir()
    assert_silent_success(run_cli(["cp", host + b":" + name, back], env=agent.env))
    assert os.listdir(os.fsencode(back)) == [name]
    got = os.path.join(os.fsencode(back), name)
    assert_same_file(Path(os.fsdecode(got)), Path(os.fsdecode(arrived)))


def test_cp_put_to_missing_directory_with_trailing_slash_fails(
    agent: Agent, tether_cli: type[Cli], tmp_path: Path
) -> None:
    """``DEST/`` names a directory (cp, scp): if there is none, that is an error.

    Otherwise a typo in a directory name silently makes a file of that name.
    """
    source = tmp_path / "f"
    source.write_bytes(b"data")
    proc = tether_cli.run(["cp", str(source), f"{agent.host}:nodir/"], env=agent.env)
    assert_one_line_error(proc, 1, "nodir")
    assert not (agent.root / "nodir").exists()
    assert partials(agent.root) == []


def test_cp_resume_restarts_with_a_warning_when_the_partial_does_not_match(
    agent: Agent, tether_cli: type[Cli], tmp_path: Path
) -> None:
    """A partial file that is not a prefix of the source: copied from 0, and said so."""
    source = make_source(tmp_path, "f.bin", 3 * CHUNK + 5, 0o640, 1_600_000_000_000_000_021)
    (agent.root / f".f.bin{PART}").write_bytes(b"not the start of f.bin" * 1000)
    proc = tether_cli.run(["cp", "--resume", str(source), f"{agent.host}:"], env=agent.env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b""
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tether: warning: "), lines
    assert "f.bin" in lines[0]
    assert_same_file(agent.root / "f.bin", source)
    out = tmp_path / "out"
    out.mkdir()
    (out / f".f.bin{PART}").write_bytes(b"also not the start" * 1000)
    proc = tether_cli.run(["cp", "--resume", f"{agent.host}:f.bin", str(out)], env=agent.env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tether: warning: "), lines
    assert_same_file(out / "f.bin", source)
    # With nothing to resume from, --resume is an ordinary, silent copy.
    assert_silent_success(
        tether_cli.run(["cp", "--resume", str(source), f"{agent.host}:g.bin"], env=agent.env)
    )
    assert_same_file(agent.root / "g.bin", source)
    assert partials(agent.root, tmp_path) == []


# 3. Trees --------------------------------------------------------------------------

TREE_FILES: dict[bytes, tuple[bytes, int]] = {
    b"empty.txt": (b"", 0o644),
    b"one byte": (b"x", 0o600),
    b"with space/file one.txt": (b"spaces in names\n", 0o640),
    "ünïcødé/日本語 テキスト.txt".encode(): ("non-ASCII ✓\n".encode(), 0o644),
    b"bad\xffname": (b"a name that is not UTF-8\n", 0o644),
    b"bad\xfedir/inner": (b"inside a directory that is not UTF-8\n", 0o600),
    b"sub/deeper/exec.sh": (b"#!/bin/sh\necho hi\n", 0o755),
    b"sub/deeper/readonly": (b"read only\n", 0o444),
    b"readonly-dir/inside": (b"in a read-only directory\n", 0o640),
}
TREE_DIRS: dict[bytes, int] = {  # beyond the parents of the files above
    b"empty": 0o755,
    b"empty/nested empty": 0o700,
    b"readonly-dir": 0o555,
    b"sub": 0o750,
}
TREE_LINKS: dict[bytes, bytes] = {
    b"link-to-file": b"with space/file one.txt",
    b"link-to-dir": b"sub/deeper",
    b"dangling": b"no/such/thing",
    b"absolute-out": b"/etc/passwd",
    b"climbs-out": b"../../../outside",
    "ünïcødé/up".encode(): b"../bad\xffname",
}
BIG_TREE_FILE = b"sub/chunk+1.bin"


def make_tree(top: Path) -> None:
    """A tree with every case of the issue's item 6, with set modes and mtimes."""
    base = os.fsencode(top)
    os.mkdir(base)
    for rel in TREE_DIRS:
        os.makedirs(os.path.join(base, rel), exist_ok=True)
    for rel, (data, _) in TREE_FILES.items():
        path = os.path.join(base, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    write_random(Path(os.fsdecode(os.path.join(base, BIG_TREE_FILE))), CHUNK + 1)
    for rel, target in TREE_LINKS.items():
        os.symlink(target, os.path.join(base, rel))
    stamp = itertools.count(1_500_000_000_000_000_007, 1_000_003_001)
    for rel, (_, mode) in TREE_FILES.items():
        path = os.path.join(base, rel)
        os.chmod(path, mode)
        os.utime(path, ns=(next(stamp), next(stamp)))
    os.utime(os.path.join(base, BIG_TREE_FILE), ns=(next(stamp), next(stamp)))
    # Directories last, deepest first: creating entries moves their mtime.
    dirs = [directory for directory, _, _ in os.walk(base)]
    for directory in sorted(dirs, key=lambda d: d.count(b"/"), reverse=True):
        rel = os.path.relpath(directory, base)
        os.chmod(directory, TREE_DIRS.get(rel, 0o750 if rel == b"." else 0o755))
        os.utime(directory, ns=(next(stamp), next(stamp)))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    top = tmp_path / "tree"
    make_tree(top)
    return top


def test_tree_fixture_has_every_case(tree: Path) -> None:
    """The comparison below would prove little on a tree missing a case."""
    snap = snapshot(tree)
    kinds = [entry[0] for entry in snap.values()]
    assert kinds.count("link") == len(TREE_LINKS)
    assert snap[b"./empty/nested empty"][0] == "dir"
    assert snap[b"./readonly-dir"][1] == 0o555
    assert any(b"\xff" in rel for rel in snap)
    assert any("日本語".encode() in rel for rel in snap)


def test_cp_r_put_then_get_reproduces_the_tree(
    agent: Agent, tether_cli: type[Cli], tmp_path: Path, tree: Path
) -> None:
    original = snapshot(tree)
    # Into the root (an existing directory): arrives as root/tree.
    assert_silent_success(tether_cli.run(["cp", "-r", str(tree), f"{agent.host}:"], env=agent.env))
    assert snapshot(agent.root / "tree") == original
    # To a new name.
    assert_silent_success(
        tether_cli.run(["cp", "-r", "-q", str(tree), f"{agent.host}:copy"], env=agent.env)
    )
    assert snapshot(agent.root / "copy") == original
    # And back: into an existing local directory, and to a new name.
    back = tmp_path / "back"
    back.mkdir()
    assert_silent_success(
        tether_cli.run(["cp", "-r", f"{agent.host}:tree", str(back)], env=agent.env)
    )
    assert snapshot(back / "tree") == original
    assert_silent_success(
        tether_cli.run(
            ["cp", "-r", "-q", f"{agent.host}:copy", str(tmp_path / "new")], env=agent.env
        )
    )
    assert snapshot(tmp_path / "new") == original
    assert partials(agent.root, tmp_path) == []
    # Links were copied as links, never followed: nothing appeared outside.
    assert sorted(p.name for p in agent.root.parent.iterdir()) == sorted(
        ["root", "state", "agent.log", "agent.sock"]
    )


def test_cp_directory_without_r_is_refused(
    agent: Agent, tether_cli: type[Cli], tmp_path: Path, tree: Path
) -> None:
    proc = tether_cli.run(["cp", str(tree), f"{agent.host}:"], env=agent.env)
    assert_one_line_error(proc, 1, "use -r")
    assert not (agent.root / "tree").exists()
    (agent.root / "rdir").mkdir()
    (agent.root / "rdir" / "f").write_bytes(b"x")
    proc = tether_cli.run(["cp", f"{agent.host}:rdir", str(tmp_path / "out")], env=agent.env)
    assert_one_line_error(proc, 1, "use -r")
    assert not (tmp_path / "out").exists()


# 4. ls -----------------------------------------------------------------------------

LS_LINE = re.compile(rb"^(?P<mode>[-dlpscb][-rwxsStT]{9}) +(?P<size>\d+) \S+ \S+ (?P<name>.*)$")


def make_listing(directory: Path) -> None:
    directory.mkdir()
    (directory / "a.txt").write_bytes(b"hello")
    (directory / "a.txt").chmod(0o640)
    (directory / "sub").mkdir(mode=0o750)
    (directory / "sub").chmod(0o750)
    (directory / "exec").write_bytes(b"#!/bin/sh\n")
    (directory / "exec").chmod(0o755)
    (directory / "sp ace é").write_bytes(b"12345678")
    (directory / "ln").symlink_to("a.txt")
    os.utime(directory / "a.txt", ns=(1_600_000_000_111_222_333, 1_600_000_000_111_222_333))


def test_ls_prints_one_line_per_entry(agent: Agent, tether_cli: type[Cli]) -> None:
    make_listing(agent.root / "d")
    proc = tether_cli.run(["ls", f"{agent.host}:d"], env=agent.env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
    lines = proc.stdout.splitlines()
    names = sorted(os.listdir(agent.root / "d"))
    assert len(lines) == len(names)
    seen = {}
    for line in lines:
        match = LS_LINE.match(line)
        assert match, line
        seen[match["name"].decode()] = (match["mode"].decode(), int(match["size"]))
    for name in names:
        st = os.lstat(agent.root / "d" / name)
        shown = f"{name} -> {os.readlink(agent.root / 'd' / name)}" if name == "ln" else name
        assert seen[shown] == (stat.filemode(st.st_mode), st.st_size), name
    assert seen["ln -> a.txt"][0].startswith("l")
    assert seen["sub"][0] == "drwxr-x---"
    assert seen["a.txt"] == ("-rw-r-----", 5)


def test_ls_json_is_a_list_of_objects(agent: Agent, tether_cli: type[Cli]) -> None:
    make_listing(agent.root / "d")
    proc = tether_cli.run(["ls", "--json", f"{agent.unix}:d"], env=agent.env)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert isinstance(rows, list)
    assert sorted(row["name"] for row in rows) == sorted(os.listdir(agent.root / "d"))
    types = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "link"}
    for row in rows:
        assert {"name", "type", "size", "mode", "mtime_ns"} <= row.keys()
        st = os.lstat(agent.root / "d" / row["name"])
        assert row["type"] == types[stat.S_IFMT(st.st_mode)]
        assert row["size"] == st.st_size
        assert row["mode"] == stat.S_IMODE(st.st_mode)
        assert row["mtime_ns"] == st.st_mtime_ns
    by_name = {row["name"]: row for row in rows}
    assert by_name["a.txt"]["mtime_ns"] == 1_600_000_000_111_222_333
    assert by_name["ln"]["target"] == "a.txt"


def test_ls_of_a_file_shows_that_entry(agent: Agent, tether_cli: type[Cli]) -> None:
    make_listing(agent.root / "d")
    proc = tether_cli.run(["ls", f"{agent.host}:d/a.txt"], env=agent.env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    match = LS_LINE.match(lines[0])
    assert match
    assert (match["mode"], int(match["size"]), match["name"]) == (b"-rw-r-----", 5, b"a.txt")
    proc = tether_cli.run(["ls", "--json", f"{agent.host}:d/a.txt"], env=agent.env)
    rows = json.loads(proc.stdout)
    assert [(r["name"], r["type"], r["size"], r["mode"]) for r in rows] == [
        ("a.txt", "file", 5, 0o640)
    ]


def test_ls_of_the_root_and_of_many_entries(agent: Agent, tether_cli: type[Cli]) -> None:
    many = agent.root / "many"
    many.mkdir()
    for i in range(1100):  # more than one entries frame (512 per frame)
        (many / f"f{i:04d}").touch()
    proc = tether_cli.run(["ls", f"{agent.host}:"], env=agent.env)
    assert proc.returncode == 0, proc.stderr
    assert [LS_LINE.match(line)["name"] for line in proc.stdout.splitlines()] == [b"many"]  # type: ignore[index]
    proc = tether_cli.run(["ls", "--json", f"{agent.host}:many"], env=agent.env)
    assert proc.returncode == 0, proc.stderr
    assert [row["name"] for row in json.loads(proc.stdout)] == [f"f{i:04d}" for i in range(1100)]


def test_ls_of_a_link_with_a_trailing_slash_lists_its_directory(
    agent: Agent, tether_cli: type[Cli]
) -> None:
    """``ls LINK/`` lists the directory LINK points to, as ls(1) and POSIX path resolution do.

    A link out of the root is then refused; never a line without a name.
    """
    make_listing(agent.root / "d")
    (agent.root / "to-d").symlink_to("d")
    (agent.root / "up-link").symlink_to("..")
    proc = tether_cli.run(["ls", f"{agent.host}:to-d/"], env=agent.env)
    assert proc.returncode == 0, proc.stderr
    names = [LS_LINE.match(line)["name"] for line in proc.stdout.splitlines()]  # type: ignore[index]
    assert names == [b"a.txt", b"exec", b"ln -> a.txt", "sp ace é".encode(), b"sub"]
    proc = tether_cli.run(["ls", f"{agent.host}:up-link/"], env=agent.env)
    assert_one_line_error(proc, 1, "outside")


def test_a_trailing_slash_on_a_file_is_not_a_directory(
    agent: Agent, tether_cli: type[Cli], tmp_path: Path
) -> None:
    """``FILE/`` names no directory, as for ls(1) and cp(1): ls and a get of it
    fail (both went ahead on the file)."""
    (agent.root / "f").write_bytes(b"a file")
    proc = tether_cli.run(["ls", f"{agent.host}:f/"], env=agent.env)
    assert_one_line_error(proc, 1, "f/", "not a directory")
    proc = tether_cli.run(["cp", f"{agent.host}:f/", str(tmp_path / "copy")], env=agent.env)
    assert_one_line_error(proc, 1, "f/", "not a directory")
    assert not (tmp_path / "copy").exists()
    copy = tether_cli.run(["cp", f"{agent.host}:f", str(tmp_path / "copy")], env=agent.env)
    assert_silent_success(copy)
    assert (tmp_path / "copy").read_bytes() == b"a file"


def test_ls_shows_an_mtime_beyond_what_localtime_can_take(
    agent: Agent, tether_cli: type[Cli]
) -> None:
    """A file dated 10^17 s after 1970 (tmpfs keeps it) is listed with its
    seconds instead of a date; the listing failed as a whole."""
    with small_tmpfs(agent.root / "t") as top:
        (top / "future").write_bytes(b"x")
        os.utime(top / "future", ns=(10**26, 10**26))
        (top / "now").write_bytes(b"y")
        proc = tether_cli.run(["ls", f"{agent.host}:t"], env=agent.env)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.decode().splitlines()
        assert len(lines) == 2
        assert lines[0].endswith(" future") and str(10**17) in lines[0]
        assert lines[1].endswith(" now")


def test_ls_missing_path_is_one_line_error(agent: Agent, tether_cli: type[Cli]) -> None:
    proc = tether_cli.run(["ls", f"{agent.host}:no/such"], env=agent.env)
    assert_one_line_error(proc, 1, "no/such")
    proc = tether_cli.run(["ls", "--json", f"{agent.host}:../"], env=agent.env)
    assert_one_line_error(proc, 1, "outside")


def make_non_utf8_listing(directory: Path) -> bytes:
    directory.mkdir()
    name = b"bad\xffname"
    with open(os.path.join(os.fsencode(directory), name), "wb") as f:
        f.write(b"abc")
    (directory / "good").write_bytes(b"")
    return name


def test_ls_json_with_a_non_utf8_name_is_valid_json(agent: Agent, tether_cli: type[Cli]) -> None:
    """JSON is UTF-8 (RFC 8259): a name that is not must come out escaped, not raw."""
    name = make_non_utf8_listing(agent.root / "d")
    proc = tether_cli.run(["ls", "--json", f"{agent.host}:d"], env=agent.env)
    assert proc.returncode == 0, proc.stderr
    proc.stdout.decode("utf-8")  # strict: raises on a raw 0xff byte
    rows = json.loads(proc.stdout)
    assert sorted(os.fsencode(row["name"]) for row in rows) == [name, b"good"]


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_ls_non_utf8_name_under_a_strict_utf8_stdout(
    agent: Agent, tether_cli: type[Cli], as_json: bool
) -> None:
    """Listing works where stdout is strict UTF-8 (a real en_US.UTF-8 locale).

    Here the locale is C.UTF-8, where Python's stdout happens to tolerate
    surrogates; PYTHONIOENCODING gives the strict encoder of most desktops.
    """
    make_non_utf8_listing(agent.root / "d")
    env = {**agent.env, "PYTHONIOENCODING": "utf-8:strict"}
    args = ["ls", f"{agent.host}:d"] + (["--json"] if as_json else [])
    proc = tether_cli.run(args, env=env)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"Traceback" not in proc.stderr
    assert len(proc.stdout.splitlines()) == (1 if as_json else 2)
    assert b"bad" in proc.stdout


# 5. Failures: one line, exit 1, no partial file ---------------------------------------


def test_cp_not_found(agent: Agent, tether_cli: type[Cli], tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = tether_cli.run(["cp", f"{agent.host}:missing.txt", str(out)], env=agent.env)
    assert_one_line_error(proc, 1, "missing.txt")
    assert not out.exists()
    source = tmp_path / "f"
    source.write_bytes(b"data")
    proc = tether_cli.run(["cp", str(source), f"{agent.host}:no/such/dir/f"], env=agent.env)
    assert_one_line_error(proc, 1, "no/such/dir/f")
    assert list(agent.root.iterdir()) == []
    assert partials(agent.root, tmp_path) == []


def test_cp_local_source_not_found(agent: Agent, tether_cli: type[Cli], tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    proc = tether_cli.run(["cp", str(missing), f"{agent.host}:x"], env=agent.env)
    assert_one_line_error(proc, 1, "missing.txt")
    proc = tether_cli.run(["cp", "-r", str(missing), f"{agent.host}:x"], env=agent.env)
    assert_one_line_error(proc, 1, "missing.txt")
    assert list(agent.root.iterdir()) == []


def test_cp_path_escapes_are_refused(agent: Agent, tether_cli: type[Cli], tmp_path: Path) -> None:
    source = tmp_path / "f"
    source.write_bytes(b"data")
    (agent.root / "out-link").symlink_to("/etc/passwd")
    (agent.root / "up-link").symlink_to("..")
    outside_before = sorted(p.name for p in agent.root.parent.iterdir())
    attempts = [
        ["cp", str(source), f"{agent.host}:../x"],
        ["cp", str(source), f"{agent.host}:sub/../../x"],
        ["cp", str(source), f"{agent.host}:/tmp/tether-escape-{os.getpid()}"],
        ["cp", str(source), f"{agent.host}:up-link/x"],
        ["cp", "-r", str(tmp_path), f"{agent.host}:../tree"],
        ["cp", f"{agent.host}:../agent.log", str(tmp_path / "got")],
        ["cp", f"{agent.host}:/etc/passwd", str(tmp_path / "got")],
        ["cp", f"{agent.host}:out-link", str(tmp_path / "got")],
        ["cp", "-r", f"{agent.host}:..", str(tmp_path / "got")],
        ["ls", f"{agent.host}:up-link/agent.log"],
    ]
    for args in attempts:
        proc = tether_cli.run(args, env=agent.env)
        assert_one_line_error(proc, 1, "outside")
    assert sorted(p.name for p in agent.root.parent.iterdir()) == outside_before
    assert not Path(f"/tmp/tether-escape-{os.getpid()}").exists()
    assert not (tmp_path / "got").exists()
    assert partials(agent.root, tmp_path) == []


def test_cp_directory_where_a_file_is_expected(
    agent: Agent, tether_cli: type[Cli], tmp_path: Path
) -> None:
    source = tmp_path / "f"
    source.write_bytes(b"data")
    # Put: DEST/f exists and is a directory.
    (agent.root / "d" / "f").mkdir(parents=True)
    proc = tether_cli.run(["cp", str(source), f"{agent.host}:d/"], env=agent.env)
    assert_one_line_error(proc, 1, "directory")
    assert (agent.root / "d" / "f").is_dir()
    assert list((agent.root / "d" / "f").iterdir()) == []
    # Get: the same on the local side.
    (agent.root / "g").write_bytes(b"remote")
    out = tmp_path / "out"
    (out / "g").mkdir(parents=True)
    proc = tether_cli.run(["cp", f"{agent.host}:g", str(out)], env=agent.env)
    assert_one_line_error(proc, 1, "directory")
    assert list((out / "g").iterdir()) == []
    # A regular file where a directory is needed.
    proc = tether_cli.run(["cp", str(source), f"{agent.host}:g/x"], env=agent.env)
    assert_one_line_error(proc, 1, "g/x")
    assert (agent.root / "g").read_bytes() == b"remote"
    (agent.root / "t").mkdir()
    proc = tether_cli.run(["cp", "-r", f"{agent.host}:t", str(source)], env=agent.env)
    assert_one_line_error(proc, 1, "not a directory")
    assert source.read_bytes() == b"data"
    assert partials(agent.root, tmp_path) == []


def test_cp_get_writes_into_a_device_or_fifo_and_never_replaces_it(
    agent: Agent, tether_cli: type[Cli], tmp_path: Path
) -> None:
    """``tether cp HOST:f /dev/null`` as with scp: the bytes go into the device,
    a FIFO's reader or what a link like /dev/stdout points to; none of them is
    replaced by a file (it was: /dev/null itself became a regular file)."""
    data = os.urandom(3 * CHUNK + 5)
    (agent.root / "f").write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    null = out / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null of our own
    proc = tether_cli.run(["cp", f"{agent.host}:f", str(null)], env=agent.env)
    assert_silent_success(proc)
    assert stat.S_ISCHR(os.lstat(null).st_mode)
    assert os.lstat(null).st_rdev == os.makedev(1, 3)
    # A FIFO: what its reader gets is the file, in full.
    fifo = out / "fifo"
    os.mkfifo(fifo)
    with open(tmp_path / "read", "wb") as read:
        reader = subprocess.Popen(["cat", str(fifo)], stdout=read)
        proc = tether_cli.run(["cp", f"{agent.host}:f", str(fifo)], env=agent.env)
        assert reader.wait(WAIT) == 0
    assert_silent_success(proc)
    assert (tmp_path / "read").read_bytes() == data
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    # A link to the CLI's own stdout, as /dev/stdout is: the bytes come out there.
    link = out / "stdout"
    link.symlink_to("/proc/self/fd/1")
    proc = tether_cli.run(["cp", f"{agent.host}:f", str(link)], env=agent.env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == data
    assert os.readlink(link) == "/proc/self/fd/1"
    assert partials(tmp_path) == []


@pytest.mark.parametrize(("reader", "how"), [(False, "SIGINT"), (True, "SIGTERM")])
def test_cp_get_into_a_fifo_nobody_reads_can_be_interrupted(
    agent: Agent, tmp_path: Path, reader: bool, how: str
) -> None:
    """A FIFO whose reader never comes, or never reads: Ctrl-C or SIGTERM ends
    the copy at once. A thread stuck opening or writing the FIFO kept the
    process from exiting: only SIGKILL ended it."""
    write_random(agent.root / "big", 8 * MiB)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    idle_reader = None
    if reader:  # holds the FIFO open for reading, reads nothing
        idle_reader = subprocess.Popen(
            ["sh", "-c", f"exec sleep 60 < '{fifo}'"], stdin=subprocess.DEVNULL
        )
    cli = subprocess.Popen(
        [sys.executable, "-m", "tether", "cp", f"{agent.host}:big", str(fifo)],
        env=agent.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        time.sleep(2.0)  # connected, and stuck on the FIFO
        assert cli.poll() is None
        sent = time.monotonic()
        cli.send_signal(getattr(signal, how))
        code = cli.wait(10)
        assert time.monotonic() - sent < 3.0
        assert code == (130 if how == "SIGINT" else -signal.SIGTERM)
    finally:
        for proc in (cli, idle_reader):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_cp_get_to_a_link_writes_its_target(
    agent: Agent, tether_cli: type[Cli], tmp_path: Path
) -> None:
    """As scp: a link at DEST names where the file goes, and stays a link;
    a link to /dev/stdout with stdout a file fills that file. The link was
    replaced by the file, and the output file stayed empty."""
    (agent.root / "f").write_bytes(b"the remote file\n")
    target = tmp_path / "target"
    target.write_bytes(b"old")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert_silent_success(tether_cli.run(["cp", f"{agent.host}:f", str(link)], env=agent.env))
    assert os.readlink(link) == str(target)
    assert target.read_bytes() == b"the remote file\n"
    stdout_link = tmp_path / "stdout"
    stdout_link.symlink_to("/proc/self/fd/1")
    with open(tmp_path / "out.txt", "wb") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "tether", "cp", f"{agent.host}:f", str(stdout_link)],
            env=agent.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.txt").read_bytes() == b"the remote file\n"
    assert os.readlink(stdout_link) == "/proc/self/fd/1"
    assert partials(tmp_path) == []


def test_cp_get_to_odd_destinations_fails_clearly_or_writes_through(
    agent: Agent, tmp_path: Path
) -> None:
    """A device with no driver fails at once (it was waited on for ever, as
    a FIFO with no reader); a link loop is refused, not replaced; a link to
    /proc/self/fd/1 writes into whatever stdout is, a deleted file included
    (a file named "out (deleted)" was made instead)."""
    (agent.root / "f").write_bytes(b"remote bytes\n")
    here = tmp_path / "here"
    here.mkdir()
    nodrv = here / "nodrv"
    os.mknod(nodrv, 0o666 | stat.S_IFCHR, os.makedev(240, 77))  # no driver there
    proc = run_cli(["cp", f"{agent.host}:f", nodrv], env=agent.env, timeout=20)
    assert_one_line_error(proc, 1, "nodrv", "No such device")
    loop = here / "loop"
    loop.symlink_to("loop")
    proc = run_cli(["cp", f"{agent.host}:f", loop], env=agent.env, timeout=20)
    assert_one_line_error(proc, 1, "loop", "symbolic links")
    assert os.readlink(loop) == "loop"
    link = here / "stdout"
    link.symlink_to("/proc/self/fd/1")
    out = here / "out"
    script = f'exec > "{out}"; rm "{out}"; exec "$@"'
    proc = subprocess.run(
        [
            "sh",
            "-c",
            script,
            "sh",
            sys.executable,
            "-m",
            "tether",
            "cp",
            f"{agent.host}:f",
            str(link),
        ],
        env=agent.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in here.iterdir()) == ["loop", "nodrv", "stdout"]
    assert partials(here) == []


def test_cp_put_onto_a_fifo_on_the_agent_is_refused(
    agent: Agent, tether_cli: type[Cli], tmp_path: Path
) -> None:
    """The agent does not write into a FIFO or device (nor replace it): a put
    there fails alone, naming it; a tree copy goes on past it."""
    source = tmp_path / "f"
    source.write_bytes(b"data")
    os.mkfifo(agent.root / "fifo")
    proc = tether_cli.run(["cp", str(source), f"{agent.host}:fifo"], env=agent.env)
    assert_one_line_error(proc, 1, "fifo", "not a regular file")
    assert stat.S_ISFIFO(os.lstat(agent.root / "fifo").st_mode)
    # In a tree copy, locally too: the other entries arrive, exit 1.
    top = tmp_path / "top"
    top.mkdir()
    (top / "fifo").write_bytes(b"file")
    (top / "other").write_bytes(b"other")
    (agent.root / "top").mkdir()
    os.mkfifo(agent.root / "top" / "fifo")
    proc = tether_cli.run(["cp", "-r", str(top), f"{agent.host}:"], env=agent.env)
    assert proc.returncode == 1, proc.stderr
    assert b"not a regular file" in proc.stderr
    assert (agent.root / "top" / "other").read_bytes() == b"other"
    assert stat.S_ISFIFO(os.lstat(agent.root / "top" / "fifo").st_mode)
    back = tmp_path / "back"
    (back / "top").mkdir(parents=True)
    os.mkfifo(back / "top" / "fifo")
    (agent.root / "top" / "fifo").unlink()
    (agent.root / "top" / "fifo").write_bytes(b"file")
    proc = tether_cli.run(["cp", "-r", f"{agent.host}:top", str(back)], env=agent.env)
    assert proc.returncode == 1, proc.stderr
    assert b"not a regular file" in proc.stderr
    assert (back / "top" / "other").read_bytes() == b"other"
    assert stat.S_ISFIFO(os.lstat(back / "top" / "fifo").st_mode)
    assert partials(agent.root, tmp_path) == []


def test_cp_r_names_what_it_leaves_out(agent: Agent, tether_cli: type[Cli], tmp_path: Path) -> None:
    """Sockets and FIFOs in a tree are not copied: each is named on stderr
    (they were left out silently), and the copy succeeds, as with scp."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_bytes(b"copied")
    os.mkfifo(src / "fifo")
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(src / "sock"))
        proc = tether_cli.run(["cp", "-r", str(src), f"{agent.host}:up"], env=agent.env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.decode().splitlines() == [
        f"tether: {src}/{name}: not a regular file, directory or symlink; not copied"
        for name in ("fifo", "sock")
    ]
    assert sorted(os.listdir(agent.root / "up")) == ["file"]
    # Downloading, the agent's FIFO is named by its remote path.
    proc = tether_cli.run(["cp", "-r", f"{agent.host}:up", str(tmp_path / "down")], env=agent.env)
    assert_silent_success(proc)
    os.mkfifo(agent.root / "up" / "fifo")
    proc = tether_cli.run(["cp", "-r", f"{agent.host}:up", str(tmp_path / "again")], env=agent.env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b"tether: up/fifo: not a regular file, directory or symlink; not copied\n"
    assert sorted(os.listdir(tmp_path / "again")) == ["file"]


# The agent as root without the capabilities that let root read and write
# whatever it likes: file permissions apply to it as to any user.
NO_BYPASS = "-dac_override,-dac_read_search"
NO_BYPASS_LAUNCHER = ["setpriv", f"--bounding-set={NO_BYPASS}", f"--inh-caps={NO_BYPASS}"]


def test_cp_r_get_goes_past_what_it_cannot_read(tether_cli: type[Cli], tmp_path: Path) -> None:
    """As scp: an unreadable file and an unreadable directory in a remote tree
    are named on stderr, one line each, and everything else is still copied
    (the copy used to stop at the first); exit 1."""
    agent = start_agent(tmp_path, launcher=NO_BYPASS_LAUNCHER)
    try:
        tree = agent.root / "t"
        (tree / "sub").mkdir(parents=True)
        (tree / "locked").mkdir()
        for name in ("a", "sub/b", "locked/hidden", "secret", "zz"):
            (tree / name).write_bytes(name.encode())
        (tree / "secret").chmod(0)
        (tree / "locked").chmod(0)
        back = tmp_path / "back"
        proc = tether_cli.run(["cp", "-r", f"{agent.host}:t", str(back)], env=agent.env)
    finally:
        agent.stop()
    check_clean_log(agent)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.decode().splitlines() == [
        "tether: t/locked: Permission denied",
        "tether: t/secret: Permission denied",
    ]
    copied = sorted(str(p.relative_to(back)) for p in back.rglob("*"))
    assert copied == ["a", "sub", "sub/b", "zz"]
    # The copy made "back" and did not copy everything: it stays marked
    # unfinished (mode 1700), for a --resume once the entries are readable.
    assert stat.S_IMODE(back.stat().st_mode) == 0o1700
    for name in ("a", "sub/b", "zz"):
        assert (back / name).read_bytes() == name.encode()
    assert partials(back) == []


def test_cp_r_resume_into_a_drop_directory(tether_cli: type[Cli], tmp_path: Path) -> None:
    """A directory others may write into but not list (0333): ``cp -r
    --resume`` copies into it by name; deciding whether it was an unfinished
    copy must not need a listing the agent cannot make."""
    agent = start_agent(tmp_path, launcher=NO_BYPASS_LAUNCHER)
    try:
        src = tmp_path / "report"
        src.mkdir()
        (src / "data").write_bytes(b"for the drop box")
        (agent.root / "incoming").mkdir()
        (agent.root / "incoming").chmod(0o333)
        args = ["cp", "-r", "-q", "--resume", str(src), f"{agent.host}:incoming"]
        assert_silent_success(tether_cli.run(args, env=agent.env))
        assert (agent.root / "incoming" / "report" / "data").read_bytes() == b"for the drop box"
    finally:
        agent.stop()
    check_clean_log(agent)


def test_cp_r_resume_finishes_a_download_with_read_only_directories(
    tether_cli: type[Cli], tmp_path: Path
) -> None:
    """A download that missed an entry gives its subdirectories their modes, a
    read-only one too; the --resume that follows, once the entry is readable,
    must still write into it (it failed on every file there, every time). The
    client, as the agent, runs without the capabilities that bypass
    permissions."""
    agent = start_agent(tmp_path, launcher=NO_BYPASS_LAUNCHER)
    try:
        tree = agent.root / "rsrc"
        (tree / "ro").mkdir(parents=True)
        (tree / "ro" / "f").write_bytes(b"in a read-only directory")
        (tree / "secret").write_bytes(b"readable later")
        (tree / "ro").chmod(0o555)
        (tree / "secret").chmod(0)
        dl = tmp_path / "dl"
        cli = [*NO_BYPASS_LAUNCHER, sys.executable, "-m", "tether", "cp", "-r", "-q"]
        args = [*cli, f"{agent.host}:rsrc", str(dl)]
        first = subprocess.run(args, env=agent.env, capture_output=True, timeout=WAIT)
        assert first.returncode == 1, first.stderr
        assert first.stderr == b"tether: rsrc/secret: Permission denied\n"
        assert stat.S_IMODE(dl.stat().st_mode) == 0o1700
        assert stat.S_IMODE((dl / "ro").stat().st_mode) == 0o555
        (tree / "secret").chmod(0o644)
        args = [*cli, "--resume", f"{agent.host}:rsrc", str(dl)]
        second = subprocess.run(args, env=agent.env, capture_output=True, timeout=WAIT)
    finally:
        agent.stop()
    check_clean_log(agent)
    assert second.returncode == 0, second.stderr
    assert snapshot(dl) == snapshot(tree)  # modes included: the mark is gone


def test_cp_r_put_goes_past_what_the_agent_refuses(
    agent: Agent, tether_cli: type[Cli], tmp_path: Path
) -> None:
    """The upload side of the test above: each refused entry one line, the
    rest copied, exit 1."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for name in ("a", "d/f", "e", "z"):
        (src / name).write_bytes(name.encode())
    dest = agent.root / "copy" / "src"  # copy exists: it receives src by name
    (dest / "e" / "inner").mkdir(parents=True)
    (dest / "d").write_bytes(b"a file")
    proc = tether_cli.run(["cp", "-r", "-q", str(src), f"{agent.host}:copy"], env=agent.env)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.decode().splitlines() == [
        "tether: copy/src/d: exists and is not a directory",
        "tether: copy/src/e: is a directory",
    ]
    assert (dest / "a").read_bytes() == b"a"
    assert (dest / "z").read_bytes() == b"z"
    assert partials(agent.root) == []


def small_tmpfs(directory: Path) -> contextlib.AbstractContextManager[Path]:
    """A 1 MiB tmpfs mounted on ``directory`` (needs root: skip otherwise)."""
    return tmpfs(directory, "size=1m")


def test_cp_disk_full_on_the_agent(agent: Agent, tether_cli: type[Cli], tmp_path: Path) -> None:
    source = tmp_path / "three-mb"
    write_random(source, 3_000_000)
    with small_tmpfs(agent.root / "small") as small:
        (small / "kept").write_bytes(b"existing destination")
        proc = tether_cli.run(["cp", str(source), f"{agent.host}:small/"], env=agent.env)
        assert_one_line_error(proc, 1, "No space left")
        proc = tether_cli.run(["cp", str(source), f"{agent.host}:small/kept"], env=agent.env)
        assert_one_line_error(proc, 1, "No space left")
        assert sorted(os.listdir(small)) == ["kept"]
        assert (small / "kept").read_bytes() == b"existing destination"


def test_cp_disk_full_locally(agent: Agent, tether_cli: type[Cli], tmp_path: Path) -> None:
    write_random(agent.root / "three-mb", 3_000_000)
    with small_tmpfs(tmp_path / "small") as small:
        (small / "kept").write_bytes(b"existing destination")
        proc = tether_cli.run(["cp", f"{agent.host}:three-mb", str(small)], env=agent.env)
        assert_one_line_error(proc, 1, "No space left")
        proc = tether_cli.run(["cp", f"{agent.host}:three-mb", str(small / "kept")], env=agent.env)
        assert_one_line_error(proc, 1, "No space left")
        assert sorted(os.listdir(small)) == ["kept"]
        assert (small / "kept").read_bytes() == b"existing destination"


def test_cp_and_ls_with_the_server_down_exit_255(tether_cli: type[Cli], tmp_path: Path) -> None:
    source = tmp_path / "f"
    source.write_bytes(b"data")
    host = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "TETHER_TOKEN": "x" * 43}
    for args in (
        ["cp", str(source), f"{host}:x"],
        ["cp", f"{host}:x", str(tmp_path / "out")],
        ["ls", f"{host}:"],
    ):
        assert_one_line_error(tether_cli.run(args, env=env), 255, host)
    assert not (tmp_path / "out").exists()
    assert partials(tmp_path) == []


# 6. Kill the CLI mid-transfer, then --resume ----------------------------------------------


TREE_BIG = 48 * MiB  # the file of a tree that the kill below lands in
TREE_KILL_AT = 8 * MiB
TREE_KILL_RATE = 16e6


def make_resumable_tree(top: Path) -> None:
    """A tree whose copy is interrupted in its last file: 'a' and 'TOP/b' come
    first (sorted), then 'zbig', which the kill lands in. It holds a directory
    of its own name, as Python and Django projects do (mysite/mysite)."""
    (top / top.name).mkdir(parents=True)
    (top / "a").write_bytes(b"first")
    (top / top.name / "b").write_bytes(b"second")
    write_random(top / "zbig", TREE_BIG)
    top.chmod(0o755)


def interrupt(
    args: Callable[[str], Sequence[PathArg]],
    agent: Agent,
    part: Path,
    rate: float = TREE_KILL_RATE,
    kill_at: int = TREE_KILL_AT,
) -> None:
    """Run ``tether ARGS(host)`` through a relay to ``agent`` at ``rate`` and
    SIGKILL it once ``part`` holds ``kill_at`` bytes; wait until nobody holds
    the partial file (the agent lets go of a put's when it sees the end)."""
    with Proxy(agent, rate=rate) as slow:
        proc = spawn_cli(args(slow.host), env=agent.env)
        try:
            wait_for(lambda: size_of(part) >= kill_at or proc.poll() is not None, "a partial")
            assert proc.poll() is None, "the copy ended before it could be interrupted"
            proc.send_signal(signal.SIGKILL)
        finally:
            kill_and_reap(proc)
    assert proc.returncode == -signal.SIGKILL
    wait_for(lambda: part.exists() and unlocked(part), "the partial file to be let go")


@pytest.mark.slow
def test_kill_cli_mid_put_then_resume(agent: Agent, big_file: Path) -> None:
    dest = agent.root / "big"
    part = agent.root / f".big{PART}"
    interrupt(lambda host: ["cp", big_file, f"{host}:big"], agent, part, KILL_RATE, KILL_AT)
    have = size_of(part)
    assert 0 < have < BIG_SIZE
    assert not dest.exists()
    with Proxy(agent) as counted:
        done = run_cli(["cp", "--resume", big_file, f"{counted.host}:big"], env=agent.env)
    assert_silent_success(done)
    assert_same_file(dest, big_file)
    assert not part.exists()
    # Only the missing bytes travelled.
    assert BIG_SIZE - have <= counted.up <= resume_bound(BIG_SIZE - have)


@pytest.mark.slow
def test_kill_cli_mid_get_then_resume(agent: Agent, big_file: Path, tmp_path: Path) -> None:
    place(big_file, agent.root / "big")
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "big"
    part = out / f".big{PART}"
    interrupt(lambda host: ["cp", f"{host}:big", out], agent, part, KILL_RATE, KILL_AT)
    have = size_of(part)
    assert 0 < have < BIG_SIZE
    assert not dest.exists()
    with Proxy(agent) as counted:
        done = run_cli(["cp", "--resume", f"{counted.host}:big", out], env=agent.env)
    assert_silent_success(done)
    assert_same_file(dest, big_file)
    assert partials(out) == []
    assert BIG_SIZE - have <= counted.down <= resume_bound(BIG_SIZE - have)


def test_cp_r_resume_goes_on_in_the_directory_the_interrupted_put_made(
    agent: Agent, tmp_path: Path
) -> None:
    """``cp -r SRC HOST:DEST`` (DEST new) killed, then the same with --resume:
    DEST exists now, and an existing directory receives SRC by name, so the
    resume used to start a second copy in DEST/SRC. It goes on in DEST, and
    only the missing bytes travel."""
    src = tmp_path / "src"
    make_resumable_tree(src)
    dest = agent.root / "dest"
    part = dest / f".zbig{PART}"
    interrupt(lambda host: ["cp", "-r", src, f"{host}:dest"], agent, part)
    have = size_of(part)
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o1700  # what tells an unfinished copy
    with Proxy(agent) as counted:
        done = run_cli(["cp", "-r", "--resume", src, f"{counted.host}:dest"], env=agent.env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == b"tether: resuming the interrupted copy in dest\n"
    assert snapshot(dest) == snapshot(src)  # not a second copy in dest/src
    assert partials(agent.root) == []
    assert counted.up <= resume_bound(TREE_BIG - have)


def test_cp_r_resume_goes_on_in_the_directory_the_interrupted_get_made(
    agent: Agent, tmp_path: Path
) -> None:
    """The download side of the test above; DEST given with a slash this time,
    as a shell's completion writes it once the directory exists."""
    make_resumable_tree(agent.root / "t")
    back = tmp_path / "back"
    part = back / f".zbig{PART}"
    interrupt(lambda host: ["cp", "-r", f"{host}:t", back], agent, part)
    have = size_of(part)
    with Proxy(agent) as counted:
        done = run_cli(["cp", "-r", "--resume", f"{counted.host}:t", f"{back}/"], env=agent.env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"tether: resuming the interrupted copy in {back}/\n".encode()
    assert snapshot(back) == snapshot(agent.root / "t")
    assert partials(back) == []
    assert counted.down <= resume_bound(TREE_BIG - have)


@pytest.mark.parametrize(
    ("dest", "expected"),
    [
        ({}, True),  # cut right after the directory was made
        ({"a": "file"}, True),
        ({"a": "file", "sub": "dir", "ln": "link", f".a{PART}": "file"}, True),
        ({f".a{PART}": "file"}, True),  # cut in the first file
        ({"src": "dir"}, True),  # the source holds a directory of its own name
        ({"a": "dir"}, False),  # not of the same type
        ({f".sub{PART}": "file"}, False),  # "sub" is a directory
        ({"a": "file", "b": "file"}, False),  # "b" is not in the source
    ],
)
def test_what_an_unfinished_copy_of_a_source_holds(dest: dict[str, str], expected: bool) -> None:
    from tether.cli import _holds_only_parts_of

    source = {"a": "file", "sub": "dir", "ln": "link", "src": "dir"}
    assert _holds_only_parts_of(dest, source) is expected


def test_only_the_mark_of_a_tree_copy_counts_as_unfinished() -> None:
    """0700 is common (home directories, ~/.ssh): it must not count."""
    from tether.paths import is_unfinished_tree

    assert is_unfinished_tree(stat.S_IFDIR | 0o1700)
    for mode in (0o700, 0o755, 0o1777, 0o3700, 0o1750):
        assert not is_unfinished_tree(stat.S_IFDIR | mode), oct(mode)


def test_cp_r_resume_into_a_directory_that_was_there_copies_by_name(
    agent: Agent, tmp_path: Path
) -> None:
    """An existing directory that is not an unfinished copy of SRC receives it
    by name, with or without --resume, as with scp: nothing in it is touched."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a").write_bytes(b"new")
    cases = {
        "other": (0o755, {"a": b"kept"}),
        # 0700 and holding only names the source has: a home directory, ~/.ssh
        "private": (0o700, {"a": b"kept"}),
        "empty": (0o700, {}),
        "slash/": (0o700, {"a": b"kept"}),
        # marked unfinished, but holds what the source has not: another copy
        "another": (0o1700, {"a": b"kept", "notes": b"not in src"}),
    }
    for name, (mode, files) in cases.items():
        dest = agent.root / name.rstrip("/")
        dest.mkdir()
        for file, data in files.items():
            (dest / file).write_bytes(data)
        dest.chmod(mode)
        proc = run_cli(["cp", "-r", "-q", "--resume", src, f"{agent.host}:{name}"], env=agent.env)
        assert_silent_success(proc)
        assert (dest / "src" / "a").read_bytes() == b"new", name
        for file, data in files.items():
            assert (dest / file).read_bytes() == data, name


def test_cp_r_resume_through_a_link_to_an_unfinished_copy_copies_by_name(
    agent: Agent, tmp_path: Path
) -> None:
    """DEST a symlink to an unfinished copy: it receives SRC by name, as any
    link to a directory does (it said it resumed, then failed on the link)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"new")
    tree = agent.root / "tree"
    tree.mkdir()
    (tree / "a").write_bytes(b"remote")
    # Unfinished copies of both by their mark and what they hold, each
    # reached through a link.
    for unfinished, link in (
        (agent.root / "dest", agent.root / "dlink"),
        (tmp_path / "dl", tmp_path / "dlink"),
    ):
        unfinished.mkdir()
        (unfinished / "a").write_bytes(b"kept")
        unfinished.chmod(0o1700)
        link.symlink_to(unfinished.name)
    for args in ([src, f"{agent.host}:dlink"], [f"{agent.host}:tree", tmp_path / "dlink"]):
        assert_silent_success(run_cli(["cp", "-r", "-q", "--resume", *args], env=agent.env))
    assert (agent.root / "dest" / "src" / "a").read_bytes() == b"new"
    assert (agent.root / "dest" / "a").read_bytes() == b"kept"
    assert (tmp_path / "dl" / "tree" / "a").read_bytes() == b"remote"
    assert (tmp_path / "dl" / "a").read_bytes() == b"kept"


def test_cp_r_lost_connection_exits_255_after_failed_entries(tmp_path: Path) -> None:
    """An entry that failed, then the agent gone: the failure is named, then the
    lost connection, and the exit is 255 as for any copy whose connection was
    lost (it became 1 once an entry had failed, which a script retrying on
    255 would not retry)."""
    agent = start_agent(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"its destination is a directory")
    write_random(src / "zbig", TREE_BIG)
    dest = agent.root / "copy" / "src"  # copy exists: it receives src by name
    (dest / "a" / "inner").mkdir(parents=True)
    part = dest / f".zbig{PART}"
    try:
        with Proxy(agent, rate=TREE_KILL_RATE) as slow:
            proc = spawn_cli(["cp", "-r", "-q", src, f"{slow.host}:copy"], env=agent.env)
            try:
                wait_for(
                    lambda: size_of(part) >= TREE_KILL_AT or proc.poll() is not None, "a partial"
                )
                agent.proc.kill()
                _, stderr = proc.communicate(timeout=WAIT)
            finally:
                kill_and_reap(proc)
    finally:
        agent.stop()
    lines = stderr.decode().splitlines()
    assert proc.returncode == 255, lines
    assert lines[0] == "tether: copy/src/a: is a directory", lines
    assert len(lines) == 2 and "connection closed" in lines[1], lines


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["put", "get"])
def test_a_tree_copied_into_an_existing_directory_leaves_its_mode_alone(
    agent: Agent, tmp_path: Path, direction: str
) -> None:
    """Merging a tree into a directory others read (0755): while the copy
    runs, it keeps its mode. It was set to 0700 for the copy (a web server
    reading it was denied everything), and stayed so if the copy stopped."""
    source_parent = (agent.root if direction == "get" else tmp_path) / "from"
    (source_parent / "site").mkdir(parents=True)
    write_random(source_parent / "site" / "big.bin", 16 * MiB)
    (source_parent / "site").chmod(0o755)
    dest_parent = (tmp_path if direction == "get" else agent.root) / "www"
    (dest_parent / "site").mkdir(parents=True)
    (dest_parent / "site").chmod(0o755)
    with Proxy(agent, rate=8e6) as slow:  # about 2 s
        if direction == "put":
            args = ["cp", "-q", "-r", str(source_parent / "site"), f"{slow.host}:www/"]
        else:
            args = ["cp", "-q", "-r", f"{slow.host}:from/site", str(dest_parent)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "tether", *args],
            env=agent.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        modes = set()
        try:
            while proc.poll() is None:
                modes.add(stat.S_IMODE(os.stat(dest_parent / "site").st_mode))
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
            _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert modes == {0o755}, [oct(m) for m in modes]
    assert_same_file(dest_parent / "site" / "big.bin", source_parent / "site" / "big.bin")


@pytest.mark.parametrize("direction", ["put", "get"])
def test_names_of_up_to_255_bytes_and_names_of_partial_files_are_copied(
    agent: Agent, tether_cli: type[Cli], tmp_path: Path, direction: str
) -> None:
    """A name of 250 bytes (a file and a link) could not be copied at all:
    its partial file's name went over the 255 bytes a name may have. And a
    real file named like the partial file of another, `.f.tether-part`, was
    taken over by the copy of `f` and lost, exit 0."""
    source = (agent.root if direction == "get" else tmp_path) / "names"
    source.mkdir()
    long = "n" * 250
    (source / long).write_bytes(b"long")
    (source / ("l" * 250)).symlink_to(long)
    (source / "f").write_bytes(b"real f")
    (source / ".f.tether-part").write_bytes(b"keep me")
    if direction == "put":
        args, dest = [str(source), f"{agent.host}:copied"], agent.root / "copied"
    else:
        args, dest = [f"{agent.host}:names", str(tmp_path / "copied")], tmp_path / "copied"
    assert_silent_success(tether_cli.run(["cp", "-q", "-r", *args], env=agent.env))
    assert snapshot(dest) == snapshot(source)
    if direction == "put":  # and one file alone
        args, dest = [str(source / long), f"{agent.host}:one"], agent.root / "one"
    else:
        args, dest = [f"{agent.host}:names/{long}", str(tmp_path / "one")], tmp_path / "one"
    assert_silent_success(tether_cli.run(["cp", "-q", *args], env=agent.env))
    assert dest.read_bytes() == b"long"


def test_a_link_to_a_directory_named_as_the_source_is_copied_as_its_tree(
    agent: Agent, tether_cli: type[Cli], tmp_path: Path
) -> None:
    """`tether cp -r link HOST:x`, link -> a directory: its tree is copied,
    as scp does (and as a download already did). It said "not a directory"."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_bytes(b"f")
    (tmp_path / "link").symlink_to("real")
    assert_silent_success(
        tether_cli.run(["cp", "-q", "-r", str(tmp_path / "link"), f"{agent.host}:x"], env=agent.env)
    )
    assert (agent.root / "x" / "f").read_bytes() == b"f"
    assert not (agent.root / "x").is_symlink()


def test_a_download_to_a_file_named_as_a_directory_says_it_is_not_one(
    agent: Agent, tether_cli: type[Cli], tmp_path: Path
) -> None:
    """`tether cp HOST:f localfile/` with localfile a file: "not a directory"
    (it said "no such directory"); with nothing there, "no such directory"."""
    (agent.root / "f").write_bytes(b"f")
    (tmp_path / "afile").write_bytes(b"mine")
    proc = tether_cli.run(["cp", f"{agent.host}:f", f"{tmp_path}/afile/"], env=agent.env)
    assert_one_line_error(proc, 1, "afile/: not a directory")
    proc = tether_cli.run(["cp", f"{agent.host}:f", f"{tmp_path}/none/"], env=agent.env)
    assert_one_line_error(proc, 1, "none/: no such directory")
    assert (tmp_path / "afile").read_bytes() == b"mine"


# 7. Progress bars on a terminal ---------------------------------------------------------


class Tmux:
    """A private tmux server (its own socket) with one detached 200x20 session."""

    def __init__(self, tmux: str, socket_path: Path) -> None:
        self.tmux = tmux
        self.socket = str(socket_path)

    def _cmd(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [self.tmux, "-S", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            timeout=15,
            stdin=subprocess.DEVNULL,
        )

    def start(self, script: Path) -> None:
        proc = self._cmd("new-session", "-d", "-s", "t", "-x", "200", "-y", "20", f"sh {script}")
        assert proc.returncode == 0, proc.stderr

    def capture(self) -> str:
        proc = self._cmd("capture-pane", "-p", "-t", "t")
        return proc.stdout.decode(errors="replace")

    def kill(self) -> None:
        self._cmd("kill-server")


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    path = shutil.which("tmux")
    if path is None:
        pytest.skip("tmux is not installed")
    session = Tmux(path, tmp_path / "tmux.sock")
    try:
        yield session
    finally:
        session.kill()


def run_in_terminal(
    tmux: Tmux, agent: Agent, tmp_path: Path, args: Sequence[str]
) -> tuple[list[str], str]:
    """Run ``tether ARGS`` in the tmux pane; every screen seen before it ended, and the last."""
    script = tmp_path / "run.sh"
    command = " ".join(_sh_quote(a) for a in [sys.executable, "-m", "tether", *args])
    script.write_text(
        f"TETHER_TOKEN={_sh_quote(agent.token)}\nexport TETHER_TOKEN\n"
        f"{command}\necho tether-exit=$?\nexec sleep 120\n"
    )
    tmux.start(script)
    screens: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        screen = tmux.capture()
        if "tether-exit=" in screen:
            return screens, screen
        screens.append(screen)
        time.sleep(0.1)
    raise AssertionError(f"tether cp did not end in the terminal:\n{tmux.capture()}")


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


PROGRESS = re.compile(r"(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?) MB")


@pytest.mark.slow
def test_progress_bar_on_a_terminal(agent: Agent, tmux: Tmux, tmp_path: Path) -> None:
    source = tmp_path / "progress-demo.bin"
    write_random(source, 32 * MiB)
    with Proxy(agent, rate=16e6) as slow:  # ~2 s
        during, final = run_in_terminal(
            tmux, agent, tmp_path, ["cp", str(source), f"{slow.host}:copy.bin"]
        )
    assert "tether-exit=0" in final, final
    assert_same_file(agent.root / "copy.bin", source)
    # Mid-way: the name, a partial byte count and a rate.
    midway = [
        s
        for s in during
        if "progress-demo.bin" in s
        and "/s" in s
        and (m := PROGRESS.search(s))
        and float(m[1]) < float(m[2])
    ]
    assert midway, "\n---\n".join(during[-5:])
    # At the end: the whole file.
    assert "progress-demo.bin" in final
    total = f"{32 * MiB / 1e6:.1f}"
    assert f"{total}/{total} MB" in final, final


@pytest.mark.slow
def test_progress_bars_for_a_tree_show_each_file_and_a_total(
    agent: Agent, tmux: Tmux, tmp_path: Path
) -> None:
    top = tmp_path / "bars"
    top.mkdir()
    write_random(top / "first.bin", 12 * MiB)
    write_random(top / "second.bin", 12 * MiB)
    with Proxy(agent, rate=16e6) as slow:
        during, final = run_in_terminal(
            tmux, agent, tmp_path, ["cp", "-r", str(top), f"{slow.host}:bars"]
        )
    assert "tether-exit=0" in final, final
    assert snapshot(agent.root / "bars") == snapshot(top)
    assert "first.bin" in final and "second.bin" in final
    assert re.search(r"total\b.*MB", final), final
    assert any("first.bin" in s and "/s" in s for s in during)


def test_progress_bars_for_a_tree_of_many_files_keep_up(
    agent: Agent, tmux: Tmux, tmp_path: Path
) -> None:
    """400 small files on a terminal: each finished file leaves a line, and
    the copy ends as quickly as without bars. A bar per file was kept, and
    every redraw drew them all: 100 files took 17 s, 1,000 minutes."""
    top = tmp_path / "many"
    top.mkdir()
    for i in range(400):
        (top / f"f{i:03d}").write_bytes(b"%d\n" % i)
    _, final = run_in_terminal(tmux, agent, tmp_path, ["cp", "-r", str(top), f"{agent.host}:many"])
    assert "tether-exit=0" in final, final
    assert snapshot(agent.root / "many") == snapshot(top)
    # The last screenful: lines of finished files, then the bars.
    assert len(re.findall(r"^f3\d\d  4 bytes$", final, re.M)) >= 10, final
    assert re.search(r"total\b.*1.5/1.5 kB", final), final


def test_names_in_progress_bars_are_shown_as_they_are_not_obeyed(
    agent: Agent, tmux: Tmux, tmp_path: Path
) -> None:
    """A file name is neither markup nor terminal control: "[red]" in a name
    was taken as rich markup (the bar showed the name without it, in red); an
    escape sequence in a name (here: clear the screen) reached the terminal.
    Names come from the agent on a download, as in scp's CVE-2019-6109."""
    top = agent.root / "names"
    top.mkdir()
    (top / "[red]tinted").write_bytes(b"one")
    (top / "x\x1b[2Jcleared").write_bytes(b"two")
    _, final = run_in_terminal(
        tmux, agent, tmp_path, ["cp", "-r", f"{agent.host}:names", str(tmp_path / "got")]
    )
    assert "tether-exit=0" in final, final
    assert snapshot(tmp_path / "got") == snapshot(top)
    assert "[red]tinted" in final, final
    assert "x\\x1b[2Jcleared" in final, final  # shown escaped, the screen not cleared


def test_names_and_messages_from_the_agent_are_escaped(
    agent: Agent, tether_cli: type[Cli], tmp_path: Path
) -> None:
    """What tether prints of a name (ls, an error) has its control characters
    escaped: one line per entry, nothing a terminal would act on. --json keeps
    the name exactly."""
    (agent.root / "d").mkdir()
    evil = "a\x1b]0;owned\x07\nb"
    (agent.root / "d" / evil).write_bytes(b"x")
    proc = tether_cli.run(["ls", f"{agent.host}:d"], env=agent.env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 1 and lines[0].endswith(" a\\x1b]0;owned\\x07\\x0ab"), lines
    listed = tether_cli.run(["ls", "--json", f"{agent.host}:d"], env=agent.env)
    assert [e["name"] for e in json.loads(listed.stdout)] == [evil]
    proc = tether_cli.run(["cp", f"{agent.host}:d/{evil}.missing", str(tmp_path)], env=agent.env)
    line = assert_one_line_error(proc, 1, "\\x1b]0;owned\\x07\\x0ab.missing")
    assert "\x1b" not in line and "\x07" not in line


@pytest.mark.slow
def test_no_progress_bar_with_q_on_a_terminal(agent: Agent, tmux: Tmux, tmp_path: Path) -> None:
    source = tmp_path / "quiet-demo.bin"
    write_random(source, 24 * MiB)
    with Proxy(agent, rate=16e6) as slow:
        during, final = run_in_terminal(
            tmux, agent, tmp_path, ["cp", "-q", str(source), f"{slow.host}:copy.bin"]
        )
    assert_same_file(agent.root / "copy.bin", source)
    assert len(during) >= 3, "the copy was too quick to watch"
    for screen in [*during, final]:
        assert "quiet-demo" not in screen
        assert "MB" not in screen
    assert [line for line in final.splitlines() if line.strip()] == ["tether-exit=0"]


# 8. Kill the agent mid-put ----------------------------------------------------------------


@pytest.mark.slow
def test_kill_agent_mid_put_then_resume_on_a_new_agent(big_file: Path, tmp_path: Path) -> None:
    first = start_agent(tmp_path, name="victim")
    dest = first.root / "big"
    part = first.root / f".big{PART}"
    try:
        with Proxy(first, rate=KILL_RATE) as slow:
            proc = spawn_cli(["cp", big_file, f"{slow.host}:big"], env=first.env)
            try:
                wait_for(lambda: size_of(part) >= KILL_AT or proc.poll() is not None, "partial")
                assert proc.poll() is None, "the put ended before it could be interrupted"
                first.proc.kill()
                first.proc.wait(WAIT)
                _, stderr = proc.communicate(timeout=WAIT)
            finally:
                kill_and_reap(proc)
    finally:
        first.stop(signal.SIGKILL)
    # A cut connection: tether's own failure (255) or a failed transfer (1), never 0.
    assert proc.returncode in (1, 255), stderr
    assert_one_line_error(
        subprocess.CompletedProcess(proc.args, proc.returncode, b"", stderr), proc.returncode
    )
    assert not dest.exists()
    have = size_of(part)
    assert 0 < have < BIG_SIZE

    second = start_agent(tmp_path, name="victim")  # same root, same token
    try:
        assert second.root == first.root
        with Proxy(second) as counted:
            done = run_cli(["cp", "--resume", big_file, f"{counted.host}:big"], env=second.env)
        assert_silent_success(done)
        assert_same_file(dest, big_file)
        assert not part.exists()
        assert BIG_SIZE - have <= counted.up <= resume_bound(BIG_SIZE - have)
    finally:
        second.stop()
        check_clean_log(second)

"""Regressions found in review, each against a real agent on loopback.

Every test here started as a reviewer's reproduction script and asserts the
behaviour the design asks for: an allow-list that a request's environment
cannot widen, memory that stays bounded when the client stops reading,
cancellation that really ends the remote work and leaves the connection
usable, a client that a malicious agent cannot make write outside the
destination, connection errors that end what the connection ran, stdin that
cannot wedge a connection, out-of-range numbers answered as ``bad_request``,
non-UTF-8 arguments, a broken tokens file, partial files kept when a
resumed put is cut off, and an exit status no program can have.

Hostile clients are blocking sockets (TLS without verification, so their bytes
reach the frame decoder); the hostile agent is an asyncio server in this file.
Nothing is mocked, nothing leaves 127.0.0.0/8, and every loop is bounded in
count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest

import tether
from conftest import Agent, check_clean_log, rss, start_agent
from rawclient import RawClient, tcp_address
from tether.frames import Frame, FrameDecoder, encode_frame
from tether.limits import PROTOCOL_VERSION

MiB = 1024 * 1024
IO_TIMEOUT = 10.0  # seconds a raw socket waits for the agent
GONE = 8.0  # seconds within which ended work must have gone (the bugs took 18 s or forever)
ANSWER = 5.0  # seconds within which a request on a still-open connection must be answered
RSS_LIMIT = 150 * MiB  # the agent's resident memory while a client reads nothing


# Helpers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def running(tmp: Path, *args: str, name: str = "agent") -> Iterator[Agent]:
    """An agent for the block; stopped after it, and its log checked for crashes."""
    a = start_agent(tmp, *args, name=name)
    try:
        yield a
    finally:
        a.stop()
        check_clean_log(a)


def unique_seconds() -> str:
    """A ``sleep`` argument no other process on the machine has: finds our command."""
    return f"{60 + secrets.randbelow(9)}.{secrets.randbelow(10**8):08d}1"


def final_for(ident: int) -> Callable[[list[Frame]], bool]:
    """Whether request ``ident`` has ended (its ``exit`` or ``error`` frame came)."""
    return lambda frames: any(f.id == ident and f.op in ("exit", "error") for f in frames)


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def find_group(tag: str, timeout: float = IO_TIMEOUT) -> int:
    """The process group of the (live) process whose argv has an element holding ``tag``."""
    wanted = tag.encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in _pids():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(wanted in arg for arg in argv):
                fields = _stat_fields(pid)
                if fields is not None and fields[0] not in ("Z", "X"):
                    return int(fields[2])
        time.sleep(0.02)
    raise AssertionError(f"no process with {tag!r} in its argv")


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``."""
    alive = []
    for pid in _pids():
        fields = _stat_fields(pid)
        if fields is not None and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive.append(pid)
    return alive


def group_survivors(pgid: int, timeout: float = GONE) -> list[int]:
    """Members of ``pgid`` still running after waiting up to ``timeout`` for all to go."""
    deadline = time.monotonic() + timeout
    while True:
        alive = group_members(pgid)
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def kill_group(pgid: int) -> None:
    """Clean up after a failed test: the group was started by it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, 9)


def fake_program(directory: Path, name: str, marker: Path) -> Path:
    """An executable ``name`` in ``directory`` that creates ``marker``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(f"#!/bin/sh\ntouch {marker}\necho PWNED\n")
    path.chmod(0o755)
    return path


def assert_not_created(*markers: Path, settle: float = 0.3) -> None:
    time.sleep(settle)  # a command would be quick
    for marker in markers:
        assert not marker.exists(), f"{marker} was created: a command ran"


# 1. An allow-list by name cannot be met by the request's own PATH ------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["own-dir", "agent-root"])
async def test_allow_by_name_is_not_found_through_the_requests_path(
    tmp_path: Path, where: str
) -> None:
    marker = tmp_path / "MARKER"
    with running(tmp_path, "--allow", "python3*") as a:
        if where == "own-dir":
            fake_dir = tmp_path / "fakebin"
            path = f"{fake_dir}:{os.environ['PATH']}"
        else:
            fake_dir, path = a.root, "."  # uploaded into the root, found as ./python3-evil
        fake_program(fake_dir, "python3-evil", marker)
        async with tether.connect(a.host, token=a.token) as conn:
            # The control: a program the pattern allows, from the agent's PATH, runs.
            ok = await conn.run(["python3", "-c", "print('allowed')"])
            assert (ok.returncode, ok.stdout) == (0, b"allowed\n"), ok.stderr
            # Without the request's PATH the fake is not found at all.
            with pytest.raises(tether.RemoteError) as info:
                await conn.run(["python3-evil"])
            assert info.value.code in ("forbidden", "not_found")
            with pytest.raises(tether.RemoteError) as info:
                await conn.run(["python3-evil"], env={"PATH": path})
            assert info.value.code in ("forbidden", "not_found"), info.value
            assert await conn.echo("alive") == "alive"
        assert_not_created(marker)


# 2. Bash functions and shell options cannot run code inside an allowed script ------------


@pytest.mark.timeout(60)
async def test_allowed_bash_script_refuses_function_and_shellopts_environment(
    tmp_path: Path,
) -> None:
    pwned = tmp_path / "PWNED"
    ran = tmp_path / "RAN"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "deploy.sh"
    script.write_text(f"#!/bin/bash\ntouch {ran}\necho deploying\nls >/dev/null\n")
    script.chmod(0o755)
    hook = tmp_path / "hook.sh"
    hook.write_text(f"touch {pwned}\n")
    attacks: list[dict[str, str]] = [
        {"BASH_FUNC_echo%%": f"() {{ touch {pwned}; }}"},
        {"BASH_FUNC_ls%%": f"() {{ touch {pwned}; }}"},
        {"SHELLOPTS": "xtrace", "PS4": f"$(touch {pwned})"},
        {"SHELLOPTS": "xtrace"},
        {"BASH_ENV": str(hook)},
    ]
    with running(tmp_path, "--allow", str(script)) as a:
        async with tether.connect(a.host, token=a.token) as conn:
            for env in attacks:
                with pytest.raises(tether.RemoteError) as info:
                    await conn.run([str(script)], env=env)
                assert info.value.code == "forbidden", env
            assert_not_created(pwned, ran)
            # The control: the allowed script itself runs, and the connection works.
            result = await conn.run([str(script)])
            assert (result.returncode, result.stdout) == (0, b"deploying\n"), result.stderr
            assert ran.exists()
            assert await conn.echo("alive") == "alive"
    assert not pwned.exists()


# 3. Output of an exec started while the socket is already full is flow-controlled --------


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_exec_started_while_writes_are_paused_keeps_memory_bounded(agent: Agent) -> None:
    pid = agent.proc.pid
    assert rss(pid) > 0
    tag = str(400 * 1000 * 1000 + secrets.randbelow(1000))  # head -c TAG: findable
    with RawClient(tcp_address(agent), IO_TIMEOUT, tls=agent.tls, rcvbuf=4096) as raw:
        raw.hello(agent.token)
        # A: fills the agent's socket and its send buffer; its own output then waits.
        raw.send_frame({"op": "exec", "id": 1, "argv": ["head", "-c", "100000000", "/dev/zero"]})
        time.sleep(2.0)
        # B: starts while the agent's writes are already paused.
        raw.send_frame({"op": "exec", "id": 2, "argv": ["head", "-c", tag, "/dev/zero"]})
        pgid = find_group(tag)
        try:
            peak = 0
            deadline = time.monotonic() + 5.0  # the client reads nothing meanwhile
            while time.monotonic() < deadline:
                peak = max(peak, rss(pid))
                time.sleep(0.02)
            assert peak < RSS_LIMIT, f"agent RSS reached {peak / MiB:.0f} MiB"
            # Flow control holds the command back: 400 MB cannot have gone anywhere.
            assert group_members(pgid), "B wrote all its output while the client read nothing"
            # Then it all drains: both end when cancelled, and the connection works.
            raw.send_frame({"op": "cancel", "id": 1})
            raw.send_frame({"op": "cancel", "id": 2})
            frames = raw.read_until(lambda fs: final_for(1)(fs) and final_for(2)(fs), 30.0)
            for f in frames:
                if f.op == "stdout":
                    assert f.body.count(0) == len(f.body)
            raw.echo(3, b"after", ANSWER)
            assert not group_survivors(pgid)
        finally:
            kill_group(pgid)
    assert rss(pid) < RSS_LIMIT


# 4. Cancelling run() or get() ends the remote work; the connection keeps working ---------

# Both event loops a client may run on: asyncio's, and uvloop (tether.run, the CLI).
LOOPS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "asyncio": asyncio.run,
    "uvloop": tether.run,
}


async def cancelled_run(agent: Agent, flood: bool) -> None:
    tag = unique_seconds()
    kwargs: dict[str, Any]
    if flood:
        # Output arrives for the cancelled request after it was given up.
        kwargs = {"shell": f"sleep 2.5; head -c 30000000 /dev/zero; exec sleep {tag}"}
    else:
        kwargs = {"argv": ["sleep", tag]}
    async with tether.connect(agent.host, token=agent.token) as conn:

        async def given_up() -> None:
            async with asyncio.timeout(1.5):
                await conn.run(**kwargs)

        task = asyncio.create_task(given_up())
        pgid = await asyncio.to_thread(find_group, tag)
        try:
            with pytest.raises(TimeoutError):
                await task
            async with asyncio.timeout(ANSWER):
                assert await conn.echo("still alive?") == "still alive?"
            left = await asyncio.to_thread(group_survivors, pgid)
            assert not left, f"the cancelled command still runs: {left}"
            async with asyncio.timeout(ANSWER):
                result = await conn.run(["echo", "next"])
            assert result.stdout == b"next\n"
        finally:
            kill_group(pgid)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize("flood", [False, True], ids=["sleep", "output-after-cancel"])
def test_cancelled_run_ends_the_command_and_the_connection_still_works(
    agent: Agent, flood: bool, loop: str
) -> None:
    LOOPS[loop](cancelled_run(agent, flood))


async def cancelled_get(agent: Agent, tmp_path: Path, data: bytes) -> None:
    first = asyncio.Event()

    def slow_progress(path: str, done: int, total: int) -> None:
        first.set()
        time.sleep(0.05)  # a slow consumer (a slow disk): the client falls behind

    async with tether.connect(agent.host, token=agent.token) as conn:
        task = asyncio.create_task(
            conn.get("big.bin", tmp_path / "copy.bin", progress=slow_progress)
        )
        async with asyncio.timeout(IO_TIMEOUT):
            await first.wait()
        await asyncio.sleep(0.5)  # several MiB arrive, unread
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(ANSWER):
            assert await conn.echo("still alive?") == "still alive?"
        # The whole file still comes over the same connection.
        async with asyncio.timeout(60):
            result = await conn.get("big.bin", tmp_path / "again.bin")
        assert result.size == len(data)
        assert (tmp_path / "again.bin").read_bytes() == data


@pytest.mark.timeout(90)
@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_cancelled_get_leaves_the_connection_working(
    agent: Agent, tmp_path: Path, loop: str
) -> None:
    data = os.urandom(50 * MiB)
    (agent.root / "big.bin").write_bytes(data)
    LOOPS[loop](cancelled_get(agent, tmp_path, data))


# 5. A malicious agent cannot make get_tree write outside the destination -----------------


class EvilAgent:
    """A plaintext agent whose listings name paths outside the client's destination.

    ``listings`` maps a remote directory path (as the client asks for it) to
    its entries; every other path is a file holding ``PAYLOAD``.
    """

    PAYLOAD = b"written by the agent\n"

    def __init__(self, listings: dict[str, list[dict[str, Any]]], exit_status: int = 0) -> None:
        self.listings = listings
        self.exit_status = exit_status  # what every exec "exits" with
        self.server: asyncio.Server | None = None
        self.port = 0
        self.handlers: set[asyncio.Task[Any]] = set()
        self.writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> EvilAgent:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        # Each connection's handler sees its end of file and returns.
        _, pending = await asyncio.wait(self.handlers, timeout=5) if self.handlers else ((), ())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.writers.add(writer)
        decoder = FrameDecoder()
        try:
            async with asyncio.timeout(30):
                while data := await reader.read(65536):
                    decoder.receive_data(data)
                    for f in decoder.frames():
                        for header, body in self._answer(f):
                            writer.write(encode_frame(header, body))
                    await writer.drain()
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    def _answer(self, f: Frame) -> list[tuple[dict[str, Any], bytes]]:
        i, op, path = f.id, f.op, f.header.get("path")
        if op == "hello":
            hello = {"op": "hello", "id": 0, "version": PROTOCOL_VERSION, "server": "evil"}
            hello |= {"encoding": "UTF-8", "max_header": 65536, "max_body": 16 * MiB}
            hello["stdin_window"] = 16 * MiB
            return [(hello, b"")]
        if op == "stat":
            kind = "dir" if path in self.listings else "file"
            stat = {"op": "stat", "id": i, "type": kind, "size": 0, "mode": 0o755}
            return [(stat | {"mtime_ns": 0}, b"")]
        if op == "list":
            entries = json.dumps(self.listings.get(path or "", [])).encode()
            return [({"op": "entries", "id": i}, entries), ({"op": "done", "id": i}, b"")]
        if op == "get":
            payload = self.PAYLOAD
            info = {"op": "file", "id": i, "size": len(payload), "mode": 0o644, "mtime_ns": 0}
            digest = blake3.blake3(payload).hexdigest()
            return [
                (info | {"offset": 0, "hash": "blake3"}, b""),
                ({"op": "data", "id": i}, payload),
                ({"op": "done", "id": i, "digest": digest}, b""),
            ]
        if op == "echo":
            return [({"op": "ok", "id": i}, f.body)]
        if op == "exec":
            return [({"op": "exit", "id": i, "status": self.exit_status}, b"")]
        return []  # cancel, signals...: nothing to say


def _file(name: str) -> dict[str, Any]:
    size = len(EvilAgent.PAYLOAD)
    return {"name": name, "type": "file", "size": size, "mode": 0o644, "mtime_ns": 0}


def _dir(name: str) -> dict[str, Any]:
    return {"name": name, "type": "dir", "size": 0, "mode": 0o755, "mtime_ns": 0}


def _link(name: str, target: str) -> dict[str, Any]:
    return {"name": name, "type": "link", "size": 0, "mode": 0o777, "mtime_ns": 0, "target": target}


def tree_snapshot(top: Path, skip: Path) -> set[str]:
    """Every path under ``top`` (links not followed), except those under ``skip``."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if path != str(skip) and not path.startswith(str(skip) + os.sep):
                found.add(path)
    return found


EVIL_LISTINGS: dict[str, Callable[[Path], dict[str, list[dict[str, Any]]]]] = {
    "dotdot-file": lambda out: {"d": [_file("../escaped.txt")]},
    "dotdot-dotdot-file": lambda out: {"d": [_file("../../escaped.txt")]},
    "slash-in-name": lambda out: {"d": [_dir("a"), _file("a/b")], "d/a": []},
    "absolute-name": lambda out: {"d": [_file(str(out / "absolute.txt"))]},
    "dotdot-dir": lambda out: {"d": [_dir("..")], "d/..": [_file("escaped.txt")]},
    "dot-dir": lambda out: {"d": [_dir(".")], "d/.": [_file("../escaped.txt")]},
    "dotdot-link": lambda out: {"d": [_link("../planted", "/etc")]},
    "link-then-dir-of-same-name": lambda out: {
        "d": [_link("esc", str(out)), _dir("esc")],
        "d/esc": [_file("escaped.txt")],
    },
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("status", "code"), [(3, 3), (2**31 + 5, 5), (-1, 255)])
async def test_cli_exit_code_of_any_status_an_agent_reports(status: int, code: int) -> None:
    # A process exit status is 8 bits: a status no program can have (only a
    # broken agent sends one) still ends the CLI with its low byte, as the
    # kernel would keep it, and never with a traceback.
    async with EvilAgent({}, exit_status=status) as evil:
        argv = [sys.executable, "-m", "tether", "exec", "--insecure-plaintext"]
        argv += [f"127.0.0.1:{evil.port}", "--", "true"]
        env = {**os.environ, "TETHER_TOKEN": "x" * 40}
        r = await asyncio.to_thread(
            subprocess.run, argv, env=env, capture_output=True, timeout=30, check=False
        )
    assert (r.returncode, r.stderr) == (code, b"")


@pytest.mark.timeout(60)
async def test_get_tree_from_the_fake_agent_works_for_plain_names(tmp_path: Path) -> None:
    """The control for the test below: the fake agent serves a correct tree."""
    listings = {"d": [_file("a.txt"), _dir("sub"), _link("ln", "a.txt")], "d/sub": [_file("b")]}
    dest = tmp_path / "dest"
    async with EvilAgent(listings) as evil:
        address = f"127.0.0.1:{evil.port}"
        conn = await tether.connect(address, token="x" * 40, insecure_plaintext=True)
        try:
            results = await conn.get_tree("d", dest)
        finally:
            await conn.close()
    assert len(results) == 2
    assert (dest / "a.txt").read_bytes() == EvilAgent.PAYLOAD
    assert (dest / "sub" / "b").read_bytes() == EvilAgent.PAYLOAD
    assert os.readlink(dest / "ln") == "a.txt"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(EVIL_LISTINGS))
async def test_get_tree_from_a_malicious_agent_writes_nothing_outside(
    tmp_path: Path, case: str
) -> None:
    outside = tmp_path / "outside"
    dest_parent = outside / "inner"
    dest_parent.mkdir(parents=True)
    (outside / "keep.txt").write_text("untouched\n")
    dest = dest_parent / "dest"
    before = tree_snapshot(tmp_path, dest)
    async with EvilAgent(EVIL_LISTINGS[case](outside)) as evil:
        address = f"127.0.0.1:{evil.port}"
        conn = await tether.connect(address, token="x" * 40, insecure_plaintext=True)
        try:
            with pytest.raises(tether.TetherError) as info:
                await conn.get_tree("d", dest)
        finally:
            await conn.close()
    # A name that is not one plain component breaks the protocol; a listed
    # directory that is a symlink on this side is refused as not a directory.
    if case == "link-then-dir-of-same-name":
        assert isinstance(info.value, tether.TransferError), repr(info.value)
        assert info.value.code == "not_a_directory"
    else:
        assert isinstance(info.value, tether.ProtocolError), repr(info.value)
    after = tree_snapshot(tmp_path, dest)
    assert after == before, f"written outside {dest}: {sorted(after - before)}"
    assert (outside / "keep.txt").read_text() == "untouched\n"
    assert not (dest / "a" / "b").exists()


# 6. A protocol error ends the connection's commands, even if the peer reads nothing ------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flood", [False, True], ids=["quiet", "unread-output"])
def test_protocol_error_ends_the_connections_commands(agent: Agent, flood: bool) -> None:
    tag = unique_seconds()
    command = f"head -c 50000000 /dev/zero; exec sleep {tag}" if flood else f"exec sleep {tag}"
    with RawClient(tcp_address(agent), IO_TIMEOUT, tls=agent.tls, rcvbuf=4096) as raw:
        raw.hello(agent.token)
        raw.send_frame({"op": "exec", "id": 1, "shell": command})
        pgid = find_group(tag)
        try:
            time.sleep(1.0)  # the output fills every buffer on the way
            raw.send_frame({"op": "no-such-op", "id": 5})  # fails the whole connection
            # The socket stays open and unread: the command must end all the same.
            left = group_survivors(pgid)
            assert not left, f"the command outlived its connection's failure: {left}"
            assert "unknown_op" in agent.wait_for_log("unknown_op", timeout=5.0)
        finally:
            kill_group(pgid)


# 7. A command that closes its stdin early does not wedge the connection ------------------


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "pieces",
    [
        # More than the pipe (64 KiB) and the agent's transport buffers hold.
        [b"x" * 300_000, b"y" * 300_000],
        # The whole stdin window (16 MiB, §4.6), none of it credited before
        # the command closes its stdin.
        [bytes([i]) * 1024 * 1024 for i in range(16)],
    ],
    ids=["600KB", "16MiB"],
)
def test_cancel_honoured_after_the_command_closed_a_full_stdin(
    agent: Agent, pieces: list[bytes]
) -> None:
    tag = unique_seconds()
    with RawClient(tcp_address(agent), IO_TIMEOUT, tls=agent.tls) as raw:
        raw.hello(agent.token)
        shell = f"sleep 1; exec 0<&-; echo closed-stdin; exec sleep {tag}"
        raw.send_frame({"op": "exec", "id": 1, "shell": shell, "stdin": True})
        for piece in pieces:
            raw.send_frame({"op": "stdin", "id": 1}, piece)
        pgid = find_group(tag)
        try:
            time.sleep(2.5)  # the command has closed its stdin with input still pending
            started = time.monotonic()
            raw.send_frame({"op": "cancel", "id": 1})
            raw.send_frame({"op": "echo", "id": 2}, b"ping")

            def both(frames: list[Frame]) -> bool:
                return final_for(1)(frames) and any(f.id == 2 for f in frames)

            frames = raw.read_until(both, GONE)
            elapsed = time.monotonic() - started
            assert elapsed < GONE, f"cancel took {elapsed:.1f}s"
            echo = next(f for f in frames if f.id == 2)
            assert (echo.op, echo.body) == ("ok", b"ping")
            assert not group_survivors(pgid, timeout=2.0)
            raw.echo(3, b"again", ANSWER)
        finally:
            kill_group(pgid)


@pytest.mark.timeout(60)
def test_a_killed_client_with_unread_stdin_leaves_nothing_running(
    agent: Agent, tmp_path: Path
) -> None:
    """`tether exec HOST -- sleep N < 100MiB-file`, the client killed with
    SIGKILL: the command never reads its stdin, yet it must end with its
    client. The agent stopped reading the connection past 16 MiB of unread
    stdin, so the client's end of the stream sat behind data nobody read:
    the command ran on until the kernel gave up on the orphaned socket
    (minutes). With the stdin window the client sends no more than the agent
    keeps, the agent reads on, and sees the end at once."""
    stdin = tmp_path / "stdin"
    with stdin.open("wb") as f:
        f.truncate(100 * MiB)
    tag = unique_seconds()
    split = f"exec sleep {tag[:4]}''{tag[4:]}"  # the client's own argv must not hold the tag
    with stdin.open("rb") as source:
        client = subprocess.Popen(
            [sys.executable, "-m", "tether", "exec", agent.host, "--shell", split],
            env=agent.env,
            stdin=source,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    try:
        pgid = find_group(tag)
        assert pgid != os.getpgrp()
        time.sleep(2.0)  # every buffer on the way fills with stdin
        assert client.poll() is None
        client.kill()
        client.wait()
        assert not group_survivors(pgid), "the command outlived its killed client"
    finally:
        client.kill()
        client.wait()
        with contextlib.suppress(UnboundLocalError):
            kill_group(pgid)


# 8, 9. Numbers out of range are a bad request, not a crash -------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "timeout", [b"1" + b"0" * 400, b"-1" + b"0" * 400, b"1e400"], ids=["huge", "-huge", "1e400"]
)
def test_exec_timeout_out_of_float_range_is_a_bad_request(agent: Agent, timeout: bytes) -> None:
    with RawClient(tcp_address(agent), IO_TIMEOUT, tls=agent.tls) as raw:
        raw.hello(agent.token)
        raw.send_raw_header(b'{"op":"exec","id":2,"argv":["true"],"timeout":' + timeout + b"}")
        reply = raw.read_frame()
        assert (reply.op, reply.id, reply.header.get("code")) == ("error", 2, "bad_request"), (
            reply.header
        )
        raw.echo(3, b"still open", ANSWER)
        raw.send_frame({"op": "exec", "id": 4, "argv": ["true"]})
        frames = raw.read_until(final_for(4), IO_TIMEOUT)
        assert (frames[-1].op, frames[-1].header.get("status")) == ("exit", 0), frames[-1].header
    check_clean_log(agent)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mtime_ns", [10**30, -(10**30)], ids=["1e30", "-1e30"])
def test_mtime_out_of_range_is_a_bad_request(agent: Agent, mtime_ns: int) -> None:
    target = agent.root / "f"
    target.write_text("x")
    os.utime(target, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    with RawClient(tcp_address(agent), IO_TIMEOUT, tls=agent.tls) as raw:
        raw.hello(agent.token)
        raw.send_frame({"op": "setattr", "id": 3, "path": "f", "mtime_ns": mtime_ns})
        reply = raw.read_frame()
        assert (reply.op, reply.id, reply.header.get("code")) == ("error", 3, "bad_request"), (
            reply.header
        )
        assert target.stat().st_mtime_ns == 1_000_000_000_000_000_000
        raw.send_frame({"op": "put", "id": 4, "path": "g", "size": 1, "mtime_ns": mtime_ns})
        reply = raw.read_frame()
        assert (reply.op, reply.id, reply.header.get("code")) == ("error", 4, "bad_request"), (
            reply.header
        )
        raw.echo(5, b"still open", ANSWER)
    assert sorted(os.listdir(agent.root)) == ["f"]
    check_clean_log(agent)


# 10. A command-line argument that is not UTF-8 ---------------------------------------------


@pytest.mark.timeout(60)
def test_cli_echo_of_an_argument_that_is_not_utf8(agent: Agent) -> None:
    text = b"caf\xe9"
    proc = subprocess.run(
        [os.fsencode(sys.executable), b"-m", b"tether", b"echo", agent.host.encode(), text],
        env=agent.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == text + b"\n"
    assert b"round trip" in proc.stderr


# 11. A tokens file rewritten with invalid UTF-8 ------------------------------------------


def token_new(a: Agent, name: str) -> subprocess.CompletedProcess[bytes]:
    """``tether token new NAME`` for the agent ``a``."""
    return subprocess.run(
        [sys.executable, "-m", "tether", "token", "new", name, "--state-dir", str(a.state_dir)],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )


@pytest.mark.timeout(90)
async def test_tokens_file_rewritten_with_invalid_utf8(tmp_path: Path) -> None:
    with running(tmp_path) as a:
        made = await asyncio.to_thread(token_new, a, "alice")
        assert made.returncode == 0, made.stderr
        alice = made.stdout.decode().strip()
        async with tether.connect(a.host, token=alice) as conn:
            assert await conn.echo("as alice") == "as alice"
        tokens = a.state_dir / "tokens"
        old = tokens.stat().st_mtime_ns
        tokens.write_bytes(b"alice \xff\xfe\xfd not utf-8\n")
        os.utime(tokens, ns=(old + 10**9, old + 10**9))  # changed, even on a coarse clock
        assert tokens.stat().st_mode & 0o077 == 0
        # Refused like any bad token, or served with the tokens loaded before.
        try:
            async with tether.connect(a.host, token=alice) as conn:
                assert await conn.echo("after") == "after"
        except tether.AuthenticationError:
            pass
        async with tether.connect(a.host, token=a.token) as conn:
            assert await conn.echo("default") == "default"
        assert a.proc.poll() is None
        check_clean_log(a)
        # A good file again: the agent takes it, no restart.
        made = await asyncio.to_thread(token_new, a, "bob")
        if made.returncode != 0:  # the tool may refuse to add to a broken file: replace it
            bob = secrets.token_urlsafe(32)
            tokens.write_text(f"bob {bob}\n")
        else:
            bob = made.stdout.decode().strip()
        os.utime(tokens, ns=(old + 2 * 10**9, old + 2 * 10**9))
        async with tether.connect(a.host, token=bob) as conn:
            assert await conn.echo("as bob") == "as bob"


# 12. A resumed put cut off while the agent hashes its partial keeps the partial ---------


@pytest.mark.timeout(90)
def test_put_cut_off_while_hashing_the_partial_keeps_it(agent: Agent) -> None:
    size = 320 * MiB
    partial = agent.root / ".big.bin.tether-part"
    with open(partial, "wb") as f:
        f.truncate(size)  # sparse: costs no disk, still takes the agent a while to hash
    partial.chmod(0o600)
    with RawClient(tcp_address(agent), IO_TIMEOUT, tls=agent.tls) as raw:
        raw.hello(agent.token)
        put = {"op": "put", "id": 1, "path": "big.bin", "size": 2 * size, "resume": True}
        raw.send_frame(put | {"mode": 0o644, "hash": "blake3"})
        time.sleep(0.2)  # the agent is hashing the partial's 320 MiB now
    agent.wait_for_log('"op": "put"', timeout=30.0)
    time.sleep(0.5)
    assert partial.exists(), "the partial of an interrupted resumable put was deleted"
    assert partial.stat().st_size == size
    assert not (agent.root / "big.bin").exists()

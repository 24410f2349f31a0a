"""Integration tests against the real agent process, the real CLI and the public API.

Every agent here is ``python -m tether serve`` started as a child process on
loopback or a Unix socket (see ``conftest.py``). Bad input is sent with plain
blocking sockets that speak raw bytes to that real agent: nothing is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import random
import re
import resource
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import tether
from conftest import LOG_WAIT, Agent, Cli, check_clean_log, start_agent
from rawclient import RawClient, hello_bytes, tcp_address, unverified_tls_context
from tether.frames import Frame, FrameDecoder, encode_frame
from tether.limits import HELLO_TIMEOUT, MAX_BODY_LEN, MAX_HEADER_LEN, PROTOCOL_VERSION

IO_TIMEOUT = 5.0  # seconds a raw socket waits for the agent to answer or close


# Helpers ---------------------------------------------------------------------------


def free_port() -> int:
    """A port that is free for both TCP and UDP on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port found")


def have_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not have_ipv6_loopback(), reason="this machine has no ::1")


@contextlib.contextmanager
def running_agent(
    tmp: Path, *args: str, name: str = "agent", unix: bool = False
) -> Iterator[Agent]:
    """``start_agent`` with the same stop-and-check-the-log teardown as the fixture."""
    a = start_agent(tmp, *args, name=name, unix=unix)
    try:
        yield a
    finally:
        a.stop()
        check_clean_log(a)


def audit_events(
    a: Agent, until: Callable[[list[dict[str, Any]]], bool], timeout: float = LOG_WAIT
) -> list[dict[str, Any]]:
    """The JSON audit records the agent wrote to its log (``tether.audit: {...}``),
    once ``until`` holds for them (its log lines come a moment after the replies)."""
    deadline = time.monotonic() + timeout
    while True:
        events = []
        for line in a.log().splitlines():
            _, marker, record = line.partition("tether.audit: ")
            if marker:
                events.append(json.loads(record))
        if until(events) or time.monotonic() > deadline:
            return events
        time.sleep(0.02)


def stderr_lines(proc: subprocess.CompletedProcess[bytes]) -> list[str]:
    return proc.stderr.decode(errors="replace").splitlines()


def env_without_token(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TETHER_TOKEN"}
    env.update(extra)
    return env


def header_frame(header: dict[str, Any]) -> bytes:
    """A frame whose header is written as given (no limit checks), with no body."""
    raw = json.dumps(header).encode()
    return struct.pack(">I", len(raw)) + raw


def prefixed(raw: bytes) -> bytes:
    """``raw`` as a frame header, whatever it holds."""
    return struct.pack(">I", len(raw)) + raw


def unix_path(a: Agent) -> str:
    return a.addresses["unix"][0]


def assert_error_frame(frames: list[Frame], code: str) -> None:
    """Exactly one frame: ``error`` with id 0, ``code`` and a message."""
    assert [(f.op, f.id, f.header.get("code")) for f in frames] == [("error", 0, code)], frames
    message = frames[0].header.get("message")
    assert isinstance(message, str) and message
    assert "Traceback" not in message


def socket_inodes(pid: int) -> set[str]:
    """Inodes of every socket the process ``pid`` holds open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
    return inodes


def inet_socket_inodes() -> set[str]:
    """Inodes of every TCP and UDP socket (IPv4 and IPv6) in this network namespace."""
    inodes = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                inodes.add(line.split()[9])
    return inodes


def find_process(argv: list[str]) -> int | None:
    """The pid of a process whose command line is exactly ``argv``, if any."""
    wanted = b"\0".join(a.encode() for a in argv) + b"\0"
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/cmdline").read_bytes() == wanted:
                    return int(entry)
    return None


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


# 1. Server down ----------------------------------------------------------------------


@pytest.mark.parametrize("command", [["exec", "--", "true"], ["echo", "hi"]], ids=["exec", "echo"])
def test_cli_server_down_one_line_exit_255(tether_cli: type[Cli], command: list[str]) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    args = [command[0], address, *command[1:]]
    proc = tether_cli.run(args, env={**os.environ, "TETHER_TOKEN": "some-token"})
    lines = stderr_lines(proc)
    assert proc.returncode == 255, proc
    assert len(lines) == 1, lines
    assert lines[0].startswith("tether:"), lines
    assert address in lines[0], lines
    assert "Traceback" not in lines[0]
    assert proc.stdout == b""


async def test_api_server_down_raises_connect_error() -> None:
    port = free_port()
    with pytest.raises(tether.ConnectError) as info:
        async with tether.connect(f"127.0.0.1:{port}", token="some-token"):
            pass
    assert isinstance(info.value, OSError)
    assert isinstance(info.value, tether.TetherError)
    assert f"127.0.0.1:{port}" in str(info.value)


async def test_api_missing_unix_socket_raises_connect_error(tmp_path: Path) -> None:
    path = tmp_path / "nobody.sock"
    with pytest.raises(tether.ConnectError) as info:
        async with tether.connect(f"unix:{path}", token="some-token"):
            pass
    assert isinstance(info.value, OSError)
    assert str(path) in str(info.value)


# 2. Tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [["exec", "-n", "--", "true"], ["echo", "hi"]], ids=["exec", "echo"]
)
def test_cli_wrong_token(agent: Agent, tether_cli: type[Cli], command: list[str]) -> None:
    args = [command[0], agent.host, *command[1:]]
    proc = tether_cli.run(args, env={**os.environ, "TETHER_TOKEN": "wrong"})
    lines = stderr_lines(proc)
    assert proc.returncode == 255, proc
    assert len(lines) == 1, lines
    assert lines[0].startswith("tether:")
    assert "authentication failed" in lines[0]
    assert proc.stdout == b""
    log = agent.wait_for_log("authentication failed")
    assert re.search(r"WARNING \S+: \S+: authentication failed", log), log
    assert "Traceback" not in log


async def test_api_wrong_token(agent: Agent) -> None:
    with pytest.raises(tether.AuthenticationError) as info:
        async with tether.connect(agent.host, token="wrong"):
            pass
    assert info.value.code == "auth_failed"
    assert "authentication failed" in str(info.value)
    # The agent goes on serving the right token.
    async with tether.connect(agent.host, token=agent.token) as conn:
        assert await conn.echo("still here") == "still here"
    log = agent.wait_for_log("authentication failed")
    assert "WARNING" in log
    assert "Traceback" not in log


def test_cli_no_token_anywhere(agent: Agent, tether_cli: type[Cli], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    env = env_without_token(XDG_STATE_HOME=str(empty), HOME=str(empty))
    for args in (["echo", agent.host, "hi"], ["exec", agent.host, "-n", "--", "true"]):
        proc = tether_cli.run(args, env=env)
        lines = stderr_lines(proc)
        assert proc.returncode == 2, proc
        assert len(lines) == 1, lines
        assert lines[0].startswith("tether: no token"), lines
        assert "--token-file" in lines[0] and "TETHER_TOKEN" in lines[0]
        assert proc.stdout == b""
    assert "authenticated" not in agent.log()  # nothing even reached the agent's hello


async def test_api_no_token_anywhere(
    agent: Agent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TETHER_TOKEN", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(tether.UsageError, match="no token"):
        async with tether.connect(agent.host):
            pass


def test_cli_token_file(agent: Agent, tether_cli: type[Cli], tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(agent.token + "\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    # --token-file wins over a wrong $TETHER_TOKEN.
    env = env_without_token(XDG_STATE_HOME=str(empty), HOME=str(empty), TETHER_TOKEN="wrong")
    proc = tether_cli.run(
        ["echo", agent.host, "via file", "--token-file", str(token_file)], env=env
    )
    assert proc.returncode == 0, proc
    assert proc.stdout == b"via file\n"
    proc = tether_cli.run(
        ["exec", agent.host, "-n", "--token-file", str(token_file), "--", "echo", "ran"], env=env
    )
    assert proc.returncode == 0, proc
    assert proc.stdout == b"ran\n"
    # A token file that does not exist is the caller's mistake: exit 2, one line.
    proc = tether_cli.run(
        ["echo", agent.host, "x", "--token-file", str(tmp_path / "missing")], env=env
    )
    lines = stderr_lines(proc)
    assert proc.returncode == 2, proc
    assert len(lines) == 1 and lines[0].startswith("tether:") and "missing" in lines[0], lines


def test_cli_token_from_local_state_dir(
    agent: Agent, tether_cli: type[Cli], tmp_path: Path
) -> None:
    xdg = tmp_path / "xdg"
    (xdg / "tether").mkdir(parents=True)
    (xdg / "tether" / "token").write_text(agent.token + "\n")
    proc = tether_cli.run(
        ["echo", agent.host, "local"], env=env_without_token(XDG_STATE_HOME=str(xdg))
    )
    assert proc.returncode == 0, proc
    assert proc.stdout == b"local\n"


async def test_api_token_file(agent: Agent, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(agent.token)
    async with tether.connect(agent.host, token_file=token_file) as conn:
        assert await conn.echo(b"file") == b"file"


# 3. Bad input on raw sockets -----------------------------------------------------------


@dataclass(frozen=True)
class BadCase:
    """Bytes sent by a misbehaving client, and the error code the agent must answer."""

    name: str
    payload: Callable[[str], bytes]  # token -> bytes
    code: str
    hello_first: bool = False


_rng = random.Random(20240611)
RANDOM_BIG_PREFIX = bytes([_rng.randrange(0x80, 0x100)]) + _rng.randbytes(255)
RANDOM_SMALL_PREFIX = struct.pack(">I", 64) + _rng.randbytes(64)

BAD_CASES = [
    BadCase("random-bytes", lambda t: RANDOM_BIG_PREFIX, "too_large"),
    BadCase("random-header-bytes", lambda t: RANDOM_SMALL_PREFIX, "bad_frame"),
    BadCase("http-request", lambda t: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "too_large"),
    BadCase(
        "header-over-64k", lambda t: struct.pack(">I", MAX_HEADER_LEN + 1) + b"{}", "too_large"
    ),
    BadCase(
        "header-over-64k-after-hello",
        lambda t: struct.pack(">I", MAX_HEADER_LEN + 1),
        "too_large",
        hello_first=True,
    ),
    BadCase(
        "body-over-16m",
        lambda t: header_frame({"op": "echo", "id": 1, "body_len": MAX_BODY_LEN + 1}),
        "too_large",
        hello_first=True,
    ),
    BadCase(
        "body-over-16m-before-hello",
        lambda t: header_frame({"op": "hello", "id": 0, "body_len": MAX_BODY_LEN + 1}),
        "too_large",
    ),
    BadCase("empty-header", lambda t: struct.pack(">I", 0), "bad_frame"),
    BadCase("non-json-header", lambda t: prefixed(b"this is not json"), "bad_frame"),
    BadCase("non-utf8-header", lambda t: prefixed(b'{"op": "\xff\xfe"}'), "bad_frame"),
    BadCase("json-list-header", lambda t: prefixed(b'["hello", 0]'), "bad_frame"),
    BadCase("json-string-header", lambda t: prefixed(b'"hello"'), "bad_frame"),
    BadCase("header-without-op", lambda t: header_frame({"id": 0}), "bad_frame"),
    BadCase("negative-id", lambda t: header_frame({"op": "echo", "id": -1}), "bad_frame"),
    BadCase(
        "non-json-header-after-hello",
        lambda t: prefixed(b"{not json}"),
        "bad_frame",
        hello_first=True,
    ),
    BadCase(
        "unknown-op",
        lambda t: header_frame({"op": "frobnicate", "id": 1}),
        "unknown_op",
        hello_first=True,
    ),
    BadCase(
        "unknown-op-before-hello",
        lambda t: header_frame({"op": "frobnicate", "id": 1}),
        "unauthenticated",
    ),
    BadCase(
        "echo-before-hello",
        lambda t: encode_frame({"op": "echo", "id": 1}, b"x"),
        "unauthenticated",
    ),
    BadCase(
        "exec-before-hello",
        lambda t: header_frame({"op": "exec", "id": 1, "argv": ["true"]}),
        "unauthenticated",
    ),
    BadCase("hello-wrong-version", lambda t: hello_bytes(t, version=99), "unsupported_version"),
    BadCase("hello-wrong-token", lambda t: hello_bytes("wrong"), "auth_failed"),
    BadCase(
        "wrong-token-then-requests",
        lambda t: (
            hello_bytes("wrong")
            + hello_bytes(t)
            + encode_frame({"op": "echo", "id": 1}, b"must not be served")
        ),
        "auth_failed",
    ),
    BadCase("hello-nonzero-id", lambda t: hello_bytes(t, ident=3), "protocol_error"),
    BadCase("second-hello", lambda t: hello_bytes(t), "protocol_error", hello_first=True),
    BadCase(
        "request-id-0",
        lambda t: encode_frame({"op": "echo", "id": 0}, b"x"),
        "protocol_error",
        hello_first=True,
    ),
]


@pytest.fixture(scope="module")
def shared_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """One agent for all bad-input cases, logging at debug level (connects and disconnects)."""
    with running_agent(tmp_path_factory.mktemp("bad"), "--log-level", "debug", unix=True) as a:
        yield a


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", BAD_CASES, ids=[c.name for c in BAD_CASES])
async def test_bad_input_fails_only_that_connection(shared_agent: Agent, case: BadCase) -> None:
    a = shared_agent
    async with tether.connect(a.host, token=a.token) as other:
        assert await other.echo(f"before {case.name}") == f"before {case.name}"
        log_start = len(a.log())
        with RawClient(tcp_address(a)) as raw:
            peer = raw.name
            if case.hello_first:
                raw.hello(a.token)
            raw.send(case.payload(a.token))
            frames = raw.read_to_eof()
            assert_error_frame(frames, case.code)
            # The agent closed: later reads keep returning end-of-file.
            assert raw.sock.recv(1) == b""
        # The connection opened before the bad one is untouched.
        payload = f"after {case.name} 数据 ✓"
        assert await other.echo(payload) == payload
        result = await other.run(["echo", case.name])
        assert result.stdout == case.name.encode() + b"\n"
    log = a.wait_for_log(f"{peer}: disconnected", log_start)
    if case.code == "auth_failed":
        assert f"{peer}: authentication failed" in log
    else:
        assert f"{peer}: closing connection: {case.code}" in log
    assert "Traceback" not in log


TRUNCATED = {
    "prefix": b"\x00\x00",
    "header": struct.pack(">I", 40) + b'{"op": "hel',
    "body": header_frame({"op": "echo", "id": 1, "body_len": 100}) + b"ab",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("after_hello", [False, True], ids=["before-hello", "after-hello"])
@pytest.mark.parametrize("part", sorted(TRUNCATED))
async def test_truncated_frame_then_close(
    shared_agent: Agent, part: str, after_hello: bool
) -> None:
    a = shared_agent
    async with tether.connect(a.host, token=a.token) as other:
        assert await other.echo("before") == "before"
        log_start = len(a.log())
        with RawClient(tcp_address(a)) as raw:
            peer = raw.name
            if after_hello:
                raw.hello(a.token)
            raw.send(TRUNCATED[part])
            refused_from_header = part == "body" and not after_hello
            if not refused_from_header:  # else the agent answers and closes at once
                raw.shutdown_write()
            answer = [(f.op, f.header.get("code")) for f in raw.read_to_eof()]
        log = a.wait_for_log(f"{peer}: disconnected", log_start)
        if refused_from_header:
            # Its header is whole and not a hello: refused from the header
            # alone, before its body (docs/protocol.md §4.1).
            assert answer == [("error", "unauthenticated")]
            assert f"{peer}: closing connection: unauthenticated" in log
        else:
            # Nothing to answer (the frame never ended); the agent just closes.
            assert answer == []
            assert "closing connection" not in log  # a plain end of input, not a violation
        assert "Traceback" not in log
        assert await other.echo("after") == "after"
    # And a brand-new client is served as usual.
    async with tether.connect(a.host, token=a.token) as conn:
        assert await conn.echo("new") == "new"


@pytest.mark.timeout(60)
async def test_frame_limits_boundary(shared_agent: Agent) -> None:
    """A header of exactly 64 KiB and a body of exactly 16 MiB are accepted."""
    a = shared_agent
    hello = {"op": "hello", "id": 0, "version": PROTOCOL_VERSION, "token": a.token, "pad": ""}
    pad = MAX_HEADER_LEN - len(json.dumps(hello).encode())
    hello["pad"] = "x" * pad
    raw_header = json.dumps(hello).encode()
    assert len(raw_header) == MAX_HEADER_LEN
    with RawClient(tcp_address(a)) as raw:
        raw.send(prefixed(raw_header))
        reply = raw.read_frame()
        assert reply.op == "hello" and reply.id == 0
        assert reply.header["max_header"] == MAX_HEADER_LEN
        assert reply.header["max_body"] == MAX_BODY_LEN
    data = random.Random(7).randbytes(MAX_BODY_LEN)
    async with tether.connect(a.host, token=a.token) as conn:
        assert await conn.echo(data) == data


@pytest.mark.timeout(30)
def test_hello_and_request_in_one_write(shared_agent: Agent) -> None:
    """A client may send its first request right behind hello, without waiting.

    Whether hello and the request arrive in one read or two is up to TCP; the
    agent must answer the same either way.
    """
    a = shared_agent
    with RawClient(tcp_address(a)) as raw:
        requests = [
            encode_frame({"op": "echo", "id": i}, f"pipelined {i}".encode()) for i in (1, 2)
        ]
        raw.send(hello_bytes(a.token) + b"".join(requests))
        reply = raw.read_frame()
        assert (reply.op, reply.id) == ("hello", 0), reply
        answers = {}
        for _ in requests:
            frame = raw.read_frame()
            assert frame.op == "ok", frame
            answers[frame.id] = frame.body
        assert answers == {1: b"pipelined 1", 2: b"pipelined 2"}
        # The connection goes on as usual.
        raw.send(encode_frame({"op": "frobnicate", "id": 3}))
        assert_error_frame(raw.read_to_eof(), "unknown_op")


# 4. Hello deadline -----------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_hello_deadline_closes_silent_connection(tmp_path: Path) -> None:
    """ServerConfig.hello_timeout, with a short deadline on an in-process Server."""
    config = tether.ServerConfig(
        token="deadline-token", port=0, udp=False, root=tmp_path, hello_timeout=1.0
    )
    server = tether.Server(config)
    await server.start()
    try:
        port = int(server.addresses[0].rsplit(":", 1)[1])
        # An in-process Server has no ssl_context: plain TCP on both sides.
        async with tether.connect(
            f"127.0.0.1:{port}", token="deadline-token", insecure_plaintext=True
        ) as conn:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.monotonic()
            async with asyncio.timeout(10):
                data = await reader.read()  # until the agent closes
            elapsed = time.monotonic() - started
            writer.close()
            decoder = FrameDecoder()
            decoder.receive_data(data)
            assert_error_frame(list(decoder.frames()), "hello_timeout")
            assert 0.8 <= elapsed <= 6.0, elapsed
            # An authenticated connection lives on past the deadline.
            await asyncio.sleep(0.5)
            assert await conn.echo("alive") == "alive"
    finally:
        await server.close()


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_hello_deadline_default_on_real_agent(agent: Agent) -> None:
    """The real agent's CLI exposes no deadline option, so wait out the 10 s default.

    A client that completes the TLS handshake and then says nothing gets a
    ``hello_timeout`` error; one that never even starts TLS is cut off at the
    same deadline (the handshake counts against it). Both wait at once.
    """
    assert HELLO_TIMEOUT == 10.0

    async def silent(context: ssl.SSLContext | None) -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection(*tcp_address(agent), ssl=context)
        started = time.monotonic()
        try:
            async with asyncio.timeout(30):
                data = await reader.read()  # until the agent closes
        except ConnectionResetError:
            data = b""  # cut off mid-handshake
        finally:
            writer.close()
        return data, time.monotonic() - started

    async with tether.connect(agent.host, token=agent.token) as conn:
        (data, elapsed), (plain_data, plain_elapsed) = await asyncio.gather(
            silent(unverified_tls_context()), silent(None)
        )
        decoder = FrameDecoder()
        decoder.receive_data(data)
        assert_error_frame(list(decoder.frames()), "hello_timeout")
        assert 9.0 <= elapsed <= 15.0, elapsed
        assert plain_data == b""  # no TLS, no frame: not a byte in the clear
        assert 9.0 <= plain_elapsed <= 15.0, plain_elapsed
        assert await conn.echo("authenticated connections stay") == "authenticated connections stay"
    agent.wait_for_log("no hello in time")


# 5. Load -----------------------------------------------------------------------------------


@pytest.fixture
def roomy_agent(tmp_path: Path) -> Iterator[Agent]:
    """An agent whose cap on running commands fits the load test: 50 clients
    with 10 execs each all at once (the default caps at 256 on the agent)."""
    with running_agent(tmp_path, "--max-execs", "500") as a:
        yield a


@pytest.mark.timeout(120)
async def test_50_clients_20_concurrent_requests_each(roomy_agent: Agent) -> None:
    agent = roomy_agent
    clients, per_client = 50, 20

    async def open_one() -> tether.Connection:
        return await tether.connect(agent.host, token=agent.token, connect_timeout=60)

    async def request(conn: tether.Connection, c: int, r: int) -> None:
        tag = f"c{c}-r{r}"
        if r % 2:
            result = await conn.run(["echo", f"exec-{tag}"])
            assert result.returncode == 0, (tag, result)
            assert result.stdout == f"exec-{tag}\n".encode(), tag
            assert result.stderr == b""
        elif r % 4:
            text = f"{tag} 文本 🚀 " * (r + 1)
            assert await conn.echo(text) == text
        else:
            data = f"{tag}:".encode() + bytes(range(256)) * (c + 1)
            assert await conn.echo(data) == data

    results = await asyncio.gather(*(open_one() for _ in range(clients)), return_exceptions=True)
    conns = [r for r in results if isinstance(r, tether.Connection)]
    try:
        assert len(conns) == clients, [r for r in results if not isinstance(r, tether.Connection)]

        async def client(c: int, conn: tether.Connection) -> None:
            await asyncio.gather(*(request(conn, c, r) for r in range(per_client)))

        async with asyncio.timeout(100):
            await asyncio.gather(*(client(c, conn) for c, conn in enumerate(conns)))
    finally:
        for conn in conns:
            await conn.close()
    # The agent saw 50 sessions and ran every command itself (its audit lines).
    events = audit_events(
        agent, lambda events: sum(e["event"] == "disconnect" for e in events) >= clients
    )
    assert len([e for e in events if e["event"] == "auth" and e.get("ok") is True]) == clients
    execs = [
        e
        for e in events
        if e["event"] == "request"
        and e.get("op") == "exec"
        and re.fullmatch(r"exec-c\d+-r\d+", e["argv"][-1])
        and e.get("status") == 0
    ]
    assert len(execs) == clients * per_client // 2


# 6. IPv6 -------------------------------------------------------------------------------------


@needs_ipv6
def test_ipv6_cli_and_api(tmp_path: Path, tether_cli: type[Cli]) -> None:
    with running_agent(tmp_path, "--host", "::1") as a:
        assert a.host.startswith("[::1]:"), a.addresses
        assert a.addresses["udp"] == [a.host]
        proc = tether_cli.run(["echo", a.host, "v6 你好"], env=a.env)
        assert proc.returncode == 0, proc
        assert proc.stdout == "v6 你好\n".encode()
        proc = tether_cli.run(["exec", a.host, "-n", "--", "echo", "over", "v6"], env=a.env)
        assert proc.returncode == 0, proc
        assert proc.stdout == b"over v6\n"

        async def api() -> None:
            async with tether.connect(a.host, token=a.token) as conn:
                assert await conn.echo(b"v6 bytes") == b"v6 bytes"
                assert (await conn.run(["echo", "api"])).stdout == b"api\n"

        tether.run(api())
        with RawClient(("::1", a.port)) as raw:
            raw.hello(a.token)
        proc = tether_cli.run(["ping", a.host, "-c", "1", "-i", "0.2"])
        assert proc.returncode == 0, proc
        assert b"1 received" in proc.stdout


@needs_ipv6
def test_dual_listeners_share_one_port(tmp_path: Path, tether_cli: type[Cli]) -> None:
    with running_agent(tmp_path, "--host", "127.0.0.1", "--host", "::1") as a:
        port = a.port
        assert a.addresses["tls"] == [f"127.0.0.1:{port}", f"[::1]:{port}"]
        assert a.addresses["udp"] == [f"127.0.0.1:{port}", f"[::1]:{port}"]
        for host in (f"127.0.0.1:{port}", f"[::1]:{port}"):
            proc = tether_cli.run(["echo", host, f"via {host}"], env=a.env)
            assert proc.returncode == 0, (host, proc)
            assert proc.stdout == f"via {host}\n".encode()
            proc = tether_cli.run(["exec", host, "-n", "--", "echo", host], env=a.env)
            assert proc.returncode == 0, (host, proc)
            assert proc.stdout == f"{host}\n".encode()


# 7. Unix sockets ---------------------------------------------------------------------------


def test_unix_socket_cli_api_and_mode(agent: Agent, tether_cli: type[Cli]) -> None:
    path = unix_path(agent)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    proc = tether_cli.run(["echo", agent.unix, "over unix 中文"], env=agent.env)
    assert proc.returncode == 0, proc
    assert proc.stdout == "over unix 中文\n".encode()
    proc = tether_cli.run(["exec", agent.unix, "-n", "--", "echo", "unix", "exec"], env=agent.env)
    assert proc.returncode == 0, proc
    assert proc.stdout == b"unix exec\n"

    async def api() -> None:
        async with tether.connect(agent.unix, token=agent.token) as conn:
            assert await conn.echo("u") == "u"
            result = await conn.run(shell="echo out; echo err >&2; exit 3")
            assert (result.stdout, result.stderr, result.returncode) == (b"out\n", b"err\n", 3)

    tether.run(api())
    with RawClient(path) as raw:
        raw.send(prefixed(b"[]"))
        assert_error_frame(raw.read_to_eof(), "bad_frame")


def test_unix_only_agent(tmp_path: Path, tether_cli: type[Cli], agent: Agent) -> None:
    path = tmp_path / "only.sock"
    port = free_port()
    with running_agent(
        tmp_path, "--no-tcp", "--unix", str(path), "--port", str(port), name="unix-only"
    ) as a:
        assert a.addresses == {"unix": [str(path)]}
        assert "listening on tcp" not in a.log() and "listening on udp" not in a.log()
        proc = tether_cli.run(["echo", f"unix:{path}", "only unix"], env=a.env)
        assert proc.returncode == 0, proc
        assert proc.stdout == b"only unix\n"
        # Nothing listens on the port it was given, and it holds no TCP/UDP socket at all.
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED
        inet = inet_socket_inodes()
        assert not socket_inodes(a.proc.pid) & inet
        # The same check sees the sockets of an agent that does listen on TCP and UDP.
        assert len(socket_inodes(agent.proc.pid) & inet) >= 2


def test_stale_unix_socket_is_replaced(tmp_path: Path, tether_cli: type[Cli]) -> None:
    path = tmp_path / "stale.sock"
    first = start_agent(tmp_path, "--no-tcp", "--unix", str(path), name="first")
    first.stop(signal.SIGKILL)
    assert stat.S_ISSOCK(os.lstat(path).st_mode), "a killed agent leaves its socket file"
    with socket.socket(socket.AF_UNIX) as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(str(path))
    with running_agent(tmp_path, "--no-tcp", "--unix", str(path), name="second") as second:
        proc = tether_cli.run(["echo", f"unix:{path}", "fresh"], env=second.env)
        assert proc.returncode == 0, proc
        assert proc.stdout == b"fresh\n"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not path.exists(), "a stopped agent removes its socket file"


def test_the_agent_raises_its_limit_on_open_files(tmp_path: Path) -> None:
    """Started with a soft limit of 64 descriptors (the usual is 1,024), an
    agent would drop connections past it, silently: it raises its own,
    towards the hard limit but not past 65,536 (its commands inherit it)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 64:
        pytest.skip(f"the hard limit is {hard}")
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)

    def low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))

    with serving_with_stderr_piped(tmp_path, low) as agent:
        with open(f"/proc/{agent.pid}/limits") as limits:
            line = next(line for line in limits if line.startswith("Max open files"))
        assert int(line.split()[3]) == wanted, line


def test_a_unix_socket_whose_listener_accepts_nothing_is_refused_at_once(
    tmp_path: Path,
) -> None:
    """A frozen agent's socket (it listens, its backlog is full): a new agent
    on the same path says it is in use. Its probe blocked for ever."""
    path = tmp_path / "frozen.sock"
    with socket.socket(socket.AF_UNIX) as frozen, socket.socket(socket.AF_UNIX) as waiting:
        frozen.bind(str(path))
        frozen.listen(0)
        waiting.connect(str(path))  # fills the backlog; nobody accepts
        proc = subprocess.run(
            [
                *(sys.executable, "-m", "tether", "serve", "--no-tcp", "--unix", str(path)),
                *("--state-dir", str(tmp_path / "state"), "--root", str(tmp_path)),
            ],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
        )
    assert proc.returncode != 0
    assert b"in use by a running agent" in proc.stderr


def test_live_unix_socket_is_not_taken_over(tmp_path: Path, tether_cli: type[Cli]) -> None:
    """A second agent must not unlink the socket of an agent that is still serving it."""
    path = tmp_path / "live.sock"
    with running_agent(tmp_path, "--no-tcp", "--unix", str(path), name="first") as first:
        log_path = tmp_path / "second.log"
        with open(log_path, "wb") as log:
            second = subprocess.Popen(
                [
                    *(sys.executable, "-m", "tether", "serve", "--no-tcp", "--unix", str(path)),
                    *("--token-file", str(first.state_dir / "token"), "--root", str(tmp_path)),
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        try:
            deadline = time.monotonic() + 15
            while second.poll() is None:
                text = log_path.read_text(errors="replace")
                assert "listening on" not in text, (
                    f"a second agent took over the live socket of the first:\n{text}"
                )
                assert time.monotonic() < deadline, "the second agent neither failed nor listened"
                time.sleep(0.05)
        finally:
            if second.poll() is None:
                second.kill()
            second.wait()
        lines = log_path.read_text(errors="replace").splitlines()
        assert second.returncode != 0, lines
        assert len(lines) == 1 and lines[0].startswith("tether: cannot listen"), lines
        proc = tether_cli.run(["echo", f"unix:{path}", "first"], env=first.env)
        assert proc.returncode == 0, proc
        assert proc.stdout == b"first\n"


def test_a_stopping_agent_leaves_the_socket_another_agent_bound(
    tmp_path: Path, tether_cli: type[Cli]
) -> None:
    """The first agent's socket file was removed and a second agent bound the
    same path: when the first stops it must not remove the second's (it did,
    and the second could no longer be reached)."""
    path = tmp_path / "shared.sock"
    first = start_agent(tmp_path, "--no-tcp", "--unix", str(path), name="first")
    try:
        path.unlink()
        with running_agent(tmp_path, "--no-tcp", "--unix", str(path), name="second") as second:
            assert first.stop() == 0
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
            proc = tether_cli.run(["echo", f"unix:{path}", "second"], env=second.env)
            assert proc.returncode == 0, proc
            assert proc.stdout == b"second\n"
    finally:
        first.stop()
        check_clean_log(first)


def test_sighup_stops_the_agent_and_ends_its_commands(tmp_path: Path) -> None:
    """Its terminal closed: SIGHUP stops the agent as SIGTERM does, commands
    ended, socket removed. It killed the agent outright, and its commands (in
    sessions of their own, which the hangup never reaches) ran on."""
    path = tmp_path / "hup.sock"
    a = start_agent(tmp_path, "--no-tcp", "--unix", str(path), "--grace", "0.5", name="hup")
    pids: list[int] = []

    async def run() -> None:
        async with tether.connect(f"unix:{path}", token=a.token) as conn:
            proc = await conn.exec(shell="echo $$; exec sleep 300")
            async for chunk in proc:
                pids.append(int(chunk.data))
                break
            a.proc.send_signal(signal.SIGHUP)
            with pytest.raises(tether.RemoteError) as caught:
                async with asyncio.timeout(30):
                    await proc.wait()
            assert caught.value.code == "shutting_down"

    try:
        asyncio.run(run())
        assert a.proc.wait(30) == 0
        assert "tether: stopped" in a.log()
        assert not path.exists()
        deadline = time.monotonic() + 10
        while pids and os.path.exists(f"/proc/{pids[0]}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pids and not os.path.exists(f"/proc/{pids[0]}")
    finally:
        a.stop()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    check_clean_log(a)


@contextlib.contextmanager
def serving_with_stderr_piped(
    tmp_path: Path, preexec_fn: Callable[[], object] | None = None, *args: str
) -> Iterator[subprocess.Popen[bytes]]:
    """``tether serve ARGS`` whose stderr is a pipe of ours, once it listens;
    killed at the end if the test left it running."""
    agent = subprocess.Popen(
        [
            *(sys.executable, "-m", "tether", "serve", "--port", "0", "--no-udp"),
            *("--state-dir", str(tmp_path / "state"), "--root", str(tmp_path), *args),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=preexec_fn,
    )
    try:
        assert agent.stderr is not None
        deadline = time.monotonic() + 30
        while b"listening on" not in agent.stderr.readline():
            assert time.monotonic() < deadline and agent.poll() is None, "it did not start"
        yield agent
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


def test_an_agent_started_under_nohup_ignores_sighup(tmp_path: Path) -> None:
    """`nohup tether serve &`: SIGHUP was ignored when the agent started, and
    stays so (it stopped the agent)."""
    ignore_hup = lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)  # noqa: E731
    with serving_with_stderr_piped(tmp_path, ignore_hup) as agent:
        agent.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert agent.poll() is None, "SIGHUP stopped an agent started under nohup"
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0


def test_commands_start_with_the_signals_the_agent_ignores_at_their_default(
    tmp_path: Path,
) -> None:
    """An agent started as a script's background job (SIGINT and SIGQUIT
    ignored) or under nohup (SIGHUP): its commands must not inherit that,
    or a `signal INT` does nothing to them. They did."""

    def ignore() -> None:
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)

    sock = tmp_path / "agent.sock"
    with serving_with_stderr_piped(tmp_path, ignore, "--unix", str(sock)) as agent:
        token = (tmp_path / "state" / "token").read_text().strip()

        async def ignored_by_a_command() -> int:
            async with tether.connect(f"unix:{sock}", token=token) as conn:
                result = await conn.run(["grep", "^SigIgn:", "/proc/self/status"])
            return int(result.stdout.split()[1], 16)

        mask = asyncio.run(ignored_by_a_command())
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
            assert not mask & (1 << (sig - 1)), f"{sig.name} ignored: {mask:#x}"
        agent.send_signal(signal.SIGQUIT)  # still ignored by the agent itself
        agent.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert agent.poll() is None
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0


def test_an_audit_log_that_cannot_be_written_does_not_stop_the_agent(
    tmp_path: Path, tether_cli: type[Cli]
) -> None:
    """/dev/full as the audit log (a full disk): connections are served and the
    agent says once what it cannot record. Every connection hung: the write
    failed inside connection_made, before the hello timer was even set."""
    with running_agent(tmp_path, "--audit-log", "/dev/full", name="full") as a:
        for text in ("one", "two"):
            proc = tether_cli.run(["echo", a.host, text], env=a.env, timeout=30)
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout == text.encode() + b"\n"
        assert a.wait_for_log("cannot write the audit log").count("cannot write the audit") == 1


def test_a_stderr_reader_that_leaves_during_the_start_does_not_stop_the_agent(
    tmp_path: Path,
) -> None:
    """A script reads the agent's stderr up to the token line and closes it:
    the agent starts and serves all the same. It died at once, exit 1, with
    no word (the next start-up line hit EPIPE)."""
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(
        [
            *(sys.executable, "-m", "tether", "serve", "--port", "0", "--no-udp"),
            *("--state-dir", str(tmp_path / "state"), "--unix", str(sock)),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert agent.stderr is not None
        assert b"token" in agent.stderr.readline()
        agent.stderr.close()  # the reader is gone before the TLS lines
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert agent.poll() is None, f"the agent died: {agent.returncode}"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        token = (tmp_path / "state" / "token").read_text().strip()

        async def echo() -> object:
            async with tether.connect(f"unix:{sock}", token=token) as conn:
                return await conn.echo("still here")

        assert asyncio.run(echo()) == "still here"
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


def test_an_audit_log_nobody_reads_does_not_stop_the_agent(tmp_path: Path) -> None:
    """--audit-log a FIFO whose reader stalls (a log shipper that hangs):
    400 connections, each running a command, are served. The agent's event
    loop wrote each audit line, and froze on the full pipe after about 110."""
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # holds it open, reads nothing
    try:
        with running_agent(tmp_path, "--audit-log", str(fifo), unix=True) as a:

            async def run() -> None:
                for _ in range(400):
                    async with asyncio.timeout(10):
                        async with tether.connect(a.unix, token=a.token) as conn:
                            assert (await conn.run(["true"])).returncode == 0

            asyncio.run(run())
            assert os.read(reader, 65536).startswith(b'{"time": ')  # it did write, first
    finally:
        os.close(reader)


def test_a_clean_stop_exits_0_when_nobody_reads_stderr_any_more(tmp_path: Path) -> None:
    """The reader of the agent's stderr went away (a supervisor's log pipe):
    a SIGTERM stop still exits 0. It exited 141 (EPIPE on "tether: stopped"),
    which a supervisor takes for a failure."""
    with serving_with_stderr_piped(tmp_path) as agent:
        assert agent.stderr is not None
        agent.stderr.close()  # the reader is gone
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0


def test_an_agent_whose_stderr_nobody_reads_goes_on_serving(tmp_path: Path) -> None:
    """stderr a pipe read only up to "listening on" (a script that wanted the
    address): 400 connections, each running a command, are all served, and
    SIGTERM still stops the agent soon, exit 0. The pipe filled after about
    200 of them and the next log line blocked the event loop: every
    connection hung, and so did the stop (its "tether: stopped")."""
    sock = tmp_path / "agent.sock"
    with serving_with_stderr_piped(tmp_path, None, "--unix", str(sock)) as agent:
        token = (tmp_path / "state" / "token").read_text().strip()

        async def run() -> None:
            for _ in range(400):
                async with asyncio.timeout(10):
                    async with tether.connect(f"unix:{sock}", token=token) as conn:
                        assert (await conn.run(["true"])).returncode == 0

        asyncio.run(run())
        started = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0
        assert time.monotonic() - started < 15
        assert agent.stderr is not None
        assert b"exec" in agent.stderr.read()  # it did log, into the full pipe


def resident_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_an_agent_stops_reading_a_client_that_reads_none_of_its_answers(agent: Agent) -> None:
    """300 echoes of 1 MiB sent, not one answer read: once the socket takes no
    more of its output the agent reads no more requests, so the sender soon
    blocks and the agent's memory stays put (§4.6). It read on, answering
    into its memory: 300 MiB more."""
    before = resident_mib(agent.proc.pid)
    body = bytes(1024 * 1024)
    sent = 0
    with RawClient(agent.unix.removeprefix("unix:"), timeout=2.0) as raw:
        raw.hello(agent.token)
        with pytest.raises(TimeoutError):  # sendall blocked: the agent stopped reading
            for ident in range(1, 301):
                raw.send_frame({"op": "echo", "id": ident, "body_len": len(body)}, body)
                sent += 1
        time.sleep(0.5)
        grown = resident_mib(agent.proc.pid) - before
    assert sent < 100
    assert grown < 64, (grown, sent)

    # Still serving, that client gone.
    async def echo() -> str | bytes:
        async with tether.connect(agent.host, token=agent.token) as conn:
            return await conn.echo("after")

    assert asyncio.run(echo()) == "after"


def test_many_gets_at_once_take_turns_and_hold_no_more_memory(agent: Agent) -> None:
    """200 gets of a 3 MB file sent in one write and never read: the agent
    sends a few at a time, so its memory stays put. Every get read its first
    chunks at once: 400 MiB more. Through the API, 40 gets at once all arrive."""
    (agent.root / "f").write_bytes(random.randbytes(3_000_000))
    before = resident_mib(agent.proc.pid)
    with RawClient(agent.unix.removeprefix("unix:"), timeout=5.0) as raw:
        raw.hello(agent.token)
        raw.send(b"".join(encode_frame({"op": "get", "id": i, "path": "f"}) for i in range(1, 201)))
        time.sleep(2.0)
        grown = resident_mib(agent.proc.pid) - before
    assert grown < 64, grown

    async def many() -> list[bytes]:
        async with tether.connect(agent.host, token=agent.token) as conn:
            dests = [agent.root / f"copy{i}" for i in range(40)]
            await asyncio.gather(*(conn.get("f", d) for d in dests))
            return [d.read_bytes() for d in dests]

    original = (agent.root / "f").read_bytes()
    assert all(copy == original for copy in asyncio.run(many()))


# 8. Echo -------------------------------------------------------------------------------------


ECHO_TEXTS = ["你好，世界：中文往返", "emoji 😀🎉👍🏽 🇫🇷", "", "  spaces  \t tab", "a\nb"]


@pytest.mark.parametrize("text", ECHO_TEXTS, ids=["chinese", "emoji", "empty", "spaces", "newline"])
def test_cli_echo_round_trip(agent: Agent, tether_cli: type[Cli], text: str) -> None:
    proc = tether_cli.run(["echo", agent.host, text], env=agent.env)
    assert proc.returncode == 0, proc
    assert proc.stdout == (text + "\n").encode()
    lines = stderr_lines(proc)
    assert len(lines) == 1, lines
    assert re.fullmatch(r"round trip \d+(\.\d+)? ms", lines[0]), lines


def test_cli_echo_succeeds_with_stderr_full(agent: Agent) -> None:
    """`tether echo HOST x 2>/dev/full`: the echo went well, only its round
    trip line could not be written: exit 0. It exited 1 (Python's own path
    for an error nobody caught)."""
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "tether", "echo", agent.host, "x"],
            env=agent.env,
            stdout=subprocess.PIPE,
            stderr=full,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )
    assert (proc.returncode, proc.stdout) == (0, b"x\n")


async def test_api_echo_round_trip(agent: Agent) -> None:
    async with tether.connect(agent.host, token=agent.token) as conn:
        for text in ECHO_TEXTS:
            reply = await conn.echo(text)
            assert isinstance(reply, str) and reply == text
            data = text.encode()
            reply_bytes = await conn.echo(data)
            assert isinstance(reply_bytes, bytes) and reply_bytes == data
        binary = bytes(range(256)) + "中".encode("gbk") + b"\xff\x00"
        assert await conn.echo(binary) == binary
        big = os.urandom(1 << 20)
        assert await conn.echo(big) == big


# 9. UDP ping ---------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_cli_ping(agent: Agent, tether_cli: type[Cli]) -> None:
    proc = tether_cli.run(["ping", agent.host, "-c", "3", "-i", "0.2"])
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc
    replies = re.findall(r"^\d+ bytes from \S+: seq=(\d) time=\d+(?:\.\d+)? ms$", out, re.M)
    assert replies == ["0", "1", "2"], out
    assert "3 sent, 3 received, 0% loss" in out
    match = re.search(r"rtt min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms", out)
    assert match, out
    low, avg, high = map(float, match.groups())
    assert 0 <= low <= avg <= high


@pytest.mark.timeout(30)
def test_cli_ping_no_agent(tether_cli: type[Cli]) -> None:
    """Nothing listens on the port: the host says so (ICMP port unreachable),
    and each ping says so at once rather than waiting out -W for silence."""
    host = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = tether_cli.run(["ping", host, "-c", "3", "-i", "0.2", "-W", "5"])
    took = time.monotonic() - started
    out = proc.stdout.decode()
    assert proc.returncode == 1, proc
    assert "3 sent, 0 received, 100% loss" in out
    assert out.count("port unreachable") == 3, out
    assert "time=" not in out
    assert "rtt" not in out
    assert took < 5, took  # not 3 x 5 s


def ping_interrupted(
    host: str, *args: str, once: Callable[[subprocess.Popen[bytes]], None]
) -> tuple[int, bytes, bytes]:
    """``tether ping HOST ARGS``, Ctrl-C once ``once(proc)`` returns: its exit
    code, stdout and stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether", "ping", host, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        once(proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def test_cli_ping_interrupted_prints_its_statistics(agent: Agent) -> None:
    """Ctrl-C ends a ping with the statistics so far, as ping(8) does."""

    def three_replies(proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"PING ")
        for _ in range(3):
            assert b"bytes from" in proc.stdout.readline()

    code, out, err = ping_interrupted(agent.host, "-c", "1000", "-i", "0.05", once=three_replies)
    assert code == 0, err  # replies came: 0, as ping(8), not 130
    match = re.search(rb"^(\d+) sent, (\d+) received", out, re.M)
    assert match, out
    assert int(match[1]) >= 2 and int(match[2]) >= 2
    assert b"rtt min/avg/max" in out


@pytest.mark.timeout(30)
def test_cli_ping_shows_its_ping_line_before_the_first_reply() -> None:
    """A host that answers nothing, -W 5: the PING line comes at once, as
    ping(8)'s does; it waited for the first outcome, 5 s."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{silent.getsockname()[1]}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "tether", "ping", host, "-c", "1", "-W", "5"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert proc.stdout is not None
            started = time.monotonic()
            assert proc.stdout.readline().startswith(b"PING ")
            assert time.monotonic() - started < 3
        finally:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(30)
def test_cli_ping_interrupted_while_it_waits_counts_that_ping() -> None:
    """A ping sent and not yet answered when Ctrl-C comes was sent: "1 sent",
    and, no reply having come, exit 1 (not 130), as ping(8)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # takes pings, answers none
        silent.settimeout(15)
        host = f"127.0.0.1:{silent.getsockname()[1]}"

        def first_ping_on_its_way(proc: subprocess.Popen[bytes]) -> None:
            assert silent.recv(2048).startswith(b"TPNG")

        code, out, err = ping_interrupted(host, "-c", "3", "-W", "20", once=first_ping_on_its_way)
    assert code == 1, err
    assert out.decode() == (
        f"PING {host} (udp): 16 bytes\n--- {host} ping statistics ---\n"
        "1 sent, 0 received, 100% loss\n"
    )


@needs_ipv6
@pytest.mark.skipif(os.geteuid() != 0, reason="unshare -m and mount need root")
@pytest.mark.timeout(30)
def test_cli_ping_moves_on_to_the_next_address_of_a_name(agent: Agent, tmp_path: Path) -> None:
    """A name for ::1 then 127.0.0.1, the agent on 127.0.0.1 only: ::1 refuses,
    and ping moves on to 127.0.0.1 as exec's TCP connect does, and says so."""
    hosts = tmp_path / "hosts"
    hosts.write_text("::1 tether-dual\n127.0.0.1 tether-dual\n")
    # In a mount namespace of its own: /etc/hosts changes for this process only.
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    host = f"tether-dual:{agent.port}"
    cmd = [sys.executable, "-m", "tether", "ping", host, "-c", "2", "-i", "0.1"]
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, str(hosts), *cmd],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, (out, proc.stderr)
    assert out.startswith(f"PING {host} (127.0.0.1, udp): 16 bytes\n"), out
    assert "2 sent, 2 received, 0% loss" in out
    assert "unreachable" not in out


def test_cli_ping_of_a_unix_socket_is_refused_before_anything_is_printed(
    tether_cli: type[Cli],
) -> None:
    proc = tether_cli.run(["ping", "unix:/run/none.sock"])
    assert proc.returncode == 2
    assert proc.stdout == b""
    assert b"Unix socket" in proc.stderr


PING_MAGIC, PONG_MAGIC = b"TPNG", b"TPNR"


def ping_datagram(seq: int, size: int, magic: bytes = PING_MAGIC) -> bytes:
    head = magic + struct.pack(">IQ", seq, time.monotonic_ns())
    return head + bytes(i % 251 for i in range(size - len(head)))


@pytest.mark.timeout(30)
def test_raw_udp_ping(agent: Agent) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2.0)
        sock.connect(tcp_address(agent))
        for seq, size in enumerate([16, 100, 1024], start=1):
            request = ping_datagram(seq, size)
            sock.send(request)
            reply = sock.recv(4096)
            assert len(reply) == len(request) == size
            assert reply == PONG_MAGIC + request[len(PING_MAGIC) :]
        # Never answered: too big, too small, wrong magic.
        ignored = [
            ping_datagram(100, 1500),
            ping_datagram(101, 1025),
            ping_datagram(102, 64)[:15],
            *(ping_datagram(103 + i, size, b"XPNG") for i, size in enumerate([16, 100, 1024])),
            ping_datagram(110, 64, PONG_MAGIC),  # a reply is not answered (no loops)
        ]
        sock.settimeout(0.3)
        for datagram in ignored:
            sock.send(datagram)
            with pytest.raises(TimeoutError):
                sock.recv(4096)
        # Nothing late either: the next datagram in is the answer to a good ping.
        sock.settimeout(2.0)
        request = ping_datagram(999, 32)
        sock.send(request)
        assert sock.recv(4096) == PONG_MAGIC + request[len(PING_MAGIC) :]


# 10. Many rounds; client disconnects ----------------------------------------------------------


@pytest.mark.timeout(60)
async def test_1000_sequential_echoes_on_one_connection(agent: Agent) -> None:
    async with tether.connect(agent.host, token=agent.token) as conn:
        for i in range(1000):
            if i % 3 == 0:
                data: str | bytes = f"{i}:" + "回" * (i % 17)
            elif i % 3 == 1:
                data = i.to_bytes(4, "big") * (i % 13)
            else:
                data = ""
            assert await conn.echo(data) == data, i
        assert (await conn.run(["echo", "after 1000"])).stdout == b"after 1000\n"


@pytest.mark.timeout(60)
async def test_client_disconnect_ends_only_its_session(agent: Agent) -> None:
    sleep_argv = ["sleep", f"{40 + os.getpid() % 10}.{os.getpid()}"]
    async with tether.connect(agent.host, token=agent.token) as other:
        # Leaves in the middle of a running exec.
        with RawClient(tcp_address(agent)) as raw:
            raw.hello(agent.token)
            raw.send(encode_frame({"op": "exec", "id": 1, "argv": sleep_argv}))
            deadline = time.monotonic() + 10
            while (pid := find_process(sleep_argv)) is None:
                assert time.monotonic() < deadline, "the remote command never started"
                await asyncio.sleep(0.05)
        deadline = time.monotonic() + 15
        while process_alive(pid):
            assert time.monotonic() < deadline, "the disconnected client's command is still running"
            await asyncio.sleep(0.1)
        assert await other.echo("after exec client left") == "after exec client left"
        # Leaves in the middle of a frame body (hard close: RST).
        with RawClient(tcp_address(agent)) as raw:
            raw.hello(agent.token)
            raw.send(header_frame({"op": "echo", "id": 1, "body_len": 1000}) + b"partial")
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert await other.echo("after reset") == "after reset"
        # Connects and leaves without a byte (an empty read).
        socket.create_connection(tcp_address(agent), timeout=IO_TIMEOUT).close()
        assert await other.echo("after empty") == "after empty"
        async with tether.connect(agent.host, token=agent.token) as fresh:
            assert await fresh.echo("fresh") == "fresh"
        result = await other.run(["echo", "other still runs commands"])
        assert result.stdout == b"other still runs commands\n"


# 11, 12. Ports ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_reuseaddr_restart_on_same_port(tmp_path: Path, tether_cli: type[Cli]) -> None:
    port = free_port()
    first = start_agent(tmp_path, "--port", str(port), name="first")
    try:
        with RawClient(("127.0.0.1", port)) as raw:
            raw.hello(first.token)
            raw.send(encode_frame({"op": "echo", "id": 1}, b"x"))
            assert raw.read_frame().op == "ok"
            assert first.stop() == 0  # with the client still connected
            # The agent closed the connection first, so its side of it lingers
            # (FIN_WAIT/TIME_WAIT) and blocks a plain bind: only SO_REUSEADDR
            # lets the next agent in.
            assert raw.read_to_eof() == []
            with socket.socket() as probe, pytest.raises(OSError) as info:
                probe.bind(("127.0.0.1", port))
            assert info.value.errno == errno.EADDRINUSE
            with running_agent(tmp_path, "--port", str(port), name="second") as second:
                assert second.port == port
                proc = tether_cli.run(["echo", second.host, "rebound"], env=second.env)
                assert proc.returncode == 0, proc
                assert proc.stdout == b"rebound\n"
    finally:
        first.stop(signal.SIGKILL)
        check_clean_log(first)


@pytest.mark.timeout(60)
def test_two_agents_cannot_share_a_port(tmp_path: Path, tether_cli: type[Cli]) -> None:
    port = free_port()
    with running_agent(tmp_path, "--port", str(port), name="first") as first:
        token_file = tmp_path / "token"
        token_file.write_text(first.token)
        token_file.chmod(0o600)  # a secret: the agent refuses one others may read
        second = subprocess.run(
            [
                *(sys.executable, "-m", "tether", "serve", "--port", str(port)),
                *("--token-file", str(token_file), "--root", str(tmp_path)),
                *("--state-dir", str(tmp_path / "second-state")),
            ],
            capture_output=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        lines = stderr_lines(second)
        assert second.returncode != 0, second
        # Its certificate lines come first; the failure is one line of its own.
        errors = [line for line in lines if line.startswith("tether: cannot")]
        assert len(errors) == 1, lines
        assert errors[0].startswith("tether: cannot listen"), lines
        assert not any("listening on" in line or "Traceback" in line for line in lines), lines
        proc = tether_cli.run(["echo", first.host, "first still serves"], env=first.env)
        assert proc.returncode == 0, proc
        assert proc.stdout == b"first still serves\n"


async def test_stdin_sent_right_behind_exec_is_never_lost(agent: Agent) -> None:
    """Exec, stdin and EOF in one write reach the child before its handler has run."""
    async with tether.connect(agent.host, token=agent.token) as conn:
        for i in range(30):
            proc = await conn.exec(["cat"], stdin=True)
            await proc.write(b"line %d\n" % i)  # nothing has yielded since exec was queued
            await proc.close_stdin()
            async with asyncio.timeout(10):
                out = b"".join([chunk.data async for chunk in proc])
            assert out == b"line %d\n" % i
            assert proc.exit_status is not None and proc.exit_status.status == 0

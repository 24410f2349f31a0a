"""Memory of an agent holding many idle authenticated connections, beside a minimal server.

Run by hand; this is a benchmark, not a test. For each transport asked for
(plaintext TCP, TLS), it starts a real agent (``python -m tether serve --port 0``,
its own temporary state directory) and reads its resident memory (``VmRSS`` in
``/proc/PID/status``) twice:

- before any connection (the baseline);
- once ``--count`` connections (10,000 by default) have each sent a ``hello``
  with the agent's token and had it accepted, and then sit there doing nothing.

A sample of 100 of the connections then sends an ``echo`` and must get it back:
the connections measured were alive and served. The connections are opened by
ONE client process (this script with ``--hold``), a few dozen at a time so the
agent's ``--max-unauthenticated`` limit (64) is never reached.

For comparison, in the same run: a minimal server on the same event loop
(uvloop when importable) whose protocol is asyncio's do-nothing
``asyncio.Protocol``, over the same transport (TLS with the agent's certificate),
held open by the same client code, with no hello. Its cost per connection is a
floor for what any asyncio server pays for a socket, a transport (and a TLS
session); the rest of the agent's is tether's own.

Loopback only; every wait is bounded in time; every process started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

# Run as ``python bench/bench_idle.py``: ``bench/`` is on sys.path, so this imports
# bench/common.py.
import common
import echo_load

DEFAULT_COUNT = 10_000  # idle connections held
OPENING_AT_ONCE = 48  # connections opening concurrently: below --max-unauthenticated (64)
CONNECT_TIMEOUT = 30.0  # seconds for one connection to open and (tether) say hello
HOLD_TIMEOUT = 600.0  # seconds for the client to open every connection
STEP_TIMEOUT = 60.0  # seconds for any other step (the alive check, closing, fds showing up)
ALIVE_SAMPLE = 100  # connections that send an echo once all are held
ECHO_BODY = b"still here"
FD_MARGIN = 64  # descriptors a process needs besides its connections
LENGTH = echo_load.LENGTH  # a tether frame's header length prefix
TOKEN_ENV = "TETHER_BENCH_TOKEN"  # how the client gets the token (not on the command line)


# File descriptors --------------------------------------------------------------------


def raise_nofile_limit(needed: int) -> None:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit.

    Child processes inherit it: the agent, the peer server and the client each hold
    ``needed`` sockets, above the usual soft limit of 1024.

    Raises:
        SystemExit: the hard limit is below ``needed``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # "unlimited" is not accepted for RLIMIT_NOFILE: the kernel caps it at nr_open.
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if target < needed:
        raise SystemExit(
            f"RLIMIT_NOFILE hard limit is {hard}, {needed} descriptors are needed: "
            "raise it (ulimit -Hn) or pass a smaller --count"
        )
    if soft == resource.RLIM_INFINITY or soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def open_fds(pid: int) -> int:
    """How many file descriptors process ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def memory_kib(pid: int) -> tuple[int, int]:
    """Resident set size of process ``pid`` now and at its peak (VmRSS, VmHWM), in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])  # "12345 kB"
    return fields["VmRSS"], fields["VmHWM"]


# The client process: opens the connections and holds them --------------------------------


class HeldConnection(asyncio.Protocol):
    """The client side of one idle connection: says hello (to an agent), then sits.

    Frames from the agent resolve ``reply``, the future of the one frame awaited
    (the hello reply, then an echo's ``ok``).
    """

    def __init__(self, hello: bytes | None) -> None:
        self.hello = hello
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.reply: asyncio.Future[tuple[dict[str, Any], bytes]] | None = None
        self.lost = False
        if hello is not None:
            self.reply = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's: cast, do not assert.
        self.transport = cast(asyncio.Transport, transport)
        if self.hello is not None:
            self.transport.write(self.hello)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= LENGTH.size:
            (header_len,) = LENGTH.unpack_from(self.buffer)
            if len(self.buffer) < LENGTH.size + header_len:
                return
            header = json.loads(self.buffer[LENGTH.size : LENGTH.size + header_len])
            end = LENGTH.size + header_len + header.get("body_len", 0)
            if len(self.buffer) < end:
                return
            body = bytes(self.buffer[LENGTH.size + header_len : end])
            del self.buffer[:end]
            if self.reply is not None and not self.reply.done():
                self.reply.set_result((header, body))
            # else: a frame nobody waits for (an error before close): connection_lost follows.

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.reply is not None and not self.reply.done():
            self.reply.set_exception(ConnectionError(f"connection lost: {exc}"))

    async def echo(self, ident: int) -> None:
        """Send an echo and check the agent's ``ok`` carries the same id and body."""
        assert self.transport is not None
        self.reply = asyncio.get_running_loop().create_future()
        self.transport.write(echo_load.tether_frame({"op": "echo", "id": ident}, ECHO_BODY))
        header, body = await self.reply
        if header.get("op") != "ok" or header.get("id") != ident or body != ECHO_BODY:
            raise AssertionError(f"unexpected answer to echo {ident}: {header} {body!r}")


def client_tls_context() -> ssl.SSLContext:
    """TLS 1.3 without checking the certificate: this measures memory, not trust."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def open_all(
    port: int, count: int, token: str | None, tls: bool
) -> tuple[list[HeldConnection], float]:
    """Open ``count`` connections, ``OPENING_AT_ONCE`` at a time; with a token,
    each sends its hello and waits for the agent's. Returns them and the seconds taken.

    Raises:
        ConnectionError: a connection failed or its hello was refused.
        TimeoutError: a connection took longer than ``CONNECT_TIMEOUT``.
    """
    loop = asyncio.get_running_loop()
    hello = None if token is None else echo_load.TetherCodec(token).hello()
    context = client_tls_context() if tls else None
    held: list[HeldConnection] = []
    remaining = count

    async def opener() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, conn = await loop.create_connection(
                    lambda: HeldConnection(hello), "127.0.0.1", port, ssl=context
                )
                held.append(conn)
                if conn.reply is not None:
                    header, _ = await conn.reply
                    if header.get("op") != "hello":
                        raise ConnectionError(f"hello refused: {header}")

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(min(OPENING_AT_ONCE, count)):
            tg.create_task(opener())
    return held, time.perf_counter() - started


async def alive(held: list[HeldConnection], with_echo: bool) -> str:
    """Check the held connections: none lost, and (tether) a sample answers an echo."""
    lost = sum(conn.lost for conn in held)
    if lost:
        raise ConnectionError(f"{lost} of {len(held)} connections were closed")
    if not with_echo:
        return f"alive {len(held)} (none closed)"
    step = max(1, len(held) // ALIVE_SAMPLE)
    sample = held[::step][:ALIVE_SAMPLE]
    async with asyncio.timeout(STEP_TIMEOUT), asyncio.TaskGroup() as tg:
        for ident, conn in enumerate(sample, start=1):
            tg.create_task(conn.echo(ident))
    return f"alive {len(held)} (none closed; {len(sample)} echoes answered)"


async def hold(port: int, count: int, tls: bool) -> None:
    """The client process: open, report, check when told, close when told.

    Talks to the benchmark over stdin/stdout, one line each way per step:
    ``held N SECONDS`` when every connection is open (and authenticated),
    then ``check`` -> ``alive ...``, then ``close`` (or end of input) -> exit.
    """
    token = os.environ.get(TOKEN_ENV) or None
    held, seconds = await open_all(port, count, token, tls)
    print(f"held {len(held)} {seconds:.2f}", flush=True)
    stdin = sys.stdin
    while (await asyncio.to_thread(stdin.readline)).strip() == "check":
        print(await alive(held, with_echo=token is not None), flush=True)
    for conn in held:
        if conn.transport is not None:
            conn.transport.close()
    await asyncio.sleep(0.1)  # let the closes go out before the loop ends


# The peer: a minimal server ---------------------------------------------------------------


async def serve_peer(cert: str | None, key: str | None) -> None:
    """A server whose protocol does nothing: print the port, serve until SIGTERM."""
    context = None
    if cert is not None and key is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # as tether's agent: TLS 1.3
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()
    # A long accept queue: nothing paces this client (no hello to wait for), and a
    # full queue drops SYNs that come back a second later. Memory is not affected.
    server = await loop.create_server(
        asyncio.Protocol, "127.0.0.1", 0, reuse_address=True, backlog=4096, ssl=context
    )
    await common.serve_until_terminated(server)


def start_peer(cert: Path | None, key: Path | None) -> tuple[subprocess.Popen[bytes], int]:
    """Start this script as the peer server (TLS with ``cert`` and ``key``); it and its port."""
    argv = [sys.executable, __file__, "--peer-server"]
    if cert is not None and key is not None:
        argv += ["--cert", str(cert), "--key", str(key)]
    return common.start_port_server(argv, "peer server")


# Measuring ---------------------------------------------------------------------------------


@dataclass
class Held:
    """One server's memory with no connection and with ``count`` idle ones."""

    count: int
    baseline_kib: int  # VmRSS before any connection
    rss_kib: int  # VmRSS with every connection open and idle
    peak_kib: int  # VmHWM then: the most it used, opening included
    seconds: float  # the client's time to open (and authenticate) them all
    alive: str  # the client's check afterwards

    @property
    def per_connection_kib(self) -> float:
        return (self.rss_kib - self.baseline_kib) / self.count


async def _readline(proc: asyncio.subprocess.Process, timeout: float, what: str) -> str:
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(timeout):
            line = (await proc.stdout.readline()).decode().strip()
    except TimeoutError:
        raise SystemExit(f"the client took over {timeout:.0f}s to {what}") from None
    if not line:
        raise SystemExit(f"the client exited (status {await proc.wait()}) before it could {what}")
    return line


async def _wait_for_fds(pid: int, wanted: int) -> None:
    """Wait until the server has accepted every connection the client opened.

    A client's connect completes in the kernel's backlog before the server accepts:
    the server's memory is read only once it holds a descriptor for each.
    """
    deadline = time.monotonic() + STEP_TIMEOUT
    while open_fds(pid) < wanted:
        if time.monotonic() > deadline:
            raise SystemExit(f"process {pid} has {open_fds(pid)} descriptors, not {wanted}")
        await asyncio.sleep(0.1)


async def hold_against(pid: int, port: int, count: int, token: str | None, tls: bool) -> Held:
    """Memory of server ``pid`` (listening on ``port``) before and while a client process
    holds ``count`` idle connections to it; with ``token``, authenticated ones."""
    baseline, _ = memory_kib(pid)
    fds_before = open_fds(pid)
    env = dict(os.environ)
    env.pop(TOKEN_ENV, None)
    if token is not None:
        env[TOKEN_ENV] = token
    argv = [sys.executable, __file__, "--hold", str(port), "--count", str(count)]
    client = await asyncio.create_subprocess_exec(
        *argv, *(["--tls"] if tls else []), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    assert client.stdin is not None
    try:
        line = await _readline(client, HOLD_TIMEOUT, f"open {count} connections")
        _, held, seconds = line.split()
        if int(held) != count:
            raise SystemExit(f"the client holds {held} connections, not {count}")
        await _wait_for_fds(pid, fds_before + count)
        await asyncio.sleep(0.5)  # let anything the last connections started settle
        rss, peak = memory_kib(pid)
        client.stdin.write(b"check\n")
        alive = await _readline(client, STEP_TIMEOUT, "check its connections")
        client.stdin.write(b"close\n")
        await common.reap(client, STEP_TIMEOUT)
    finally:
        await common.reap(client, grace=0)  # a step failed: kill it now
    return Held(count, baseline, rss, peak, float(seconds), alive)


def measure_held(count: int, tls: bool) -> tuple[Held, Held]:
    """The agent's memory and the peer's, each holding ``count`` idle connections."""
    raise_nofile_limit(count + FD_MARGIN)
    with tempfile.TemporaryDirectory(prefix="tether-bench-idle-") as name:
        tmp = Path(name)
        agent = common.Agent.start(tmp, tls=tls)
        try:
            ours = common.run_loop(
                hold_against(agent.proc.pid, agent.port, count, agent.token, tls)
            )
        finally:
            agent.stop()
        state = tmp / "state"
        cert, key = (state / "cert.pem", state / "key.pem") if tls else (None, None)
        peer, peer_port = start_peer(cert, key)
        try:
            theirs = common.run_loop(hold_against(peer.pid, peer_port, count, None, tls))
        finally:
            common.stop_process(peer)
    return ours, theirs


def measure_idle(count: int, tls: bool) -> dict[str, float]:
    """Agent RSS with ``count`` idle authenticated connections, and the peer's.

    Call from synchronous code (it runs its own event loop). Returns MiB:
    ``agent_rss_mib``, ``baseline_mib`` (the agent before any connection),
    ``peer_rss_mib``, ``peer_baseline_mib``, and KiB per connection:
    ``agent_kib_per_connection``, ``peer_kib_per_connection``.
    """
    ours, theirs = measure_held(count, tls)
    return {
        "agent_rss_mib": ours.rss_kib / 1024,
        "baseline_mib": ours.baseline_kib / 1024,
        "peer_rss_mib": theirs.rss_kib / 1024,
        "peer_baseline_mib": theirs.baseline_kib / 1024,
        "agent_kib_per_connection": ours.per_connection_kib,
        "peer_kib_per_connection": theirs.per_connection_kib,
    }


# Output ------------------------------------------------------------------------------------


def table_lines(name: str, held: Held) -> list[tuple[str, ...]]:
    return [
        (f"{name}, no connection", "0", f"{held.baseline_kib / 1024:.1f}", "", "", ""),
        (
            f"{name}, idle",
            f"{held.count:,}",
            f"{held.rss_kib / 1024:.1f}",
            f"{held.peak_kib / 1024:.1f}",
            f"{held.per_connection_kib:.2f}",
            f"{held.count / held.seconds:,.0f}",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="idle connections")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--plaintext", dest="modes", action="store_const", const=["plaintext"])
    modes.add_argument("--tls", dest="modes", action="store_const", const=["tls"])
    modes.add_argument(
        "--both", dest="modes", action="store_const", const=["plaintext", "tls"], help="default"
    )
    # Internal: the client process and the peer server (this script, run again).
    parser.add_argument("--hold", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--peer-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cert", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.count < 1:
        parser.error("--count must be at least 1")
    if args.peer_server:
        common.run_loop(serve_peer(args.cert, args.key))
        return
    if args.hold is not None:
        raise_nofile_limit(args.count + FD_MARGIN)
        common.run_loop(hold(args.hold, args.count, tls=args.modes == ["tls"]))
        return

    print(common.describe_machine(), flush=True)
    lines: list[tuple[str, ...]] = []
    checks: list[str] = []
    for mode in args.modes or ["plaintext", "tls"]:
        ours, theirs = measure_held(args.count, tls=mode == "tls")
        print(f"  {mode}: done", file=sys.stderr, flush=True)
        checks += [f"tether agent, {mode}: {ours.alive}", f"asyncio peer, {mode}: {theirs.alive}"]
        lines += table_lines(f"tether agent, {mode}", ours)
        lines += table_lines(f"asyncio peer, {mode}", theirs)
    print()
    header = ("what", "connections", "RSS MiB", "peak MiB", "KiB per connection", "opened /s")
    common.print_markdown_table(header, lines, right={1, 2, 3, 4, 5})
    print(
        "\nRSS: VmRSS with every connection idle; peak: VmHWM (opening included); "
        "KiB per connection: (RSS - RSS with no connection) / connections; "
        "opened /s: connections (tether: authenticated) per second from one client"
    )
    print("\n".join(["", "checked at the end:", *checks]), flush=True)


if __name__ == "__main__":
    main()

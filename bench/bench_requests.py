"""Requests per second on one connection, against peers measured in the same run.

Run by hand (``make bench``); this is a benchmark, not a test. It starts a real
agent (``python -m tether serve --port 0``) with its own temporary state
directory, and measures through the public API on ONE connection:

- echo round trips per second, 64-byte payload: one at a time, and 100 in flight;
- exec calls per second (``true``): one at a time, and 20 in flight;

and on 100 connections at once, each with one echo in flight at a time (the
peer's client there is ``echo_load.LoadConnection``).

For comparison, in the same run:

- a minimal length-prefixed asyncio echo server (in its own process) and client,
  on the same event loop policy (uvloop when importable);
- local ``asyncio.create_subprocess_exec("true")`` spawns per second, stdout and
  stderr piped, on a stdlib asyncio loop of its own in a worker thread
  (``spawn_rate_stdlib``). uvloop spawns processes 2-4x slower than the stdlib
  loop on this machine, so a uvloop spawn would flatter tether; the combined
  runner (``bench/run_exec.py``) uses the same stdlib-loop peer.

A rate is operations / wall time of a whole batch of a fixed count. Each row is
the median of ``--runs`` runs after one short warm-up of each side, tether's and
the peer's runs taking turns (``common.alternate``). Loopback only; every count is
fixed and every run is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# Run as ``python bench/bench_requests.py``: ``bench/`` is on sys.path, so this imports
# bench/common.py.
import common
import echo_load
from echo_load import PAYLOAD

if TYPE_CHECKING:
    import tether

ECHO_N = 2000  # echo round trips per run
ECHO_CONCURRENCY = 100  # echoes in flight in the concurrent row
ECHO_CLIENTS = 100  # connections in the many-clients row, one echo in flight on each
EXEC_N = 200  # commands per run
EXEC_CONCURRENCY = 20  # commands in flight in the concurrent row
RUN_TIMEOUT = 120.0  # seconds one run may take before the benchmark gives up
LENGTH = struct.Struct(">I")  # the peer's frame prefix


# The peer: a minimal length-prefixed echo server and a pipelining client ------------


class NoDelayProtocol(asyncio.Protocol):
    """Keeps the transport and turns Nagle's algorithm off, as tether does."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = echo_load.no_delay(transport)


class PeerEchoServer(NoDelayProtocol):
    """Echoes each ``u32 length | payload`` frame back as it is."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = 0
        while len(self.buffer) - end >= LENGTH.size:
            (length,) = LENGTH.unpack_from(self.buffer, end)
            if len(self.buffer) - end - LENGTH.size < length:
                break
            end += LENGTH.size + length
        if end:
            self.transport.write(bytes(self.buffer[:end]))
            del self.buffer[:end]


class PeerEchoClient(NoDelayProtocol):
    """Sends frames and matches replies in order (the peer has no request ids)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiting: collections.deque[asyncio.Future[bytes]] = collections.deque()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= LENGTH.size:
            (length,) = LENGTH.unpack_from(self.buffer)
            if len(self.buffer) - LENGTH.size < length:
                break
            body = bytes(self.buffer[LENGTH.size : LENGTH.size + length])
            del self.buffer[: LENGTH.size + length]
            self.waiting.popleft().set_result(body)

    def connection_lost(self, exc: Exception | None) -> None:
        while self.waiting:
            self.waiting.popleft().set_exception(ConnectionError("peer echo server went away"))

    def echo(self, data: bytes) -> asyncio.Future[bytes]:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        self.transport.write(LENGTH.pack(len(data)) + data)
        return future


async def serve_peer_echo() -> None:
    """The peer server process: print the port, serve until terminated."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(PeerEchoServer, "127.0.0.1", 0, reuse_address=True)
    await common.serve_until_terminated(server)


# The peer's process -------------------------------------------------------------------


def start_peer_echo() -> tuple[subprocess.Popen[bytes], int]:
    """Start this script as the peer echo server; return it and its port."""
    return common.start_port_server(
        [sys.executable, __file__, "--peer-echo-server"], "peer echo server"
    )


# Measuring ----------------------------------------------------------------------------

Op = Callable[[], Awaitable[object]]  # one request, awaited until its reply
RateOf = Callable[[int], Awaitable[float]]  # operations per second over a batch of N


async def rate_over(ops: Sequence[Op], count: int) -> float:
    """Operations per second: ``count`` calls in all, one worker per op in ``ops``
    (each calling its op one at a time), the workers at once."""

    async def worker(op: Op, n: int) -> None:
        for _ in range(n):
            await op()

    shares = [count // len(ops) + (i < count % len(ops)) for i in range(len(ops))]
    started = time.perf_counter()
    async with asyncio.timeout(RUN_TIMEOUT), asyncio.TaskGroup() as tg:
        for op, n in zip(ops, shares, strict=True):
            tg.create_task(worker(op, n))
    return count / (time.perf_counter() - started)


async def rate(op: Op, count: int, concurrency: int) -> float:
    """Operations per second: ``count`` calls of ``op``, ``concurrency`` at a time."""
    return await rate_over([op] * concurrency, count)


def on_this_loop(op: Op, concurrency: int) -> RateOf:
    """``op``'s rate on this event loop, ``concurrency`` calls at a time."""
    return lambda count: rate(op, count, concurrency)


async def median_rates(
    ours: RateOf, theirs: RateOf, count: int, warm_up: int, runs: int
) -> tuple[float, float]:
    """Median rates of tether's side and the peer's over ``runs`` batches of ``count``,
    after one untimed batch of ``warm_up`` each.

    The sides take turns in a changing order (``common.alternate``), which spreads
    any background load on the machine over both.
    """
    for measure in (ours, theirs):
        await measure(warm_up)
    ways = {"tether": lambda: ours(count), "peer": lambda: theirs(count)}
    rates = await common.alternate(ways, runs, RUN_TIMEOUT)
    return statistics.median(rates["tether"]), statistics.median(rates["peer"])


async def local_spawn() -> None:
    """One local ``true``, stdout and stderr piped, as the agent runs it."""
    proc = await asyncio.create_subprocess_exec(
        "true",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await proc.communicate()
    if proc.returncode != 0:
        raise AssertionError(f"true exited {proc.returncode}")


def spawn_rate_stdlib(count: int, concurrency: int) -> float:
    """``local_spawn`` calls per second on a stdlib asyncio loop of its own.

    Run it in a worker thread (``asyncio.to_thread``) of a uvloop program: uvloop
    spawns processes 2-4x slower than the stdlib loop here (about 250/s against
    1,000/s one at a time), so the stdlib loop is the fair local peer.
    """
    return asyncio.run(rate(local_spawn, count, concurrency))


async def stdlib_spawn_rate(count: int, concurrency: int) -> float:
    """``spawn_rate_stdlib`` in a worker thread, awaited from this (uvloop) loop.

    The thread cannot be cancelled: ``rate``'s own RUN_TIMEOUT bounds it.
    """
    return await asyncio.to_thread(spawn_rate_stdlib, count, concurrency)


def spawning_on_stdlib_loop(concurrency: int) -> RateOf:
    """The local spawn rate on a stdlib loop, ``concurrency`` spawns at a time."""
    return lambda count: stdlib_spawn_rate(count, concurrency)


def tether_echo(conn: tether.Connection) -> Op:
    """``conn.echo(64 bytes)``, reply checked."""

    async def op() -> None:
        if await conn.echo(PAYLOAD) != PAYLOAD:
            raise AssertionError("the echo came back different")

    return op


def tether_exec(conn: tether.Connection) -> Op:
    """``conn.run(["true"])``, exit status checked."""

    async def op() -> None:
        result = await conn.run(["true"])
        if result.returncode != 0:
            raise AssertionError(f"true exited {result.returncode}")

    return op


@dataclass
class Row:
    """One line of the table: tether's rate beside the peer's, medians."""

    name: str
    count: int
    tether: float
    peer_name: str
    peer: float


async def many_clients(agent: common.Agent, peer_port: int, runs: int) -> Row:
    """Echo with ECHO_CLIENTS connections at once, one echo in flight on each."""
    async with contextlib.AsyncExitStack() as stack:
        ours: list[Op] = []
        theirs: list[Op] = []
        for _ in range(ECHO_CLIENTS):
            ours.append(tether_echo(await stack.enter_async_context(agent.connect())))
            peer = await echo_load.open_load(peer_port, echo_load.LengthCodec())
            stack.callback(peer.close)
            theirs.append(peer.round_trip)
        ours_median, theirs_median = await median_rates(
            lambda count: rate_over(ours, count),
            lambda count: rate_over(theirs, count),
            ECHO_N,
            ECHO_CLIENTS,
            runs,
        )
    name = f"echo 64 B, {ECHO_CLIENTS} connections"
    return Row(name, ECHO_N, ours_median, "asyncio echo", theirs_median)


async def measure(agent: common.Agent, peer_port: int, runs: int) -> list[Row]:
    """Every row: tether on one connection to ``agent``, the peers, interleaved."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(echo_load.CONNECT_TIMEOUT):
        _, peer = await loop.create_connection(PeerEchoClient, "127.0.0.1", peer_port)

    async def peer_echo() -> None:
        if await peer.echo(PAYLOAD) != PAYLOAD:
            raise AssertionError("the peer echo came back different")

    rows = []
    try:
        async with agent.connect() as conn:
            echo, run = tether_echo(conn), tether_exec(conn)
            spawn = "local spawn (stdlib loop)"
            specs: list[tuple[str, Op, int, int, str, RateOf]] = [
                (
                    "echo 64 B, sequential",
                    echo,
                    ECHO_N,
                    1,
                    "asyncio echo",
                    on_this_loop(peer_echo, 1),
                ),
                (
                    f"echo 64 B, {ECHO_CONCURRENCY} in flight",
                    echo,
                    ECHO_N,
                    ECHO_CONCURRENCY,
                    "asyncio echo",
                    on_this_loop(peer_echo, ECHO_CONCURRENCY),
                ),
                ("exec true, sequential", run, EXEC_N, 1, spawn, spawning_on_stdlib_loop(1)),
                (
                    f"exec true, {EXEC_CONCURRENCY} in flight",
                    run,
                    EXEC_N,
                    EXEC_CONCURRENCY,
                    spawn,
                    spawning_on_stdlib_loop(EXEC_CONCURRENCY),
                ),
            ]
            for name, op, count, concurrency, peer_name, theirs in specs:
                ours_median, theirs_median = await median_rates(
                    on_this_loop(op, concurrency),
                    theirs,
                    count,
                    max(count // 10, concurrency),
                    runs,
                )
                rows.append(Row(name, count, ours_median, peer_name, theirs_median))
                print(f"  {name}: done", file=sys.stderr, flush=True)
    finally:
        peer.transport.close()
    rows.insert(2, await many_clients(agent, peer_port, runs))
    return rows


def print_table(rows: list[Row], runs: int) -> None:
    header = ("what", "N", "tether /s", "peer", "peer /s", "tether/peer")
    lines = [
        (
            r.name,
            str(r.count),
            f"{r.tether:,.0f}",
            r.peer_name,
            f"{r.peer:,.0f}",
            f"{r.tether / r.peer:.2f}",
        )
        for r in rows
    ]
    common.print_markdown_table(header, lines, right={1, 2, 4, 5})
    print(f"\nmedians of {runs} runs; ops per second; higher is better")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per row (median is shown)")
    parser.add_argument("--peer-echo-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_echo_server:
        common.run_helper(serve_peer_echo())
        return
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    print(common.describe_machine(), flush=True)
    with (
        tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        agent = common.Agent.start(Path(tmp))
        stack.callback(agent.stop)
        peer, peer_port = start_peer_echo()
        stack.callback(common.stop_process, peer)
        rows = common.run_loop(measure(agent, peer_port, args.runs))
    print()
    print_table(rows, args.runs)


if __name__ == "__main__":
    main()

"""Transfer throughput: a 1 GiB put and get, against raw pipes measured in the same run.

Run by hand (``.venv/bin/python bench/bench_transfer.py``); this is a benchmark,
not a test. It writes one random file (1 GiB by default, ``--size`` in MiB) in a
temporary directory, starts a real agent (``python -m tether serve --port 0``,
its own state directory, its root in that temporary directory) and measures,
through the public API on one connection, timing only the transfer itself:

- ``conn.put(file, remote)``: the file to the agent's root;
- ``conn.get(remote, file)``: the same file back from the agent's root.

Both include what a tether transfer always does: BLAKE3 on both ends, the
write to a hidden partial file, ``fsync`` and the rename.

For comparison, in the same run, over TCP on 127.0.0.1:

- a raw asyncio pipe: this script sends the file in 1 MiB writes on a stream
  (uvloop when importable, as tether), a receiver process (an asyncio
  ``BufferedProtocol``) writes what arrives to a file and fsyncs it, then
  acknowledges. No framing, no hashing, no partial file: the floor of moving
  the bytes in Python;
- the same pipe with the receiver most asyncio code would write: a
  ``StreamReader`` handler reading 1 MiB at a time (``reader.read``), writing
  and fsyncing the same way;
- ``socat -u`` with 1 MiB blocks, sender and receiver processes, then an
  ``fsync`` of what arrived (if socat is installed).

Each number is MB/s (10^6 bytes per second), the median of ``--runs`` runs;
within a run the measurements take turns (in a changing order), so
background load falls on all of them. Loopback only; every run is bounded by
a timeout; the temporary directory and every process are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

# Run as ``python bench/bench_transfer.py``: ``bench/`` is on sys.path, so this imports
# bench/common.py.
import common
import machine
from common import MiB, Way

CHUNK = MiB  # bytes per write of the raw pipe (tether's chunk size too)
RUN_TIMEOUT = 300.0  # seconds one measurement may take before the benchmark gives up
COUNT = struct.Struct(">Q")  # the raw receiver's acknowledgement: bytes it wrote
RAW_ROW = "raw asyncio pipe (BufferedProtocol)"
STREAM_ROW = "raw asyncio pipe (StreamReader)"
SOCAT_ROW = "socat -u, 1 MiB blocks"


# The raw pipe: a receiver process and a sender --------------------------------------


class RawReceiver(asyncio.BufferedProtocol):
    """Writes every byte of a connection to ``dest``; at EOF fsyncs and acknowledges."""

    def __init__(self, dest: str) -> None:
        self.dest = dest
        self.buffer = memoryview(bytearray(CHUNK))
        self.count = 0
        self.fd = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.fd = os.open(self.dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        view = self.buffer[:nbytes]
        while view:
            view = view[os.write(self.fd, view) :]
        self.count += nbytes

    def eof_received(self) -> bool:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        self.transport.write(COUNT.pack(self.count))
        self.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.fd >= 0:
            os.close(self.fd)


async def serve_raw_receiver(dest: str) -> None:
    """The receiver process: print the port, receive until terminated."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: RawReceiver(dest), "127.0.0.1", 0)
    await common.serve_until_terminated(server)


async def serve_stream_receiver(dest: str) -> None:
    """The StreamReader receiver process: what most asyncio code writes.

    ``asyncio.start_server`` and a handler that reads 1 MiB at a time with
    ``reader.read`` and writes it to ``dest``; at EOF it fsyncs and acknowledges,
    as ``RawReceiver``. Prints the port, receives until terminated.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count = 0
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while chunk := await reader.read(CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                count += len(chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        writer.write(COUNT.pack(count))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=CHUNK)
    await common.serve_until_terminated(server)


async def raw_send(port: int, source: Path, size: int) -> float:
    """Seconds to send ``source`` through the raw pipe until the receiver has it on disk."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        fd = os.open(source, os.O_RDONLY)
        try:
            while chunk := os.read(fd, CHUNK):
                writer.write(chunk)
                await writer.drain()
        finally:
            os.close(fd)
        writer.write_eof()
        (count,) = COUNT.unpack(await reader.readexactly(COUNT.size))
        elapsed = time.perf_counter() - started
    finally:
        writer.close()
    await writer.wait_closed()
    if count != size:
        raise SystemExit(f"the raw receiver wrote {count} bytes, not {size}")
    return elapsed


# socat --------------------------------------------------------------------------------


def listening(port: int) -> bool:
    """Whether something listens on TCP 127.0.0.1:``port`` (Linux: /proc/net/tcp)."""
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        time.sleep(0.5)
        return True
    wanted = f"0100007F:{port:04X}"
    return any(f[1] == wanted and f[3] == "0A" for f in (line.split() for line in lines))


def socat_send(socat: str, source: Path, dest: Path, size: int) -> float:
    """Seconds for ``socat -u`` to move ``source`` to ``dest`` over TCP, fsync included.

    The receiver is started and listening before the timed span, which runs from
    the sender's start to the fsync of ``dest`` once both have exited.
    """
    port = common.free_port()
    block = str(CHUNK)
    receiver = subprocess.Popen(
        [
            socat,
            "-u",
            "-b",
            block,
            f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr",
            f"OPEN:{dest},creat,trunc,wronly",
        ],
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + common.START_TIMEOUT
        while not listening(port):
            if receiver.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the socat receiver did not start")
            time.sleep(0.01)
        started = time.perf_counter()
        common.timed_run(
            "the socat sender",
            [socat, "-u", "-b", block, f"OPEN:{source},rdonly", f"TCP:127.0.0.1:{port}"],
            RUN_TIMEOUT,
        )
        # Only once the sender has succeeded: a receiver nobody connected to never exits.
        try:
            receiver.wait(RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"the socat receiver ran over {RUN_TIMEOUT:.0f} s") from None
        if receiver.returncode == 0:
            common.fsync_path(dest)
        elapsed = time.perf_counter() - started
    finally:
        common.stop_process(receiver)
    if receiver.returncode or dest.stat().st_size != size:
        raise SystemExit(f"the socat receiver failed (exit {receiver.returncode})")
    return elapsed


# Processes ----------------------------------------------------------------------------


def start_raw_receiver(dest: Path, stream: bool = False) -> tuple[subprocess.Popen[bytes], int]:
    """Start this script as a raw pipe's receiver (``stream``: the StreamReader one);
    return it and its port."""
    mode = "--stream-receiver" if stream else "--raw-receiver"
    return common.start_port_server(
        [sys.executable, __file__, mode, str(dest)], f"raw receiver ({mode})"
    )


# Measuring ----------------------------------------------------------------------------


@contextlib.contextmanager
def receiver(dest: Path, stream: bool = False) -> Iterator[tuple[int, int]]:
    """A raw pipe receiver process writing to ``dest``, for the ``with`` block;
    its port and process id."""
    proc, port = start_raw_receiver(dest, stream)
    try:
        yield port, proc.pid
    finally:
        common.stop_process(proc)


def pipe_way(port: int, source: Path, dest: Path) -> Way:
    """Seconds to send ``source`` to the receiver on ``port``, which writes ``dest``."""
    size = source.stat().st_size

    async def way() -> float:
        elapsed = await raw_send(port, source, size)
        common.remove(dest)
        return elapsed

    return way


def socat_way(socat: str, source: Path, dest: Path) -> Way:
    """Seconds for socat to move ``source`` to ``dest`` (run in a thread: it blocks)."""
    size = source.stat().st_size

    async def way() -> float:
        elapsed = await asyncio.to_thread(socat_send, socat, source, dest, size)
        common.remove(dest)
        return elapsed

    return way


@dataclass
class Setup:
    """What ``measure`` works with, made by ``main``."""

    tmp: Path
    source: Path  # the local file put sends
    root: Path  # the agent's root
    agent: common.Agent
    pipes: dict[str, Way]  # the raw pipes and socat, by row name
    size: int


async def measure(setup: Setup, runs: int) -> dict[str, list[float]]:
    """Seconds per run of each way, runs interleaved in a changing order."""
    os.link(setup.source, setup.root / "source.bin")  # what get fetches
    got = setup.tmp / "got.bin"
    digests: set[str] = set()

    async with setup.agent.connect() as conn:

        async def put() -> float:
            started = time.perf_counter()
            result = await conn.put(str(setup.source), "put.bin")
            elapsed = time.perf_counter() - started
            digests.add(result.digest)
            common.remove(setup.root / "put.bin")
            return elapsed

        async def get() -> float:
            started = time.perf_counter()
            result = await conn.get("source.bin", str(got))
            elapsed = time.perf_counter() - started
            digests.add(result.digest)
            common.remove(got)
            return elapsed

        ways: dict[str, Way] = {"tether put (conn.put)": put, "tether get (conn.get)": get}
        times = await common.alternate(
            ways | setup.pipes,
            runs,
            RUN_TIMEOUT,
            show=lambda name, seconds: f"{name:30} {setup.size / seconds / 1e6:8.0f} MB/s",
        )
    if len(digests) != 1:
        raise SystemExit(f"put and get disagree on the file's digest: {digests}")
    return times


def size_label(size: int) -> str:
    """``1 GiB``, ``64 MiB``."""
    return f"{size // MiB} MiB" if size % (1024 * MiB) else f"{size // (1024 * MiB)} GiB"


def print_table(times: dict[str, list[float]], size: int, runs: int) -> None:
    rate = {k: size / statistics.median(v) / 1e6 for k, v in times.items() if v}
    raw, socat = rate[RAW_ROW], rate.get(SOCAT_ROW)
    header = (f"one file, {size_label(size)}, loopback", "MB/s", "/ raw pipe", "/ socat")
    lines = [
        (
            name,
            f"{value:,.0f}",
            f"{value / raw:.2f}",
            f"{value / socat:.2f}" if socat is not None else "-",
        )
        for name, value in rate.items()
    ]
    common.print_markdown_table(header, lines, right={1, 2, 3})
    print(f"\nmedians of {runs} runs; MB = 10^6 bytes; higher is better; fsync included")


def file_system(directory: Path) -> str:
    """The type of the file system ``directory`` is on (Linux: /proc/mounts), or "?"."""
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) < 3:
                continue
            mount = fields[1].replace("\\040", " ")
            inside = str(directory) == mount or str(directory).startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, kind = mount, fields[2]
    return kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per way (median is shown)")
    parser.add_argument("--size", type=int, default=1024, help="file size in MiB")
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary files go")
    parser.add_argument("--no-socat", action="store_true", help="skip socat even if installed")
    parser.add_argument("--raw-receiver", metavar="DEST", help=argparse.SUPPRESS)
    parser.add_argument("--stream-receiver", metavar="DEST", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_receiver:
        common.run_helper(serve_raw_receiver(args.raw_receiver))
        return
    if args.stream_receiver:
        common.run_helper(serve_stream_receiver(args.stream_receiver))
        return
    if args.runs < 1 or args.size < 1:
        parser.error("--runs and --size must be at least 1")
    size = args.size * MiB
    socat = None if args.no_socat else shutil.which("socat")

    with (
        machine.paused_page_reporting() as setup_note,
        tempfile.TemporaryDirectory(prefix="tether-bench-", dir=args.dir) as name,
        contextlib.ExitStack() as stack,
    ):
        tmp = Path(name)
        print(f"{common.describe_machine()}, files on {tmp} ({file_system(tmp)})", flush=True)
        print(setup_note, flush=True)
        if socat is None:
            print("socat is not installed: its row is left out", file=sys.stderr)
        root = tmp / "root"
        root.mkdir()
        source = tmp / "source.bin"
        common.write_random(source, size)
        agent = common.Agent.start(tmp, root)
        stack.callback(agent.stop)
        raw, stream = tmp / "raw.bin", tmp / "stream.bin"
        pipes = {
            RAW_ROW: pipe_way(stack.enter_context(receiver(raw))[0], source, raw),
            STREAM_ROW: pipe_way(stack.enter_context(receiver(stream, True))[0], source, stream),
        }
        if socat is not None:
            pipes[SOCAT_ROW] = socat_way(socat, source, tmp / "socat.bin")
        setup = Setup(tmp, source, root, agent, pipes, size)
        times = common.run_loop(measure(setup, args.runs))
        agent_rss = common.peak_rss_mib(agent.proc.pid)
    print()
    print_table(times, size, args.runs)
    client_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    shown = f"{agent_rss:.0f} MiB" if agent_rss is not None else "unknown"
    print(f"peak RSS: agent {shown}, this client process {client_rss:.0f} MiB")


if __name__ == "__main__":
    main()

"""Section "transfer" of the combined benchmark (``bench/run.py``): one file, put and get.

One random file (1 GiB by default) is moved over loopback by tether and by each
peer, every way once per round, the rounds in a changing order
(``common.alternate``). Each figure is MB/s (10^6 bytes) of the median time.
What is timed:

- tether put / get, plaintext and TLS: ``conn.put(file, "put.bin")`` and
  ``conn.get("source.bin", file)`` on a connection opened beforehand, in a client
  process of its own (``bench/transfer_client.py``, which imports only tether);
  the agents (one plaintext, one TLS pinned by fingerprint) write and read their
  root in the temporary directory. BLAKE3 on both ends, partial file, fsync,
  rename: everything a tether transfer does.
- the raw asyncio pipes (this process sends 1 MiB writes; a receiver process, a
  ``BufferedProtocol`` or a ``StreamReader`` handler, writes the file and fsyncs)
  and ``socat -u``: ``bench/bench_transfer.py``. A pipe has one direction: put
  and get are both compared with it.
- scp and sftp processes, default cipher and aes128-gcm, and asyncssh and
  paramiko SFTP on a connection opened beforehand, against a throwaway sshd on
  127.0.0.1: ``bench/sshpeers.py`` (each fsyncs the destination in the timed span).

The agents' and the raw receiver's peak memory (VmHWM) are read at the end, and
the client process's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_transfer
import common
import sshpeers
from bench_transfer import RAW_ROW, SOCAT_ROW, STREAM_ROW
from common import MiB, Way
from report import AGENT_OPTIONS, Row, Section, Settings, Target, rate

CLIENT = Path(__file__).with_name("transfer_client.py")
RUN_TIMEOUT = 600.0  # seconds one transfer may take (paramiko on a loaded machine)
GCM = "aes128-gcm"
RSS_LIMIT = Target(128, at_least=False, unit="MiB")
MODES = ("plaintext", "TLS")

# The rows: (peer way, target) for each tether way; "{d}" is put or get.
PLAINTEXT_PEERS = [
    (RAW_ROW, Target(0.75)),
    (STREAM_ROW, None),
    (SOCAT_ROW, None),
    ("scp {d}", Target(4)),
    ("sftp {d}", None),
]
TLS_PEERS = [
    (f"scp {{d}} {GCM}", Target(1.6)),
    (f"sftp {{d}} {GCM}", None),
    ("asyncssh SFTP {d}", Target(2)),
    ("paramiko SFTP {d}", None),
]


# tether's client process -------------------------------------------------------------


class ClientProcess:
    """``transfer_client.py``, started with one open connection per agent."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, agents: dict[str, common.Agent]) -> ClientProcess:
        spec = {
            mode: {
                "port": a.port,
                "token": a.token,
                "fingerprint": a.fingerprint,
                "known_hosts": str(a.dir / "known_hosts"),
            }
            for mode, a in agents.items()
        }
        env = {**os.environ, "TETHER_BENCH_AGENTS": json.dumps(spec)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(CLIENT),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        client = cls(proc)
        if await client._line(common.START_TIMEOUT) != "ready":
            await common.reap(proc, grace=0)
            raise SystemExit("tether's transfer client did not connect")
        return client

    async def call(self, command: dict[str, Any]) -> dict[str, Any]:
        """Send one command, return its answer; SystemExit on an error answer."""
        assert self.proc.stdin is not None
        if self.proc.returncode is not None:
            raise SystemExit(f"tether's transfer client exited ({self.proc.returncode})")
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        answer: dict[str, Any] = json.loads(await self._line(RUN_TIMEOUT))
        if "error" in answer:
            raise SystemExit(f"tether {command['op']} failed: {answer['error']}")
        return answer

    async def _line(self, timeout: float) -> str:
        """Its next line. Killed if none comes in time (or the wait is cancelled): a
        late answer must not be read as the next command's."""
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                line = await self.proc.stdout.readline()
        except BaseException:
            if self.proc.returncode is None:
                self.proc.kill()  # the event loop's child watcher collects it
            raise
        if not line:
            await common.reap(self.proc)
            raise SystemExit(f"tether's transfer client exited ({self.proc.returncode})")
        return line.decode().strip()

    async def close(self) -> None:
        """End its input; kill it if it has not exited within common.STOP_TIMEOUT."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        await common.reap(self.proc)


@dataclass
class Files:
    """The section's files: what is sent, where it lands, and the digests seen."""

    tmp: Path
    source: Path  # the random file; put sends it, the SSH peers' get fetches it
    root: Path  # the agents' root; root/source.bin is what tether's get fetches
    size: int
    digests: list[str] = field(default_factory=list)  # of every tether transfer


def tether_ways(client: ClientProcess, files: Files) -> dict[str, Way]:
    """put and get over each agent's connection, timed by the client process."""

    def way(op: str, mode: str) -> Way:
        local = files.source if op == "put" else files.tmp / "got.bin"
        remote = "put.bin" if op == "put" else "source.bin"
        landed = files.root / "put.bin" if op == "put" else local

        async def run() -> float:
            answer = await client.call(
                {"op": op, "mode": mode, "local": str(local), "remote": remote}
            )
            files.digests.append(answer["digest"])
            got = landed.stat().st_size
            common.remove(landed)
            if answer["size"] != files.size or got != files.size:
                raise SystemExit(f"tether {op}: {got} bytes landed, not {files.size}")
            return float(answer["seconds"])

        return run

    return {f"tether {op} {mode}": way(op, mode) for mode in MODES for op in ("put", "get")}


# The peers ----------------------------------------------------------------------------


def in_thread(function: Callable[..., float], *args: Any) -> Way:
    """A blocking measurement, run in a thread so the event loop (tether's and
    asyncssh's open connections) keeps running."""
    return lambda: asyncio.to_thread(function, *args)


def openssh_ways(sshd: sshpeers.LocalSshd, files: Files) -> dict[str, Way]:
    """scp and sftp processes, put and get, default cipher and aes128-gcm."""
    put_dest, got = files.tmp / "ssh-put.bin", files.tmp / "ssh-got.bin"
    ways: dict[str, Way] = {}
    for tool in ("scp", "sftp"):
        if sshpeers.missing(tool):
            continue
        for cipher, suffix in ((None, ""), (sshpeers.AES_GCM, f" {GCM}")):
            put = getattr(sshpeers, f"{tool}_put")
            get = getattr(sshpeers, f"{tool}_get")
            ways[f"{tool} put{suffix}"] = cleaned(
                in_thread(put, sshd, files.source, put_dest, cipher), put_dest
            )
            ways[f"{tool} get{suffix}"] = cleaned(
                in_thread(get, sshd, files.source, got, cipher), got
            )
    return ways


def cleaned(way: Way, dest: Path) -> Way:
    """``way``, then ``dest`` removed (outside the timed span)."""

    async def run() -> float:
        seconds = await way()
        common.remove(dest)
        return seconds

    return run


async def asyncssh_ways(
    stack: contextlib.AsyncExitStack, sshd: sshpeers.LocalSshd, files: Files
) -> dict[str, Way]:
    """asyncssh SFTP put and get on a connection and session opened here, untimed."""
    conn = await stack.enter_async_context(sshpeers.asyncssh_connection(sshd))
    sftp = await stack.enter_async_context(conn.start_sftp_client())
    put_dest, got = files.tmp / "asyncssh-put.bin", files.tmp / "asyncssh-got.bin"
    return {
        "asyncssh SFTP put": cleaned(
            lambda: sshpeers.asyncssh_put(sftp, files.source, put_dest), put_dest
        ),
        "asyncssh SFTP get": cleaned(lambda: sshpeers.asyncssh_get(sftp, files.source, got), got),
    }


def paramiko_ways(
    stack: contextlib.ExitStack, sshd: sshpeers.LocalSshd, files: Files
) -> dict[str, Way]:
    """paramiko SFTP put and get on a connection opened here, untimed."""
    sftp = stack.enter_context(sshpeers.paramiko_sftp(sshd))
    put_dest, got = files.tmp / "paramiko-put.bin", files.tmp / "paramiko-got.bin"
    return {
        "paramiko SFTP put": cleaned(
            in_thread(sshpeers.paramiko_put, sftp, files.source, put_dest), put_dest
        ),
        "paramiko SFTP get": cleaned(
            in_thread(sshpeers.paramiko_get, sftp, files.source, got), got
        ),
    }


def missing_peers() -> dict[str, str]:
    """Peer -> why it cannot run here (with the install hint)."""
    reasons = {
        p: r for p in ("sshd", "scp", "sftp", "asyncssh", "paramiko") if (r := sshpeers.missing(p))
    }
    if shutil.which("socat") is None:
        reasons["socat"] = "socat is not installed (apt-get install socat)"
    return reasons


# The section -----------------------------------------------------------------------------


def interleave(ours: dict[str, Way], theirs: dict[str, Way]) -> dict[str, Way]:
    """All ways, tether's spread evenly among the peers' (a fairer first order)."""
    merged: dict[str, Way] = {}
    step = max(1, len(theirs) // max(1, len(ours)))
    peers = list(theirs.items())
    for i, item in enumerate(ours.items()):
        merged.update([item, *peers[i * step : (i + 1) * step]])
    merged.update(peers[len(ours) * step :])
    return merged


@dataclass
class Measured:
    """What ``measure`` found: seconds per way, failures, peak memory in MiB."""

    times: dict[str, list[float]]
    failures: dict[str, str]
    rss: dict[str, float | None]  # "agent plaintext", "agent TLS", "client", "receiver"


async def measure(
    settings: Settings,
    files: Files,
    agents: dict[str, common.Agent],
    peers: dict[str, Way],
    sshd: sshpeers.LocalSshd | None,
    receiver_pid: int,
) -> Measured:
    """Every way over ``settings.runs`` rounds, then the peak memory of tether's processes."""
    async with contextlib.AsyncExitStack() as stack:
        client = await ClientProcess.start(agents)
        stack.push_async_callback(client.close)
        ways = tether_ways(client, files)
        await warm_up(client, files)
        if sshd is not None and sshpeers.available("asyncssh"):
            peers |= await asyncssh_ways(stack, sshd, files)
        failures: dict[str, str] = {}
        times = await common.alternate(
            interleave(ways, peers),
            settings.runs,
            RUN_TIMEOUT,
            show=lambda name, s: f"{name:36} {files.size / s / 1e6:7.0f} MB/s",
            failures=failures,
        )
        rss = {f"agent {m}": common.peak_rss_mib(a.proc.pid) for m, a in agents.items()}
        rss["client"] = None
        with contextlib.suppress(SystemExit):  # the client failed: already reported
            rss["client"] = (await client.call({"op": "rss"}))["peak_mib"]
        rss["receiver"] = common.peak_rss_mib(receiver_pid)
    return Measured(times, failures, rss)


async def warm_up(client: ClientProcess, files: Files) -> None:
    """One small untimed put and get per connection: first-use imports and caches."""
    small = files.tmp / "warm.bin"
    common.write_random(small, MiB)
    os.link(small, files.root / "warm.bin")
    for mode in MODES:
        await client.call({"op": "put", "mode": mode, "local": str(small), "remote": "w.bin"})
        await client.call(
            {"op": "get", "mode": mode, "local": str(files.tmp / "w.bin"), "remote": "warm.bin"}
        )
        for path in (files.root / "w.bin", files.tmp / "w.bin"):
            common.remove(path)


def blake3_hex(path: Path) -> str | None:
    """The file's BLAKE3 digest (hex), computed here to check tether's; None without blake3."""
    try:
        import blake3
    except ImportError:
        return None
    hasher = blake3.blake3()
    with path.open("rb") as f:
        while block := f.read(4 * MiB):
            hasher.update(block)
    return str(hasher.hexdigest())


def pipe_ways(stack: contextlib.ExitStack, files: Files) -> tuple[dict[str, Way], int]:
    """The raw pipes (receiver processes started here) and socat; the raw receiver's pid."""
    raw, stream = files.tmp / "raw.bin", files.tmp / "stream.bin"
    raw_port, raw_pid = stack.enter_context(bench_transfer.receiver(raw))
    stream_port, _ = stack.enter_context(bench_transfer.receiver(stream, stream=True))
    ways = {
        RAW_ROW: bench_transfer.pipe_way(raw_port, files.source, raw),
        STREAM_ROW: bench_transfer.pipe_way(stream_port, files.source, stream),
    }
    if socat := shutil.which("socat"):
        ways[SOCAT_ROW] = bench_transfer.socat_way(socat, files.source, files.tmp / "socat.bin")
    return ways, raw_pid


def run_section(settings: Settings, tmp: Path) -> Section:
    """Set up (file, agents, receivers, sshd, connections), measure, make the rows."""
    size = settings.size_mib * MiB
    files = Files(tmp, tmp / "source.bin", tmp / "root", size)
    files.root.mkdir()
    common.write_random(files.source, size)
    os.link(files.source, files.root / "source.bin")
    expected = blake3_hex(files.source)
    reasons = missing_peers()
    with contextlib.ExitStack() as stack:
        # A plaintext and a TLS agent sharing one root.
        agents = common.start_agents(stack, tmp, MODES, files.root, AGENT_OPTIONS)
        peers, receiver_pid = pipe_ways(stack, files)
        sshd = None
        if "sshd" not in reasons:
            sshd = stack.enter_context(sshpeers.LocalSshd())
            peers |= openssh_ways(sshd, files)
            if "paramiko" not in reasons:
                peers |= paramiko_ways(stack, sshd, files)
        measured = common.run_loop(measure(settings, files, agents, peers, sshd, receiver_pid))
    section = Section(rows(measured, size), [])
    section.notes += digest_notes(section, files, expected)
    section.notes += rss_notes() + peer_notes(measured, reasons)
    section.failed |= any(name.startswith("tether ") for name in measured.failures)
    return section


def rows(measured: Measured, size: int) -> list[Row]:
    """Each tether transfer against its peers, then the peak memory rows."""
    label = bench_transfer.size_label(size)
    out = []
    for mode, peers in (("plaintext", PLAINTEXT_PEERS), ("TLS", TLS_PEERS)):
        for direction in ("put", "get"):
            ours = rate(size, measured.times.get(f"tether {direction} {mode}"))
            for pattern, target in peers:
                peer = pattern.format(d=direction)
                theirs = rate(size, measured.times.get(peer))
                what = f"{direction} {label} {mode}, MB/s"
                out.append(Row("transfer", what, ours, peer, theirs, target))
    rss = measured.rss
    receiver = "raw pipe receiver (BufferedProtocol)"
    for mode in MODES:
        what = f"peak RSS agent {mode}, MiB"
        out.append(
            Row("transfer", what, rss[f"agent {mode}"], receiver, rss["receiver"], RSS_LIMIT)
        )
    out.append(Row("transfer", "peak RSS client, MiB", rss["client"], "-", None, RSS_LIMIT))
    return out


def digest_notes(section: Section, files: Files, expected: str | None) -> list[str]:
    """Whether every tether transfer reported the same digest, the source's BLAKE3."""
    seen = set(files.digests)
    count = len(files.digests)
    if len(seen) == 1 and (expected is None or seen == {expected}):
        check = "equal to" if expected else "not checked against (no blake3 module)"
        return [
            f"transfer digests: all {count} timed tether transfers (put and get, plaintext "
            f"and TLS) reported BLAKE3 {expected or next(iter(seen))}, {check} the runner's "
            "own BLAKE3 of the source file"
        ]
    section.failed = True
    return [
        f"transfer digests DISAGREE: {count} transfers gave {sorted(seen)}, "
        f"the source's BLAKE3 is {expected}"
    ]


def rss_notes() -> list[str]:
    """What the peak memory rows measure."""
    return [
        "transfer RSS: VmHWM (peak resident memory) over the whole section: each agent from its "
        "start to the end of every transfer; the client is bench/transfer_client.py, a process "
        "of its own that imports tether and the standard library only and did every tether "
        "transfer (the runner itself loads asyncssh and paramiko, so its RSS would say nothing)"
    ]


def peer_notes(measured: Measured, reasons: dict[str, str]) -> list[str]:
    """The peers that are not installed, and every way that failed."""
    notes = [f"transfer: {peer} n/a: {reason}" for peer, reason in reasons.items()]
    notes += [f"transfer: {way} FAILED: {why}" for way, why in measured.failures.items()]
    return notes

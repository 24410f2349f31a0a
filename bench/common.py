"""What the benchmark scripts share: the event loop, the agent and child processes, output.

Not a benchmark itself. The scripts are run as ``python bench/<script>.py``, which
puts ``bench/`` first on ``sys.path``, so they import this module as ``common``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Container, Coroutine, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import tether

T = TypeVar("T")
Way = Callable[[], Awaitable[float]]  # one measurement: its figure (seconds, a rate)

MiB = 1024 * 1024
START_TIMEOUT = 15.0  # seconds for a server process to report its port
STOP_TIMEOUT = 15.0  # seconds a process has to exit after SIGTERM, and again after SIGKILL


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is importable: the policy tether uses."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def run_helper(main: Coroutine[Any, Any, None]) -> None:
    """``run_loop`` for a helper process (a receiver, a peer server, a client): Ctrl-C
    reaches it together with the benchmark, which reports it; no traceback here."""
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(main)


async def alternate(
    ways: Mapping[str, Way],
    runs: int,
    timeout: float,
    show: Callable[[str, float], str] | None = None,
    failures: dict[str, str] | None = None,
) -> dict[str, list[float]]:
    """Each way's results over ``runs`` rounds; every way runs once per round.

    The order changes from round to round (rotated, and reversed every other
    round), so background load on a noisy machine falls on every way rather than
    on whichever always runs after the heaviest one. Each call is bounded by
    ``timeout`` seconds. ``show(name, value)``, if given, makes a progress line
    on stderr. With ``failures``, a way that fails (an exception, a SystemExit
    from a check, the timeout) is recorded there and skipped from then on;
    without, the failure propagates.
    """
    order = list(ways)
    results: dict[str, list[float]] = {name: [] for name in order}
    for run in range(runs):
        shift = run * len(order) // runs
        turn = order[shift:] + order[:shift]
        for name in reversed(turn) if run % 2 else turn:
            if failures is not None and name in failures:
                continue
            try:
                async with asyncio.timeout(timeout):
                    value = await ways[name]()
            except (Exception, SystemExit) as exc:
                if failures is None:
                    raise
                failures[name] = _failure_text(exc, timeout)
                print(f"  run {run + 1}/{runs}: {name} FAILED: {failures[name]}", file=sys.stderr)
                continue
            results[name].append(value)
            if show is not None:
                print(f"  run {run + 1}/{runs}: {show(name, value)}", file=sys.stderr, flush=True)
    return results


async def warm_up_and_alternate(
    ways: Mapping[str, Way],
    runs: int,
    timeout: float,
    show: Callable[[str, float], str] | None = None,
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """One untimed round of every way (a warm-up: first-use imports and caches),
    then ``alternate`` over ``runs`` rounds. A way that fails, in the warm-up or
    later, is left out from then on. Returns the results and the failures (way ->
    one line).
    """
    failures: dict[str, str] = {}
    await alternate(ways, 1, timeout, failures=failures)
    results = await alternate(ways, runs, timeout, show=show, failures=failures)
    return results, failures


def _failure_text(exc: BaseException, timeout: float) -> str:
    """One short line: the first of a group of errors, a SystemExit's message."""
    others = ""
    while isinstance(exc, BaseExceptionGroup):
        others = f" (and {len(exc.exceptions) - 1} more)" if len(exc.exceptions) > 1 else others
        exc = exc.exceptions[0]
    if isinstance(exc, TimeoutError):
        text = f"took over {timeout:.0f} s"
    else:
        text = str(exc.code) if isinstance(exc, SystemExit) else repr(exc)
    text = " ".join(text.split())  # a message over several lines (an agent log) on one
    return (text[:300] + "...") if len(text) > 300 else text + others


# Processes ----------------------------------------------------------------------------


def start_agent(
    tmp: Path, root: Path | None = None, *, tls: bool = False, options: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], int, str]:
    """Start ``python -m tether serve --port 0``; return it, its port and token.

    Its state directory and log (``agent.log``) go in ``tmp``; its root is ``root``,
    ``tmp`` itself when not given. Plaintext (``--insecure-plaintext``) unless
    ``tls``: then it listens on TLS with the certificate it makes in its state
    directory (``agent_fingerprint`` reads its fingerprint). ``options`` are more
    ``serve`` options (limits, timeouts).
    """
    log = tmp / "agent.log"
    argv = [
        sys.executable,
        "-m",
        "tether",
        "serve",
        "--port",
        "0",
        "--no-udp",
        "--state-dir",
        str(tmp / "state"),
        "--root",
        str(tmp if root is None else root),
        *options,
    ]
    if not tls:
        # Plaintext, as the raw peers it is compared with.
        argv.append("--insecure-plaintext")
    with log.open("wb") as stderr:
        agent = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
        )
    prefix = f"tether: listening on {'tls' if tls else 'tcp'} 127.0.0.1:"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                token = (tmp / "state" / "token").read_text().strip()
                return agent, int(line[len(prefix) :]), token
        if agent.poll() is not None:
            break
        time.sleep(0.05)
    stop_process(agent)
    raise SystemExit(f"the agent did not start; its log:\n{log.read_text(errors='replace')}")


def agent_fingerprint(tmp: Path) -> str:
    """The certificate fingerprint a TLS agent started in ``tmp`` printed on stderr."""
    prefix = "tether: certificate fingerprint "
    for line in (tmp / "agent.log").read_text(errors="replace").splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    raise SystemExit(f"the agent in {tmp} printed no certificate fingerprint")


@dataclass
class Agent:
    """An agent started for a benchmark: its process, address and credentials."""

    proc: subprocess.Popen[bytes]
    port: int
    token: str
    fingerprint: str | None  # its TLS certificate's; None for a plaintext agent
    dir: Path  # its state directory and log

    @classmethod
    def start(
        cls, tmp: Path, root: Path | None = None, *, tls: bool = False, options: Sequence[str] = ()
    ) -> Agent:
        """``start_agent`` with the same arguments; a TLS agent's fingerprint is read."""
        proc, port, token = start_agent(tmp, root, tls=tls, options=options)
        return cls(proc, port, token, agent_fingerprint(tmp) if tls else None, tmp)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def connect(self) -> AbstractAsyncContextManager[tether.Connection]:
        """``connect_agent`` to this agent (its known-hosts file in its directory)."""
        return connect_agent(self.port, self.token, self.fingerprint, self.dir / "known_hosts")

    def stop(self) -> None:
        """Stop it (SIGTERM by PID); warn on stderr if it logged a traceback."""
        stop_process(self.proc)
        log = (self.dir / "agent.log").read_text(errors="replace")
        if "Traceback" in log:
            print(f"warning: the agent logged a traceback:\n{log[-5000:]}", file=sys.stderr)


def connect_agent(
    port: int, token: str, fingerprint: str | None, known_hosts: Path
) -> AbstractAsyncContextManager[tether.Connection]:
    """``tether.connect`` to 127.0.0.1:``port``: plaintext without a fingerprint, else
    TLS pinned to it. ``known_hosts`` is passed so that nothing in ``~`` is read or
    written."""
    import tether

    address = f"127.0.0.1:{port}"
    if fingerprint is None:
        return tether.connect(address, token=token, insecure_plaintext=True)
    return tether.connect(address, token=token, fingerprint=fingerprint, known_hosts=known_hosts)


def start_agents(
    stack: ExitStack,
    tmp: Path,
    modes: Sequence[str],
    root: Path | None = None,
    options: Sequence[str] = (),
) -> dict[str, Agent]:
    """One agent per mode ("plaintext" or "TLS"), each in ``tmp/agent-MODE`` with
    ``options``, sharing ``root`` when given; each stopped when ``stack`` closes."""
    agents = {}
    for mode in modes:
        directory = tmp / f"agent-{mode.lower()}"
        directory.mkdir()
        agent = Agent.start(directory, root, tls=mode == "TLS", options=options)
        stack.callback(agent.stop)
        agents[mode] = agent
    return agents


async def serve_until_terminated(server: asyncio.Server) -> None:
    """The end of a helper server process: print its port on stdout (what
    ``start_port_server`` reads), serve until SIGTERM, close."""
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()


def start_port_server(argv: list[str], name: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server process that prints its port first thing; return it and the port.

    Raises:
        SystemExit: no port within START_TIMEOUT (the process is stopped).
    """
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    # The server prints the whole line at once: once readable, readline does not block.
    readable, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
    line = proc.stdout.readline() if readable else b""
    if not line.strip().isdigit():
        stop_process(proc)
        raise SystemExit(f"the {name} did not start")
    return proc, int(line)


def peak_rss_mib(pid: int) -> float | None:
    """A process's peak resident set size (Linux VmHWM), in MiB; None if unknown."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (by PID), then SIGKILL if it has not exited within STOP_TIMEOUT."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)


async def reap(proc: asyncio.subprocess.Process, grace: float = STOP_TIMEOUT) -> None:
    """Wait ``grace`` seconds for a child told to finish (its input closed), then
    SIGKILL it (by PID) and wait again, at most STOP_TIMEOUT."""
    if proc.returncode is None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await proc.wait()
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
            proc.kill()
        async with asyncio.timeout(STOP_TIMEOUT):
            await proc.wait()


def timed_run(
    what: str,
    argv: Sequence[str | Path],
    timeout: float,
    *,
    env: Mapping[str, str] | None = None,
    fsync: Path | None = None,
) -> float:
    """Seconds for the process ``argv`` to exit 0 (no input, output captured), and
    then, when given, for an fsync of the file ``fsync`` (a transfer's destination).

    Raises:
        SystemExit: it ran over ``timeout`` seconds (it is killed), or exited non-zero
            (the message has its stderr, else its stdout).
    """
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{what} did not finish within {timeout:.0f} s") from None
    if proc.returncode == 0 and fsync is not None:
        fsync_path(fsync)
    elapsed = time.perf_counter() - started
    if proc.returncode:
        output = (proc.stderr or proc.stdout).decode(errors="replace").strip()
        raise SystemExit(f"{what} failed (exit {proc.returncode}): {output}")
    return elapsed


# Files and ports ----------------------------------------------------------------------


def write_random(path: Path, size: int) -> None:
    """Write ``size`` random bytes to ``path`` (incompressible, in 4 MiB blocks)."""
    with path.open("wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 4 * MiB))
            f.write(block)
            left -= len(block)


def fsync_path(path: Path) -> None:
    """Flush ``path``'s data to disk, as tether does before it reports a transfer done."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Remove a file if it is there."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (another process may take it before it is used)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# Output -------------------------------------------------------------------------------


def describe_machine() -> str:
    """tether's and Python's versions, the event loop, the CPUs and the OS."""
    try:
        from importlib.metadata import version

        import uvloop  # noqa: F401

        loop = f"uvloop {version('uvloop')}"
    except ImportError:
        loop = "asyncio default loop (no uvloop)"
    import tether

    return (
        f"tether {tether.__version__}, Python {platform.python_version()}, {loop}, "
        f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    )


def print_markdown_table(
    header: tuple[str, ...], lines: Sequence[tuple[str, ...]], right: Container[int]
) -> None:
    """Print a Markdown table; the columns numbered in ``right`` are right-aligned."""
    widths = [max(len(x) for x in column) for column in zip(header, *lines, strict=True)]

    def fmt(cells: tuple[str, ...]) -> str:
        padded = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    print(fmt(header))
    rule = ["-" * (w + 1) + ":" if i in right else "-" * (w + 2) for i, w in enumerate(widths)]
    print("|" + "|".join(rule) + "|")
    for line in lines:
        print(fmt(line))

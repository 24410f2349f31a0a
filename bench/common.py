"""What the benchmark scripts share: the event loop, the agent and child processes, output.

Not a benchmark itself. The scripts are run as ``python bench/<script>.py``, which
puts ``bench/`` first on ``sys.path``, so they import this module as ``common``.
"""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Container, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

START_TIMEOUT = 15.0  # seconds for a server process to report its port


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is importable: the policy tether uses."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


# Processes ----------------------------------------------------------------------------


def start_agent(tmp: Path, root: Path | None = None) -> tuple[subprocess.Popen[bytes], int, str]:
    """Start ``python -m tether serve --port 0``; return it, its port and token.

    Its state directory and log (``agent.log``) go in ``tmp``; its root is ``root``,
    ``tmp`` itself when not given.
    """
    log = tmp / "agent.log"
    with log.open("wb") as stderr:
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tether",
                "serve",
                "--port",
                "0",
                "--no-udp",
                # Plaintext, as the peers it is compared with; TLS figures
                # are the performance issue's to add.
                "--insecure-plaintext",
                "--state-dir",
                str(tmp / "state"),
                "--root",
                str(tmp if root is None else root),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    prefix = "tether: listening on tcp 127.0.0.1:"
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


def start_port_server(argv: list[str], name: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server process that prints its port first thing; return it and the port."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        stop_process(proc)
        raise SystemExit(f"the {name} did not start")
    return proc, int(line)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 15 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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

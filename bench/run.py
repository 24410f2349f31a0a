"""tether beside scp, sftp, asyncssh, paramiko, socat and minimal asyncio: one table.

``make bench`` runs this (or ``.venv/bin/python bench/run.py [--runs N] [--size MiB]
[--only SECTION] [--quick]``). It is a benchmark, not a test. Everything runs on
this machine over loopback (127.0.0.1): agents (``python -m tether serve``),
a throwaway OpenSSH server and the peers' processes, started here and stopped
at the end, even on Ctrl-C; their files go in one temporary directory, removed
at the end. Sections (each described in its module):

- transfer (``run_transfer.py``): one file, 1 GiB by default, put and get,
  plaintext and TLS, MB/s; peak memory of the agents and of tether's client;
- exec (``run_exec.py``): ``true`` calls per second on one connection;
- fresh (``run_exec.py``): wall time of a new ``tether exec`` process vs ``ssh``;
- echo (``run_echo.py``): 64-byte round trips per second, 1 and 100 clients;
- idle (``bench_idle.py``): agent memory with 10,000 idle authenticated connections.

Every figure is the median of ``--runs`` rounds (``--fresh-runs`` for fresh
processes), tether's ways and the peers' taking turns in a changing order, so
background load falls on all. Each row gives the ratio tether/peer, the target
the performance issue sets and whether it is met. A peer that is not installed
shows "n/a" with the install hint; a way that fails shows "n/a" (a peer) or
"failed" (tether), and the runner then exits with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import FrameType

import bench_idle
import machine as machine_setup
import run_echo
import run_exec
import run_transfer
from bench_transfer import file_system
from report import Row, Section, Settings, Target, median, print_rows

TARGET_IDLE = Target(150, at_least=False, unit="MiB")


def run_idle_section(settings: Settings, tmp: Path) -> Section:
    """``bench_idle.measure_idle`` for plaintext and TLS, ``--runs`` times each: RSS medians."""
    rows = []
    for tls in (False, True):
        results = [bench_idle.measure_idle(settings.idle_count, tls) for _ in range(settings.runs)]
        mode = "TLS" if tls else "plaintext"
        ours = median([r["agent_rss_mib"] for r in results])
        theirs = median([r["peer_rss_mib"] for r in results])
        what = f"{settings.idle_count:,} idle connections {mode}, agent RSS MiB"
        rows.append(Row("idle", what, ours, "do-nothing asyncio server", theirs, TARGET_IDLE))
    note = (
        "idle: VmRSS once every connection is open and idle (tether's authenticated with a "
        "hello; a sample answers an echo afterwards), from one client process; the peer is "
        "asyncio.Protocol on the same loop and transport (TLS with the agent's certificate)"
    )
    return Section(rows, [note])


SECTIONS: dict[str, Callable[[Settings, Path], Section]] = {
    "transfer": run_transfer.run_section,
    "exec": run_exec.run_exec_section,
    "fresh": run_exec.run_fresh_section,
    "echo": run_echo.run_echo_section,
    "idle": run_idle_section,
}


# The machine -------------------------------------------------------------------------------


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def command_version(argv: list[str], marker: str) -> str:
    """The first line of ``argv``'s output (stdout or stderr) containing ``marker``."""
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    for line in (proc.stdout + proc.stderr).decode(errors="replace").splitlines():
        if marker in line:
            return line.strip()
    return "unknown"


def machine_line(tmp: Path) -> str:
    """Date, CPUs, kernel, Python, the event loop and every peer's version."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{now}; nproc {len(os.sched_getaffinity(0))}; {platform.system()} {platform.release()} "
        f"{platform.machine()}; Python {platform.python_version()}; "
        f"uvloop {package_version('uvloop')}; tether {package_version('tether')}; "
        f"{command_version(['ssh', '-V'], 'OpenSSH')}; asyncssh {package_version('asyncssh')}; "
        f"paramiko {package_version('paramiko')}; "
        f"{command_version(['socat', '-V'], 'socat version')}; "
        f"files in {tmp.parent} ({file_system(tmp)})"
    )


# Options ----------------------------------------------------------------------------------


def parse_settings() -> tuple[Settings, list[str], Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="rounds per section, medians shown (default 3)")
    parser.add_argument("--fresh-runs", type=int, help="fresh processes of each kind (default 7)")
    parser.add_argument("--size", type=int, help="transfer file size in MiB (default 1024)")
    parser.add_argument(
        "--only", choices=SECTIONS, action="append", help="run only SECTION (repeatable)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and counts: a smoke run")
    parser.add_argument("--dir", type=Path, help="where the temporary files go")
    args = parser.parse_args()
    quick = args.quick
    settings = Settings(
        runs=args.runs or (1 if quick else 3),
        fresh_runs=args.fresh_runs or (3 if quick else 7),
        size_mib=args.size or (64 if quick else 1024),
        exec_count=50 if quick else 200,
        exec_concurrency=50 if quick else 200,
        echo_count=500 if quick else 5000,
        echo_clients=100,
        idle_count=1000 if quick else 10_000,
    )
    if min(settings.runs, settings.fresh_runs, settings.size_mib) < 1:
        parser.error("--runs, --fresh-runs and --size must be at least 1")
    return settings, args.only or list(SECTIONS), args.dir


# Running ----------------------------------------------------------------------------------


def interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM as Ctrl-C, so the cleanups run."""
    raise KeyboardInterrupt


def run_sections(names: list[str], settings: Settings, tmp: Path) -> list[Section]:
    """Each section in its own subdirectory, removed as soon as it is done (a 1 GiB file)."""
    done = []
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        directory = tmp / name
        directory.mkdir()
        try:
            done.append(SECTIONS[name](settings, directory))
        except (Exception, SystemExit) as exc:  # the other sections still run
            message = exc.code if isinstance(exc, SystemExit) else repr(exc)
            print(f"section {name} FAILED: {message}", file=sys.stderr, flush=True)
            done.append(Section([], [f"{name}: the section FAILED: {message}"], failed=True))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    return done


def print_report(machine: str, setup: str, settings: Settings, sections: list[Section]) -> None:
    print(machine)
    print()
    print_rows([row for section in sections for row in section.rows])
    print()
    print(
        f"medians of {settings.runs} rounds (fresh: {settings.fresh_runs}), tether and peers "
        "alternating; MB = 10^6 bytes; every transfer ends with the destination fsynced; "
        "tether/peer > 1 means tether is faster, except for fresh (times) and RSS (memory)"
    )
    for section in sections:
        for note in section.notes:
            print(f"- {note}")
    print(f"- {setup}")


def main() -> None:
    settings, names, directory = parse_settings()
    signal.signal(signal.SIGTERM, interrupt_on_sigterm)
    try:
        with (
            machine_setup.paused_page_reporting() as setup_note,
            tempfile.TemporaryDirectory(prefix="tether-bench-", dir=directory) as name,
        ):
            machine = machine_line(Path(name))
            print(machine, file=sys.stderr, flush=True)
            print(setup_note, file=sys.stderr, flush=True)
            sections = run_sections(names, settings, Path(name))
    except KeyboardInterrupt:
        print("interrupted: every process started was stopped", file=sys.stderr)
        sys.exit(130)
    print_report(machine, setup_note, settings, sections)
    sys.exit(1 if any(section.failed for section in sections) else 0)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()

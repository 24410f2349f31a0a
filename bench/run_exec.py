"""Sections "exec" and "fresh" of the combined benchmark (``bench/run.py``).

exec: calls per second of ``true`` on ONE open connection, one call at a time
and many at once (200 by default), for

- tether: ``conn.run(["true"])`` (exit status checked), on a plaintext agent and
  on a TLS agent, each started with ``--max-execs-per-connection 256`` so 200 may
  run at once;
- asyncssh: ``conn.run("true")`` on one connection to the benchmark's sshd
  (``sshpeers.asyncssh_exec_rate``): sshd runs each command through the user's
  shell;
- the local spawn rate: ``asyncio.create_subprocess_exec("true")`` with stdout
  and stderr piped, no network (``bench_requests.local_spawn``), on a stdlib
  asyncio loop of its own in a worker thread: uvloop spawns 2-4x slower here,
  so the rows use the faster stdlib loop (the uvloop figure is in the notes).

Each rate is calls / wall time of the whole batch, in this process, on one event
loop (uvloop); every way runs once untimed first (a warm-up).

fresh: the wall time of one new process that connects, runs ``true`` and exits:
``tether exec 127.0.0.1:PORT -- true`` (the venv's ``tether`` script, a TLS agent
pinned in a known-hosts file, the token in ``$TETHER_TOKEN``) against
``ssh -p PORT root@127.0.0.1 true`` (``sshpeers.ssh_true_seconds``), each the
median of ``--fresh-runs`` runs after one untimed run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import bench_requests
import common
import sshpeers
from common import Way
from report import AGENT_OPTIONS, Row, Section, Settings, Target, median

if TYPE_CHECKING:
    import asyncssh

RUN_TIMEOUT = 300.0  # seconds one batch of exec calls may take
FRESH_TIMEOUT = 30.0  # seconds one fresh process may take
MODES = ("plaintext", "TLS")


# exec -----------------------------------------------------------------------------------


def batch(op: bench_requests.Op, count: int, concurrency: int) -> Way:
    """A rate measurement: ``count`` calls of ``op``, ``concurrency`` at a time."""
    return lambda: bench_requests.rate(op, count, concurrency)


def asyncssh_batch(conn: asyncssh.SSHClientConnection, count: int, concurrency: int) -> Way:
    """A rate measurement: ``count`` asyncssh ``conn.run("true")``, ``concurrency`` at a time."""
    return lambda: sshpeers.asyncssh_exec_rate(conn, count, concurrency)


async def exec_ways(
    stack: contextlib.AsyncExitStack,
    agents: dict[str, common.Agent],
    sshd: sshpeers.LocalSshd | None,
    count: int,
    concurrency: int,
) -> dict[str, Way]:
    """Every exec way, its connection opened here (untimed), by row name."""
    ways: dict[str, Way] = {}
    shapes = (("sequential", 1), (f"{concurrency} at once", concurrency))
    for mode, agent in agents.items():
        run = bench_requests.tether_exec(await stack.enter_async_context(agent.connect()))
        for shape, n in shapes:
            ways[f"tether {mode} {shape}"] = batch(run, count, n)
    if sshd is not None:
        conn = await stack.enter_async_context(sshpeers.asyncssh_connection(sshd))
        for shape, n in shapes:
            ways[f"asyncssh {shape}"] = asyncssh_batch(conn, count, n)
    for shape, n in shapes:
        ways[f"local spawn (stdlib loop) {shape}"] = stdlib_spawn_batch(count, n)
        ways[f"local spawn (uvloop) {shape}"] = batch(bench_requests.local_spawn, count, n)
    return ways


def stdlib_spawn_batch(count: int, concurrency: int) -> Way:
    """A rate measurement of local spawns on a stdlib asyncio loop in a worker thread."""
    return lambda: bench_requests.stdlib_spawn_rate(count, concurrency)


async def measure_exec(
    settings: Settings, agents: dict[str, common.Agent], sshd: sshpeers.LocalSshd | None
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Calls per second of every way over ``settings.runs`` rounds, and the failures."""
    async with contextlib.AsyncExitStack() as stack:
        ways = await exec_ways(stack, agents, sshd, settings.exec_count, settings.exec_concurrency)
        return await common.warm_up_and_alternate(
            ways,
            settings.runs,
            RUN_TIMEOUT,
            show=lambda name, value: f"exec {name:28} {value:7.0f} calls/s",
        )


def exec_rows(settings: Settings, rates: dict[str, list[float]]) -> list[Row]:
    """tether against asyncssh and the local spawn rate, each shape and mode."""
    rows = []
    shapes = ("sequential", f"{settings.exec_concurrency} at once")
    for mode in MODES:
        for shape in shapes:
            ours = median(rates.get(f"tether {mode} {shape}"))
            what = f"exec true {shape} {mode}, calls/s"
            asyncssh_target = Target(2.5) if shape == "sequential" else None
            for peer, target in (
                (f"asyncssh {shape}", asyncssh_target),
                (f"local spawn (stdlib loop) {shape}", Target(0.6)),
            ):
                rows.append(Row("exec", what, ours, peer, median(rates.get(peer)), target))
    return rows


def uvloop_spawn(settings: Settings, rates: dict[str, list[float]]) -> str:
    """The uvloop local spawn medians, for the notes."""
    figures = []
    for shape in ("sequential", f"{settings.exec_concurrency} at once"):
        value = median(rates.get(f"local spawn (uvloop) {shape}"))
        figures.append(f"{value:,.0f}/s {shape}" if value is not None else f"n/a {shape}")
    return ", ".join(figures)


def run_exec_section(settings: Settings, tmp: Path) -> Section:
    """Agents, sshd, then every exec way over the rounds; the rows and notes."""
    reasons = {p: r for p in ("sshd", "asyncssh") if (r := sshpeers.missing(p))}
    with contextlib.ExitStack() as stack:
        agents = common.start_agents(stack, tmp, MODES, options=AGENT_OPTIONS)
        sshd = None if reasons else stack.enter_context(sshpeers.LocalSshd())
        rates, failures = common.run_loop(measure_exec(settings, agents, sshd))
    notes = [
        f"exec: {settings.exec_count} calls per measurement on one connection; the agents run "
        "with --max-execs-per-connection 256; 'at once' rows compare with the same concurrency; "
        "the 0.6x target is read as 'against the local spawn rate at the same concurrency'; "
        "asyncssh's commands go through sshd and the user's shell, ~/.bashrc skipped (see fresh)",
        "exec: local spawn is measured on a stdlib asyncio loop (in a worker thread); on uvloop, "
        "this runner's loop, it was " + uvloop_spawn(settings, rates),
        *(f"exec: {peer} n/a: {reason}" for peer, reason in reasons.items()),
        *(f"exec: {way} FAILED: {why}" for way, why in failures.items()),
    ]
    failed = any(way.startswith("tether") for way in failures)
    return Section(exec_rows(settings, rates), notes, failed)


# fresh process ----------------------------------------------------------------------------


def tether_command() -> list[str]:
    """The venv's ``tether`` script beside this Python, else ``python -m tether``."""
    script = Path(sys.executable).with_name("tether")
    return [str(script)] if script.exists() else [sys.executable, "-m", "tether"]


def fresh_tether(agent: common.Agent, known_hosts: Path) -> float:
    """Wall time of one ``tether exec 127.0.0.1:PORT -- true`` process, exit 0 checked."""
    argv = [*tether_command(), "exec", "--known-hosts", str(known_hosts), agent.address]
    env = {**os.environ, "TETHER_TOKEN": agent.token}
    return common.timed_run("tether exec true", [*argv, "--", "true"], FRESH_TIMEOUT, env=env)


def run_fresh_section(settings: Settings, tmp: Path) -> Section:
    """A TLS agent and sshd; fresh ``tether exec`` and ``ssh`` processes, alternating."""
    reasons = {p: r for p in ("sshd", "ssh") if (r := sshpeers.missing(p))}
    with contextlib.ExitStack() as stack:
        agent = common.start_agents(stack, tmp, ["TLS"], options=AGENT_OPTIONS)["TLS"]
        known_hosts = tmp / "known_hosts"  # the pin, as `tether exec` wrote it on first use
        known_hosts.write_text(f"{agent.address} {agent.fingerprint}\n")
        ways: dict[str, Way] = {
            "tether exec": lambda: asyncio.to_thread(fresh_tether, agent, known_hosts)
        }
        if not reasons:
            sshd = stack.enter_context(sshpeers.LocalSshd())
            ways["ssh true"] = lambda: asyncio.to_thread(sshpeers.ssh_true_seconds, sshd)
        times, failures = common.run_loop(
            common.warm_up_and_alternate(
                ways,
                settings.fresh_runs,
                FRESH_TIMEOUT,
                show=lambda name, s: f"fresh {name:14} {s * 1000:6.0f} ms",
            )
        )
    ms = {name: [s * 1000 for s in values] for name, values in times.items()}
    row = Row(
        "fresh",
        "new process runs true, ms (lower is better)",
        median(ms.get("tether exec")),
        "ssh HOST true",
        median(ms.get("ssh true")),
        Target(0.5, at_least=False),
    )
    notes = [
        f"fresh: median of {settings.fresh_runs} runs each, alternating, after one untimed run; "
        f"tether: `{' '.join(tether_command())} exec 127.0.0.1:PORT -- true`, TLS agent pinned "
        "in a known_hosts file, token in $TETHER_TOKEN; ssh: a throwaway sshd, key "
        "authentication, no ControlMaster, and sshd's bash skips ~/.bashrc (SetEnv SHLVL=1: "
        "root's pyenv rc costs ~190 ms here), which is generous to ssh",
        *(f"fresh: {peer} n/a: {reason}" for peer, reason in reasons.items()),
        *(f"fresh: {way} FAILED: {why}" for way, why in failures.items()),
    ]
    return Section([row], notes, "tether exec" in failures)

"""Section "echo" of the combined benchmark (``bench/run.py``): 64-byte round trips per second.

A plaintext agent (the peer has no TLS either) and a minimal asyncio echo server
(``bench_requests.PeerEchoServer``, its own process), both on uvloop, as this
process is. Every connection has one echo in flight at a time; "1 client" is one
connection, "100 clients" is 100 connections at once. A rate is round trips /
wall time of the whole batch (``bench_requests.rate_over``). Ways:

- tether API: ``conn.echo(64 bytes)`` on ``tether.connect`` connections: tether's
  client and server;
- load generator -> agent: ``echo_load.LoadConnection`` with tether frames (a
  hello, then echo frames with fresh ids): tether's server only;
- load generator -> minimal server: the same ``LoadConnection`` with
  ``u32 length | payload`` frames: the peer, client and server.

The peer is measured once and compared with both tether ways: "API" rows
compare client + server with the minimal client + server, "server only" rows
the two servers driven by the same generator.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import bench_requests
import common
import echo_load
from bench_requests import Op, rate_over
from common import Way
from report import AGENT_OPTIONS, Row, Section, Settings, Target, median

RUN_TIMEOUT = 120.0  # seconds one batch may take
TARGET = Target(0.8)


async def connections(
    stack: contextlib.AsyncExitStack, agent: common.Agent, peer_port: int, count: int
) -> dict[str, list[Op]]:
    """``count`` connections of each kind, opened one after the other (the agent lets
    64 authenticate at once); one op per connection."""
    ops: dict[str, list[Op]] = {"api": [], "generator": [], "peer": []}
    for _ in range(count):
        ops["api"].append(
            bench_requests.tether_echo(await stack.enter_async_context(agent.connect()))
        )
        for kind, port, codec in (
            ("generator", agent.port, echo_load.TetherCodec(agent.token)),
            ("peer", peer_port, echo_load.LengthCodec()),
        ):
            conn = await echo_load.open_load(port, codec)
            stack.callback(conn.close)
            ops[kind].append(conn.round_trip)
    return ops


NAMES = {"api": "tether API", "generator": "generator -> agent", "peer": "generator -> minimal"}


def echo_ways(ops: dict[str, list[Op]], settings: Settings) -> dict[str, Way]:
    """1 client (the first connection of each kind) and all the clients, by way name."""
    clients = settings.echo_clients
    ways: dict[str, Way] = {}
    for kind, name in NAMES.items():
        ways[f"{name}, 1 client"] = batch(ops[kind][:1], settings.echo_count)
        ways[f"{name}, {clients} clients"] = batch(ops[kind], settings.echo_count * 4)
    return ways


def batch(ops: list[Op], count: int) -> Way:
    """A rate measurement: ``count`` round trips over ``ops``' connections at once."""
    return lambda: rate_over(ops, count)


async def measure(
    settings: Settings, agent: common.Agent, peer_port: int
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Round trips per second of every way over ``settings.runs`` rounds, and the failures."""
    async with contextlib.AsyncExitStack() as stack:
        ops = await connections(stack, agent, peer_port, settings.echo_clients)
        return await common.warm_up_and_alternate(
            echo_ways(ops, settings),
            settings.runs,
            RUN_TIMEOUT,
            show=lambda name, value: f"echo {name:34} {value:8.0f} /s",
        )


def rows(settings: Settings, rates: dict[str, list[float]]) -> list[Row]:
    """Each tether way against the minimal peer, 1 client and all the clients."""
    out = []
    for clients in ("1 client", f"{settings.echo_clients} clients"):
        peer = f"{NAMES['peer']}, {clients}"
        theirs = median(rates.get(peer))
        for kind, label in (("api", "API"), ("generator", "server only")):
            ours = median(rates.get(f"{NAMES[kind]}, {clients}"))
            what = f"echo 64 B {label}, {clients}, round trips/s"
            minimal = "minimal asyncio echo" + (" (same generator)" if kind != "api" else "")
            out.append(Row("echo", what, ours, minimal, theirs, TARGET))
    return out


def run_echo_section(settings: Settings, tmp: Path) -> Section:
    """The agent and the peer server; every way over the rounds; rows and notes."""
    with contextlib.ExitStack() as stack:
        agent = common.Agent.start(tmp, options=AGENT_OPTIONS)
        stack.callback(agent.stop)
        peer, peer_port = bench_requests.start_peer_echo()
        stack.callback(common.stop_process, peer)
        rates, failures = common.run_loop(measure(settings, agent, peer_port))
    notes = [
        f"echo: plaintext on both sides; {settings.echo_count} round trips per 1-client "
        f"measurement, {settings.echo_count * 4} per {settings.echo_clients}-client one; "
        "'API' = tether.connect + conn.echo vs the minimal client and server; 'server only' = "
        "bench/echo_load.py's generator drives both servers (tether frames with a hello vs "
        "u32-length frames), the peer figure is the same measurement in both rows",
        *(f"echo: {way} FAILED: {why}" for way, why in failures.items()),
    ]
    failed = any(not way.startswith(NAMES["peer"]) for way in failures)
    return Section(rows(settings, rates), notes, failed)

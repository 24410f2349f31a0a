"""tether's client for the combined benchmark's transfers, in a process of its own.

Not run by hand: ``bench/run_transfer.py`` starts it (``python bench/transfer_client.py``)
and drives it. It imports tether and the standard library only, so its peak
resident memory (VmHWM) is what a tether client needs for the transfers, not the
benchmark's (which also loads asyncssh and paramiko).

At start it opens one connection per agent described in ``$TETHER_BENCH_AGENTS``
(a JSON object: mode -> port, token, fingerprint, known_hosts; the tokens are
in the environment, not on the command line) and prints ``ready``. Then, one
JSON line in, one JSON line out:

- ``{"op": "put"|"get", "mode": M, "local": L, "remote": R}``: ``conn.put(L, R)``
  or ``conn.get(R, L)`` on mode M's open connection; answers ``seconds`` (only
  the call itself is timed), ``digest`` and ``size`` from its result, or
  ``error`` if it raised;
- ``{"op": "rss"}``: answers ``peak_mib``, this process's VmHWM.

It exits at end of input.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# Run as ``python bench/transfer_client.py``: bench/ is on sys.path.
import common

AGENTS_ENV = "TETHER_BENCH_AGENTS"


async def transfer(conn: Any, command: dict[str, Any]) -> dict[str, Any]:
    """One put or get on an open connection; seconds spent in the call."""
    started = time.perf_counter()
    if command["op"] == "put":
        result = await conn.put(command["local"], command["remote"])
    else:
        result = await conn.get(command["remote"], command["local"])
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "digest": result.digest, "size": result.size}


async def serve() -> None:
    """Open the connections, then answer commands from stdin until it ends."""
    agents = json.loads(os.environ[AGENTS_ENV])
    async with contextlib.AsyncExitStack() as stack:
        conns = {
            mode: await stack.enter_async_context(
                common.connect_agent(
                    spec["port"], spec["token"], spec["fingerprint"], Path(spec["known_hosts"])
                )
            )
            for mode, spec in agents.items()
        }
        print("ready", flush=True)
        while line := await asyncio.to_thread(sys.stdin.readline):
            command = json.loads(line)
            if command["op"] == "rss":
                answer: dict[str, Any] = {"peak_mib": common.peak_rss_mib(os.getpid())}
            else:
                try:
                    answer = await transfer(conns[command["mode"]], command)
                except Exception as exc:  # reported, and the next command still runs
                    answer = {"error": repr(exc)}
            print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    common.run_helper(serve())

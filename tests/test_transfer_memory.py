"""Transfers stream: neither end holds a file in memory, and a slow reader slows the agent.

These move gigabytes, so they are marked slow; they still run in ``make test``.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import Agent, rss
from tether.frames import FrameDecoder, encode_frame
from tether.limits import PROTOCOL_VERSION

GiB = 1024 * 1024 * 1024
MiB = 1024 * 1024
RSS_LIMIT = 128 * MiB  # the bound for either side during a 4 GiB transfer


class PeakRss:
    """Samples the RSS of some processes every 20 ms in a thread; keeps the maximum."""

    def __init__(self, *pids: int) -> None:
        self.pids = list(pids)
        self.peak = dict.fromkeys(self.pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add(self, pid: int) -> None:
        self.peak.setdefault(pid, 0)
        self.pids.append(pid)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for pid in list(self.pids):
                self.peak[pid] = max(self.peak[pid], rss(pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def make_big_file(path: Path, size: int) -> None:
    # Sparse: quick to make, and still 4 GiB of bytes to read, hash and send.
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(size - 5)
        f.write(b"tail!")


def cli(agent: Agent, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tether", "cp", "-q", *args],
        env=agent.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_4gib_put_and_get_stay_under_128mib_rss_on_both_ends(agent: Agent, tmp_path: Path) -> None:
    size = 4 * GiB
    source = tmp_path / "big.bin"
    make_big_file(source, size)
    for args, produced in (
        ((str(source), f"{agent.host}:big.bin"), agent.root / "big.bin"),
        ((f"{agent.host}:big.bin", str(tmp_path / "back.bin")), tmp_path / "back.bin"),
    ):
        with PeakRss(agent.proc.pid) as peak:
            proc = cli(agent, *args)
            peak.add(proc.pid)
            _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        assert produced.stat().st_size == size
        with open(produced, "rb") as f:
            f.seek(size - 5)
            assert f.read() == b"tail!"
        assert 0 < peak.peak[agent.proc.pid] < RSS_LIMIT, peak.peak
        assert 0 < peak.peak[proc.pid] < RSS_LIMIT, peak.peak
        if produced != agent.root / "big.bin":
            produced.unlink()
    (agent.root / "big.bin").unlink()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_agent_holds_back_for_a_slow_reader(agent: Agent, tmp_path: Path) -> None:
    """A client that reads a 1 GiB get slowly must not make the agent buffer the file."""
    make_big_file(agent.root / "slow.bin", GiB)
    baseline = rss(agent.proc.pid)
    # TLS as any client speaks it to this agent (the certificate is checked elsewhere).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    assert agent.tls, agent.addresses
    plain = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
    plain.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    with context.wrap_socket(plain) as sock:
        sock.sendall(
            encode_frame(
                {"op": "hello", "id": 0, "version": PROTOCOL_VERSION, "token": agent.token}
            )
        )
        sock.sendall(encode_frame({"op": "get", "id": 1, "path": "slow.bin"}))
        decoder = FrameDecoder()
        received = 0
        peak = 0
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:  # 4 s at about 6 MB/s: a slow reader
            data = sock.recv(64 * 1024)
            assert data
            received += len(data)
            decoder.receive_data(data)
            list(decoder.frames())
            peak = max(peak, rss(agent.proc.pid))
            time.sleep(0.01)
    assert 0 < received < GiB // 2  # it really was slow
    # Everything not yet read would be ~1 GiB if the agent buffered it.
    assert peak - baseline < 64 * MiB, (baseline, peak, received)
    # And the agent is fine afterwards.
    time.sleep(0.2)
    assert agent.proc.poll() is None
    os.unlink(agent.root / "slow.bin")

"""Shared fixtures: a real ``tether serve`` process on loopback, and the real CLI.

Nothing here mocks a socket: the agent is the installed package started as a
child process, exactly as a user would start it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import pytest

LISTEN_RE = re.compile(r"listening on (tls|tcp|udp|unix) (\S+)")
FINGERPRINT_RE = re.compile(r"certificate fingerprint (SHA256:\S+)")
START_TIMEOUT = 15.0  # seconds for an agent to print its addresses
LOG_WAIT = 5.0  # seconds to wait for a line to show up in an agent's log


@dataclass
class Agent:
    """A running ``tether serve`` child process."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    token: str
    root: Path
    state_dir: Path
    addresses: dict[str, list[str]] = field(default_factory=dict)

    @property
    def host(self) -> str:
        """The first TCP address (TLS unless --insecure-plaintext), as
        ``127.0.0.1:PORT`` or ``[::1]:PORT``."""
        return (self.addresses.get("tls") or self.addresses["tcp"])[0]

    @property
    def tls(self) -> bool:
        return "tls" in self.addresses

    @property
    def fingerprint(self) -> str:
        """The certificate fingerprint the agent printed at start (TLS agents only)."""
        printed = FINGERPRINT_RE.search(self.log())
        assert printed, self.log()
        return printed.group(1)

    @property
    def port(self) -> int:
        return int(self.host.rsplit(":", 1)[1])

    @property
    def unix(self) -> str:
        return "unix:" + self.addresses["unix"][0]

    @property
    def env(self) -> dict[str, str]:
        """Environment for a client of this agent (token in $TETHER_TOKEN)."""
        return {**os.environ, "TETHER_TOKEN": self.token}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, start: int = 0, timeout: float = LOG_WAIT) -> str:
        """The log from offset ``start`` on, once that part contains ``text``
        (the agent's log lines are written by a thread of their own: they
        may come a moment after the reply). Fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()[start:]
            if text in log:
                return log
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the agent's log:\n{log}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def start_agent(
    tmp: Path,
    *args: str,
    name: str = "agent",
    unix: bool = False,
    launcher: Sequence[str] = (),
) -> Agent:
    """Start ``tether serve`` with its own state dir and root under ``tmp``,
    through ``launcher`` (a command that runs the rest, such as setpriv) if given."""
    base = tmp / name
    root = base / "root"
    state = base / "state"
    root.mkdir(parents=True, exist_ok=True)
    log_path = base / "agent.log"
    cmd = [*launcher, sys.executable, "-m", "tether", "serve"]
    cmd += ["--state-dir", str(state), "--root", str(root)]
    if "--port" not in args:
        cmd += ["--port", "0"]
    if unix:
        cmd += ["--unix", str(base / "agent.sock")]
    cmd += list(args)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT
    addresses: dict[str, list[str]] = {}
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        addresses = {}
        for kind, addr in LISTEN_RE.findall(text):
            addresses.setdefault(kind, []).append(addr)
        if (
            addresses
            and (not unix or "unix" in addresses)
            and ("--no-tcp" in args or "tcp" in addresses or "tls" in addresses)
        ):
            break
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited with {proc.returncode}:\n{text}")
        time.sleep(0.02)
    else:
        proc.kill()
        raise RuntimeError(f"agent did not start:\n{log_path.read_text()}")
    token = (state / "token").read_text().strip() if (state / "token").exists() else ""
    printed = FINGERPRINT_RE.search(log_path.read_text(errors="replace"))
    if printed:
        # As a user who pinned the fingerprint the agent printed: clients of
        # this agent see no trust-on-first-use notice (tested on its own).
        for address in addresses.get("tls", []):
            pin_known_host(address, printed.group(1))
    return Agent(proc, log_path, token, root, state, addresses)


def known_hosts_path() -> Path:
    return Path(os.environ["XDG_CONFIG_HOME"]) / "tether" / "known_hosts"


def pin_known_host(address: str, fingerprint: str) -> None:
    """Pin ``address`` in this test's known_hosts, replacing an older pin."""
    path = known_hosts_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = path.read_text().splitlines() if path.exists() else []
    lines = [line for line in lines if line.split()[:1] != [address]]
    path.write_text("".join(f"{line}\n" for line in [*lines, f"{address} {fingerprint}"]))


def check_clean_log(agent: Agent) -> None:
    """Fail if the agent logged a crash (a traceback) rather than a handled error."""
    text = agent.log()
    assert "Traceback" not in text, text


@pytest.fixture(autouse=True, scope="session")
def private_config_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Agent certificates are pinned in a known_hosts of the test session, never
    the user's. Every agent start re-pins its address (ports are reused by
    agents with new certificates), so clients see no man-in-the-middle."""
    config = tmp_path_factory.mktemp("xdg-config")
    old = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(config)
    yield config
    if old is None:
        del os.environ["XDG_CONFIG_HOME"]
    else:
        os.environ["XDG_CONFIG_HOME"] = old


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    """A fresh agent on 127.0.0.1, a free port, with a Unix socket too."""
    a = start_agent(tmp_path, unix=True)
    try:
        yield a
    finally:
        a.stop()
        check_clean_log(a)


SMALL_DISK = 256 * 1024  # bytes of the tmpfs a full disk is tested on
PAGE = os.sysconf("SC_PAGE_SIZE")  # what a tmpfs hands out at a time


@dataclass
class SmallDisk:
    """A tmpfs of this test's own, filled up on demand: a full disk for real."""

    path: Path

    @property
    def filler(self) -> Path:
        return self.path / ".filler"

    def fill(self, leave: int = 0) -> None:
        """Fill the disk, leaving ``leave`` pages free."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for _ in range(SMALL_DISK // PAGE + 1):  # full before the last round
                try:
                    os.write(fd, bytes(PAGE))
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
            else:
                raise AssertionError(f"{self.path} never filled")
            pages = os.fstat(fd).st_size // PAGE
            assert pages >= leave, (pages, leave)
            os.ftruncate(fd, (pages - leave) * PAGE)
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A 256 KiB tmpfs mounted for the test (root only; skipped otherwise)."""
    with tmpfs(tmp_path / "disk", f"size={SMALL_DISK},mode=700") as mount_point:
        yield SmallDisk(mount_point)


@pytest.fixture
def tether_cli() -> type[Cli]:
    return Cli


class Cli:
    """The real ``tether`` command line, run as a child process."""

    @staticmethod
    def run(
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        input: bytes | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "tether", *args],
            env=env,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )


PathArg = str | bytes | os.PathLike[str] | os.PathLike[bytes]


# Shared checks ---------------------------------------------------------------------


def digest(path: PathArg) -> str:
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb") as f:
        while block := f.read(16 * 1024 * 1024):
            hasher.update(block)
    result: str = hasher.hexdigest()
    return result


def snapshot(top: Path) -> dict[bytes, tuple[object, ...]]:
    """Everything a tree copy must reproduce, keyed by relative bytes path: types,
    modes, mtimes of files and directories, file digests, link targets (never followed)."""
    result: dict[bytes, tuple[object, ...]] = {}

    def visit(path: bytes, rel: bytes) -> None:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            result[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            result[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            for name in sorted(os.listdir(path)):
                visit(os.path.join(path, name), os.path.join(rel, name))
        elif stat.S_ISREG(st.st_mode):
            result[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns, digest(path))
        else:
            result[rel] = ("other", st.st_mode)

    visit(os.fsencode(top), b".")
    return result


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (0 once it has gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``path`` for the duration (the tests run as root)."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)

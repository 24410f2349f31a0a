"""The SSH-side peers of tether's benchmark: OpenSSH, asyncssh and paramiko on loopback.

A library for the benchmark runner (``bench/run_transfer.py``, ``bench/run_exec.py``);
``python bench/sshpeers_selftest.py`` runs every measurement once on a small file
and prints the numbers.

``LocalSshd`` starts a throwaway OpenSSH server on 127.0.0.1 (its own host key,
client key, ``authorized_keys`` and ``sshd_config`` in a temporary directory) and
gives the ``ssh``/``scp``/``sftp`` options that reach it with the host key pinned
and the user's own configuration, agent and ControlMaster left out.

Each measurement is ONE run and returns seconds (or operations per second for
the exec rate); the caller takes medians and alternates with tether. A transfer
is timed from the start of the user-visible operation until the destination
file is on disk: the timed span ends with an ``fsync`` of the destination, as
tether fsyncs what it receives. Every destination is removed before its run,
outside the timed span, so each run writes a new file (as tether does).

- ``scp_put`` / ``scp_get``: one ``scp`` process. OpenSSH 9.0+ scp speaks the
  SFTP protocol by default: kept, since that is what users get. Like sftp, it
  reads and writes 255 KiB per request (the server's ``limits@openssh.com``
  reply; 32 KiB without it), 64 requests in flight. ``cipher=None`` is
  OpenSSH's default (chacha20-poly1305); ``AES_GCM`` asks for aes128-gcm.
- ``sftp_put`` / ``sftp_get``: one ``sftp -b BATCH`` process, same ciphers.
- ``asyncssh_put`` / ``asyncssh_get``: ``SFTPClient.put``/``get`` with their
  default parameters on an already open connection and SFTP session (opened
  outside the timed span, as tether's benchmark times ``conn.put`` on an open
  connection). asyncssh then uses the server's largest read/write (255 KiB with
  OpenSSH) and 16 requests in flight: ``asyncssh_transfer_parameters`` says.
- ``paramiko_put`` / ``paramiko_get``: ``SFTPClient.put``/``get`` with their
  defaults (32 KiB requests, pipelined put, prefetching get) on an open
  connection whose socket has TCP_NODELAY set, as users who know do.
- ``asyncssh_exec_rate``: ``conn.run("true")`` calls per second on one
  connection, ``concurrency`` at a time (sshd runs each through the user's shell).
- ``ssh_true_seconds``: the wall time of one fresh ``ssh HOST true`` process.

sshd runs commands and the sftp-server subsystem through the user's shell; by
default ``LocalSshd`` keeps bash from sourcing ``~/.bashrc`` for them (see
``LocalSshd.__init__``), so the figures are SSH's, not this machine's rc file's.

Every check (sizes equal, exit status 0) raises ``SystemExit`` with a message;
every subprocess has a timeout and asyncio work runs under ``asyncio.timeout``.
asyncssh and paramiko are optional: ``available()``/``missing()`` tell whether a
peer can run, so the runner can print "n/a".
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

# Run from a script in bench/ (``bench/`` is on sys.path): bench/common.py.
import common

if TYPE_CHECKING:
    import asyncssh
    import paramiko

SSHD = "/usr/sbin/sshd"  # sshd refuses to start from a relative path (it re-executes itself)
SSHD_PRIVSEP_DIR = Path("/run/sshd")  # Debian's sshd exits at start without it
SFTP_SERVER = "/usr/lib/openssh/sftp-server"  # Debian's default Subsystem line
AES_GCM = "aes128-gcm@openssh.com"
HOST = "127.0.0.1"
MAX_SESSIONS = 256  # channels per connection: the exec benchmark opens 200 at once
MAX_STARTUPS = 256  # unauthenticated connections at once, for runners that open many
START_TIMEOUT = 15.0  # seconds for sshd to answer with its banner
COMMAND_TIMEOUT = 30.0  # seconds for ssh-keygen and for a fresh `ssh HOST true`
CONNECT_TIMEOUT = 30.0  # seconds to open (or close) an asyncssh/paramiko connection
RUN_TIMEOUT = 300.0  # seconds one transfer or one exec-rate run may take
START_ATTEMPTS = 3  # free ports tried: another process may take the one picked
PEERS = ("sshd", "ssh", "scp", "sftp", "asyncssh", "paramiko")
GLOB_CHARS = frozenset("*?[")  # sftp's put/get glob their source paths


# The server ---------------------------------------------------------------------------


class LocalSshd:
    """A throwaway OpenSSH server on 127.0.0.1, for one benchmark run.

    Use it as a context manager: on entry it creates a temporary directory with a
    fresh ed25519 host key and client key, an ``authorized_keys`` file, a
    ``known_hosts`` file that pins the host key and an ``sshd_config``, and
    starts ``/usr/sbin/sshd -D -e -f sshd_config`` on a free port (its log goes to
    ``sshd.log`` there). On exit it stops sshd by its PID and removes the directory.

    Attributes (valid inside the ``with`` block):
        dir: the temporary directory.
        port: the TCP port sshd listens on.
        user: the user the client logs in as (the one running the benchmark).
        client_key: the client's private key file.
        known_hosts: the file that pins sshd's host key.
    """

    def __init__(self, sftp_server: str = SFTP_SERVER, shell_rc: bool = False) -> None:
        """Args:
        sftp_server: the ``Subsystem sftp`` command (or ``internal-sftp``).
        shell_rc: whether commands may run the user's ``~/.bashrc``, see below.

        sshd runs every command (and the sftp-server subsystem) through the
        user's shell, and Debian's bash sources ``~/.bashrc`` when sshd starts it
        (SSH_SOURCE_BASHRC) unless ``SHLVL`` says it is a nested shell. Root's
        ``~/.bashrc`` here runs ``pyenv init`` (about 190 ms): paid per command,
        it would measure this machine's rc file rather than SSH. So by default
        sshd sets ``SHLVL=1`` for its sessions (bash then counts itself level 2
        and skips the file). Shells that are not bash are not affected.
        """
        self.sftp_server = sftp_server
        self.shell_rc = shell_rc
        self.user = getpass.getuser()
        self.dir = Path()
        self.port = 0
        self.client_key = Path()
        self.known_hosts = Path()
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LocalSshd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def log(self) -> Path:
        return self.dir / "sshd.log"

    def start(self) -> None:
        """Write the keys and configuration and start sshd; SystemExit if it does not."""
        if reason := missing("sshd"):
            raise SystemExit(f"cannot start a local sshd: {reason}")
        self.dir = Path(tempfile.mkdtemp(prefix="tether-sshd-"))
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        if os.geteuid() == 0:
            # The privilege separation directory; root-owned, not group/world writable.
            SSHD_PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        host_key = self.dir / "host_ed25519"
        self.client_key = self.dir / "client_ed25519"
        self.known_hosts = self.dir / "known_hosts"
        for key in (host_key, self.client_key):
            common.timed_run(
                "ssh-keygen",
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tether-bench", "-f", key],
                COMMAND_TIMEOUT,
            )
        authorized = self.dir / "authorized_keys"
        authorized.write_text(self.client_key.with_suffix(".pub").read_text())
        host_public = " ".join(host_key.with_suffix(".pub").read_text().split()[:2])
        for _ in range(START_ATTEMPTS):
            self.port = common.free_port()
            # The non-default port is part of the name ssh looks up: "[host]:port".
            self.known_hosts.write_text(f"[{HOST}]:{self.port} {host_public}\n")
            config = self.dir / "sshd_config"
            config.write_text(self._config(host_key, authorized))
            with self.log.open("ab") as log:
                self._proc = subprocess.Popen(
                    [SSHD, "-D", "-e", "-f", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            if self._wait_ready():
                return
            self._stop_process()  # and try another port
        raise SystemExit(f"sshd did not start; its log:\n{self.log.read_text(errors='replace')}")

    def _config(self, host_key: Path, authorized: Path) -> str:
        lines = [
            f"ListenAddress {HOST}",
            f"Port {self.port}",
            f"HostKey {host_key}",
            f"PidFile {self.dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {authorized}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",  # the benchmark runs as root
            "StrictModes no",  # the temporary directory's modes are not sshd's business
            "UsePAM no",
            f"MaxSessions {MAX_SESSIONS}",
            f"MaxStartups {MAX_STARTUPS}",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            f"Subsystem sftp {self.sftp_server}",
        ]
        if not self.shell_rc:
            lines.append("SetEnv SHLVL=1")  # bash skips ~/.bashrc: see __init__
        return "\n".join(lines) + "\n"

    def _wait_ready(self) -> bool:
        """Whether sshd answers with its SSH banner within START_TIMEOUT."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False  # exited: the port was taken, or the configuration is bad
            with (
                contextlib.suppress(OSError),
                socket.create_connection((HOST, self.port), timeout=1.0) as probe,
            ):
                if probe.recv(256).startswith(b"SSH-"):
                    return True
            time.sleep(0.05)
        return False

    def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            common.stop_process(proc)

    def stop(self) -> None:
        """Stop sshd (by its PID) and remove the temporary directory."""
        self._stop_process()
        if self.dir != Path():
            shutil.rmtree(self.dir, ignore_errors=True)

    # Client options -----------------------------------------------------------------

    def client_options(self) -> list[str]:
        """Options shared by ssh, scp and sftp: this key, this host key, nothing else.

        ``-F /dev/null`` keeps the user's ``~/.ssh/config`` out; the agent,
        ControlMaster and host key updates are switched off; ``BatchMode`` makes
        any prompt a failure instead of a hang.
        """
        options = [
            "IdentitiesOnly=yes",
            "IdentityAgent=none",
            f"UserKnownHostsFile={self.known_hosts}",
            "GlobalKnownHostsFile=/dev/null",
            "StrictHostKeyChecking=yes",
            "UpdateHostKeys=no",
            "BatchMode=yes",
            "ControlMaster=no",
            "ControlPath=none",
            "LogLevel=ERROR",
        ]
        argv = ["-F", "/dev/null", "-i", str(self.client_key)]
        for option in options:
            argv += ["-o", option]
        return argv

    def ssh_argv(self, *command: str) -> list[str]:
        """``ssh -p PORT ... user@127.0.0.1 COMMAND``."""
        return ["ssh", "-p", str(self.port), *self.client_options(), self.destination, *command]

    def scp_argv(self, cipher: str | None = None) -> list[str]:
        """``scp -P PORT ...`` (without the paths); ``cipher`` adds ``-c``."""
        return ["scp", "-P", str(self.port), *self.client_options(), *cipher_option(cipher)]

    def sftp_argv(self, cipher: str | None = None) -> list[str]:
        """``sftp -P PORT ...`` (without the batch file or destination)."""
        return ["sftp", "-P", str(self.port), *self.client_options(), *cipher_option(cipher)]

    @property
    def destination(self) -> str:
        return f"{self.user}@{HOST}"

    def remote(self, path: Path) -> str:
        """``user@127.0.0.1:/path``, as scp takes it."""
        return f"{self.destination}:{path}"


def cipher_option(cipher: str | None) -> list[str]:
    return [] if cipher is None else ["-c", cipher]


# Availability -------------------------------------------------------------------------


def missing(peer: str) -> str | None:
    """Why ``peer`` (one of PEERS) cannot run here, or None when it can."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; peers: {', '.join(PEERS)}")
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} is not installed (apt-get install openssh-server)"
    if not shutil.which("ssh-keygen"):
        return "ssh-keygen is not installed (apt-get install openssh-client)"
    if peer in ("ssh", "scp", "sftp") and not shutil.which(peer):
        return f"{peer} is not installed (apt-get install openssh-client)"
    if peer in ("asyncssh", "paramiko") and importlib.util.find_spec(peer) is None:
        return f"{peer} is not installed (pip install {peer})"
    return None


def available(peer: str) -> bool:
    """Whether ``peer`` (one of PEERS) can run here; ``missing`` says why not."""
    return missing(peer) is None


# Helpers ------------------------------------------------------------------------------


def check_copy(what: str, source: Path, dest: Path) -> None:
    """SystemExit unless ``dest`` exists with ``source``'s size."""
    want = source.stat().st_size
    try:
        got = dest.stat().st_size
    except FileNotFoundError:
        raise SystemExit(f"{what}: {dest} was not written") from None
    if got != want:
        raise SystemExit(f"{what}: {dest} has {got} bytes, {source} has {want}")


def timed_copy(what: str, argv: list[str], source: Path, dest: Path) -> float:
    """Seconds for the process ``argv`` to exit 0, plus an fsync of ``dest``.

    ``dest`` is removed first (outside the timed span), and checked afterwards to
    have ``source``'s size.
    """
    common.remove(dest)
    elapsed = common.timed_run(what, argv, RUN_TIMEOUT, fsync=dest)
    check_copy(what, source, dest)
    return elapsed


# OpenSSH: scp and sftp processes ------------------------------------------------------


def scp_put(sshd: LocalSshd, source: Path, dest: Path, cipher: str | None = None) -> float:
    """Seconds for ``scp SOURCE user@127.0.0.1:DEST`` and an fsync of DEST.

    scp uses the SFTP protocol (OpenSSH's default since 9.0); ``cipher`` None is
    OpenSSH's default cipher, ``AES_GCM`` is aes128-gcm@openssh.com.
    """
    argv = [*sshd.scp_argv(cipher), str(source), sshd.remote(dest)]
    return timed_copy(f"scp put ({cipher or 'default cipher'})", argv, source, dest)


def scp_get(sshd: LocalSshd, source: Path, dest: Path, cipher: str | None = None) -> float:
    """Seconds for ``scp user@127.0.0.1:SOURCE DEST`` and an fsync of DEST."""
    argv = [*sshd.scp_argv(cipher), sshd.remote(source), str(dest)]
    return timed_copy(f"scp get ({cipher or 'default cipher'})", argv, source, dest)


def sftp_put(sshd: LocalSshd, source: Path, dest: Path, cipher: str | None = None) -> float:
    """Seconds for ``sftp -b BATCH`` running ``put SOURCE DEST``, and an fsync of DEST.

    The batch file is written before the timed span.
    """
    return _sftp_batch(sshd, "put", source, dest, cipher)


def sftp_get(sshd: LocalSshd, source: Path, dest: Path, cipher: str | None = None) -> float:
    """Seconds for ``sftp -b BATCH`` running ``get SOURCE DEST``, and an fsync of DEST."""
    return _sftp_batch(sshd, "get", source, dest, cipher)


def _sftp_batch(sshd: LocalSshd, verb: str, source: Path, dest: Path, cipher: str | None) -> float:
    what = f"sftp {verb} ({cipher or 'default cipher'})"
    for path in (source, dest):
        # sftp globs put's and get's paths; quoting does not stop that, so refuse.
        if GLOB_CHARS & set(str(path)):
            raise SystemExit(f"{what}: a path with * ? or [ would be globbed by sftp: {path}")
    batch = sshd.dir / f"sftp-{verb}.batch"
    batch.write_text(f"{verb} {sftp_quote(source)} {sftp_quote(dest)}\n")
    argv = [*sshd.sftp_argv(cipher), "-b", str(batch), sshd.destination]
    return timed_copy(what, argv, source, dest)


def sftp_quote(path: Path) -> str:
    """``path`` in double quotes, as sftp's command parser reads them."""
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


# asyncssh -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def asyncssh_connection(sshd: LocalSshd) -> AsyncIterator[asyncssh.SSHClientConnection]:
    """An asyncssh connection to ``sshd``: this key, the pinned host key, no config or agent.

    Use ``async with conn.start_sftp_client() as sftp`` for the transfers.
    """
    import asyncssh

    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            conn = await asyncssh.connect(
                HOST,
                sshd.port,
                username=sshd.user,
                client_keys=[str(sshd.client_key)],
                known_hosts=str(sshd.known_hosts),
                agent_path=None,
                config=[],  # not ~/.ssh/config
            )
    except (OSError, asyncssh.Error) as exc:  # TimeoutError is an OSError
        raise SystemExit(f"asyncssh could not connect to the local sshd: {exc!r}") from None
    try:
        yield conn
    finally:
        conn.close()
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await conn.wait_closed()


def asyncssh_transfer_parameters(sftp: asyncssh.SFTPClient) -> tuple[int, int]:
    """The block size and requests in flight asyncssh's put/get use by default.

    The same rule as asyncssh's ``_begin_copy`` (2.x): the smaller of the
    server's read and write limits (a local file has 4 MiB), and 4 MiB of
    requests in flight, at least 16 and at most 128.
    """
    from asyncssh.sftp import MAX_SFTP_READ_LEN, MAX_SFTP_WRITE_LEN

    limits = sftp.limits
    put_block = min(MAX_SFTP_READ_LEN, limits.max_write_len)
    get_block = min(limits.max_read_len, MAX_SFTP_WRITE_LEN)
    block = min(put_block, get_block)
    return block, max(16, min(MAX_SFTP_READ_LEN // block, 128))


async def asyncssh_put(sftp: asyncssh.SFTPClient, source: Path, dest: Path) -> float:
    """Seconds for ``sftp.put(SOURCE, DEST)`` (default parameters) and an fsync of DEST.

    ``sftp`` is an open SFTP session; DEST is on this machine, written by sshd.
    """
    return await _asyncssh_transfer("asyncssh put", sftp.put, source, dest)


async def asyncssh_get(sftp: asyncssh.SFTPClient, source: Path, dest: Path) -> float:
    """Seconds for ``sftp.get(SOURCE, DEST)`` (default parameters) and an fsync of DEST."""
    return await _asyncssh_transfer("asyncssh get", sftp.get, source, dest)


async def _asyncssh_transfer(
    what: str, transfer: Callable[[str, str], Awaitable[None]], source: Path, dest: Path
) -> float:
    import asyncssh

    common.remove(dest)
    try:
        async with asyncio.timeout(RUN_TIMEOUT):
            started = time.perf_counter()
            await transfer(str(source), str(dest))
            common.fsync_path(dest)
            elapsed = time.perf_counter() - started
    except TimeoutError:
        raise SystemExit(f"{what} did not finish within {RUN_TIMEOUT:.0f} s") from None
    except (OSError, asyncssh.Error) as exc:  # SFTPError is an asyncssh.Error
        raise SystemExit(f"{what} failed: {exc!r}") from None
    check_copy(what, source, dest)
    return elapsed


async def asyncssh_exec_rate(
    conn: asyncssh.SSHClientConnection, count: int, concurrency: int = 1
) -> float:
    """``conn.run("true")`` calls per second: ``count`` calls, ``concurrency`` at a time.

    Each call opens a session channel on the one connection, sshd runs ``true``
    through the user's shell, and the call returns with its exit status.
    """
    if not 1 <= concurrency <= min(count, MAX_SESSIONS):
        raise ValueError(f"concurrency {concurrency} not in 1..min({count}, {MAX_SESSIONS})")
    failures: list[object] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            result = await conn.run("true")
            if result.exit_status != 0:
                failures.append(result.exit_status if result.exit_status is not None else result)

    shares = [count // concurrency + (i < count % concurrency) for i in range(concurrency)]
    started = time.perf_counter()
    try:
        async with asyncio.timeout(RUN_TIMEOUT):
            try:
                async with asyncio.TaskGroup() as tg:
                    for n in shares:
                        tg.create_task(worker(n))
            except* Exception as group:  # ChannelOpenError when sshd refuses a session
                raise SystemExit(f"asyncssh exec failed: {group.exceptions[0]!r}") from None
    except TimeoutError:
        raise SystemExit(f"asyncssh exec: {count} calls took over {RUN_TIMEOUT:.0f} s") from None
    elapsed = time.perf_counter() - started
    if failures:
        raise SystemExit(f"asyncssh exec: {len(failures)} of {count} calls failed: {failures[0]}")
    return count / elapsed


# paramiko -----------------------------------------------------------------------------


@contextlib.contextmanager
def paramiko_sftp(sshd: LocalSshd) -> Iterator[paramiko.SFTPClient]:
    """A paramiko SFTP session on a connection to ``sshd``, TCP_NODELAY set on its socket.

    Default window and packet sizes otherwise. Every blocking read on the SFTP
    channel times out after RUN_TIMEOUT, so a stalled transfer raises.
    """
    import paramiko

    client = paramiko.SSHClient()
    try:
        try:
            client.load_host_keys(str(sshd.known_hosts))
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            client.connect(
                HOST,
                port=sshd.port,
                username=sshd.user,
                key_filename=str(sshd.client_key),
                look_for_keys=False,
                allow_agent=False,
                timeout=CONNECT_TIMEOUT,
                banner_timeout=CONNECT_TIMEOUT,
                auth_timeout=CONNECT_TIMEOUT,
                channel_timeout=CONNECT_TIMEOUT,
            )
            transport = client.get_transport()
            assert transport is not None
            # Without it, Nagle holds back small requests (paramiko's exec: 21/s, not 250/s).
            transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sftp = client.open_sftp()
            channel = sftp.get_channel()
            assert channel is not None
            channel.settimeout(RUN_TIMEOUT)
        except (OSError, paramiko.SSHException) as exc:
            raise SystemExit(f"paramiko could not connect to the local sshd: {exc!r}") from None
        try:
            yield sftp
        finally:
            sftp.close()
    finally:
        client.close()


def paramiko_put(sftp: paramiko.SFTPClient, source: Path, dest: Path) -> float:
    """Seconds for ``sftp.put(SOURCE, DEST)`` (default parameters) and an fsync of DEST.

    paramiko's default ``confirm=True`` stats DEST afterwards: part of what users get.
    """
    return _paramiko_transfer("paramiko put", sftp.put, source, dest)


def paramiko_get(sftp: paramiko.SFTPClient, source: Path, dest: Path) -> float:
    """Seconds for ``sftp.get(SOURCE, DEST)`` (default: prefetch) and an fsync of DEST."""
    return _paramiko_transfer("paramiko get", sftp.get, source, dest)


def _paramiko_transfer(
    what: str, transfer: Callable[[str, str], object], source: Path, dest: Path
) -> float:
    import paramiko

    common.remove(dest)
    started = time.perf_counter()
    try:
        transfer(str(source), str(dest))
    except (OSError, EOFError, paramiko.SSHException) as exc:  # socket.timeout is an OSError
        raise SystemExit(f"{what} failed: {exc!r}") from None
    common.fsync_path(dest)
    elapsed = time.perf_counter() - started
    check_copy(what, source, dest)
    return elapsed


# Fresh ssh process --------------------------------------------------------------------


def ssh_true_seconds(sshd: LocalSshd) -> float:
    """Wall time of one fresh ``ssh -p PORT user@127.0.0.1 true`` process, exit 0 checked.

    A whole connection: key exchange, authentication, a session, the user's
    shell running ``true``, and the close.
    """
    return common.timed_run("ssh true", sshd.ssh_argv("true"), COMMAND_TIMEOUT)

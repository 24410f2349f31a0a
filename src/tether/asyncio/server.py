"""The agent: its configuration, listeners, connections and shutdown.

Each client connection is a :class:`~.session.ServerConnection`; every
protocol decision is made by :class:`tether.protocol.ServerProtocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import locale
import logging
import math
import os
import socket
import ssl
import stat
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..audit import AuditLog
from ..auth import Authenticator, AuthFailure, FailureLimiter
from ..exceptions import UsageError
from ..limits import DEFAULT_PORT, HELLO_TIMEOUT, Limits
from ..policy import ExecPolicy
from ..tokens import load_tokens
from .execution import KILL_GRACE
from .session import CLOSE_GRACE, ServerConnection, format_peer
from .udp import PingResponder

__all__ = ["Server", "ServerConfig", "ServerConnection"]

log = logging.getLogger("tether.server")

PORT_ATTEMPTS = 20  # tries to find a free TCP+UDP port pair for --port 0
IDLE_SWEEP_MAX = 5.0  # seconds between idle checks at the most (a quarter of the timeout if less)
# Seconds a stopping agent waits for its last frames (output, exit, the
# shutting_down errors) to reach clients that read slowly before it cuts them.
DRAIN_TIMEOUT = CLOSE_GRACE


@dataclass
class ServerConfig:
    """How an agent listens and what it allows."""

    token: str
    hosts: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    port: int = DEFAULT_PORT
    unix_path: str | None = None
    tcp: bool = True
    udp: bool = True
    root: Path = field(default_factory=Path.cwd)
    allow_exec: bool = True
    grace: float = 10.0  # seconds running requests get to finish on stop
    backlog: int = 128
    hello_timeout: float = HELLO_TIMEOUT
    limits: Limits = field(default_factory=Limits)
    name: str = field(default_factory=socket.gethostname)
    # TLS for every TCP listener; None only with --insecure-plaintext.
    ssl_context: ssl.SSLContext | None = None
    tokens_file: Path | None = None  # more named tokens ("name token" lines, mode 0600)
    allow: list[str] = field(default_factory=list)  # exec allow-list patterns
    max_unauthenticated: int = 64  # connections still before their hello; more get busy
    idle_timeout: float = 300.0  # seconds an authenticated connection may do nothing
    max_execs_per_connection: int = 64
    max_execs: int = 256  # on the whole agent
    max_auth_failures: int = 10  # failed hellos per address per minute before a block
    audit_log: str | None = None  # JSON lines file (also logged at info level)

    def __post_init__(self) -> None:
        # Checked here, not when the first client comes: the idle timeout
        # goes into every hello reply, and JSON has no infinity nor NaN.
        if not 0 <= self.grace < math.inf:  # nan fails every comparison
            raise UsageError(f"grace must be a finite number of seconds >= 0, not {self.grace!r}")
        for name in ("hello_timeout", "idle_timeout"):
            if not 0 < (value := getattr(self, name)) < math.inf:
                raise UsageError(f"{name} must be a finite number of seconds > 0, not {value!r}")


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is edited, replaced or chmod'ed (the ctime:
    a tokens file refused for its mode is taken once `chmod 600` fixes it)."""
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size)


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file left by an agent that died; refuse a live one.

    Raises:
        OSError: EADDRINUSE when an agent still answers on ``path``.
    """
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return  # not a socket: binding fails with a clear EADDRINUSE
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        # Non-blocking: a listener whose backlog is full (a frozen agent)
        # answers EAGAIN at once; a blocking connect waited for ever.
        probe.setblocking(False)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # nobody listens: stale
            return
        except BlockingIOError:
            pass  # someone listens, and is not accepting
    raise OSError(errno.EADDRINUSE, f"{path} is in use by a running agent")


class Server:
    """An agent: its listeners, connections and background tasks."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.encoding = locale.getpreferredencoding(False)
        self.root = os.path.realpath(config.root)
        self.connections: set[ServerConnection] = set()
        self.stopping = False
        self.addresses: list[str] = []
        self._servers: list[asyncio.Server] = []
        self._udp: list[asyncio.DatagramTransport] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()  # a second stop: no grace for running requests
        self._unix_bound: tuple[str, int, int] | None = None  # path, st_dev, st_ino
        self.unauthenticated: set[ServerConnection] = set()
        # Accepted, TLS handshake not done, and when. A failed handshake
        # never reaches the connection, but the TLS layer lets go of it when
        # the socket closes: weak references, so under uvloop a port
        # scanner's connect-and-close stops counting at once (held until the
        # hello timeout, 10 probes locked every client out). The stdlib
        # loop's TLS layer holds it in a reference cycle, freed by the
        # garbage collector whenever: the hello timeout still bounds that.
        self.handshaking: weakref.WeakKeyDictionary[ServerConnection, float] = (
            weakref.WeakKeyDictionary()
        )
        self.execs = 0
        self.policy = ExecPolicy(config.allow_exec, tuple(config.allow))
        self.audit = AuditLog(config.audit_log)
        initial = {config.token: "default"} if config.token else {}
        self.authenticator = Authenticator(
            initial, FailureLimiter(max_failures=config.max_auth_failures)
        )
        self._tokens_stamp: tuple[int, ...] | None = None
        self._idle_sweep: asyncio.TimerHandle | None = None
        if config.tokens_file is not None and os.path.lexists(config.tokens_file):
            # Refuse to start on an unsafe or malformed file, not later.
            self.authenticator.tokens = initial | load_tokens(config.tokens_file)
            self._tokens_stamp = _stamp(os.stat(config.tokens_file))

    def authenticate(self, token: str, address: str | None) -> str | AuthFailure:
        """The identity ``token`` was issued under, or why the hello fails."""
        self._reload_tokens()
        return self.authenticator.check(token, address, time.monotonic())

    def _reload_tokens(self) -> None:
        # `tether token new` adds tokens while the agent runs: reread on change.
        path = self.config.tokens_file
        if path is None:
            return
        try:
            stamp: tuple[int, ...] | None = _stamp(os.stat(path))
        except FileNotFoundError:
            stamp = None
        if stamp == self._tokens_stamp:
            return
        self._tokens_stamp = stamp
        tokens = {self.config.token: "default"} if self.config.token else {}
        if stamp is not None:
            try:
                tokens |= load_tokens(path)
            except UsageError as exc:
                log.error("%s; keeping the tokens loaded before", exc)
                return
        self.authenticator.tokens = tokens

    def authenticating(self) -> int:
        """Connections not yet authenticated, including this one and TLS handshakes."""
        expired = time.monotonic() - self.config.hello_timeout
        for conn in [c for c, since in self.handshaking.items() if since < expired]:
            del self.handshaking[conn]
        return len(self.unauthenticated) + len(self.handshaking) + 1

    def track(self, task: asyncio.Task[Any]) -> None:
        """Keep ``task`` alive, and wait for it before the agent exits."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        """Open every listener.

        Raises:
            OSError: an address could not be bound.
        """
        config = self.config
        if config.tcp:
            # With port 0 the kernel picks a TCP port; UDP (or another host)
            # may find that number taken: pick again, a bounded number of times.
            attempts = PORT_ATTEMPTS if config.port == 0 else 1
            for attempt in range(attempts):
                try:
                    await self._start_inet(config.port)
                    break
                except OSError as exc:
                    self._close_listeners()
                    if exc.errno != errno.EADDRINUSE or attempt == attempts - 1:
                        raise
        if config.unix_path:
            await self._start_unix(config.unix_path)
        self._sweep_idle()

    def _sweep_idle(self) -> None:
        # One timer for the agent, not one per connection: a close may come
        # up to a quarter of the timeout (at most IDLE_SWEEP_MAX) late.
        now = time.monotonic()
        for conn in list(self.connections):
            conn.check_idle(now)
        interval = min(self.config.idle_timeout / 4, IDLE_SWEEP_MAX)
        self._idle_sweep = asyncio.get_running_loop().call_later(interval, self._sweep_idle)

    async def _start_inet(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        for host in config.hosts:
            server = await loop.create_server(
                lambda: ServerConnection(self),
                host,
                port,
                reuse_address=True,
                backlog=config.backlog,
                ssl=config.ssl_context,
                # The handshake counts against the hello deadline too.
                ssl_handshake_timeout=config.hello_timeout if config.ssl_context else None,
            )
            self._servers.append(server)
            bound = server.sockets[0].getsockname()
            port = bound[1]  # port 0: every host shares the first one picked
            kind = "tls" if config.ssl_context is not None else "tcp"
            self.addresses.append(f"{kind} {format_peer(bound)}")
            if config.udp:
                udp, _ = await loop.create_datagram_endpoint(
                    PingResponder, local_addr=(host, port), reuse_port=False
                )
                self._udp.append(udp)
                self.addresses.append(f"udp {format_peer(udp.get_extra_info('sockname'))}")

    async def _drain(self, timeout: float) -> None:
        """Wait until every closing connection has sent what it had queued
        (a connection is gone once its transport has flushed and closed), at
        most ``timeout`` seconds; then cut the ones left. Exiting earlier
        would drop the final frames of a client that reads slowly."""
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()

    def _close_listeners(self) -> None:
        for server in self._servers:
            server.close()
        for udp in self._udp:
            udp.close()
        self._servers.clear()
        self._udp.clear()
        self.addresses.clear()

    async def _start_unix(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        _remove_stale_socket(path)
        old_umask = os.umask(0o177)  # born 0600: no window where others may connect
        try:
            server = await loop.create_unix_server(
                lambda: ServerConnection(self), path, backlog=self.config.backlog
            )
        finally:
            os.umask(old_umask)
        st = os.lstat(path)
        self._unix_bound = (path, st.st_dev, st.st_ino)
        os.chmod(path, 0o600)
        self._servers.append(server)
        self.addresses.append(f"unix {path}")

    def stop(self) -> None:
        """Ask :meth:`serve` to shut down gracefully; asked again, at once
        (running requests end without their grace, as after it)."""
        if self._stop.is_set() and not self._hurry.is_set():
            log.info("stopping now: running requests get no more grace")
            self._hurry.set()
        self._stop.set()

    async def serve(self) -> None:
        """Serve until :meth:`stop`, then shut down gracefully."""
        await self._stop.wait()
        await self.close()

    async def close(self) -> None:
        """Stop accepting, give running requests ``grace`` seconds, end the rest."""
        self.stopping = True
        for conn in [*self.connections, *self.handshaking]:
            conn.protocol.answer_echo = False  # new requests get shutting_down, echo too
        if self._idle_sweep is not None:
            self._idle_sweep.cancel()
        servers = list(self._servers)
        self._close_listeners()
        if self._unix_bound is not None:
            path, dev, ino = self._unix_bound
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                # Never another agent's socket: ours may have been removed
                # and the path bound again meanwhile.
                if (st.st_dev, st.st_ino) == (dev, ino):
                    os.unlink(path)
        running = [t for c in self.connections for t in c.tasks.values()]
        if running:
            log.info(
                "stopping: waiting up to %.1fs for %d request(s)", self.config.grace, len(running)
            )
            all_done = asyncio.ensure_future(asyncio.wait(running))
            hurried = asyncio.ensure_future(self._hurry.wait())
            await asyncio.wait(
                [all_done, hurried], timeout=self.config.grace, return_when=asyncio.FIRST_COMPLETED
            )
            all_done.cancel()  # the wait, not the requests: they are ended below
            hurried.cancel()
        for conn in list(self.connections):
            for task in conn.tasks.values():
                task.cancel()
        await asyncio.sleep(0)  # let cancelled requests start their clean-up
        if self._tasks:
            # Process-group clean-up (TERM, then KILL after KILL_GRACE) runs
            # to its end whatever --grace is: nothing may outlive the agent.
            await asyncio.wait(list(self._tasks), timeout=KILL_GRACE + 2.0)
        for conn in list(self.connections):
            conn._close()
        await self._drain(DRAIN_TIMEOUT)
        for server in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self.audit.close()

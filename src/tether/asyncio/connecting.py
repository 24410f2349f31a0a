"""Opening a connection: the socket, TLS and the agent's certificate, the hello.

:func:`connect` checks the agent's certificate (a pinned fingerprint, a CA,
or the known-hosts file with trust on first use) before the token leaves
this process, then sends the hello and returns a :class:`~.client.Connection`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import ssl
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from ..addresses import Address, parse_address
from ..exceptions import (
    CertificateError,
    ConnectError,
    ConnectionClosed,
    ProtocolError,
    TetherError,
    TimeoutError,
    UsageError,
)
from ..known_hosts import (
    add_known_host,
    default_known_hosts,
    fingerprint,
    lookup_known_host,
    normalize_fingerprint,
)
from ..limits import Limits
from ..tokens import find_client_token
from . import tls
from .channel import Channel
from .client import Connection

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "Connecting", "connect"]

DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds for TCP connect plus hello


class Connecting:
    """What :func:`connect` returns: await it, or use it with ``async with``."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._conn: Connection | None = None

    def __await__(self) -> Generator[Any, None, Connection]:
        return _open_connection(**self._kwargs).__await__()

    async def __aenter__(self) -> Connection:
        self._conn = await _open_connection(**self._kwargs)
        return self._conn

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            await self._conn.close()


def connect(
    host: str | Address,
    *,
    token: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    limits: Limits | None = None,
    insecure_plaintext: bool = False,
    fingerprint: str | None = None,
    cacert: str | os.PathLike[str] | None = None,
    known_hosts: str | os.PathLike[str] | None = None,
    trust_on_first_use: bool = True,
) -> Connecting:
    """Connect to an agent and authenticate.

    ``host`` is ``name[:port]``, ``[v6addr]:port`` or ``unix:/path``. The token
    is ``token``, else read from ``token_file``, else ``$TETHER_TOKEN``, else
    the local agent's token file.

    TCP is TLS unless ``insecure_plaintext`` (the agent must say so too). The
    agent's certificate is checked before the token is sent: against
    ``fingerprint`` if given, else against a CA if ``cacert`` is given, else
    against the pin for this host in ``known_hosts`` (default
    ``~/.config/tether/known_hosts``); an unknown host is pinned on first use
    (``Connection.new_host`` tells) unless ``trust_on_first_use`` is false.
    Unix sockets are plaintext (their file mode guards them).

    Use as ``async with connect(host) as conn:`` or ``conn = await connect(host)``.

    Raises:
        ConnectError: the agent cannot be reached, or TLS failed.
        CertificateError: the certificate is not the pinned one.
        AuthenticationError: the agent refused the token.
        TimeoutError: no connection and hello within ``connect_timeout`` seconds.
        UsageError: bad ``host`` or ``fingerprint``, or no token anywhere.
    """
    return Connecting(
        host=host,
        token=token,
        token_file=token_file,
        connect_timeout=connect_timeout,
        limits=limits or Limits(),
        trust=_Trust(insecure_plaintext, fingerprint, cacert, known_hosts, trust_on_first_use),
    )


@dataclass(frozen=True, slots=True)
class _Trust:
    insecure_plaintext: bool
    fingerprint: str | None
    cacert: str | os.PathLike[str] | None
    known_hosts: str | os.PathLike[str] | None
    trust_on_first_use: bool


async def _open_connection(
    *,
    host: str | Address,
    token: str | None,
    token_file: str | os.PathLike[str] | None,
    connect_timeout: float,
    limits: Limits,
    trust: _Trust,
) -> Connection:
    address = parse_address(host) if isinstance(host, str) else host
    secret = find_client_token(token, token_file)
    pinned = None
    if trust.fingerprint is not None:
        try:
            pinned = normalize_fingerprint(trust.fingerprint)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    use_tls = address.path is None and not trust.insecure_plaintext
    loop = asyncio.get_running_loop()
    wire: Channel | None = None
    seen: str | None = None
    new_host = False
    pin_error: str | None = None
    try:
        async with asyncio.timeout(connect_timeout):
            if address.path is not None:
                _, wire = await loop.create_unix_connection(lambda: Channel(limits), address.path)
            else:
                assert address.host is not None and address.port is not None
                ctx = tls.client_context(trust.cacert) if use_tls else None
                _, wire = await loop.create_connection(
                    lambda: Channel(limits),
                    address.host,
                    address.port,
                    ssl=ctx,
                    server_hostname=address.host if trust.cacert is not None else None,
                )
            pin_into: str | None = None
            if use_tls:
                seen = _peer_fingerprint(wire)
                if pinned is not None or trust.cacert is None:  # a pin holds even with a CA
                    pin_into = _check_pin(address, seen, pinned, trust)
            wire.protocol.send_hello(secret)  # only now: the agent is who we think
            wire.flush()
            try:
                hello = await wire.hello
            except (ProtocolError, ConnectionClosed) as exc:
                if use_tls or address.is_unix:
                    raise  # the hint below is for a TCP agent that speaks TLS
                raise ConnectError(
                    f"cannot connect to {address}: no tether hello came back ({exc}); "
                    "if the agent uses TLS (the default), drop --insecure-plaintext"
                ) from None
            if pin_into is not None:
                # Pinned once the agent has accepted us, so that the connection
                # that pins is one that succeeds (and the CLI says so): after a
                # refused hello, or against something that is no tether agent,
                # the next attempt is still a first use.
                assert seen is not None
                pin_error = _pin(pin_into, address, seen)
                new_host = pin_error is None
    except TetherError:
        _abort(wire)
        raise
    except builtins.TimeoutError:
        _abort(wire)
        raise TimeoutError(
            f"connecting to {address} timed out after {connect_timeout:g}s", seconds=connect_timeout
        ) from None
    except ssl.SSLCertVerificationError as exc:
        _abort(wire)
        raise CertificateError(
            f"cannot connect to {address}: its certificate is not trusted by --cacert "
            f"({exc.verify_message or exc.reason})"
        ) from None
    except ssl.SSLError as exc:
        _abort(wire)
        raise ConnectError(
            f"cannot connect to {address}: TLS handshake failed ({exc.reason or exc}); "
            "an agent started with --insecure-plaintext needs --insecure-plaintext here too"
        ) from None
    except OSError as exc:
        _abort(wire)
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConnectError(f"cannot connect to {address}: {reason}") from None
    except BaseException:  # cancelled from outside: no half-open connection is left
        _abort(wire)
        raise
    return Connection(
        wire, address, hello, fingerprint=seen, new_host=new_host, pin_error=pin_error
    )


def _peer_fingerprint(wire: Channel) -> str:
    assert wire.transport is not None
    ssl_object = wire.transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise ConnectError("the agent presented no TLS certificate")
    return fingerprint(der)


def _check_pin(address: Address, seen: str, pinned: str | None, trust: _Trust) -> str | None:
    """Compare the agent's certificate with its pin.

    Returns:
        The known-hosts file to pin it in once the hello succeeds (an unknown
        host, trust on first use), else None.

    Raises:
        CertificateError: a mismatch, or an unknown host without trust on first use.
    """
    if pinned is not None:
        if seen != pinned:
            raise CertificateError(
                f"the agent at {address} presented certificate {seen}, "
                f"not {pinned} as --fingerprint requires: refusing to send the token"
            )
        return None
    path = os.fspath(trust.known_hosts) if trust.known_hosts is not None else default_known_hosts()
    with _known_hosts_file(path):
        known = lookup_known_host(path, str(address))
    if known is not None:
        try:
            expected = normalize_fingerprint(known.fingerprint)
        except ValueError:
            raise CertificateError(
                f"line {known.line} of {path} pins {address} to {known.fingerprint!r}, "
                "which is not a SHA-256 fingerprint: correct or remove that line"
            ) from None
        if expected != seen:
            raise CertificateError(
                f"WARNING: THE CERTIFICATE OF THE AGENT AT {address} HAS CHANGED!\n"
                "Someone could be intercepting this connection (man-in-the-middle), or the\n"
                "agent's certificate was replaced. The token was not sent.\n"
                f"Expected {known.fingerprint}, got {seen}.\n"
                f"If the change is expected, remove line {known.line} of {path} and connect again."
            )
        return None
    if not trust.trust_on_first_use:
        error = CertificateError(
            f"{address} is not in {path} (its certificate is {seen}); "
            "pass --fingerprint, or allow trust on first use"
        )
        error.code = "unknown_host"
        raise error
    return path


def _pin(path: str, address: Address, seen: str) -> str | None:
    """Record ``seen`` as the pin of ``address`` in the known-hosts file ``path``.

    Returns:
        None, or why it could not be written (a read-only file system, no
        permission...). As with ssh's "Failed to add the host to the list of
        known hosts", the connection goes on: its certificate was trusted on
        first use all the same, the next connection will be a first use too.
    """
    try:
        add_known_host(path, str(address), seen)
    except OSError as exc:
        return f"known hosts file {path}: {exc.strerror or exc}"
    return None


@contextlib.contextmanager
def _known_hosts_file(path: str) -> Generator[None, None, None]:
    """Reading the known-hosts file at ``path``.

    Raises:
        UsageError: the file cannot be read (a directory, no permission...):
            about that file, not a failed connection.
    """
    try:
        yield
    except OSError as exc:
        raise UsageError(f"known hosts file {path}: {exc.strerror or exc}") from None


def _abort(wire: Channel | None) -> None:
    if wire is not None and wire.transport is not None:
        wire.transport.abort()

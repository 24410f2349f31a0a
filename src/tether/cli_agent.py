"""The agent's commands, ``tether serve`` and ``tether token``, loaded only when used.

They hang under the ``tether`` group of :mod:`tether.cli`, which imports this
module on first use, so a client command such as ``tether exec`` does not pay
for them.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import click

from .cli import Seconds, _local_failure, fail, run_main, warn

if TYPE_CHECKING:
    import ssl
    from pathlib import Path

    import tether
    from tether.logwriter import LineHandler

__all__ = ["serve", "token"]

TOKENS_FILE_NAME = "tokens"  # in the state directory, beside the agent's own token


@click.command()
@click.option(
    "--host", "hosts", multiple=True, help="Address to listen on (repeatable). [default: 127.0.0.1]"
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="TCP and UDP port; 0 picks a free one. [default: 7447]",
)
@click.option(
    "--unix", "unix_path", type=click.Path(), help="Also listen on this Unix socket (mode 0600)."
)
@click.option("--no-tcp", is_flag=True, help="Do not listen on TCP (with --unix).")
@click.option("--no-udp", is_flag=True, help="Do not answer UDP pings.")
@click.option(
    "--root",
    type=click.Path(file_okay=False, exists=True),
    help="Directory requests are relative to. [default: the current one]",
)
@click.option("--no-exec", is_flag=True, help="Refuse every exec request.")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    help="The agent's token, tokens file, TLS certificate and key. [default: $XDG_STATE_HOME/tether]",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, exists=True),
    help="Use the token in this file instead.",
)
@click.option(
    "--grace",
    type=Seconds(min=0),
    default=10.0,
    show_default=True,
    help="Seconds running requests get to finish on SIGTERM.",
)
@click.option(
    "--insecure-plaintext",
    is_flag=True,
    help="TCP without TLS: anyone on the path can read and change the traffic.",
)
@click.option(
    "--tokens-file",
    type=click.Path(dir_okay=False),
    help="Named tokens, 'NAME TOKEN' per line, mode 0600. [default: STATE_DIR/tokens]",
)
@click.option(
    "--allow",
    "allow",
    multiple=True,
    metavar="PATTERN",
    help="Only programs matching PATTERN may run (repeatable; 'ls', '/usr/bin/*', '/bin/sh' for --shell).",
)
@click.option(
    "--audit-log",
    type=click.Path(dir_okay=False),
    help="Append one JSON line per connection, hello, command and file change.",
)
@click.option(
    "--max-unauthenticated",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Connections allowed to be authenticating at once.",
)
@click.option(
    "--idle-timeout",
    type=Seconds(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="Seconds before a silent authenticated connection is closed.",
)
@click.option(
    "--max-execs-per-connection",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Commands running at once on one connection.",
)
@click.option(
    "--max-auth-failures",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Failed hellos from one address in a minute before it is blocked for a minute.",
)
@click.option(
    "--max-execs",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Commands running at once on the agent.",
)
@click.option(
    "--cert",
    type=click.Path(dir_okay=False, exists=True),
    help="TLS certificate (PEM) instead of the agent's own.",
)
@click.option(
    "--key", type=click.Path(dir_okay=False, exists=True), help="Private key (PEM) of --cert."
)
@click.option(
    "--hello-timeout",
    type=Seconds(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds a new connection gets to authenticate.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def serve(
    hosts: tuple[str, ...],
    port: int | None,
    unix_path: str | None,
    no_tcp: bool,
    no_udp: bool,
    root: str | None,
    no_exec: bool,
    state_dir: str | None,
    token_file: str | None,
    grace: float,
    insecure_plaintext: bool,
    tokens_file: str | None,
    allow: tuple[str, ...],
    audit_log: str | None,
    max_unauthenticated: int,
    idle_timeout: float,
    max_execs_per_connection: int,
    max_auth_failures: int,
    max_execs: int,
    cert: str | None,
    key: str | None,
    hello_timeout: float,
    log_level: str,
) -> None:
    """Run the agent."""
    import logging
    from pathlib import Path

    import tether
    from tether.addresses import check_host_name
    from tether.logwriter import LineHandler
    from tether.tokens import check_private, read_token_file

    _raise_open_files_limit()
    # Not written by the event loop: a stderr nobody reads would stop it.
    log_handler = LineHandler(sys.stderr.fileno())
    log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=log_level.upper(), handlers=[log_handler])
    if no_tcp and not unix_path:
        fail("--no-tcp needs --unix: there would be nothing to listen on", 2)
    try:
        for host in hosts:
            check_host_name(host, f"--host {host}")
    except tether.UsageError as exc:
        fail(str(exc), 2)
    try:
        if token_file:
            check_private(token_file, "token file")
            token = read_token_file(token_file)
        else:
            directory = Path(state_dir) if state_dir else tether.default_state_dir()
            token, path, created = tether.create_token_file(directory)
            if created:
                # The token is shown once, to a person at a terminal; a log
                # file only learns where it is.
                shown = f": {token}" if sys.stderr.isatty() else ""
                log_handler.put_line(f"tether: new token written to {path}{shown}")
            else:
                log_handler.put_line(f"tether: token in {path}")
    except tether.UsageError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(_one_line(exc))
    directory = Path(state_dir) if state_dir else tether.default_state_dir()
    ssl_context = None
    if not no_tcp and not insecure_plaintext:
        ssl_context = _agent_tls(directory, cert, key, log_handler)
    config = tether.ServerConfig(
        ssl_context=ssl_context,
        tokens_file=Path(tokens_file) if tokens_file else directory / TOKENS_FILE_NAME,
        allow=list(allow),
        audit_log=audit_log,
        max_unauthenticated=max_unauthenticated,
        idle_timeout=idle_timeout,
        max_execs_per_connection=max_execs_per_connection,
        max_execs=max_execs,
        max_auth_failures=max_auth_failures,
        token=token,
        hosts=list(hosts) or ["127.0.0.1"],
        port=tether.DEFAULT_PORT if port is None else port,
        unix_path=unix_path,
        tcp=not no_tcp,
        udp=not no_udp,
        root=Path(root or os.getcwd()).resolve(),
        allow_exec=not no_exec,
        grace=grace,
        hello_timeout=hello_timeout,
    )
    run_main(lambda: _serve(config, log_handler), teardown=True)


@click.group()
def token() -> None:
    """Manage the agent's named tokens."""


@token.command(name="new")
@click.argument("name")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    help="The agent's state directory. [default: $XDG_STATE_HOME/tether]",
)
@click.option("--tokens-file", type=click.Path(dir_okay=False), help="[default: STATE_DIR/tokens]")
def token_new(name: str, state_dir: str | None, tokens_file: str | None) -> None:
    """Make a token for NAME (its identity in the audit log) and print it.

    A running agent picks it up at the next connection.
    """
    from pathlib import Path

    import tether
    from tether.tokens import add_token, check_new_token_name, new_token

    path = (
        Path(tokens_file)
        if tokens_file
        else Path(state_dir or tether.default_state_dir()) / TOKENS_FILE_NAME
    )
    try:
        check_new_token_name(path, name)
    except tether.UsageError as exc:
        fail(str(exc), 2)
    secret = new_token()
    # Printed before it is added: a token nobody received must not be live.
    try:
        click.echo(secret)
        sys.stdout.flush()
    except OSError as exc:
        sys.exit(_local_failure(exc, f"token {name!r} not added: cannot print it"))
    try:
        add_token(path, name, secret)
    except tether.UsageError as exc:
        fail(str(exc), 2)
    except OSError as exc:
        fail(f"token {name!r} not added: {_one_line(exc)}")
    warn(f"token {name!r} added to {path}; give it to the client in a file or $TETHER_TOKEN")


OPEN_FILES = 65536  # the soft limit on open files the agent raises its own to


def _raise_open_files_limit() -> None:
    """Raise the soft limit on open files towards the hard one, as Go's
    runtime and nginx do: each connection and each command's pipes cost
    descriptors, and at the usual soft limit of 1,024 an agent drops
    connections past about a thousand, which libuv closes at accept without
    a word. Not past OPEN_FILES: commands inherit it (restoring it for them
    would cost the spawn its vfork), and some programs loop up to it."""
    import contextlib
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _agent_tls(
    state_dir: Path, cert: str | None, key: str | None, say: LineHandler
) -> ssl.SSLContext:
    from pathlib import Path

    from tether.asyncio import tls

    if (cert is None) != (key is None):
        fail("--cert and --key go together", 2)
    try:
        if cert is not None and key is not None:
            cert_path, key_path = Path(cert), Path(key)
        else:
            cert_path, key_path, created = tls.ensure_certificate(state_dir)
            if created:
                say.put_line(f"tether: new TLS certificate in {cert_path}")
        context = tls.server_context(cert_path, key_path)
        say.put_line(f"tether: certificate fingerprint {tls.fingerprint_of_file(cert_path)}")
    except OSError as exc:
        fail(f"cannot load the TLS certificate: {_one_line(exc)}")
    except ValueError as exc:
        fail(f"cannot load the TLS certificate: {exc}")
    return context


def _one_line(exc: OSError) -> str:
    """``PATH: reason``, without the "[Errno 28]" and quotes of str(exc)."""
    reason = exc.strerror or str(exc)
    return f"{exc.filename}: {reason}" if exc.filename else reason


async def _serve(config: tether.ServerConfig, log: LineHandler) -> int:
    import asyncio
    import signal

    import tether

    server = tether.Server(config)
    try:
        await server.start()
    except OSError as exc:
        await server.close()
        fail(f"cannot listen: {exc.strerror or exc}")
    for address in server.addresses:
        log.put_line(f"tether: listening on {address}")
    loop = asyncio.get_running_loop()
    # SIGHUP too (the terminal it ran in closed): its commands run in
    # sessions of their own, which that hangup never reaches; killed by it,
    # the agent would leave them running with nobody to end them.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        if signal.getsignal(sig) is signal.SIG_IGN:
            # Ignored when we started (`nohup`; SIGINT and SIGQUIT for a
            # background job of a script): stay so, but through a handler
            # that does nothing. An ignored signal stays ignored across
            # exec, a caught one does not: our commands start with every
            # signal at its default, as sshd's do (`send_signal("INT")` did
            # nothing to them).
            loop.add_signal_handler(sig, lambda: None)
        elif sig != signal.SIGQUIT:
            loop.add_signal_handler(sig, server.stop)
    await server.serve()
    # Whoever read our stderr may be gone (EPIPE) or not reading: the stop
    # itself went well, so exit 0 all the same, without waiting for ever.
    log.put_line("tether: stopped")
    log.close()
    return 0

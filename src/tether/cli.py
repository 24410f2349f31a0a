"""The ``tether`` command line, built on the public API only.

Imports of the API happen inside the commands, so ``tether exec`` does not pay
for the agent's modules (and ``--help`` pays for nothing).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import replace as dataclasses_replace
from typing import TYPE_CHECKING, Any, NoReturn

import click

if TYPE_CHECKING:
    import asyncio
    import ssl
    from pathlib import Path  # imported by the commands that make paths, not by exec

    import tether

TOKENS_FILE_NAME = "tokens"  # in the state directory, beside the agent's own token
EXIT_FAILURE = 255  # tether's own failures, as ssh
EXIT_TIMEOUT = 124  # the command ran out of --timeout, as timeout(1)
EXIT_NOT_FOUND = 127  # the program does not exist, as a shell
EXIT_CANNOT_RUN = 126  # the program exists but cannot be run, as a shell
EXIT_SIGPIPE = 128 + 13  # our stdout went away, as a process killed by SIGPIPE
STDIN_CHUNK = 256 * 1024  # bytes read from local stdin at a time


def _fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    click.echo(f"tether: {message}", err=True)
    sys.exit(code)


def _run(main: Callable[[], Coroutine[Any, Any, int]]) -> NoReturn:
    """Run a command's coroutine and exit with its code; errors are one line."""
    import tether

    try:
        code = tether.run(main())
    except tether.UsageError as exc:
        _fail(str(exc), 2)
    except tether.TetherError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code)


def _connection_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add the options of every client command; the command gets them as ``connect``."""

    @functools.wraps(f)
    def command(
        *args: Any,
        token_file: str | None,
        connect_timeout: float,
        insecure_plaintext: bool,
        fingerprint: str | None,
        cacert: str | None,
        known_hosts: str | None,
        **kwargs: Any,
    ) -> Any:
        connect = {
            "token_file": token_file,
            "connect_timeout": connect_timeout,
            "insecure_plaintext": insecure_plaintext,
            "fingerprint": fingerprint,
            "cacert": cacert,
            "known_hosts": known_hosts,
        }
        return f(*args, connect=connect, **kwargs)

    options = [
        click.option(
            "--token-file",
            type=click.Path(dir_okay=False),
            help="File holding the token (default: $TETHER_TOKEN, then the local agent's).",
        ),
        click.option(
            "--connect-timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=10.0,
            show_default=True,
            help="Seconds to connect and authenticate.",
        ),
        click.option(
            "--insecure-plaintext",
            is_flag=True,
            help="Connect without TLS (only to an agent started the same way).",
        ),
        click.option(
            "--fingerprint",
            metavar="SHA256:...",
            help="The agent's certificate fingerprint, as it printed it at start.",
        ),
        click.option(
            "--cacert",
            type=click.Path(dir_okay=False, exists=True),
            help="Verify the agent's certificate with this CA instead of a pin.",
        ),
        click.option(
            "--known-hosts",
            type=click.Path(dir_okay=False),
            help="Pinned certificates. [default: ~/.config/tether/known_hosts]",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@contextlib.asynccontextmanager
async def _connected(host: str, connect: dict[str, Any]) -> AsyncIterator[tether.Connection]:
    """``tether.connect`` for the CLI: says so when a new host gets pinned."""
    import tether

    async with tether.connect(host, **connect) as conn:
        if conn.new_host:
            click.echo(
                f"tether: pinned {conn.address} to certificate {conn.fingerprint} "
                "(trust on first use; compare it with what the agent printed)",
                err=True,
            )
        yield conn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tether")
def cli() -> None:
    """Run commands and move files on machines you control."""


# serve -------------------------------------------------------------------------


@cli.command()
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
    type=click.FloatRange(min=0),
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
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="Seconds before a silent authenticated connection is closed.",
)
@click.option(
    "--max-execs-per-connection", type=click.IntRange(min=1), default=64, show_default=True
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
    type=click.FloatRange(min=0, min_open=True),
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
    from tether.tokens import read_token_file

    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if no_tcp and not unix_path:
        _fail("--no-tcp needs --unix: there would be nothing to listen on", 2)
    try:
        if token_file:
            token = read_token_file(token_file)
        else:
            directory = Path(state_dir) if state_dir else tether.default_state_dir()
            token, path, created = tether.create_token_file(directory)
            if created:
                # The token is shown once, to a person at a terminal; a log
                # file only learns where it is.
                shown = f": {token}" if sys.stderr.isatty() else ""
                click.echo(f"tether: new token written to {path}{shown}", err=True)
            else:
                click.echo(f"tether: token in {path}", err=True)
    except (tether.UsageError, OSError) as exc:
        _fail(str(exc))
    directory = Path(state_dir) if state_dir else tether.default_state_dir()
    ssl_context = None
    if not no_tcp and not insecure_plaintext:
        ssl_context = _agent_tls(directory, cert, key)
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
    _run(lambda: _serve(config))


@cli.group()
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
    from tether.tokens import add_token

    path = (
        Path(tokens_file)
        if tokens_file
        else Path(state_dir or tether.default_state_dir()) / TOKENS_FILE_NAME
    )
    try:
        secret = add_token(path, name)
    except tether.UsageError as exc:
        _fail(str(exc), 2)
    except OSError as exc:
        _fail(f"{path}: {exc.strerror}")
    click.echo(secret)
    click.echo(
        f"tether: token {name!r} added to {path}; give it to the client in a file or $TETHER_TOKEN",
        err=True,
    )


def _agent_tls(state_dir: Path, cert: str | None, key: str | None) -> ssl.SSLContext:
    from pathlib import Path

    from tether.asyncio import tls

    if (cert is None) != (key is None):
        _fail("--cert and --key go together", 2)
    try:
        if cert is not None and key is not None:
            cert_path, key_path = Path(cert), Path(key)
        else:
            cert_path, key_path, created = tls.ensure_certificate(state_dir)
            if created:
                click.echo(f"tether: new TLS certificate in {cert_path}", err=True)
        context = tls.server_context(cert_path, key_path)
        click.echo(
            f"tether: certificate fingerprint {tls.fingerprint_of_file(cert_path)}", err=True
        )
    except (OSError, ValueError) as exc:
        _fail(f"cannot load the TLS certificate: {exc}")
    return context


async def _serve(config: tether.ServerConfig) -> int:
    import asyncio
    import signal

    import tether

    server = tether.Server(config)
    try:
        await server.start()
    except OSError as exc:
        await server.close()
        _fail(f"cannot listen: {exc.strerror or exc}")
    for address in server.addresses:
        click.echo(f"tether: listening on {address}", err=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    await server.serve()
    click.echo("tether: stopped", err=True)
    return 0


# exec --------------------------------------------------------------------------


def _parse_env(values: Sequence[str]) -> dict[str, str]:
    env = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not K=V", param_hint="--env")
        env[key] = value
    return env


@cli.command(name="exec")
@click.argument("host")
@click.argument("command", nargs=-1)
@click.option(
    "--shell", "shell", metavar="CMDLINE", help="Run CMDLINE with /bin/sh -c instead of an argv."
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds before the agent ends the command.",
)
@click.option("--cwd", help="Directory to run in, relative to the agent's root.")
@click.option(
    "--env", "env", multiple=True, metavar="K=V", help="Set an environment variable (repeatable)."
)
@click.option(
    "-n", "no_stdin", is_flag=True, help="Do not forward stdin (the command reads nothing)."
)
@_connection_options
def exec_(
    host: str,
    command: tuple[str, ...],
    shell: str | None,
    timeout: float | None,
    cwd: str | None,
    env: tuple[str, ...],
    no_stdin: bool,
    connect: dict[str, Any],
) -> None:
    """Run COMMAND on HOST; exit with its exit code.

    \b
    tether exec web1 -- uname -a
    tether exec web1 --shell 'ps aux | grep nginx'
    printf 'b\\na\\n' | tether exec web1 -- sort
    """
    if bool(command) == bool(shell):
        _fail("give a command after --, or --shell CMDLINE (not both)", 2)
    environment = _parse_env(env)
    _run(
        lambda: _exec(
            host,
            list(command) if command else None,
            shell=shell,
            timeout=timeout,
            cwd=cwd,
            env=environment or None,
            forward_stdin=not no_stdin,
            connect=connect,
        )
    )


async def _exec(
    host: str,
    argv: list[str] | None,
    *,
    shell: str | None,
    timeout: float | None,
    cwd: str | None,
    env: dict[str, str] | None,
    forward_stdin: bool,
    connect: dict[str, Any],
) -> int:
    import asyncio

    import tether

    async with _connected(host, connect) as conn:
        proc = await conn.exec(
            argv, shell=shell, cwd=cwd, env=env, timeout=timeout, stdin=forward_stdin
        )
        feeder = None
        if forward_stdin:
            feeder = asyncio.get_running_loop().create_task(_forward_stdin(proc))
            # Its failure (the connection went away) is reported by the output loop.
            feeder.add_done_callback(lambda t: t.cancelled() or t.exception())
        outputs = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
        try:
            async for chunk in proc:
                stream = outputs[chunk.stream]
                stream.write(chunk.data)
                stream.flush()  # live output, not at the end
        except BrokenPipeError:
            # Our reader went away (``| head``): end the command, stay quiet.
            _silence_stdout()
            return EXIT_SIGPIPE
        except tether.RemoteError as exc:
            click.echo(f"tether: {exc.message}", err=True)
            return {"not_found": EXIT_NOT_FOUND, "permission_denied": EXIT_CANNOT_RUN}.get(
                exc.code, EXIT_FAILURE
            )
        finally:
            if feeder is not None:
                feeder.cancel()
    status = proc.exit_status
    assert status is not None
    if status.timed_out:
        click.echo(f"tether: command timed out after {timeout:g}s and was ended", err=True)
        return EXIT_TIMEOUT
    return status.returncode


def _silence_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


async def _forward_stdin(proc: tether.RemoteProcess) -> None:
    """Copy local stdin to the command, then end-of-file.

    A thread reads, because stdin may be a terminal, a pipe or a regular file
    and only a blocking read works for all three; the bounded queue makes the
    thread wait while the connection is busy.
    """
    import asyncio

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
    threading.Thread(target=_read_stdin, args=(loop, queue), daemon=True).start()
    while chunk := await queue.get():
        await proc.write(chunk)
    await proc.close_stdin()


def _read_stdin(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[bytes]) -> None:
    import asyncio

    fd = sys.stdin.fileno()
    while True:
        try:
            chunk = os.read(fd, STDIN_CHUNK)
        except OSError:
            chunk = b""
        try:
            asyncio.run_coroutine_threadsafe(queue.put(chunk), loop).result()
        except (RuntimeError, asyncio.CancelledError):
            return  # the loop is gone: the command has ended
        if not chunk:
            return


# cp, ls ------------------------------------------------------------------------


@cli.command()
@click.argument("source")
@click.argument("dest")
@click.option("-r", "recursive", is_flag=True, help="Copy directory trees.")
@click.option("--resume", is_flag=True, help="Continue an interrupted copy from its partial file.")
@click.option("-q", "quiet", is_flag=True, help="No progress bars, only errors.")
@_connection_options
def cp(
    source: str,
    dest: str,
    recursive: bool,
    resume: bool,
    quiet: bool,
    connect: dict[str, Any],
) -> None:
    """Copy SOURCE to DEST; exactly one of them is HOST:PATH.

    \b
    tether cp build.tar.gz web1:/srv/releases/
    tether cp -r web1:/etc/nginx ./nginx-backup
    tether cp --resume web1:big.iso .
    """
    import tether

    try:
        src, dst = tether.parse_remote_path(source), tether.parse_remote_path(dest)
    except tether.UsageError as exc:
        _fail(str(exc), 2)
    if (src is None) == (dst is None):
        _fail("exactly one of SOURCE and DEST must be HOST:PATH", 2)
    options = {"recursive": recursive, "resume": resume, "quiet": quiet}
    if src is not None:
        _run(lambda: _copy(src, dest, upload=False, **options, connect=connect))
    assert dst is not None
    _run(lambda: _copy(dst, source, upload=True, **options, connect=connect))


async def _copy(
    remote: tether.RemotePath,
    local: str,
    *,
    upload: bool,
    recursive: bool,
    resume: bool,
    quiet: bool,
    connect: dict[str, Any],
) -> int:
    import tether

    async with _connected(remote.host, connect) as conn:
        try:
            if upload:
                results = await _upload(conn, local, remote.path, recursive, resume, quiet)
            else:
                results = await _download(conn, remote.path, local, recursive, resume, quiet)
        except (tether.RemoteError, tether.TransferError, _CopyRefused) as exc:
            click.echo(f"tether: {exc}", err=True)
            return 1
        except OSError as exc:  # the local side, before any transfer started
            click.echo(f"tether: {exc.filename}: {exc.strerror}", err=True)
            return 1
    for result in results:
        if result.restarted:
            click.echo(
                f"tether: warning: {result.path} changed since the partial copy; "
                "copied from the start",
                err=True,
            )
    return 0


class _CopyRefused(Exception):
    """cp will not do what was asked (a directory without -r...): one line, exit 1."""


async def _upload(
    conn: tether.Connection, local: str, target: str, recursive: bool, resume: bool, quiet: bool
) -> list[tether.TransferResult]:
    import posixpath
    import stat

    import tether
    from tether.progressbar import TransferBars

    is_dir = stat.S_ISDIR(os.stat(local).st_mode)  # a missing source fails here, clearly
    if is_dir and not recursive:
        raise _CopyRefused(f"{local}: is a directory (use -r)")
    try:
        into = (await conn.stat(target, follow=True)).is_dir
    except tether.RemoteError as exc:
        if exc.code != "not_found":
            raise
        if target.endswith("/"):  # as cp and scp: "dir/" must be a directory
            raise _CopyRefused(f"{target}: no such directory") from None
        into = False
    else:
        if target.endswith("/") and not into:
            raise _CopyRefused(f"{target}: not a directory")
    if into:  # an existing directory receives the source by its name
        target = posixpath.join(target, os.path.basename(os.path.normpath(local)))
    total = _tree_size(local) if is_dir else os.path.getsize(local)
    with TransferBars(quiet=quiet, total=total) as bars:
        if is_dir:
            return await conn.put_tree(local, target, resume=resume, progress=bars)
        return [await conn.put(local, target, resume=resume, progress=bars)]


async def _download(
    conn: tether.Connection, source: str, target: str, recursive: bool, resume: bool, quiet: bool
) -> list[tether.TransferResult]:
    import posixpath

    from tether.progressbar import TransferBars

    info = await conn.stat(source, follow=True)
    if info.is_dir and not recursive:
        raise _CopyRefused(f"{source}: is a directory (use -r)")
    if os.path.isdir(target):
        target = os.path.join(target, posixpath.basename(posixpath.normpath(source)))
    elif target.endswith("/"):
        raise _CopyRefused(f"{target}: no such directory")
    with TransferBars(quiet=quiet, total=None if info.is_dir else info.size) as bars:
        if info.is_dir:
            return await conn.get_tree(source, target, resume=resume, progress=bars)
        return [await conn.get(source, target, resume=resume, progress=bars)]


def _tree_size(top: str) -> int:
    total = 0
    for directory, _, files in os.walk(top):
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                total += os.path.getsize(path)
    return total


@cli.command(name="ls")
@click.argument("target", metavar="HOST:PATH")
@click.option("--json", "as_json", is_flag=True, help="One JSON array, for scripts.")
@_connection_options
def ls(target: str, as_json: bool, connect: dict[str, Any]) -> None:
    """List a remote directory: mode, size, modification time, name."""
    import tether

    try:
        remote = tether.parse_remote_path(target)
    except tether.UsageError as exc:
        _fail(str(exc), 2)
    if remote is None:
        _fail(f"{target}: expected HOST:PATH (ls lists a remote directory)", 2)
    _run(lambda: _ls(remote, as_json, connect))


async def _ls(remote: tether.RemotePath, as_json: bool, connect: dict[str, Any]) -> int:
    import json
    import posixpath
    import stat as stat_module
    import time

    import tether

    async with _connected(remote.host, connect) as conn:
        try:
            # As ls(1): "link/" lists the directory a link leads to.
            info = await conn.stat(remote.path, follow=remote.path.endswith("/"))
            if info.is_dir:
                entries = await conn.listdir(remote.path)
            else:
                name = posixpath.basename(remote.path.rstrip("/")) or remote.path
                entries = [dataclasses_replace(info, name=name)]
        except tether.RemoteError as exc:
            click.echo(f"tether: {exc.message}", err=True)
            return 1
    if as_json:
        rows = [
            {
                "name": e.name,
                "type": e.type,
                "size": e.size,
                "mode": e.mode,
                "mtime_ns": e.mtime_ns,
                "target": e.target,
            }
            for e in entries
        ]
        # ASCII JSON: a name that is not UTF-8 stays a \udcXX escape, which
        # os.fsencode() turns back into its bytes.
        _write_line(json.dumps(rows))
        return 0
    kinds = {"dir": stat_module.S_IFDIR, "link": stat_module.S_IFLNK, "file": stat_module.S_IFREG}
    for e in entries:
        mode = stat_module.filemode(kinds.get(e.type, 0) | e.mode)
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime_ns / 1e9))
        name = e.name or ""
        if e.target is not None:
            name += f" -> {e.target}"
        _write_line(f"{mode} {e.size:>12} {when} {name}")
    return 0


def _write_line(text: str) -> None:
    # File names are bytes: write them back as the bytes they were
    # (surrogateescape), whatever encoding stdout was opened with.
    sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape") + b"\n")
    sys.stdout.buffer.flush()


# echo, ping ----------------------------------------------------------------------


@cli.command()
@click.argument("host")
@click.argument("text")
@_connection_options
def echo(host: str, text: str, connect: dict[str, Any]) -> None:
    """Send TEXT to HOST and print what comes back, with the round-trip time."""
    _run(lambda: _echo(host, text, connect))


async def _echo(host: str, text: str, connect: dict[str, Any]) -> int:
    import time

    async with _connected(host, connect) as conn:
        started = time.perf_counter()
        reply = await conn.echo(text)
        elapsed = time.perf_counter() - started
    if reply != text:
        _fail("echo came back different from what was sent")
    assert isinstance(reply, str)
    _write_line(reply)  # as bytes: an argument that is not UTF-8 comes back as it went
    click.echo(f"round trip {elapsed * 1000:.3f} ms", err=True)
    return 0


@cli.command()
@click.argument("host")
@click.option(
    "-c", "count", type=click.IntRange(min=1), default=4, show_default=True, help="Pings to send."
)
@click.option(
    "-i",
    "interval",
    type=click.FloatRange(min=0.01),
    default=1.0,
    show_default=True,
    help="Seconds between pings.",
)
@click.option(
    "-W",
    "wait",
    type=click.FloatRange(min=0.01),
    default=1.0,
    show_default=True,
    help="Seconds to wait for each reply.",
)
@click.option(
    "-s",
    "size",
    type=click.IntRange(16, 1024),
    default=16,
    show_default=True,
    help="Datagram size in bytes.",
)
def ping(host: str, count: int, interval: float, wait: float, size: int) -> None:
    """Ping HOST's agent over UDP (no token needed)."""
    _run(lambda: _ping(host, count, interval, wait, size))


async def _ping(host: str, count: int, interval: float, wait: float, size: int) -> int:
    import tether

    address = tether.parse_address(host)
    click.echo(f"PING {address} (udp): {size} bytes")
    rtts = []
    async for reply in tether.ping(
        address, count=count, interval=interval, timeout=wait, size=size
    ):
        if reply.rtt is None:
            click.echo(f"no reply for seq={reply.seq} within {wait:g}s")
        else:
            rtts.append(reply.rtt * 1000)
            click.echo(
                f"{reply.size} bytes from {address}: seq={reply.seq} time={reply.rtt * 1000:.3f} ms"
            )
    loss = 100.0 * (count - len(rtts)) / count
    click.echo(f"--- {address} ping statistics ---")
    click.echo(f"{count} sent, {len(rtts)} received, {loss:.0f}% loss")
    if rtts:
        avg = sum(rtts) / len(rtts)
        click.echo(f"rtt min/avg/max = {min(rtts):.3f}/{avg:.3f}/{max(rtts):.3f} ms")
    return 0 if rtts else 1


def main() -> None:
    cli(prog_name="tether")

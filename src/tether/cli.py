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
    from types import FrameType

    import tether

EXIT_FAILURE = 255  # tether's own failures, as ssh
EXIT_TIMEOUT = 124  # the command ran out of --timeout, as timeout(1)
EXIT_NOT_FOUND = 127  # the program does not exist, as a shell
EXIT_CANNOT_RUN = 126  # the program exists but cannot be run, as a shell
EXIT_SIGPIPE = 128 + 13  # our stdout went away, as a process killed by SIGPIPE
STDIN_CHUNK = 256 * 1024  # bytes read from local stdin at a time


class Seconds(click.FloatRange):
    """An option's duration: a finite number of seconds within the range.

    FloatRange alone lets ``nan`` through (no comparison holds) and ``inf``
    through an open top; neither can be sent (JSON has no such numbers).
    """

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        import math

        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return seconds


def warn(message: str, *, lines: bool = False) -> None:
    """``tether: MESSAGE`` on stderr, its control characters escaped (names and
    messages may come from the agent); with ``lines``, a message of our own
    made of several lines keeps them (each escaped)."""
    from .terminal import printable

    parts = message.split("\n") if lines else [message]
    _say("tether: " + "\n".join(printable(part) for part in parts))


def _say(line: str) -> None:
    """``line`` on stderr, if stderr takes it: one that is full or gone
    (``2>/dev/full``) must not turn a command that went well into a failure."""
    with contextlib.suppress(OSError):
        click.echo(line, err=True)


def fail(message: str, code: int = EXIT_FAILURE, *, lines: bool = False) -> NoReturn:
    warn(message, lines=lines)
    sys.exit(code)


def run_main(main: Callable[[], Coroutine[Any, Any, int]], *, teardown: bool = False) -> NoReturn:
    """Run a command's coroutine and exit with its code; errors are one line.

    A client command then leaves without the interpreter's teardown (unless
    ``teardown``): by the time the loop has closed (``asyncio.Runner`` joins
    the worker threads that read and write files before it returns), its
    connection is closed and its files are written and closed, so all that
    teardown does is free the modules of asyncio, ssl and click, one by one:
    about 12 ms here, a tenth of a whole ``tether exec``.
    """
    import tether

    signalled: list[int] = []
    try:
        code = tether.run(main() if teardown else _cancelled_by_signals(main(), signalled))
    except _Signalled:
        # Cleaned up (requests ended, connections reset): now die of the
        # signal, so that whoever started us sees it as such.
        _die_of(signalled[0])
        code = 128 + signalled[0]  # not reached while the signal is deliverable
    except tether.UsageError as exc:
        fail(str(exc), 2)
    except tether.CertificateError as exc:
        fail(str(exc), lines=True)  # "THE CERTIFICATE ... HAS CHANGED!" reads as ssh's does
    except tether.TetherError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as exc:  # our own output failed (`| head`, a full disk), most likely
        code = _local_failure(exc)
    if not teardown:
        _exit_now(code)
    sys.exit(code)


class _Signalled(Exception):
    """The main task was cancelled by SIGTERM or SIGHUP."""


SIGNAL_CLEANUP = 2.0  # seconds the clean-up after SIGTERM or SIGHUP may take before we just die
_writing = False  # set while _write_all may block: a signal then cannot wait for the loop


def _die_of(signum: int) -> None:
    import signal

    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


async def _cancelled_by_signals(main: Coroutine[Any, Any, int], signalled: list[int]) -> int:
    """Run ``main``; SIGTERM and SIGHUP cancel it as Ctrl-C does, so that
    its clean-up runs: killed outright, the process would leave a command
    that is not reading its stdin running on the agent (our end of the
    connection would go on sending the queued stdin before its end, and the
    agent, not reading it, would never learn that we are gone).

    The clean-up gets SIGNAL_CLEANUP seconds; a second signal, or one that
    comes while our output is blocked on a reader that does not read (the
    loop cannot run), ends the process at once, as the default action would.
    A signal ignored when we started (``nohup``) stays ignored.
    """
    import asyncio
    import signal
    import threading

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    main_thread = threading.main_thread().ident
    assert main_thread is not None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # A Python-level handler, not loop.add_signal_handler: it runs even
        # while the loop is blocked in a write.
        if signalled or _writing or loop.is_closed():
            _die_of(signum)
            return
        signalled.append(signum)
        # The same signal again, to the main thread, if the clean-up overruns:
        # it interrupts whatever blocks there, and this handler then ends it.
        timer = threading.Timer(SIGNAL_CLEANUP, signal.pthread_kill, (main_thread, signum))
        timer.daemon = True
        timer.start()
        loop.call_soon_threadsafe(task.cancel)

    runners_sigint = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        # Ctrl-C while our output is blocked: the loop cannot run the
        # clean-up asyncio's handler asks for; leave as Ctrl-C leaves.
        if _writing:
            os._exit(130)
        if callable(runners_sigint):
            runners_sigint(signum, frame)

    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, on_signal)
    if callable(runners_sigint):  # asyncio.Runner's, which cancels the main task
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, on_sigint)
    try:
        code = await main
    except asyncio.CancelledError:
        if not signalled:
            raise
    finally:
        if not signalled:  # after the loop, a signal takes its usual course
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    if signalled:  # also when the command's own clean-up swallowed the cancellation
        raise _Signalled
    return code


def _local_failure(exc: OSError, what: str | None = None) -> int:
    """The exit code for a local error (writing our stdout, mostly), said in
    one line if at all.

    Our reader went away (EPIPE, ``| head``): quietly 141, as a process killed
    by SIGPIPE. Anything else (ENOSPC on a full disk or /dev/full): 255.
    Later writes to stdout go to /dev/null, so the exit does not fail on them.
    """
    from .logwriter import silence

    silence(sys.stdout.fileno())
    if isinstance(exc, BrokenPipeError):
        return EXIT_SIGPIPE
    where = what or exc.filename
    prefix = f"{where}: " if where else ""
    warn(f"{prefix}{exc.strerror or exc}")
    return EXIT_FAILURE


def _exit_now(code: int) -> None:
    """``os._exit(code)`` once stdout and stderr are flushed (the code of
    :func:`_local_failure` if stdout cannot be)."""
    if sys.stdout is not None:  # None: the descriptor was closed when we started
        try:
            sys.stdout.flush()
        except ValueError:  # closed meanwhile: nothing to flush
            pass
        except OSError as exc:
            code = _local_failure(exc, "cannot write the output")
    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
    # An exit status is 8 bits: what the kernel would keep of a larger code
    # (only a broken agent reports one), where os._exit would raise instead.
    os._exit(code & 0xFF)


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
            type=Seconds(min=0, min_open=True),
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
            _say(
                f"tether: pinned {conn.address} to certificate {conn.fingerprint} "
                "(trust on first use; compare it with what the agent printed)"
            )
        elif conn.pin_error is not None:
            warn(
                f"failed to pin {conn.address} to certificate {conn.fingerprint} "
                f"({conn.pin_error}): trusted for this connection only"
            )
        yield conn


class _LazyGroup(click.Group):
    """A group whose agent commands (cli_agent.py) are loaded only when used:
    ``tether exec`` does not build ``serve``'s two dozen options."""

    LAZY = frozenset({"serve", "token"})  # each the attribute of that name in tether.cli_agent

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.LAZY:
            from tether import cli_agent

            command: click.Command = getattr(cli_agent, cmd_name)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tether")
def cli() -> None:
    """Run commands and move files on machines you control."""


# exec --------------------------------------------------------------------------


def _parse_env(values: Sequence[str]) -> dict[str, str]:
    env = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not K=V", param_hint="--env")
        env[key] = value
    return env


class _RemoteCommand(click.Command):
    """``exec``: the first word after HOST starts the remote command, and
    every word from there on is the command's own, as with ssh. Click lets
    options come between arguments, so ``tether exec web1 grep -n foo`` ran
    ``grep foo`` with tether's ``-n`` (no stdin), and ``sleep 3 --timeout 1``
    got tether's timeout. Options before the command are still tether's."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        takes_value = {
            name
            for param in self.params
            if isinstance(param, click.Option) and not param.is_flag and not param.count
            for name in param.opts
        }
        words = 0  # arguments seen before: HOST, then the command
        index = 0
        while index < len(args):
            arg = args[index]
            if arg == "--":
                break  # click's own rule: the rest are arguments
            if arg.startswith("-") and arg != "-":
                index += 2 if arg in takes_value else 1  # "--cwd DIR"; "--cwd=DIR" is one
                continue
            if words == 1:
                return super().parse_args(ctx, [*args[:index], "--", *args[index:]])
            words += 1
            index += 1
        return super().parse_args(ctx, args)


@cli.command(name="exec", cls=_RemoteCommand)
@click.argument("host")
@click.argument("command", nargs=-1)
@click.option(
    "--shell", "shell", metavar="CMDLINE", help="Run CMDLINE with /bin/sh -c instead of an argv."
)
@click.option(
    "--timeout",
    type=Seconds(min=0, min_open=True),
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
    if bool(command) == (shell is not None):  # an empty --shell '' is a command line too
        fail("give a command after --, or --shell CMDLINE (not both)", 2)
    environment = _parse_env(env)
    run_main(
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
        sys.stdout.flush()
        sys.stderr.flush()
        outputs = {"stdout": sys.stdout.fileno(), "stderr": sys.stderr.fileno()}
        try:
            async for chunk in proc:
                _write_all(outputs[chunk.stream], chunk.data)  # live output, not at the end
        except tether.RemoteError as exc:
            warn(exc.message)
            return {
                "not_found": EXIT_NOT_FOUND,
                "permission_denied": EXIT_CANNOT_RUN,
                "exec_failed": EXIT_CANNOT_RUN,  # found, but not runnable (ENOEXEC...), as a shell
            }.get(exc.code, EXIT_FAILURE)
        finally:
            if feeder is not None:
                feeder.cancel()
    status = proc.exit_status
    assert status is not None
    if status.timed_out:
        warn(f"command timed out after {timeout:g}s and was ended")
        return EXIT_TIMEOUT
    return status.returncode


def _write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd``. Straight to the descriptor: under
    ``PYTHONUNBUFFERED`` (common in containers) ``sys.stdout.buffer`` is the
    raw file, whose ``write`` may write part and return the count, and on a
    descriptor left non-blocking by whoever started us returns None for
    EAGAIN: output was lost without a word. Here a short write goes on and
    EAGAIN waits until the reader has made room, as ssh does."""
    from .logwriter import write_fully

    global _writing
    _writing = True
    try:
        write_fully(fd, data)
    finally:
        _writing = False


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
    import concurrent.futures
    import select

    fd = sys.stdin.fileno()
    while True:
        try:
            chunk = os.read(fd, STDIN_CHUNK)
        except BlockingIOError:
            # Whoever started us left stdin non-blocking: wait for input, as
            # ssh does, rather than take "no input yet" for its end.
            select.select([fd], [], [])
            continue
        except OSError:
            chunk = b""  # EIO (the terminal went away) and the like: the end
        put = queue.put(chunk)
        try:
            asyncio.run_coroutine_threadsafe(put, loop).result()
        except RuntimeError:  # the loop is closed: the command has ended
            put.close()  # never scheduled: not a "coroutine was never awaited"
            return
        except concurrent.futures.CancelledError:  # the loop ended it on its way out
            return
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
        fail(str(exc), 2)
    if (src is None) == (dst is None):
        fail("exactly one of SOURCE and DEST must be HOST:PATH", 2)
    options = {"recursive": recursive, "resume": resume, "quiet": quiet}
    if src is not None:
        run_main(lambda: _copy(src, dest, upload=False, **options, connect=connect))
    assert dst is not None
    run_main(lambda: _copy(dst, source, upload=True, **options, connect=connect))


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
        except tether.TreeCopyError as exc:
            # Name every entry that was not copied; the rest of the tree was,
            # unless an error ended the copy: when that was the connection,
            # the exit is tether's own failure's, as for any copy.
            _warn_restarted(exc.results)
            for failure in exc.failures:
                warn(str(failure))
            cut = not isinstance(exc.stopped_by or exc, tether.RemoteError | tether.TransferError)
            return EXIT_FAILURE if cut else 1
        except (tether.RemoteError, tether.TransferError, _CopyRefused) as exc:
            warn(str(exc))
            return 1
        except OSError as exc:  # the local side, before any transfer started
            warn(f"{exc.filename}: {exc.strerror}")
            return 1
    _warn_restarted(results)
    return 0


def _warn_restarted(results: list[tether.TransferResult]) -> None:
    for result in results:
        if result.restarted:
            warn(f"warning: {result.path} changed since the partial copy; copied from the start")


class _CopyRefused(Exception):
    """cp will not do what was asked (a directory without -r...): one line, exit 1."""


async def _upload(
    conn: tether.Connection, local: str, target: str, recursive: bool, resume: bool, quiet: bool
) -> list[tether.TransferResult]:
    import posixpath
    import stat

    import tether
    from tether.paths import is_unfinished_tree
    from tether.progressbar import TransferBars

    is_dir = stat.S_ISDIR(os.stat(local).st_mode)  # a missing source fails here, clearly
    if is_dir and not recursive:
        raise _CopyRefused(f"{local}: is a directory (use -r)")
    try:
        dest: tether.RemoteStat | None = await conn.stat(target, follow=True)
    except tether.RemoteError as exc:
        if exc.code != "not_found":
            raise
        if target.endswith("/"):  # as cp and scp: "dir/" must be a directory
            raise _CopyRefused(f"{target}: no such directory") from None
        dest = None
    if target.endswith("/") and dest is not None and not dest.is_dir:
        raise _CopyRefused(f"{target}: not a directory")
    if dest is not None and dest.is_dir:  # an existing directory receives the source by its name
        name = os.path.basename(os.path.normpath(local))
        in_place = (
            resume
            and is_dir
            and is_unfinished_tree(dest.mode)
            and (await conn.stat(target)).is_dir  # not a link to one: that receives SRC by name
            and _holds_only_parts_of(_remote_types(await conn.listdir(target)), _local_types(local))
        )
        target = _into(target, name, posixpath.join, in_place, quiet)
    total = _tree_size(local) if is_dir else os.path.getsize(local)
    with TransferBars(quiet=quiet, total=total) as bars:
        if is_dir:
            return await conn.put_tree(
                local, target, resume=resume, progress=bars, skipped=_say_skipped
            )
        return [await conn.put(local, target, resume=resume, progress=bars)]


async def _download(
    conn: tether.Connection, source: str, target: str, recursive: bool, resume: bool, quiet: bool
) -> list[tether.TransferResult]:
    import posixpath

    from tether.paths import is_unfinished_tree
    from tether.progressbar import TransferBars

    info = await conn.stat(source, follow=True)
    if info.is_dir and not recursive:
        raise _CopyRefused(f"{source}: is a directory (use -r)")
    if os.path.isdir(target):
        name = posixpath.basename(posixpath.normpath(source))
        in_place = (
            resume
            and info.is_dir
            and is_unfinished_tree(os.lstat(target).st_mode)  # a link to one receives SRC by name
            and _holds_only_parts_of(
                _local_types(target), _remote_types(await conn.listdir(source))
            )
        )
        target = _into(target, name, os.path.join, in_place, quiet)
    elif target.endswith("/"):  # as cp and scp: "dir/" must be a directory
        what = "not a directory" if os.path.lexists(target.rstrip("/")) else "no such directory"
        raise _CopyRefused(f"{target}: {what}")
    with TransferBars(quiet=quiet, total=None if info.is_dir else info.size) as bars:
        if info.is_dir:
            return await conn.get_tree(
                source, target, resume=resume, progress=bars, skipped=_say_skipped
            )
        return [await conn.get(source, target, resume=resume, progress=bars)]


def _say_skipped(path: str) -> None:
    # Named, and not an error, as rsync's "skipping non-regular file" (scp
    # counts it as one): the copy of everything else went well.
    warn(f"{path}: not a regular file, directory or symlink; not copied")


def _into(
    directory: str, name: str, join: Callable[[str, str], str], in_place: bool, quiet: bool
) -> str:
    """Where a copy of ``name`` into the existing ``directory`` goes: under its
    name, as with scp; or, resuming the unfinished copy that made
    ``directory`` (paths.is_unfinished_tree), ``directory`` itself."""
    if not in_place:
        return join(directory, name)
    if not quiet:
        warn(f"resuming the interrupted copy in {directory}")
    return directory


def _holds_only_parts_of(dest: dict[str, str], source: dict[str, str]) -> bool:
    """Whether everything in DEST (the type of each entry, by name) is named
    like an entry of SOURCE, of the same type, or is the partial file of one:
    DEST is then an unfinished copy of SOURCE, not of something else."""
    from tether.paths import partial_name

    partials = {partial_name(entry): "file" for entry, kind in source.items() if kind == "file"}
    return all(source.get(entry, partials.get(entry)) == kind for entry, kind in dest.items())


def _remote_types(entries: list[tether.RemoteStat]) -> dict[str, str]:
    return {entry.name or "": entry.type for entry in entries}


def _local_types(directory: str) -> dict[str, str]:
    """The entries of a local directory by name, with the types a listing gives."""
    types = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_symlink():
                types[entry.name] = "link"
            elif entry.is_dir(follow_symlinks=False):
                types[entry.name] = "dir"
            else:
                types[entry.name] = "file" if entry.is_file(follow_symlinks=False) else "other"
    return types


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
        fail(str(exc), 2)
    if remote is None:
        fail(f"{target}: expected HOST:PATH (ls lists a remote directory)", 2)
    run_main(lambda: _ls(remote, as_json, connect))


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
            warn(exc.message)
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
    from tether.terminal import printable

    kinds = {"dir": stat_module.S_IFDIR, "link": stat_module.S_IFLNK, "file": stat_module.S_IFREG}
    for e in entries:
        mode = stat_module.filemode(kinds.get(e.type, 0) | e.mode)
        try:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime_ns / 1e9))
        except (OverflowError, OSError, ValueError):  # a year beyond what the C library shows
            when = f"{e.mtime_ns // 10**9:>16}"
        name = e.name or ""
        if e.target is not None:
            name += f" -> {e.target}"
        # One line per entry whatever the name holds (--json gives it exactly).
        _write_line(f"{mode} {e.size:>12} {when} {printable(name, backslashes=True)}")
    return 0


def _write_line(text: str) -> None:
    # File names are bytes: write them back as the bytes they were
    # (surrogateescape), whatever encoding stdout was opened with.
    sys.stdout.flush()
    _write_all(sys.stdout.fileno(), text.encode("utf-8", "surrogateescape") + b"\n")


# echo, ping ----------------------------------------------------------------------


@cli.command()
@click.argument("host")
@click.argument("text")
@_connection_options
def echo(host: str, text: str, connect: dict[str, Any]) -> None:
    """Send TEXT to HOST and print what comes back, with the round-trip time."""
    run_main(lambda: _echo(host, text, connect))


async def _echo(host: str, text: str, connect: dict[str, Any]) -> int:
    import time

    async with _connected(host, connect) as conn:
        started = time.perf_counter()
        reply = await conn.echo(text)
        elapsed = time.perf_counter() - started
    if reply != text:
        fail("echo came back different from what was sent")
    assert isinstance(reply, str)
    _write_line(reply)  # as bytes: an argument that is not UTF-8 comes back as it went
    _say(f"round trip {elapsed * 1000:.3f} ms")
    return 0


@cli.command()
@click.argument("host")
@click.option(
    "-c", "count", type=click.IntRange(min=1), default=4, show_default=True, help="Pings to send."
)
@click.option(
    "-i",
    "interval",
    type=Seconds(min=0.01),
    default=1.0,
    show_default=True,
    help="Seconds between pings.",
)
@click.option(
    "-W",
    "wait",
    type=Seconds(min=0.01),
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
    run_main(lambda: _ping(host, count, interval, wait, size))


async def _ping(host: str, count: int, interval: float, wait: float, size: int) -> int:
    import asyncio

    import tether

    address = tether.parse_address(host)
    pings = tether.ping(address, count=count, interval=interval, timeout=wait, size=size)
    rtts: list[float] = []
    outcomes = 0
    shown = False

    def show_header() -> None:
        # At the first outcome, which tells which of the host's addresses
        # answers (one that refuses gives way to the next within moments),
        # or soon after the first ping went, as ping(8) shows it at once.
        nonlocal shown
        if not shown and pings.peer is not None:
            shown = True
            click.echo(_ping_header(address, pings.peer, size))

    header_timer = asyncio.get_running_loop().call_later(HEADER_AFTER, show_header)
    try:
        async for reply in pings:
            outcomes += 1
            show_header()
            if reply.refused:
                click.echo(f"seq={reply.seq}: port unreachable: nothing listens on {address} (udp)")
            elif reply.rtt is None:
                click.echo(f"no reply for seq={reply.seq} within {wait:g}s")
            else:
                rtts.append(reply.rtt * 1000)
                click.echo(
                    f"{reply.size} bytes from {address}: "
                    f"seq={reply.seq} time={reply.rtt * 1000:.3f} ms"
                )
    except asyncio.CancelledError:  # Ctrl-C: the statistics so far, exit code and all, as ping(8)
        show_header()  # the first ping may still be on its way
    finally:
        header_timer.cancel()
    _ping_statistics(address, pings.sent, rtts)
    return 0 if rtts else 1


HEADER_AFTER = 0.2  # seconds after which ping shows its PING line, reply or not


def _ping_header(address: tether.Address, peer: str, size: int) -> str:
    # As ping(8)'s "PING localhost (127.0.0.1)": the IP address, if not typed.
    via = "udp" if peer == address.host else f"{peer}, udp"
    return f"PING {address} ({via}): {size} bytes"


def _ping_statistics(address: object, sent: int, rtts: list[float]) -> None:
    loss = 100.0 * (sent - len(rtts)) / sent if sent else 0.0
    click.echo(f"--- {address} ping statistics ---")
    click.echo(f"{sent} sent, {len(rtts)} received, {loss:.0f}% loss")
    if rtts:
        avg = sum(rtts) / len(rtts)
        click.echo(f"rtt min/avg/max = {min(rtts):.3f}/{avg:.3f}/{max(rtts):.3f} ms")


def main() -> None:
    _open_standard_descriptors()
    cli(prog_name="tether")


def _open_standard_descriptors() -> None:
    """Put /dev/null on whichever of descriptors 0, 1 and 2 the caller left
    closed (``>&-``, some daemons), as ssh does, and give Python its streams
    back: otherwise the first socket or pipe opened takes the number, output
    meant for stdout goes into it, and libuv aborts when it closes it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            name = ("stdin", "stdout", "stderr")[fd]
            if getattr(sys, name) is None:  # Python found it closed at start-up
                # Lives as long as the process, as the streams Python opens itself.
                stream = open(fd, "r" if fd == 0 else "w", closefd=False)  # noqa: SIM115
                setattr(sys, name, stream)

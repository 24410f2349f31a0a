"""The client's side of file transfers (docs/protocol.md §5): stat, list, get, put, trees."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any, TypeVar

from ..exceptions import (
    AuthenticationError,
    ConnectionClosed,
    ProtocolError,
    RemoteError,
    TetherError,
    TransferError,
    TreeCopyError,
)
from ..messages import (
    HASH_NAME,
    Cancel,
    Data,
    Done,
    Entries,
    Error,
    ErrorCode,
    FileInfo,
    Get,
    ListDir,
    Message,
    Mkdir,
    Ok,
    Put,
    Ready,
    SetAttr,
    Stat,
    StatReply,
    Symlink,
)
from ..paths import UNFINISHED_TREE_MODE, is_unfinished_tree, looks_partial
from .fileio import (
    FileSource,
    PartialFile,
    StreamSink,
    error_from_os,
    is_stream,
    replace_symlink,
)

if TYPE_CHECKING:
    from .client import Connection

__all__ = ["Progress", "RemoteStat", "Skipped", "TransferResult"]

Progress = Callable[[str, int, int], None]
"""Called as ``progress(path, done, total)``: at least every 1 MiB or second,
and exactly once with ``done == total`` when the file is complete."""

PROGRESS_INTERVAL = 1.0  # seconds between progress calls at the most
CANCEL_WAIT = 5.0  # seconds a failed put waits for the agent to confirm its cancel


@dataclass(frozen=True, slots=True)
class RemoteStat:
    """A path on the agent: ``type`` is ``file``, ``dir``, ``link`` or ``other``."""

    type: str
    size: int
    mode: int
    mtime_ns: int
    target: str | None = None
    name: str | None = None  # set in listings

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"


@dataclass(frozen=True, slots=True)
class TransferResult:
    """What one file transfer did."""

    path: str
    size: int
    sent: int  # bytes that crossed the network (less than size after a resume)
    digest: str
    resumed_from: int = 0
    restarted: bool = False  # a resume was asked for but the prefix did not match


class _Ticker:
    """Calls ``progress`` per chunk, and once with done == total at the very end."""

    def __init__(self, progress: Progress | None, path: str, total: int) -> None:
        self.progress, self.path, self.total = progress, path, total
        self.last = 0.0

    def update(self, done: int) -> None:
        if self.progress is not None and done < self.total:
            self.progress(self.path, done, self.total)
            self.last = time.monotonic()

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(self.path, self.total, self.total)


async def _reply(conn: Connection, queue: asyncio.Queue[Any]) -> Message:
    msg = await queue.get()
    if isinstance(msg, Message):
        conn._wire.consumed(msg)
        if isinstance(msg, Error):
            raise RemoteError(msg.code, msg.message)
        return msg
    raise msg.error  # the connection ended


def _expect(msg: Message, kind: type[Any]) -> Any:
    if not isinstance(msg, kind):
        raise ProtocolError(f"expected {kind.OP}, got {msg.OP}")
    return msg


async def _simple(conn: Connection, factory: Callable[[int], Message], kind: type[Any]) -> Any:
    return _expect(await conn._request(factory), kind)


async def stat_path(conn: Connection, path: str, *, follow: bool = False) -> RemoteStat:
    reply: StatReply = await _simple(conn, lambda i: Stat(i, path, follow), StatReply)
    return RemoteStat(reply.type, reply.size, reply.mode, reply.mtime_ns, reply.target)


async def listdir(conn: Connection, path: str) -> list[RemoteStat]:
    request_id, queue = conn._open(lambda i: ListDir(i, path))
    entries: list[RemoteStat] = []
    try:
        while not isinstance(msg := await _reply(conn, queue), Done):
            for item in json.loads(_expect(msg, Entries).body):
                entries.append(
                    RemoteStat(
                        item["type"],
                        item["size"],
                        item["mode"],
                        item["mtime_ns"],
                        item.get("target"),
                        item["name"],
                    )
                )
    finally:
        conn._forget(request_id)
    return entries


async def mkdir(conn: Connection, path: str, mode: int | None = None) -> None:
    await _simple(conn, lambda i: Mkdir(i, path, mode), Ok)


async def symlink(conn: Connection, path: str, target: str) -> None:
    await _simple(conn, lambda i: Symlink(i, path, target), Ok)


async def setattr_path(
    conn: Connection, path: str, mode: int | None = None, mtime_ns: int | None = None
) -> None:
    await _simple(conn, lambda i: SetAttr(i, path, mode, mtime_ns), Ok)


async def get_file(
    conn: Connection,
    remote: str,
    local: str,
    *,
    resume: bool,
    progress: Progress | None,
    into_streams: bool = True,
) -> TransferResult:
    """Download ``remote`` to ``local``: a partial file renamed into place once
    verified; or, if ``local`` is a FIFO or device and ``into_streams``, into it
    (a tree copy refuses those: a FIFO nobody reads would wait for ever).

    With ``into_streams`` (a copy of one file, as scp), a symlink at ``local``
    names where the file goes: its target is written, the link stays; a link
    into /proc (/dev/stdout) is written through, whatever it is open on. A
    tree copy replaces links.
    """
    partial: PartialFile | StreamSink
    if into_streams and is_stream(local):  # through a link too: stat follows it
        partial = await StreamSink.open(local, local)
    else:
        target = _link_target(local) if into_streams and os.path.islink(local) else local
        partial = PartialFile(target, local, resume=resume)
    keep = False
    request_id: int | None = None
    try:
        have, prefix_digest = await partial.prefix()
        request_id, queue = conn._open(
            lambda i: Get(i, remote, offset=have, prefix_digest=prefix_digest)
        )
        info: FileInfo = _expect(await _reply(conn, queue), FileInfo)
        if info.hash != HASH_NAME:
            raise TransferError(
                ErrorCode.BAD_REQUEST,
                f"{remote}: the agent hashes with {info.hash!r}, not {HASH_NAME}",
            )
        await partial.start_at(info.offset)
        ticker = _Ticker(progress, remote, info.size)
        ticker.update(info.offset)
        while isinstance(msg := await _reply(conn, queue), Data):
            await partial.write(msg.body)
            conn._wire.protocol.reuse_body(msg.body)
            ticker.update(partial.pos)
        done: Done = _expect(msg, Done)
        conn._forget(request_id)
        request_id = None
        if done.digest is None:
            raise ProtocolError("get: done without a digest")
        await partial.commit(info.size, done.digest, info.mode, info.mtime_ns)
        ticker.finish()
        return TransferResult(
            remote,
            info.size,
            info.size - info.offset,
            done.digest,
            resumed_from=info.offset,
            restarted=have > 0 and info.offset == 0,
        )
    except (ConnectionClosed, RemoteError, asyncio.CancelledError) as exc:
        if not isinstance(exc, RemoteError) or exc.code == ErrorCode.SHUTTING_DOWN:
            # Interrupted (by us, the network, or the agent stopping): the
            # bytes so far stay for --resume, all on disk and unlocked when
            # we return. Any other error frame is a failure of this get.
            keep = True
            await partial.settle()
        raise
    finally:
        if request_id is not None:
            _cancel(conn, request_id)
        conn._wire.protocol.drop_spare_bodies()  # an idle connection holds no data buffers
        if keep:
            partial.close()
        else:
            partial.discard()


def _link_target(link: str) -> str:
    """Where the symlink ``link`` leads: an existing file, or the name a
    dangling link gives. A loop is refused (ELOOP), not replaced.

    Raises:
        TransferError: the links loop.
    """
    try:
        return os.path.realpath(link, strict=True)
    except FileNotFoundError:
        return os.path.realpath(link)  # dangling: the file is made where it points
    except OSError as exc:
        raise error_from_os(exc, link) from None


def _cancel(conn: Connection, request_id: int, *, keep: bool = False) -> None:
    """Tell the agent to stop a request we gave up on (if the connection lives)."""
    conn._forget(request_id)
    if conn._wire.error is None:
        conn._wire.send(Cancel(request_id, keep=keep))


async def _cancel_and_wait(conn: Connection, request_id: int, queue: asyncio.Queue[Any]) -> None:
    """:func:`_cancel`, then wait (``CANCEL_WAIT`` at most) for the request's
    last frame: by then the agent has cleaned up after it."""
    if conn._wire.error is None:
        conn._wire.send(Cancel(request_id))
        with contextlib.suppress(TetherError, TimeoutError):  # the error frame, or no answer
            async with asyncio.timeout(CANCEL_WAIT):
                while not isinstance(await _reply(conn, queue), Ok):
                    pass
    conn._forget(request_id)


async def put_file(
    conn: Connection,
    local: str,
    remote: str,
    *,
    resume: bool,
    progress: Progress | None,
    mode: int | None = None,
) -> TransferResult:
    source = FileSource(local, local)
    meta = source.meta
    request_id: int | None = None
    try:
        request_id, queue = conn._open(
            lambda i: Put(
                i,
                remote,
                meta.size,
                mode=meta.mode if mode is None else mode,
                mtime_ns=meta.mtime_ns,
                resume=resume,
            )
        )
        ready: Ready = _expect(await _reply(conn, queue), Ready)
        offset = await source.start_at(ready.offset, ready.prefix_digest)
        ticker = _Ticker(progress, local, meta.size)
        conn._wire.send(Data(request_id, offset=offset))
        sent = offset
        pending = asyncio.ensure_future(source.read())
        try:
            while chunk := await pending:
                pending = asyncio.ensure_future(source.read())  # read ahead while sending
                conn._wire.send(Data(request_id, body=chunk))
                await conn._wire.drain()
                sent += len(chunk)
                ticker.update(sent)
                if not queue.empty():  # the agent failed early (disk full...)
                    await _reply(conn, queue)
        finally:
            pending.cancel()
        digest = source.finish()
        conn._wire.send(Done(request_id, digest=digest))
        _expect(await _reply(conn, queue), Ok)
        conn._forget(request_id)
        request_id = None
        ticker.finish()
        return TransferResult(
            remote,
            meta.size,
            meta.size - offset,
            digest,
            resumed_from=offset,
            restarted=ready.offset > 0 and offset == 0,
        )
    except asyncio.CancelledError:
        if request_id is not None:  # interrupted: the agent keeps the bytes for --resume
            _cancel(conn, request_id, keep=True)
            request_id = None
        raise
    except TransferError:
        # Ours: the file changed or could not be read. The agent removes its
        # partial file before it answers the cancel; waiting for that answer
        # puts whatever the caller does next after it (a tree copy setting
        # the directory's mtime, which the removal would change).
        if request_id is not None:
            await _cancel_and_wait(conn, request_id, queue)
            request_id = None
        raise
    finally:
        source.close()
        if request_id is not None:
            _cancel(conn, request_id)


# Trees ------------------------------------------------------------------------------

# Errors that concern one entry of a tree and say nothing of the next: a tree
# copy records them and goes on, as scp does. Any other (no space left, the
# agent stopping, the connection gone, a protocol error) would fail every
# later entry too, and ends the copy at once.
_ENTRY_CODES = frozenset(
    {
        ErrorCode.NOT_FOUND,  # vanished since it was listed
        ErrorCode.BAD_REQUEST,  # a FIFO or device where the file goes
        ErrorCode.PERMISSION_DENIED,
        ErrorCode.FORBIDDEN,
        ErrorCode.PATH_OUTSIDE_ROOT,
        ErrorCode.IS_A_DIRECTORY,
        ErrorCode.NOT_A_DIRECTORY,
        ErrorCode.SOURCE_CHANGED,
        ErrorCode.CHECKSUM_MISMATCH,
        ErrorCode.BUSY,
        ErrorCode.IO_ERROR,
    }
)


Skipped = Callable[[str], None]
"""Called as ``skipped(path)`` for each entry a tree copy leaves out: neither a
regular file, a directory nor a symlink (a socket, a FIFO, a device)."""


_Dir = TypeVar("_Dir")


FILES_IN_FLIGHT = 8  # files of a tree copied at once


class _TreeCopy:
    """The files a tree copy has copied, the entries it could not, and
    whether its top directory is its own (new, or an unfinished copy's).

    Files are copied FILES_IN_FLIGHT at a time (:meth:`send`): one at a time,
    a tree of small files cost two round trips and two fsyncs per file, and
    copied 30-60 times slower than ``cp -r``.
    """

    def __init__(self, skipped: Skipped | None, *, fresh: bool) -> None:
        # By place in the tree (files land in any order): see the properties.
        self._results: list[tuple[int, TransferResult]] = []
        self._failures: list[tuple[int, TetherError]] = []
        self._places = itertools.count()
        self.skipped = skipped
        # The top directory is made by this copy, or by an unfinished one: it
        # is marked unfinished until everything has been copied into it.
        self.fresh = fresh
        self._slots = asyncio.Semaphore(FILES_IN_FLIGHT)
        self._flying: set[asyncio.Task[None]] = set()
        self._fatal: BaseException | None = None  # what ends the copy, from a file in flight

    async def send(self, shown: str, transfer: Callable[[], Awaitable[TransferResult]]) -> None:
        """Start copying the file ``shown`` beside those in flight. Its own
        failure is recorded as :meth:`entry` does; one that ends the copy
        starts no more files, and is raised by a later :meth:`send` or by
        :meth:`landed`."""
        place = next(self._places)
        await self._slots.acquire()
        if self._fatal is not None:
            self._slots.release()
            await self.landed()
        task = asyncio.get_running_loop().create_task(self._one(shown, transfer, place))
        self._flying.add(task)
        task.add_done_callback(self._flying.discard)

    async def _one(
        self, shown: str, transfer: Callable[[], Awaitable[TransferResult]], place: int
    ) -> None:
        try:
            with self.entry(shown, place):
                self._results.append((place, await transfer()))
        except Exception as exc:  # entry() let it through: it ends the copy
            if self._fatal is None:
                self._fatal = exc
        finally:
            self._slots.release()

    async def landed(self) -> None:
        """Wait until every file in flight has been copied (or failed).

        Raises:
            TetherError: one of them failed in a way that ends the copy.
        """
        # After an error that ends the copy too: the files in flight land
        # (or fail, and remove their partial files) rather than be cancelled,
        # which would leave their partial files behind on, say, a full disk.
        while self._flying:
            await asyncio.wait(set(self._flying))
        if self._fatal is not None:
            raise self._fatal

    async def abort(self) -> None:
        """End the files still in flight (an error, or the copy cancelled)."""
        flying = list(self._flying)
        for task in flying:
            task.cancel()
        await asyncio.gather(*flying, return_exceptions=True)

    def skip(self, path: str) -> None:
        if self.skipped is not None:
            self.skipped(path)

    @property
    def results(self) -> list[TransferResult]:
        """The files copied, in the order of the tree."""
        return [result for _, result in sorted(self._results, key=itemgetter(0))]

    @property
    def failures(self) -> list[TetherError]:
        """The entries that could not be copied, in the order of the tree."""
        return [error for _, error in sorted(self._failures, key=itemgetter(0))]

    @contextlib.contextmanager
    def entry(self, shown: str, place: int | None = None) -> Iterator[None]:
        """Record an error of the entry ``shown`` (at ``place`` in the tree:
        the next one if not given) and go on; re-raise any other."""
        if place is None:
            place = next(self._places)
        try:
            yield
        except (RemoteError, TransferError) as exc:
            if exc.code not in _ENTRY_CODES or isinstance(exc, AuthenticationError):
                raise
            self._failures.append((place, exc))
        except TetherError:
            raise
        except OSError as exc:  # this side's, outside a transfer (readlink, chmod...)
            error = error_from_os(exc, shown)
            if error.code not in _ENTRY_CODES:
                raise error from None
            self._failures.append((place, error))

    def to_finish(self, dirs: list[_Dir]) -> list[_Dir]:
        """The directories to give their own mode and mtime, children first
        (their writes touch the parent): all of them, except the top of a
        fresh copy that missed entries, which stays marked unfinished."""
        keep_top = self.fresh and bool(self._failures)
        return list(reversed(dirs[1:] if keep_top else dirs))

    @contextlib.contextmanager
    def stopping(self) -> Iterator[None]:
        """An error that ends the copy keeps the entries that failed before it."""
        try:
            yield
        except TetherError as exc:
            if not self._failures:
                raise
            raise TreeCopyError([*self.failures, exc], self.results, stopped_by=exc) from exc

    def outcome(self) -> list[TransferResult]:
        """The results, or TreeCopyError if any entry failed."""
        if self._failures:
            raise TreeCopyError(self.failures, self.results)
        return self.results


def _join(base: str, name: str) -> str:
    return name if base in ("", ".") else base.rstrip("/") + "/" + name


async def put_tree(
    conn: Connection,
    local: str,
    remote: str,
    *,
    resume: bool,
    progress: Progress | None,
    skipped: Skipped | None = None,
) -> list[TransferResult]:
    """Copy the directory ``local`` to ``remote`` (created if missing).

    Directories are made writable first and get their own mode and mtime
    last, so read-only trees copy too; symlinks are copied as links. An
    entry that cannot be copied does not stop the others (TreeCopyError at
    the end); the top directory itself must be readable.
    """
    copy = _TreeCopy(skipped, fresh=await _fresh_remote(conn, remote))
    dirs: list[tuple[str, os.stat_result]] = []

    async def walk(local_dir: str, remote_dir: str) -> None:
        try:
            # The top may be a link to a directory (`cp -r link HOST:`, as
            # scp); below it, links are copied as links.
            st = os.stat(local_dir) if not dirs else os.lstat(local_dir)
            if not stat.S_ISDIR(st.st_mode):
                raise TransferError(ErrorCode.NOT_A_DIRECTORY, f"{local_dir}: not a directory")
            with os.scandir(local_dir) as it:
                entries = sorted(it, key=lambda e: _copy_order(e.name))
        except OSError as exc:
            raise error_from_os(exc, local_dir) from None
        # Writable until its own mode is set, last; the top marked unfinished.
        top = not dirs
        await _writable_remote_dir(
            conn, remote_dir, UNFINISHED_TREE_MODE if top and copy.fresh else 0o700
        )
        dirs.append((remote_dir, st))
        for entry in entries:
            target = _join(remote_dir, entry.name)
            if looks_partial(entry.name):
                await copy.landed()  # not while the file it may be the partial of flies
            with copy.entry(entry.path):
                if entry.is_symlink():
                    await symlink(conn, target, os.readlink(entry.path))
                elif entry.is_dir(follow_symlinks=False):
                    await walk(entry.path, target)
                elif entry.is_file(follow_symlinks=False):
                    await copy.send(
                        entry.path,
                        functools.partial(
                            put_file, conn, entry.path, target, resume=resume, progress=progress
                        ),
                    )
                else:  # a socket, a FIFO, a device
                    copy.skip(entry.path)

    with copy.stopping():
        try:
            await walk(local, remote)
            await copy.landed()
        finally:
            await copy.abort()
        for remote_dir, st in copy.to_finish(dirs):
            with copy.entry(remote_dir):
                await setattr_path(conn, remote_dir, stat.S_IMODE(st.st_mode), st.st_mtime_ns)
    return copy.outcome()


def _copy_order(name: str) -> tuple[bool, str]:
    """Names in order, those of the form of a partial file last: a real file
    ``.f.tether-part`` copied before ``f`` became the partial file of ``f``,
    which took it over and renamed it to ``f``: it was lost, and nothing said
    so."""
    return looks_partial(name), name


async def _writable_remote_dir(conn: Connection, path: str, mode_if_made: int) -> None:
    """Make the directory ``path`` with ``mode_if_made``; one that exists
    only gains what its owner needs to write into it. Set to 0700, a
    directory a web server reads denied it every file for the whole copy,
    and for good once a copy stopped half way."""
    try:
        info = await stat_path(conn, path)
    except RemoteError as exc:
        if exc.code != ErrorCode.NOT_FOUND:
            raise
        await mkdir(conn, path, mode_if_made)
        return
    if not info.is_dir:
        await mkdir(conn, path)  # the agent says what it is instead (not_a_directory)
    elif info.mode & 0o700 != 0o700:
        await setattr_path(conn, path, stat.S_IMODE(info.mode) | 0o700)


async def _fresh_remote(conn: Connection, path: str) -> bool:
    """Whether a tree copy to ``path`` makes it, or goes on with an unfinished one."""
    try:
        info = await stat_path(conn, path)
    except RemoteError as exc:
        if exc.code == ErrorCode.NOT_FOUND:
            return True
        raise
    return info.is_dir and is_unfinished_tree(info.mode)


def _fresh_local(path: str) -> bool:
    """:func:`_fresh_remote` on this side."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False  # making it will say why
    return stat.S_ISDIR(st.st_mode) and is_unfinished_tree(st.st_mode)


async def get_tree(
    conn: Connection,
    remote: str,
    local: str,
    *,
    resume: bool,
    progress: Progress | None,
    skipped: Skipped | None = None,
) -> list[TransferResult]:
    """Copy the remote directory ``remote`` to ``local`` (created if missing).

    An entry that cannot be copied does not stop the others (TreeCopyError
    at the end); the top directory itself must be readable.
    """
    copy = _TreeCopy(skipped, fresh=_fresh_local(local))
    dirs: list[tuple[str, RemoteStat]] = []

    async def walk(remote_dir: str, local_dir: str, info: RemoteStat) -> None:
        # Before anything is made here.
        entries = sorted(await listdir(conn, remote_dir), key=lambda e: _copy_order(e.name or ""))
        for entry in entries:
            # The agent names what we write: a name that is not one plain
            # component could write outside the destination (as scp's
            # CVE-2019-6111). Refuse the whole listing.
            name = entry.name or ""
            if name in ("", ".", "..") or "/" in name or "\0" in name:
                raise ProtocolError(f"the agent listed a bad name {name!r} in {remote_dir}")
        try:
            try:
                os.mkdir(local_dir, 0o700)
                # Writable until its own mode is set, last; the top marked
                # unfinished (chmod: mkdir's mode is filtered by the umask).
                os.chmod(local_dir, UNFINISHED_TREE_MODE if not dirs and copy.fresh else 0o700)
            except FileExistsError:
                st = os.lstat(local_dir)
                if not stat.S_ISDIR(st.st_mode):
                    raise TransferError(
                        ErrorCode.NOT_A_DIRECTORY, f"{local_dir}: exists and is not a directory"
                    ) from None
                # As for a put: only what its owner needs to write into it (a
                # read-only one that an unfinished copy already gave its mode
                # must take files again); nothing taken from others.
                if st.st_mode & 0o700 != 0o700:
                    os.chmod(local_dir, stat.S_IMODE(st.st_mode) | 0o700)
        except OSError as exc:
            raise error_from_os(exc, local_dir) from None
        dirs.append((local_dir, info))
        for entry in entries:
            assert entry.name is not None
            source = _join(remote_dir, entry.name)
            target = os.path.join(local_dir, entry.name)
            if looks_partial(entry.name):
                await copy.landed()  # not while the file it may be the partial of flies
            with copy.entry(target):
                if entry.type == "link" and entry.target is not None:
                    replace_symlink(entry.target, target)
                elif entry.type == "dir":
                    await walk(source, target, entry)
                elif entry.type == "file":
                    await copy.send(
                        target,
                        functools.partial(
                            get_file,
                            conn,
                            source,
                            target,
                            resume=resume,
                            progress=progress,
                            into_streams=False,
                        ),
                    )
                else:  # a socket, a FIFO, a device
                    copy.skip(source)

    top = await stat_path(conn, remote, follow=True)  # a link to a directory copies it
    if not top.is_dir:
        raise RemoteError(ErrorCode.NOT_A_DIRECTORY, f"{remote}: not a directory")
    with copy.stopping():
        try:
            await walk(remote, local, top)
            await copy.landed()
        finally:
            await copy.abort()
        for local_dir, info in copy.to_finish(dirs):
            with copy.entry(local_dir):
                os.chmod(local_dir, info.mode)
                os.utime(local_dir, ns=(info.mtime_ns, info.mtime_ns))
    return copy.outcome()

"""The agent's file ops: stat, list, get, put, mkdir, symlink, setattr (docs/protocol.md §5).

Every path goes through :func:`resolve`: lexical confinement in
:mod:`tether.paths`, then symlinks resolved and checked against the root.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from typing import TYPE_CHECKING, Any

from ..exceptions import RemoteError
from ..messages import (
    Data,
    Done,
    Entries,
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
from ..paths import confine, is_within, outside_root
from .fileio import FileSource, PartialFile, error_from_os, replace_symlink

if TYPE_CHECKING:
    from .session import ServerConnection

__all__ = ["FILE_HANDLERS", "resolve"]

ENTRIES_PER_FRAME = 512  # listing entries per frame: well under the body limit
PUT_BUFFER = 16 * 1024 * 1024  # 16 MiB of received data waiting for the disk: stop reading


def resolve(root: str, requested: str, *, follow: bool) -> str:
    """The real path ``requested`` names, confined to ``root`` (already real).

    With ``follow`` a final symlink is resolved too (the target must be
    inside); without it only the parent directory is, so the link itself
    is what the op acts on.

    Raises:
        RemoteError: ``path_outside_root``.
    """
    path = confine(root, requested)
    if path == root:
        return root
    as_directory = requested.endswith("/")  # as in POSIX: "link/" is where it leads
    if follow or as_directory:
        real = os.path.realpath(path)
    else:
        head, tail = os.path.split(path)
        real = os.path.join(os.path.realpath(head), tail)
    if not is_within(root, real):
        raise outside_root(requested)
    if as_directory and os.path.exists(real) and not os.path.isdir(real):
        raise RemoteError(ErrorCode.NOT_A_DIRECTORY, f"{requested}: not a directory")
    return real


def _file_type(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "link"
    return "other"


def _describe(path: str, st: os.stat_result) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": _file_type(st.st_mode),
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "mtime_ns": st.st_mtime_ns,
    }
    if stat.S_ISLNK(st.st_mode):
        info["target"] = os.fsdecode(os.readlink(path))
    return info


def _root(conn: ServerConnection) -> str:
    return conn.server.root


async def handle_stat(conn: ServerConnection, request: Stat) -> Message:
    path = resolve(_root(conn), request.path, follow=request.follow)
    try:
        info = _describe(path, os.lstat(path))
    except OSError as exc:
        raise error_from_os(exc, request.path) from None
    return StatReply(request.id, **info)


def _scan(path: str) -> list[dict[str, Any]]:
    entries = []
    with os.scandir(path) as it:
        for entry in it:
            try:
                info = _describe(entry.path, entry.stat(follow_symlinks=False))
            except FileNotFoundError:
                continue  # removed while we listed
            entries.append({"name": entry.name, **info})
    entries.sort(key=lambda e: e["name"])
    return entries


async def handle_list(conn: ServerConnection, request: ListDir) -> Message:
    path = resolve(_root(conn), request.path, follow=True)
    async with conn.sending():
        try:
            entries = await asyncio.to_thread(_scan, path)
        except OSError as exc:
            raise error_from_os(exc, request.path) from None
        for start in range(0, len(entries), ENTRIES_PER_FRAME):
            batch = entries[start : start + ENTRIES_PER_FRAME]
            # ASCII JSON, like headers: undecodable name bytes travel as \\udcXX.
            conn.send(Entries(request.id, body=json.dumps(batch).encode("ascii")))
            await conn.drain()
    return Done(request.id)


async def handle_get(conn: ServerConnection, request: Get) -> Message:
    path = resolve(_root(conn), request.path, follow=True)
    async with conn.sending():
        return await _send_file(conn, request, path)


async def _send_file(conn: ServerConnection, request: Get, path: str) -> Message:
    source = FileSource(path, request.path)
    offset = 0
    try:
        offset = await source.start_at(request.offset, request.prefix_digest)
        meta = source.meta
        conn.send(FileInfo(request.id, meta.size, meta.mode, meta.mtime_ns, offset=offset))
        # Read the next chunk while the previous one is on its way.
        pending = asyncio.ensure_future(source.read())
        try:
            while chunk := await pending:
                pending = asyncio.ensure_future(source.read())
                conn.send(Data(request.id, body=chunk))
                await conn.drain()
        finally:
            pending.cancel()
        digest = source.finish()
    finally:
        conn.note(request.id, bytes=source.pos - offset)
        source.close()
    conn.note(request.id, size=meta.size, digest=digest)
    return Done(request.id, digest=digest)


class PutReceiver:
    """Takes a put's ``data`` and ``done`` frames and feeds them to the disk in order."""

    def __init__(self, conn: ServerConnection, request: Put, partial: PartialFile) -> None:
        self.conn = conn
        self.request = request
        self.partial = partial
        self.queue: asyncio.Queue[Data | Done] = asyncio.Queue()
        self.buffered = 0
        self.started = False

    def control(self, msg: Message) -> None:
        if isinstance(msg, Data):
            self.buffered += len(msg.body)
            if self.buffered > PUT_BUFFER:
                self.conn.hold_input(self)  # the disk is behind: read no more for now
            self.queue.put_nowait(msg)
        elif isinstance(msg, Done):
            self.queue.put_nowait(msg)

    def pause_output(self) -> None:
        pass

    def resume_output(self) -> None:
        pass

    async def receive(self) -> str:
        """Write data until ``done``; return the sender's digest."""
        while True:
            msg = await self.queue.get()
            if isinstance(msg, Done):
                if not self.started:
                    raise RemoteError(ErrorCode.BAD_REQUEST, "put: done before any data")
                if msg.digest is None:
                    raise RemoteError(ErrorCode.BAD_REQUEST, "put: done needs the digest")
                return msg.digest
            if not self.started:
                if msg.offset is None:
                    raise RemoteError(ErrorCode.BAD_REQUEST, "put: the first data needs an offset")
                await self.partial.start_at(msg.offset)
                self.started = True
            elif msg.offset is not None and msg.offset != self.partial.pos:
                raise RemoteError(ErrorCode.BAD_REQUEST, f"put: data out of order at {msg.offset}")
            if self.partial.pos + len(msg.body) > self.request.size:
                raise RemoteError(ErrorCode.BAD_REQUEST, "put: more data than the declared size")
            await self.partial.write(msg.body)
            self.buffered -= len(msg.body)
            self.conn.protocol.reuse_body(msg.body)
            if self.buffered <= PUT_BUFFER // 2:
                self.conn.release_input(self)


async def handle_put(conn: ServerConnection, request: Put) -> Message:
    dest = resolve(_root(conn), request.path, follow=False)
    partial = PartialFile(dest, request.path, resume=request.resume)
    receiver = PutReceiver(conn, request, partial)
    keep = False
    offset = 0
    try:
        try:
            offset, prefix_digest = await partial.prefix(request.size)
            conn.attach(request.id, receiver)
            conn.send(Ready(request.id, offset=offset, prefix_digest=prefix_digest))
            digest = await receiver.receive()
        except asyncio.CancelledError:
            # A cut connection, or a sender that was interrupted, keeps the
            # bytes for --resume; a sender that gave up does not.
            cancel = conn.cancel_of(request.id)
            keep = cancel is None or cancel.keep
            await partial.settle()
            raise
        await partial.commit(request.size, digest, request.mode, request.mtime_ns)
        conn.note(request.id, digest=digest)
    finally:
        conn.note(request.id, bytes=max(partial.pos - offset, 0))
        conn.release_input(receiver)
        conn.protocol.drop_spare_bodies()  # an idle connection holds no data buffers
        if keep:
            partial.close()
        else:
            partial.discard()
    return Ok(request.id)


async def handle_mkdir(conn: ServerConnection, request: Mkdir) -> Message:
    path = resolve(_root(conn), request.path, follow=False)
    try:
        try:
            os.mkdir(path, 0o777 if request.mode is None else request.mode)
        except FileExistsError:
            if not os.path.isdir(path) or os.path.islink(path):
                raise RemoteError(
                    ErrorCode.NOT_A_DIRECTORY, f"{request.path}: exists and is not a directory"
                ) from None
        if request.mode is not None:
            os.chmod(path, request.mode)  # mkdir's mode is filtered by the umask
    except OSError as exc:
        raise error_from_os(exc, request.path) from None
    return Ok(request.id)


async def handle_symlink(conn: ServerConnection, request: Symlink) -> Message:
    path = resolve(_root(conn), request.path, follow=False)
    if os.path.isdir(path) and not os.path.islink(path):
        raise RemoteError(ErrorCode.IS_A_DIRECTORY, f"{request.path}: is a directory")
    # The target is stored as given: the agent never follows it without a
    # new confinement check.
    try:
        replace_symlink(request.target, path)
    except OSError as exc:
        raise error_from_os(exc, request.path) from None
    return Ok(request.id)


async def handle_setattr(conn: ServerConnection, request: SetAttr) -> Message:
    path = resolve(_root(conn), request.path, follow=False)
    try:
        is_link = stat.S_ISLNK(os.lstat(path).st_mode)
        if request.mode is not None and not is_link:  # links have no mode of their own
            os.chmod(path, request.mode)
        if request.mtime_ns is not None:
            times = (request.mtime_ns, request.mtime_ns)
            os.utime(path, ns=times, follow_symlinks=False)
    except OSError as exc:
        raise error_from_os(exc, request.path) from None
    return Ok(request.id)


FILE_HANDLERS: dict[type[Message], Any] = {
    Stat: handle_stat,
    ListDir: handle_list,
    Get: handle_get,
    Put: handle_put,
    Mkdir: handle_mkdir,
    Symlink: handle_symlink,
    SetAttr: handle_setattr,
}

"""Files on either end of a transfer: a verified source, an atomic destination.

Both the agent and the client use these: the agent reads for ``get`` and
writes for ``put``; the client the other way round. Reading, writing and
hashing run in threads (BLAKE3 and the kernel release the GIL for large
buffers) so they overlap with the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import blake3

from ..exceptions import TransferError
from ..messages import ErrorCode
from ..paths import link_temp_name, partial_name

__all__ = [
    "CHUNK_SIZE",
    "FileSource",
    "PartialFile",
    "StreamSink",
    "error_from_os",
    "is_stream",
    "new_hasher",
    "partial_path",
    "replace_symlink",
]

T = TypeVar("T")

CHUNK_SIZE = 1024 * 1024  # 1 MiB of file per data frame
LOCK_ATTEMPTS = 3  # opens of a partial file that another process renamed away meanwhile

_ERRNO_CODES = {
    errno.ENOENT: ErrorCode.NOT_FOUND,
    errno.EACCES: ErrorCode.PERMISSION_DENIED,
    errno.EPERM: ErrorCode.PERMISSION_DENIED,
    errno.EROFS: ErrorCode.PERMISSION_DENIED,
    errno.EISDIR: ErrorCode.IS_A_DIRECTORY,
    errno.ENOTDIR: ErrorCode.NOT_A_DIRECTORY,
    errno.ENOSPC: ErrorCode.NO_SPACE,
    errno.EDQUOT: ErrorCode.NO_SPACE,
}


def error_from_os(exc: OSError, shown: str) -> TransferError:
    """The wire error for ``exc``, naming the path as the user wrote it."""
    code = _ERRNO_CODES.get(exc.errno or 0, ErrorCode.IO_ERROR)
    reason = exc.strerror or str(exc)
    return TransferError(code, f"{shown}: {reason}")


def new_hasher() -> Any:
    # One thread per hash: transfers already run one per file in parallel.
    return blake3.blake3(max_threads=1)


def partial_path(dest: str) -> str:
    """Where a transfer to ``dest`` collects its bytes: hidden, same directory."""
    head, tail = os.path.split(dest)
    return os.path.join(head, partial_name(tail))


def _hash_range(fd: int, length: int) -> Any:
    hasher = new_hasher()
    pos = 0
    while pos < length:
        chunk = os.pread(fd, min(CHUNK_SIZE * 4, length - pos), pos)
        if not chunk:
            break
        hasher.update(chunk)
        pos += len(chunk)
    return hasher


@dataclass(frozen=True, slots=True)
class FileMeta:
    size: int
    mode: int
    mtime_ns: int


class _ThreadedFile:
    """A file descriptor whose blocking work runs in threads.

    A thread may outlive the coroutine that started it (the request was
    cancelled): the descriptor is closed only after the thread is done, so
    its number can never be reused by another file under a late write.
    """

    fd: int
    shown: str  # the path as the user wrote it, for errors
    _closed = False
    _busy: asyncio.Future[Any] | None = None

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a thread.

        Raises:
            TransferError: for an OSError (EIO, ENOSPC...): this request
                fails, cleanly, naming the file.
        """
        future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        # Retrieved here, so that one nobody awaits any more (the caller was
        # cancelled) is not reported as "never retrieved".
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._busy = future
        try:
            # Shielded: cancelling the caller must not mark this future done
            # (cancelled) while the thread still uses the descriptor.
            return await asyncio.shield(future)
        except OSError as exc:
            raise error_from_os(exc, self.shown) from None

    async def _hash_prefix(self, length: int) -> Any:
        """A hasher fed the file's first ``length`` bytes.

        Raises:
            TransferError: the read failed (``io_error`` for EIO...).
        """
        return await self._in_thread(_hash_range, self.fd, length)

    async def settle(self) -> None:
        """Wait for a thread still working on this file (after a cancellation)."""
        if self._busy is not None and not self._busy.done():
            await asyncio.wait([self._busy])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._after_thread(self._close_fd)

    def _after_thread(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` now, or once the thread still at work on this file is done."""
        if self._busy is not None and not self._busy.done():
            self._busy.add_done_callback(lambda _: fn())
        else:
            fn()

    def _close_fd(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class FileSource(_ThreadedFile):
    """A regular file being sent: read in order, hashed, checked for change."""

    def __init__(self, path: str, shown: str) -> None:
        self.shown = shown
        try:
            # O_NONBLOCK: opening a FIFO must not block the agent's loop.
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise error_from_os(exc, shown) from None
        st = os.fstat(self.fd)
        if stat.S_ISDIR(st.st_mode):
            self.close()
            raise TransferError(ErrorCode.IS_A_DIRECTORY, f"{shown}: is a directory")
        if not stat.S_ISREG(st.st_mode):
            self.close()
            raise TransferError(ErrorCode.BAD_REQUEST, f"{shown}: not a regular file")
        self.meta = FileMeta(st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns)
        self.hasher = new_hasher()
        self.pos = 0

    async def start_at(self, offset: int, prefix_digest: str | None) -> int:
        """Start after the first ``offset`` bytes if their digest matches; else at 0."""
        if 0 < offset <= self.meta.size and prefix_digest is not None:
            hasher = await self._hash_prefix(offset)
            if hasher.hexdigest() == prefix_digest:
                self.hasher, self.pos = hasher, offset
        return self.pos

    async def read(self) -> bytes:
        """The next chunk (empty at the end), hashed.

        Raises:
            TransferError: ``source_changed`` if the file ended early.
        """
        want = min(CHUNK_SIZE, self.meta.size - self.pos)
        if want <= 0:
            return b""
        chunk = await self._in_thread(self._read, want)
        if len(chunk) < want:
            raise self._changed()
        self.pos += len(chunk)
        return chunk

    def _read(self, want: int) -> bytes:
        chunk = os.pread(self.fd, want, self.pos)
        self.hasher.update(chunk)
        return chunk

    def finish(self) -> str:
        """The whole file's digest, once every byte was read and nothing changed.

        Raises:
            TransferError: ``source_changed`` if size or mtime moved meanwhile.
        """
        st = os.fstat(self.fd)
        if st.st_size != self.meta.size or st.st_mtime_ns != self.meta.mtime_ns:
            raise self._changed()
        digest: str = self.hasher.hexdigest()
        return digest

    def _changed(self) -> TransferError:
        return TransferError(ErrorCode.SOURCE_CHANGED, f"{self.shown}: changed while it was sent")


class PartialFile(_ThreadedFile):
    """The hidden file a transfer writes before it becomes the destination.

    Kept after an interruption so ``resume`` can continue it; removed when
    the transfer fails for any other reason; renamed over the destination
    only after the digest matched (docs/protocol.md §5.4).
    """

    def __init__(self, dest: str, shown: str, *, resume: bool) -> None:
        self.dest = dest
        self.shown = shown
        self.path = partial_path(dest)
        try:
            kind = stat.S_IFMT(os.lstat(dest).st_mode)
        except OSError:  # no such file yet; or the open below reports why not
            kind = stat.S_IFREG
        if kind == stat.S_IFDIR:
            raise TransferError(ErrorCode.IS_A_DIRECTORY, f"{shown}: is a directory")
        if kind not in (stat.S_IFREG, stat.S_IFLNK):
            # A FIFO, device or socket: the rename would replace it with a file.
            raise TransferError(ErrorCode.BAD_REQUEST, f"{shown}: not a regular file")
        for _ in range(LOCK_ATTEMPTS):
            self.fd = self._open_locked()
            # Another process (a second `tether cp` to the same file) may have
            # renamed this very file over the destination between our open and
            # our lock: then we hold the destination, not a partial file.
            try:
                same = _same_file(os.fstat(self.fd), os.lstat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(self.fd)
        else:
            raise self._busy_error()
        self.have = os.fstat(self.fd).st_size if resume else 0
        self.hasher = new_hasher()
        self.pos = 0
        self.committed = False

    async def prefix(self, size: int | None = None) -> tuple[int, str | None]:
        """How much of a ``size``-byte file is already here, and its digest."""
        if self.have <= 0 or (size is not None and self.have > size):
            self.have = 0
            return 0, None
        hasher = await self._hash_prefix(self.have)
        self._prefix_hasher = hasher
        return self.have, hasher.hexdigest()

    async def start_at(self, offset: int) -> None:
        """Continue after the verified prefix, or start over from 0.

        Raises:
            TransferError: ``bad_request`` for any other offset.
        """
        if offset == self.have and offset > 0:
            self.hasher = self._prefix_hasher
        elif offset == 0:
            self.hasher = new_hasher()
        else:
            raise TransferError(ErrorCode.BAD_REQUEST, f"cannot continue at offset {offset}")
        # In a thread: cutting a stale partial file of gigabytes frees
        # its blocks, which can take seconds (ext4).
        await self._in_thread(os.ftruncate, self.fd, offset)
        self.pos = offset

    async def write(self, data: bytes | bytearray) -> None:
        await self._in_thread(self._write, data)

    def _write(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, self.pos)
            self.pos += written
            view = view[written:]
        self.hasher.update(data)

    async def commit(self, size: int, digest: str, mode: int, mtime_ns: int | None) -> None:
        """Verify, then make the bytes the destination, atomically.

        Raises:
            TransferError: ``checksum_mismatch`` (the partial file is removed),
                or the error of a failing fsync/rename.
        """
        if self.pos != size or self.hasher.hexdigest() != digest:
            self.discard()
            got = "size" if self.pos != size else "digest"
            raise TransferError(
                ErrorCode.CHECKSUM_MISMATCH,
                f"{self.shown}: {got} does not match the sender's; nothing was written",
            )
        try:
            await self._in_thread(self._commit, mode, mtime_ns)
        except TransferError:
            self.discard()
            raise

    def _commit(self, mode: int, mtime_ns: int | None) -> None:
        os.fchmod(self.fd, mode)
        if mtime_ns is not None:
            os.utime(self.fd, ns=(mtime_ns, mtime_ns))
        os.fsync(self.fd)
        # Opened before the rename: once the destination is replaced, nothing
        # may fail (out of descriptors, EMFILE) and report the transfer as
        # failed with the new file in place.
        directory = os.open(os.path.dirname(self.dest) or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.rename(self.path, self.dest)
            self.committed = True  # the name now belongs to the destination
            os.fsync(directory)  # the rename itself must survive a crash
        finally:
            os.close(directory)

    def discard(self) -> None:
        """Remove the partial file (a failed transfer leaves nothing); close.

        A thread still at work on it (a commit cut short by a cancellation)
        finishes first: removed under it, the name could be taken by the next
        transfer's partial file, which the late rename would then put in place
        of the destination unverified. Until then this file stays open and
        locked, so a new transfer to the same destination is refused as busy.
        """
        self._after_thread(self._discard_now)

    def _discard_now(self) -> None:
        if self.committed or self._closed:
            self.close()
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # quick: the blocks are freed by the last close
        self._closed = True
        try:
            # That close frees gigabytes of blocks for a large partial file,
            # which can take seconds (ext4): not on the event loop.
            asyncio.get_running_loop().run_in_executor(None, self._close_fd)
        except RuntimeError:  # no loop, or it is shutting down its threads
            self._close_fd()

    # close() (from _ThreadedFile) keeps the partial file for a later resume.

    def _open_locked(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise error_from_os(exc, self.shown) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._busy_error() from None
        except OSError as exc:  # ENOLCK (NFS without locks) and the like
            os.close(fd)
            raise error_from_os(exc, self.shown) from None
        return fd

    def _busy_error(self) -> TransferError:
        return TransferError(ErrorCode.BUSY, f"{self.shown}: another transfer is writing it")


def is_stream(path: str) -> bool:
    """Whether ``path`` is, or links to, a FIFO or a device, or is a link into
    /proc (``/dev/stdout``: a process's open file): a download writes into it
    as it comes (``tether cp HOST:FILE /dev/null``), as scp does."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # dangling; or /proc/self/fd/1 on a socket or a deleted file
        mode = 0
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or _into_proc(path)


def _into_proc(link: str) -> bool:
    # /dev/stdout -> /proc/self/fd/1: its realpath is whatever fd 1 is open
    # on, "pipe:[123]", "/tmp/out (deleted)"..., not a name to write to.
    target = link
    for _ in range(40):  # as the kernel's limit on links followed
        if not os.path.islink(target):
            return False
        target = os.path.join(os.path.dirname(target), os.readlink(target))
        if os.path.normpath(target).startswith("/proc/"):
            return True
    return False


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


FIFO_RETRY = 0.1  # seconds between tries to open a FIFO that nobody reads yet


class StreamSink(_ThreadedFile):
    """A FIFO or device a download writes into, in order, with nothing kept
    aside: no partial file to resume, nothing to rename, chmod or date, and a
    digest that does not match can only be reported after the bytes went in.

    Opened non-blocking and written from the loop, waiting for room as a
    socket is: a FIFO whose reader never comes or never reads must not hold
    a thread that Ctrl-C cannot stop (the process could not exit).
    """

    def __init__(self, fd: int, shown: str) -> None:
        self.fd = fd
        self.shown = shown
        self.hasher = new_hasher()
        self.pos = 0
        self._block_device = stat.S_ISBLK(os.fstat(fd).st_mode)

    @classmethod
    async def open(cls, path: str, shown: str) -> StreamSink:
        """Open ``path`` for writing; a FIFO waits for a reader, as with scp."""
        while True:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as exc:
                # ENXIO is a FIFO nobody reads yet; for a device, no driver.
                if exc.errno != errno.ENXIO or not _is_fifo(path):
                    raise error_from_os(exc, shown) from None
                await asyncio.sleep(FIFO_RETRY)
            else:
                break
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                # Reached through /proc/self/fd/N (a link like /dev/stdout):
                # the file our stdout goes to. Written from its start, as cp does.
                os.ftruncate(fd, 0)
            return cls(fd, shown)
        except OSError as exc:
            os.close(fd)
            raise error_from_os(exc, shown) from None

    async def prefix(self, size: int | None = None) -> tuple[int, str | None]:
        return 0, None  # nothing kept from an earlier try: always from the start

    async def start_at(self, offset: int) -> None:
        if offset != 0:
            raise TransferError(ErrorCode.BAD_REQUEST, f"cannot continue at offset {offset}")

    async def write(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                await self._writable()
            except OSError as exc:  # EPIPE: the reader went away; ENOSPC...
                raise error_from_os(exc, self.shown) from None
        self.pos += len(data)
        self.hasher.update(data)

    async def _writable(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_writer(self.fd, wake)
        try:
            await ready
        finally:
            loop.remove_writer(self.fd)

    async def commit(self, size: int, digest: str, mode: int, mtime_ns: int | None) -> None:
        """Check what was written; a block device's writes are flushed first.

        Raises:
            TransferError: ``checksum_mismatch``, or the error of the fsync.
        """
        if self.pos != size or self.hasher.hexdigest() != digest:
            got = "size" if self.pos != size else "digest"
            raise TransferError(
                ErrorCode.CHECKSUM_MISMATCH,
                f"{self.shown}: {got} does not match the sender's; the bytes were written "
                "to it all the same (not a regular file)",
            )
        if self._block_device:
            await self._in_thread(os.fsync, self.fd)

    def discard(self) -> None:
        self.close()


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def replace_symlink(target: str, path: str) -> None:
    """Make ``path`` a symlink to ``target``, atomically replacing a link or file there."""
    head, tail = os.path.split(path)
    temp = os.path.join(head, link_temp_name(tail))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)
    os.symlink(target, temp)
    try:
        os.rename(temp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise

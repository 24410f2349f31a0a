"""tether's own files on this machine: where they live, and how they are written.

The client's known-hosts file and the agent's state directory lie under the
user's home directory or an XDG base directory. They are written so that a
full disk or a crash leaves the file as it was or whole, never cut short:
a token cut short would be a weaker one, an empty token or certificate file
would stop every later start of the agent.

Paths here are strings, not pathlib: every fresh ``tether exec`` imports this
module, and pathlib (with urllib.parse and ipaddress) costs it 3-5 ms.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from .exceptions import UsageError

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "append_line",
    "home_directory",
    "put_in_place",
    "staged_file",
    "write_private_file",
    "xdg_base_directory",
]


def home_directory() -> str:
    """``$HOME``, or the user's home in the password database when ``$HOME``
    is unset, empty or relative.

    ``os.path.expanduser("~")`` returns an empty or relative ``$HOME`` as it
    is: ``HOME= tether exec`` then wrote its known hosts under ``/``, and a
    relative one wrote them under whatever the current directory was.

    Raises:
        UsageError: neither gives an absolute path.
    """
    home = os.environ.get("HOME", "")
    if os.path.isabs(home):
        return home
    import pwd  # here: $HOME is nearly always set

    try:
        home = pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        home = ""
    if not os.path.isabs(home):
        raise UsageError(f"no home directory for user {os.getuid()}: set HOME to an absolute path")
    return home


def xdg_base_directory(variable: str, default: str) -> str:
    """The directory in ``$variable`` (``XDG_CONFIG_HOME``...), else ``default``
    (``.config``...) under the home directory.

    A relative path in the variable is ignored, as the XDG Base Directory
    specification says it must be.
    """
    base = os.environ.get(variable, "")
    return base if os.path.isabs(base) else os.path.join(home_directory(), default)


def _naming(exc: OSError, path: str | os.PathLike[str]) -> OSError:
    """``exc`` about ``path``: os.write and a temporary file's errors name no
    file, or not the one the user knows ("No space left on device" alone)."""
    return OSError(exc.errno, exc.strerror, os.fspath(path))


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append ``line`` to ``path`` as a line of its own (file 0600 and its
    directory 0700 when made here).

    Raises:
        OSError: naming ``path``; the file is then as it was.
    """
    from .logwriter import write_fully

    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    existed = os.path.exists(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        size = os.fstat(fd).st_size
        # A file edited by hand may lack its final newline: the new line must
        # start a line of its own, not extend the last one.
        new_line = b"" if size == 0 or os.pread(fd, 1, size - 1) == b"\n" else b"\n"
        try:
            write_fully(fd, new_line + line.encode() + b"\n")
        except OSError as exc:
            # A full disk may have taken part of the line: "name tok" would
            # be a token of its own, and a short one.
            os.ftruncate(fd, size)
            if not existed:
                with contextlib.suppress(OSError):
                    os.unlink(path)  # made here for nothing: as it was is absent
            raise _naming(exc, path) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_file(path: str | os.PathLike[str], data: bytes) -> Iterator[str]:
    """A temporary file beside ``path`` (mode 0600) holding ``data``, synced
    to the disk, for :func:`put_in_place`; removed on leaving unless put.

    Raises:
        OSError: naming ``path``; no temporary file is left.
    """
    import tempfile  # the agent's: a client writes no whole files

    from .logwriter import write_fully

    directory, name = os.path.split(os.path.abspath(path))
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise _naming(exc, path) from None
    try:
        try:
            try:
                write_fully(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _naming(exc, path) from None
        yield temporary
    finally:
        with contextlib.suppress(FileNotFoundError):  # put in place: it has another name
            os.unlink(temporary)


def put_in_place(temporary: str, path: str | os.PathLike[str], *, replace: bool) -> bool:
    """Give the file ``temporary`` the name ``path``, all at once.

    With ``replace``, over whatever ``path`` was; without, only if there is
    no ``path`` yet (a hard link: as exclusive as ``O_EXCL``).

    Returns:
        Whether ``path`` is now the temporary file: False if it existed
        and ``replace`` is false.

    Raises:
        OSError: naming ``path``.
    """
    try:
        (os.replace if replace else os.link)(temporary, path)
    except FileExistsError as exc:
        if replace:  # rename(2) onto a directory that is not empty
            raise _naming(exc, path) from None
        return False
    except OSError as exc:
        raise _naming(exc, path) from None
    return True


def write_private_file(path: str | os.PathLike[str], data: bytes) -> bool:
    """Make the file ``path`` (mode 0600) holding ``data``, whole or not at
    all: a full disk or a crash leaves no ``path``, never an empty or cut one.

    Returns:
        Whether it was made: False, and nothing written, if ``path`` exists
        (made meanwhile by another process, say).

    Raises:
        OSError: naming ``path``.
    """
    with staged_file(path, data) as temporary:
        return put_in_place(temporary, path, replace=False)

"""Where tokens live: the agent's state directory, token files, the environment."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .exceptions import UsageError
from .localfiles import append_line, write_private_file, xdg_base_directory

if TYPE_CHECKING:
    from pathlib import Path  # imported where a Path is made: not by every `tether exec`

__all__ = [
    "TOKEN_ENV",
    "check_private",
    "check_state_dir",
    "create_token_file",
    "default_state_dir",
    "find_client_token",
    "read_token_file",
]

TOKEN_ENV = "TETHER_TOKEN"
TOKEN_FILE_NAME = "token"
TOKEN_BYTES = 32  # 256 bits of randomness, url-safe base64 on disk


def new_token() -> str:
    """A fresh random token."""
    import secrets  # here: a client that only reads tokens never needs it

    return secrets.token_urlsafe(TOKEN_BYTES)


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/tether``, by default ``~/.local/state/tether``."""
    from pathlib import Path

    return Path(xdg_base_directory("XDG_STATE_HOME", os.path.join(".local", "state"))) / "tether"


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token stored in ``path`` (surrounding whitespace removed).

    Raises:
        UsageError: the file cannot be read or holds no token.
    """
    try:
        # utf-8-sig: a file saved by an editor that starts it with a BOM.
        with open(path, encoding="utf-8-sig") as f:
            token = f.read().strip()
    except OSError as exc:
        raise UsageError(
            f"cannot read token file {os.fspath(path)}: {exc.strerror or exc}"
        ) from None
    except UnicodeDecodeError:
        raise UsageError(f"token file {os.fspath(path)} is not UTF-8 text") from None
    if not token:
        raise UsageError(f"token file {os.fspath(path)} is empty")
    return token


def check_private(path: str | os.PathLike[str], what: str, mode: int | None = None) -> None:
    """Refuse a secret others may read, as ssh refuses such a key.

    Raises:
        UsageError: group or others have any access to ``path`` (``mode``
            if given, else its own).
    """
    shown = os.fspath(path)
    mode = (os.stat(path).st_mode if mode is None else mode) & 0o777
    if mode & 0o077:
        raise UsageError(f"{what} {shown} is mode {mode:o}: others may read it; chmod 600 {shown}")


def check_state_dir(directory: str | os.PathLike[str]) -> None:
    """Refuse a state directory others may write in: they could swap its files.

    Raises:
        UsageError: it is writable by group or others.
    """
    shown = os.fspath(directory)
    mode = os.stat(directory).st_mode & 0o777
    if mode & 0o022:
        raise UsageError(
            f"state directory {shown} is mode {mode:o}: others may change what is in it; "
            f"chmod 700 {shown}"
        )


def create_token_file(state_dir: Path) -> tuple[str, Path, bool]:
    """Load the agent's token from ``state_dir``, making it on first start.

    The directory is made 0700 and the file 0600, written whole or not at all
    (a full disk left an empty file, which stopped every later start) and
    created exclusively so two agents starting at once cannot overwrite each
    other's token.

    Returns:
        The token, its file, and whether it was made just now.

    Raises:
        UsageError: the directory or an existing token file is open to others.
        OSError: the file cannot be made (naming it).
    """
    path = state_dir / TOKEN_FILE_NAME
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_state_dir(state_dir)
    if not os.path.lexists(path):
        token = new_token()
        if write_private_file(path, (token + "\n").encode()):
            return token, path, True
    check_private(path, "token file")
    return read_token_file(path), path, False


def find_client_token(
    token: str | None = None, token_file: str | os.PathLike[str] | None = None
) -> str:
    """The token a client should present, from the first source that has one.

    Order: ``token``, ``token_file``, ``$TETHER_TOKEN``, then the token file
    of an agent on this machine in the default state directory.

    Raises:
        UsageError: no source has a token.
    """
    if token:
        return token
    if token_file is not None:
        return read_token_file(token_file)
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    local = default_state_dir() / TOKEN_FILE_NAME
    if local.exists():
        return read_token_file(local)
    raise UsageError(
        f"no token: pass --token-file, set {TOKEN_ENV}, or run on the agent's machine "
        f"(looked for {local})"
    )


TOKENS_FILE_NAME = "tokens"
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.@-")


RESERVED_NAME = "default"  # the identity of the agent's own token


def check_token_name(name: str) -> None:
    """Raises UsageError unless ``name`` is 1-64 of ``[A-Za-z0-9_.@-]``, not ``default``."""
    if not 0 < len(name) <= 64 or not set(name) <= _NAME_CHARS:
        raise UsageError(f"bad token name {name!r}: use 1-64 of A-Z a-z 0-9 _ . @ -")
    if name == RESERVED_NAME:
        raise UsageError(f"{RESERVED_NAME!r} is the agent's own token; pick another name")


def load_tokens(path: str | os.PathLike[str]) -> dict[str, str]:
    """The named tokens in a tokens file (``name token`` per line), by token.

    Raises:
        UsageError: the file is readable by group or others, or malformed.
    """
    shown = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise UsageError(f"cannot read tokens file {shown}: {exc.strerror}") from None
    with os.fdopen(fd, encoding="utf-8") as f:
        check_private(shown, "tokens file", os.fstat(f.fileno()).st_mode)
        try:
            text = f.read()
        except UnicodeDecodeError:
            raise UsageError(f"tokens file {shown} is not UTF-8 text") from None
    tokens: dict[str, str] = {}
    names: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise UsageError(f"{shown} line {number}: expected 'NAME TOKEN'")
        name, token = fields
        check_token_name(name)
        if name in names or token in tokens:
            raise UsageError(f"{shown} line {number}: name or token used twice")
        names.add(name)
        tokens[token] = name
    return tokens


def check_new_token_name(path: str | os.PathLike[str], name: str) -> None:
    """Whether a token called ``name`` may be added to the tokens file ``path``.

    Raises:
        UsageError: bad or duplicate name, or an unsafe existing file.
    """
    check_token_name(name)
    if os.path.exists(path) and name in load_tokens(path).values():
        raise UsageError(f"a token named {name!r} already exists in {os.fspath(path)}")


def add_token(path: str | os.PathLike[str], name: str, token: str | None = None) -> str:
    """Add ``token`` (a new one if None) called ``name`` to the tokens file
    (created 0600); return it.

    Raises:
        UsageError: bad or duplicate name, or an unsafe existing file.
        OSError: the file cannot be written (naming it); it is then as it was.
    """
    check_new_token_name(path, name)
    token = new_token() if token is None else token
    append_line(path, f"{name} {token}")
    return token

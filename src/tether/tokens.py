"""Where tokens live: the agent's state directory, token files, the environment."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from .exceptions import UsageError

__all__ = [
    "TOKEN_ENV",
    "create_token_file",
    "default_state_dir",
    "find_client_token",
    "read_token_file",
]

TOKEN_ENV = "TETHER_TOKEN"
TOKEN_FILE_NAME = "token"
TOKEN_BYTES = 32  # 256 bits of randomness, url-safe base64 on disk


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/tether``, by default ``~/.local/state/tether``."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "tether"


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token stored in ``path`` (surrounding whitespace removed).

    Raises:
        UsageError: the file cannot be read or holds no token.
    """
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read token file {os.fspath(path)}: {exc}") from None
    if not token:
        raise UsageError(f"token file {os.fspath(path)} is empty")
    return token


def create_token_file(state_dir: Path) -> tuple[str, Path, bool]:
    """Load the agent's token from ``state_dir``, making it on first start.

    The directory is made 0700 and the file 0600, created exclusively so two
    agents starting at once cannot overwrite each other's token.

    Returns:
        The token, its file, and whether it was made just now.
    """
    path = state_dir / TOKEN_FILE_NAME
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_token_file(path), path, False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return token, path, True


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

"""Pinned agent certificates: the client's known-hosts file (trust on first use, as ssh).

One line per agent: ``HOST SHA256:base64-of-the-certificate's-SHA-256``, where
HOST is the address as the client writes it (``name:port``, ``[v6]:port``),
compared without regard to case as ssh does (``unix:`` paths excepted).
Blank lines and ``#`` comments are kept as they are.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass

from .localfiles import append_line, xdg_base_directory

__all__ = [
    "KnownHost",
    "add_known_host",
    "default_known_hosts",
    "fingerprint",
    "lookup_known_host",
    "normalize_fingerprint",
]


# Paths here are strings, not pathlib: every fresh `tether exec` reads this file,
# and pathlib (with urllib.parse and ipaddress) costs it 3-5 ms of imports.


def default_known_hosts() -> str:
    """``$XDG_CONFIG_HOME/tether/known_hosts``, by default ``~/.config/tether/known_hosts``."""
    return os.path.join(xdg_base_directory("XDG_CONFIG_HOME", ".config"), "tether", "known_hosts")


def fingerprint(der: bytes) -> str:
    """The ssh-style fingerprint of a DER certificate: ``SHA256:`` + unpadded base64."""
    digest = hashlib.sha256(der).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def normalize_fingerprint(text: str) -> str:
    """Accept ``SHA256:base64`` (padded or not) or 64 hex digits; return ``SHA256:base64``.

    Raises:
        ValueError: the text is neither.
    """
    text = text.strip()
    body = text.removeprefix("SHA256:")
    hex_digits = body.replace(":", "").lower()
    if len(hex_digits) == 64 and all(c in "0123456789abcdef" for c in hex_digits):
        raw = bytes.fromhex(hex_digits)
    else:
        try:
            raw = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise ValueError(f"{text!r} is not a SHA-256 fingerprint")
    return "SHA256:" + base64.b64encode(raw).decode().rstrip("=")


@dataclass(frozen=True, slots=True)
class KnownHost:
    host: str
    fingerprint: str  # as the line has it: see normalize_fingerprint
    line: int  # 1-based, for the message that tells which line to remove


def _host_key(host: str) -> str:
    # DNS names have no case (Web1 is web1: a pin must not be dodged by typing
    # it otherwise); a Unix socket's path has.
    return host if host.startswith("unix:") else host.lower()


def lookup_known_host(path: str | os.PathLike[str], host: str) -> KnownHost | None:
    """The pinned fingerprint of ``host`` in ``path``, if there is one."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    key = _host_key(host)
    # Lines end at "\n" only: splitlines() also splits at form feeds and
    # U+2028 in comments, and the line number we report would be wrong.
    for number, line in enumerate(text.split("\n"), 1):
        fields = line.split()
        if len(fields) >= 2 and not fields[0].startswith("#") and _host_key(fields[0]) == key:
            return KnownHost(host, fields[1], number)
    return None


def add_known_host(path: str | os.PathLike[str], host: str, print_: str) -> None:
    """Pin ``host`` to fingerprint ``print_`` (appending a line; the file is 0600)."""
    append_line(path, f"{_host_key(host)} {print_}")

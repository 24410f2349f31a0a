"""Parsing of HOST arguments: ``name[:port]``, ``[v6addr]:port``, ``unix:/path``."""

from __future__ import annotations

from dataclasses import dataclass

from .exceptions import UsageError
from .limits import DEFAULT_PORT

__all__ = ["Address", "parse_address"]


@dataclass(frozen=True, slots=True)
class Address:
    """Where an agent listens: a TCP host and port, or a Unix socket path."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def _parse_port(text: str, original: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise UsageError(f"bad port in {original!r}: expected 1-65535")
    return int(text)


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> Address:
    """Parse a HOST argument.

    Raises:
        UsageError: the text is empty or malformed.
    """
    original = text
    text = text.strip()
    if not text:
        raise UsageError("empty host")
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise UsageError(f"no socket path in {original!r}")
        return Address(path=path)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not host:
            raise UsageError(f"unclosed '[' in {original!r}")
        if not rest:
            return Address(host=host, port=default_port)
        if not rest.startswith(":"):
            raise UsageError(f"expected ':port' after ']' in {original!r}")
        return Address(host=host, port=_parse_port(rest[1:], original))
    if text.count(":") > 1:  # a bare IPv6 address, no port
        return Address(host=text, port=default_port)
    host, sep, port = text.partition(":")
    if not host:
        raise UsageError(f"no host name in {original!r}")
    return Address(host=host, port=_parse_port(port, original) if sep else default_port)

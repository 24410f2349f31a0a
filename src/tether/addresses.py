"""Parsing of HOST arguments: ``name[:port]``, ``[v6addr]:port``, ``unix:/path``."""

from __future__ import annotations

from dataclasses import dataclass

from .exceptions import UsageError
from .limits import DEFAULT_PORT

__all__ = ["Address", "check_host_name", "parse_address"]


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
    if text.count(":") > 1:  # a bare IPv6 address, no port, or a typo
        return Address(host=_check_bare_ipv6(text, original), port=default_port)
    host, sep, port = text.partition(":")
    if not host:
        raise UsageError(f"no host name in {original!r}")
    return Address(
        host=check_host_name(host, original),
        port=_parse_port(port, original) if sep else default_port,
    )


def _check_bare_ipv6(text: str, original: str) -> str:
    """``text`` if it is an IPv6 address (``%scope`` allowed): ``host:22:``
    or ``127.0.0.1:22:9`` must be a usage error, not a name that fails to
    resolve."""
    # Imported here only: ipaddress costs every `tether exec` start-up time,
    # and this branch is the one that needs it.
    import ipaddress

    try:
        ipaddress.IPv6Address(text)
        valid = not _has_space(text)  # ipaddress takes any %scope
    except ValueError:
        valid = False
    if not valid:
        raise UsageError(
            f"bad address in {original!r}: more than one ':' and not an IPv6 address "
            "(write [v6addr]:port)"
        )
    return text


def check_host_name(host: str, original: str | None = None) -> str:
    """``host``, if the resolver will take it.

    Raises:
        UsageError: a name the IDNA codec refuses (an empty label as in
            ``web1..lan`` or ``.web1``, a label over 63 characters), or one
            with a space in it (``'127.0.0.1 :22'``, which the codec takes):
            one clear line here rather than an error from the resolver.
    """
    try:
        host.encode("idna")
    except UnicodeError:
        raise UsageError(f"bad host name in {original or host!r}") from None
    if _has_space(host):
        raise UsageError(f"bad host name in {original or host!r}")
    return host


def _has_space(text: str) -> bool:
    return any(c.isspace() for c in text)


@dataclass(frozen=True, slots=True)
class RemotePath:
    """A ``HOST:PATH`` argument of ``tether cp`` / ``tether ls``."""

    host: str
    path: str


def parse_remote_path(text: str) -> RemotePath | None:
    """Split ``HOST:PATH`` (scp style), or ``None`` if ``text`` is a local path.

    Local: no colon, or a slash before the first colon (``./a:b``). The host
    may be ``name``, ``name:port``, ``[v6addr]``, ``[v6addr]:port`` or
    ``unix:/socket``; an empty path means the agent's root.

    Raises:
        UsageError: a malformed host part.
    """
    if text.startswith("unix:"):
        socket_path, sep, path = text[len("unix:") :].partition(":")
        if not sep:
            raise UsageError(f"no ':PATH' after the socket in {text!r}")
        host = "unix:" + socket_path
    elif text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise UsageError(f"unclosed '[' in {text!r}")
        rest = text[end + 1 :]
        if not rest.startswith(":"):
            raise UsageError(f"expected ':PATH' after ']' in {text!r}")
        host, path = _split_port(text[: end + 1], rest[1:])
    else:
        colon = text.find(":")
        if colon <= 0 or "/" in text[:colon]:
            return None
        host, path = _split_port(text[:colon], text[colon + 1 :])
    parse_address(host)  # validates; the caller connects with the string
    return RemotePath(host, path or ".")


def _split_port(host: str, rest: str) -> tuple[str, str]:
    # "host:7447:path": digits then a colon are a port.
    port, sep, path = rest.partition(":")
    if sep and port.isascii() and port.isdigit():
        return f"{host}:{port}", path
    return host, rest

"""Frame encoding and incremental decoding (docs/protocol.md §2).

A frame is ``u32 big-endian header length | UTF-8 JSON object header | body``,
where the body is ``header["body_len"]`` bytes (absent means 0). This module
knows nothing of ops beyond the two fields every header must carry, ``op`` and
``id``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .exceptions import FrameTooLarge, ProtocolError, UsageError
from .limits import Limits

__all__ = ["PREFIX_LEN", "Frame", "FrameDecoder", "encode_frame", "encode_frame_head"]

_PREFIX = struct.Struct(">I")
PREFIX_LEN = _PREFIX.size  # 4 bytes
_EMPTY = b""


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame: its header object and its body bytes."""

    header: dict[str, Any]
    body: bytes = field(default=_EMPTY)

    @property
    def op(self) -> str:
        op: str = self.header["op"]
        return op

    @property
    def id(self) -> int:
        ident: int = self.header["id"]
        return ident


def _reject_constant(name: str) -> Any:
    # JSON has no NaN or Infinity; Python's json would accept them silently.
    raise ValueError(f"{name} is not JSON")


def encode_frame_head(
    header: Mapping[str, Any], body_len: int = 0, limits: Limits | None = None
) -> bytes:
    """Encode the length prefix and header of a frame whose body follows separately.

    Lets the I/O layer write a large body without copying it into one buffer.

    Raises:
        FrameTooLarge: the header or body would exceed ``limits``.
    """
    limits = limits or _DEFAULT_LIMITS
    if body_len:
        if body_len > limits.max_body:
            raise FrameTooLarge("body", body_len, limits.max_body)
        header = {**header, "body_len": body_len}
    try:
        # ensure_ascii: a str holding lone surrogates (PEP 383: bytes of an
        # argv or file name that are not UTF-8) travels as \udcXX escapes
        # instead of failing to encode (docs/protocol.md §2.2).
        raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("ascii")
    except (TypeError, ValueError) as exc:
        raise UsageError(f"cannot encode frame header: {exc}") from None
    if len(raw) > limits.max_header:
        raise FrameTooLarge("header", len(raw), limits.max_header)
    return _PREFIX.pack(len(raw)) + raw


def encode_frame(
    header: Mapping[str, Any],
    body: bytes | bytearray | memoryview = _EMPTY,
    limits: Limits | None = None,
) -> bytes:
    """Encode one whole frame.

    Raises:
        FrameTooLarge: the header or body would exceed ``limits``.
    """
    head = encode_frame_head(header, len(body), limits)
    return head + body if body else head


def parse_header(raw: bytes | bytearray | memoryview, limits: Limits) -> dict[str, Any]:
    """Decode and validate a header's JSON (docs/protocol.md §2.2).

    Raises:
        ProtocolError: not UTF-8, not JSON, not an object, or a bad ``op``,
            ``id`` or ``body_len``.
        FrameTooLarge: ``body_len`` is over ``limits.max_body``.
    """
    try:
        text = bytes(raw).decode("utf-8")  # a copy; never a view that pins the buffer
        header = json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError("frame header is not UTF-8 JSON") from exc
    if not isinstance(header, dict):
        raise ProtocolError("frame header is not a JSON object")
    op = header.get("op")
    if not isinstance(op, str) or not op:
        raise ProtocolError("frame header has no string 'op'")
    ident = header.get("id")
    if type(ident) is not int or ident < 0:
        raise ProtocolError("frame header has no integer 'id' >= 0")
    body_len = header.get("body_len", 0)
    if type(body_len) is not int or body_len < 0:
        raise ProtocolError("frame header 'body_len' is not an integer >= 0")
    if body_len > limits.max_body:
        raise FrameTooLarge("body", body_len, limits.max_body)
    return header


_DEFAULT_LIMITS = Limits()


class FrameDecoder:
    """Turns a byte stream into frames, checking every declared length first.

    Feed bytes with :meth:`receive_data` and take frames from :meth:`frames`.
    Once an exception has been raised the decoder is broken: every later call
    raises the same exception again, so no input after a violation is used.
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or _DEFAULT_LIMITS
        self._buf = bytearray()
        self._pos = 0
        self._header: dict[str, Any] | None = None
        self._body_len = 0
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a frame."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes; never parses, so never raises."""
        if self._error is None:
            self._buf += data

    def frames(self) -> Iterator[Frame]:
        """Yield every complete frame buffered so far.

        Raises:
            FrameTooLarge: a declared length is over its limit.
            ProtocolError: a header is malformed.
        """
        if self._error is not None:
            raise self._error
        try:
            while True:
                frame = self._next_frame()
                if frame is None:
                    break
                yield frame
        except ProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            self._pos = 0
            raise
        finally:
            if self._pos:
                del self._buf[: self._pos]
                self._pos = 0

    def _next_frame(self) -> Frame | None:
        buf, pos = self._buf, self._pos
        if self._header is None:
            if len(buf) - pos < PREFIX_LEN:
                return None
            (header_len,) = _PREFIX.unpack_from(buf, pos)
            if header_len > self.limits.max_header:
                raise FrameTooLarge("header", header_len, self.limits.max_header)
            if header_len == 0:
                raise ProtocolError("frame header is empty")
            if len(buf) - pos < PREFIX_LEN + header_len:
                return None
            start = pos + PREFIX_LEN
            header = parse_header(bytes(buf[start : start + header_len]), self.limits)
            self._pos = pos = start + header_len
            self._header = header
            self._body_len = header.get("body_len", 0)
        if len(buf) - pos < self._body_len:
            return None
        header = self._header
        if self._body_len:
            # One copy, straight from the buffer: slicing the bytearray first
            # would copy every body twice. The view is released at once, so
            # the buffer can be resized again.
            with memoryview(buf) as view:
                body = bytes(view[pos : pos + self._body_len])
        else:
            body = _EMPTY
        self._pos = pos + self._body_len
        self._header = None
        return Frame(header, body)

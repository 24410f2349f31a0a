"""Frame encoding and incremental decoding (docs/protocol.md §2).

A frame is ``u32 big-endian header length | UTF-8 JSON object header | body``,
where the body is ``header["body_len"]`` bytes (absent means 0). This module
knows nothing of ops beyond the two fields every header must carry, ``op`` and
``id``.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .exceptions import FrameTooLarge, ProtocolError, UsageError
from .limits import Limits

__all__ = [
    "PREFIX_LEN",
    "Body",
    "Frame",
    "FrameDecoder",
    "encode_frame",
    "encode_frame_head",
    "frame_head",
]

_PREFIX = struct.Struct(">I")
PREFIX_LEN = _PREFIX.size  # 4 bytes
_EMPTY = b""

Body = bytes | bytearray
"""A frame body: a bytearray when a large one was received in place, without a copy."""


@dataclass(slots=True)  # not frozen: one is made per frame (see protocol.py's events)
class Frame:
    """One decoded frame: its header object and its body bytes."""

    header: dict[str, Any]
    body: Body = field(default=_EMPTY)

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


# One encoder and one decoder for every frame: json.dumps and json.loads with
# options build a new one per call, a good part of a small frame's cost.
# ensure_ascii (the default): a str holding lone surrogates (PEP 383: bytes of
# an argv or file name that are not UTF-8) travels as \udcXX escapes instead
# of failing to encode (docs/protocol.md §2.2).
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_quote = json.encoder.encode_basestring_ascii
_scan_once: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]


def _encode_header(header: Mapping[str, Any]) -> str:
    """``header`` as compact ASCII JSON; most headers hold only strings and integers,
    and writing those directly takes half the time of the generic encoder."""
    parts = []
    for key, value in header.items():
        kind = type(value)
        if kind is int and type(key) is str:
            parts.append(f"{_quote(key)}:{value}")
        elif kind is str and type(key) is str:
            parts.append(f"{_quote(key)}:{_quote(value)}")
        else:
            encoded: str = _ENCODER.encode(header)
            return encoded
    return "{" + ",".join(parts) + "}"


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
        raw = _encode_header(header).encode("ascii")
    except (TypeError, ValueError) as exc:
        raise UsageError(f"cannot encode frame header: {exc}") from None
    return frame_head(raw, limits)


def frame_head(raw: bytes, limits: Limits) -> bytes:
    """The length prefix and ``raw``, an encoded header, checked against ``limits``.

    Raises:
        FrameTooLarge: the header is over ``limits.max_header``.
    """
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
        text = str(raw, "utf-8")
        try:
            # The C scanner itself (raw_decode without its Python wrapper):
            # no whitespace to skip is the common case.
            header, end = _scan_once(text, 0)
        except StopIteration:
            end = -1
        if end != len(text):
            header = _DECODER.decode(text)  # whitespace around it, or the precise error
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
    body_len = header.get("body_len")
    if body_len is None:  # absent, or null, which counts as absent (§2.2)
        header.pop("body_len", None)
        body_len = 0
    if type(body_len) is not int or body_len < 0:
        raise ProtocolError("frame header 'body_len' is not an integer >= 0")
    if body_len > limits.max_body:
        raise FrameTooLarge("body", body_len, limits.max_body)
    return header


_DEFAULT_LIMITS = Limits()
_per_thread = threading.local()


def _shared_scratch() -> bytearray:
    """This thread's scratch buffer, which decoders lend each other (get_buffer)."""
    try:
        buffer: bytearray = _per_thread.scratch
    except AttributeError:
        buffer = _per_thread.scratch = bytearray(FrameDecoder.SCRATCH_SIZE)
    return buffer


class FrameDecoder:
    """Turns a byte stream into frames, checking every declared length first.

    Two ways in, one state machine: :meth:`receive_data` takes bytes that
    were read elsewhere; :meth:`get_buffer` and :meth:`buffer_updated` let the
    I/O layer read straight into the decoder (asyncio's ``BufferedProtocol``).
    A body of at least ``DIRECT_BODY`` bytes gets its own buffer, handed out
    by :meth:`get_buffer`, so its bytes are copied once, by the kernel; smaller
    frames are read into a scratch buffer that every decoder of the thread
    shares: whatever part of a frame is left in it after :meth:`buffer_updated`
    is moved to a buffer of the decoder's own. So an idle connection holds no
    buffer, and a busy one makes none per read.

    Complete frames are taken with :meth:`frames`. Once a violation is found
    the decoder is broken: the frames before it are still returned, then
    every later call raises the same exception, and no later input is used.
    """

    DIRECT_BODY = 16 * 1024  # bodies this large are received into their own buffer
    SCRATCH_SIZE = 16 * 1024  # bytes read at a time between large bodies
    SPARE_BODIES = 8  # returned body buffers kept for reuse

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or _DEFAULT_LIMITS
        self._scratch: bytearray | None = None
        self._borrowed = False  # _scratch is the thread's shared one (see get_buffer)
        self._start = 0  # scratch[_start:_end] is received and not yet part of a frame
        self._end = 0
        self._header: dict[str, Any] | None = None  # parsed, its body not complete
        self._body_len = 0
        self._body: bytearray | None = None  # a large body being received in place
        self._body_filled = 0
        self._frame_len = 0  # bytes of the frame being received, prefix and header included
        self._spare: list[bytearray] | None = None  # body buffers given back with reuse_body()
        # Complete frames not yet taken, each with its length on the wire. A
        # list, not a deque: it holds a few frames, and an empty deque costs
        # 13 times the memory (an agent may hold 10,000 idle connections).
        self._ready: list[tuple[Frame, int]] = []
        self._error: ProtocolError | None = None
        # Called with each header before any of its body is buffered; raising
        # ProtocolError refuses the frame there (the agent's first frame).
        self.check_header: Callable[[dict[str, Any]], None] | None = None
        # While set, parsing stops at the next frame boundary and what follows
        # stays unparsed bytes until release() (frames behind a hello not yet
        # decided: no body buffer is made for them before that).
        self.hold = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a frame."""
        ready = sum(length for _, length in self._ready)
        return ready + (self._end - self._start) + self._body_filled

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes read elsewhere; never raises (a violation waits for :meth:`frames`)."""
        with memoryview(data) as view:
            while view and self._error is None:
                buf = self.get_buffer(len(view))
                n = min(len(buf), len(view))
                buf[:n] = view[:n]
                buf.release()
                self.buffer_updated(n)
                view = view[n:]

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next bytes read should go: never empty.

        Write at most ``len()`` bytes into it, release it, then report how
        many with :meth:`buffer_updated`.
        """
        if self._body is not None:
            return memoryview(self._body)[self._body_filled :]
        if self._scratch is None:
            # Nothing partial is held: read into the thread's shared buffer,
            # given back (or left behind) by buffer_updated. A loop reads one
            # connection at a time: get_buffer, the read, buffer_updated.
            self._scratch, self._borrowed = _shared_scratch(), True
        elif self._end == len(self._scratch):
            self._make_room()
        return memoryview(self._scratch)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the last :meth:`get_buffer`; never raises."""
        if self._error is not None:
            self._drop_input()
            return
        if self._body is not None:
            self._body_filled += nbytes
            if self._body_filled == len(self._body):
                self._emit(self._body)
            return
        self._end += nbytes
        self._parse_scratch()

    def release(self) -> None:
        """Clear :attr:`hold` and parse what arrived meanwhile; never raises."""
        self.hold = False
        if self._error is None and self._body is None and self._scratch is not None:
            self._parse_scratch()

    def _parse_scratch(self) -> None:
        try:
            self._parse()
        except ProtocolError as exc:
            self._error = exc
            self._drop_input()
        if self._start == self._end:
            self._scratch = None  # nothing partial: hold no buffer while idle
            self._borrowed = False
            self._start = self._end = 0
        elif self._borrowed:
            # Part of a frame: into a buffer of our own before another
            # connection reads into the shared one.
            left = self._end - self._start
            own = bytearray(max(self.SCRATCH_SIZE, left))
            own[:left] = self._scratch[self._start : self._end]  # type: ignore[index]
            self._scratch, self._borrowed, self._start, self._end = own, False, 0, left

    def frames(self) -> Iterator[Frame]:
        """Yield every complete frame received so far.

        Raises:
            FrameTooLarge: a declared length is over its limit.
            ProtocolError: a header is malformed.
        """
        while (frame := self.next_frame()) is not None:
            yield frame

    def next_frame(self) -> Frame | None:
        """The oldest complete frame not yet taken; None when there is none.

        Raises:
            FrameTooLarge: a declared length is over its limit.
            ProtocolError: a header is malformed.
        """
        if self._ready:
            return self._ready.pop(0)[0]
        if self._error is not None:
            raise self._error
        return None

    def reuse_body(self, body: Body) -> None:
        """Give back the body of a frame from :meth:`frames` once nothing refers to it.

        Its buffer is then filled with a later body of the same size: a new
        megabyte buffer costs page faults and zeroing, about as much as
        receiving it. The caller must keep no reference (nor a view) to it.
        """
        if type(body) is bytearray:
            if self._spare is None:
                self._spare = []
            if len(self._spare) < self.SPARE_BODIES:
                self._spare.append(body)

    def drop_spare_bodies(self) -> None:
        """Let go of the buffers given back with :meth:`reuse_body` (a transfer
        ended): an idle connection holds none."""
        self._spare = None

    def _new_body(self, size: int) -> bytearray:
        spare = self._spare
        if spare:
            # The most recently returned first: likely still in the CPU's cache.
            for i in range(len(spare) - 1, -1, -1):
                if len(spare[i]) == size:
                    return spare.pop(i)
        return bytearray(size)

    def _parse(self) -> None:
        scratch = self._scratch
        assert scratch is not None
        while True:
            start, available = self._start, self._end - self._start
            if self._header is None:
                if available < PREFIX_LEN or self.hold:
                    return
                (header_len,) = _PREFIX.unpack_from(scratch, start)
                if header_len > self.limits.max_header:
                    raise FrameTooLarge("header", header_len, self.limits.max_header)
                if header_len == 0:
                    raise ProtocolError("frame header is empty")
                if available < PREFIX_LEN + header_len:
                    self._reserve(PREFIX_LEN + header_len)
                    return
                begin = start + PREFIX_LEN
                # Slicing copies, which for a header costs less than a memoryview.
                header = parse_header(scratch[begin : begin + header_len], self.limits)
                if self.check_header is not None:
                    self.check_header(header)
                self._header, self._body_len = header, header.get("body_len", 0)
                self._frame_len = PREFIX_LEN + header_len + self._body_len
                self._start = start = begin + header_len
                available = self._end - start
            body_len = self._body_len
            if body_len >= self.DIRECT_BODY:
                # Move what already arrived into the body's own buffer; the
                # kernel writes the rest there directly (get_buffer).
                body = self._new_body(body_len)
                taken = min(available, body_len)
                with memoryview(scratch) as view:
                    body[:taken] = view[start : start + taken]
                self._start += taken
                if taken == body_len:
                    self._emit(body)
                    continue
                self._body, self._body_filled = body, taken
                return
            if available < body_len:
                self._reserve(body_len)
                return
            self._emit(bytes(scratch[start : start + body_len]) if body_len else _EMPTY)
            self._start = start + body_len

    def _emit(self, body: Body) -> None:
        assert self._header is not None
        self._ready.append((Frame(self._header, body), self._frame_len))
        self._header, self._body_len = None, 0
        self._body, self._body_filled = None, 0

    def _reserve(self, needed: int) -> None:
        """Make sure the scratch can hold ``needed`` bytes from ``_start`` (a big header)."""
        assert self._scratch is not None
        if len(self._scratch) < needed:
            bigger = bytearray(needed)
            bigger[: self._end - self._start] = self._scratch[self._start : self._end]
            self._scratch, self._end, self._start = bigger, self._end - self._start, 0
            self._borrowed = False

    def _make_room(self) -> None:
        """Move a partial frame to the front of a full scratch buffer (or, when
        it is all bytes held unparsed, give it more room)."""
        assert self._scratch is not None
        left = self._end - self._start
        if left == len(self._scratch):
            self._reserve(left + self.SCRATCH_SIZE)
            return
        self._scratch[:left] = self._scratch[self._start : self._end]
        self._start, self._end = 0, left

    def _drop_input(self) -> None:
        self._scratch, self._borrowed, self._start, self._end = None, False, 0, 0
        self._header, self._body, self._body_filled = None, None, 0

"""Messages to frames and back (docs/protocol.md §2-4): encoding, decoding, field checks.

A message (:mod:`.messages`) turns into a frame header plus body with
:func:`to_frame_parts`, or straight into bytes with :func:`encode_message`,
and back with :func:`decode_client_message` / :func:`decode_server_message`.
Field types are checked from the messages' annotations, so a class is all it
takes to add an op; unknown header fields are ignored (forward compatibility).
"""

from __future__ import annotations

import math
import typing
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

from .exceptions import FrameTooLarge, ProtocolError
from .frames import Body, Frame, encode_frame_head, frame_head
from .limits import Limits
from .messages import (
    ALL_MESSAGES,
    CLIENT_MESSAGES,
    NO_DEFAULT,
    SERVER_MESSAGES,
    Echo,
    ErrorCode,
    Message,
    Ok,
    shorten,
)

__all__ = [
    "decode_client_message",
    "decode_server_message",
    "echo_reply_head",
    "echo_request_head",
    "encode_message",
    "to_frame_parts",
]


def to_frame_parts(msg: Message) -> tuple[dict[str, Any], Body]:
    """The header object and body of ``msg``; ``None`` fields are left out."""
    header: dict[str, Any] = {"op": msg.OP.value, "id": msg.id}
    body: Body = b""
    for name in _FIELDS[type(msg)]:
        value = getattr(msg, name)
        if name == "body":
            body = value
        elif value is not None:
            header[name] = value
    return header, body


def encode_message(msg: Message, limits: Limits | None = None) -> tuple[bytes, Body]:
    """The frame of ``msg`` as its head (length prefix and header) and its body.

    The same bytes as :func:`encode_frame_head` of :func:`to_frame_parts`,
    written faster: every frame sent goes through here, and most headers
    hold only integers and strings, which go straight into a template made
    once per message class. Anything else takes the general way.

    Raises:
        FrameTooLarge: the header or body would exceed ``limits``.
    """
    prefix, keys = _TEMPLATES[type(msg)]
    ident = msg.id
    if type(ident) is not int:
        return _encode_generic(msg, limits)
    parts = [prefix, str(ident)]
    for name, key in keys:
        value = getattr(msg, name)
        if value is None:
            continue
        kind = type(value)
        if kind is int:
            parts += (key, str(value))
        elif kind is str:
            parts += (key, _quote(value))
        else:
            return _encode_generic(msg, limits)
    body: Body = msg.body if msg.HAS_BODY else b""  # type: ignore[attr-defined]
    return _close_head("".join(parts), len(body), limits or _DEFAULT_LIMITS), body


def echo_reply_head(ident: int, body_len: int, limits: Limits) -> bytes:
    """The head of ``Ok(ident, body)``, the answer to an echo, for a body of
    ``body_len`` bytes: what :func:`encode_message` writes, without making the
    message (an agent answers every keepalive and latency probe with one).

    Raises:
        FrameTooLarge: the header or body would exceed ``limits``.
    """
    return _close_head(f"{_OK_START}{ident}", body_len, limits)


def echo_request_head(ident: int, body_len: int, limits: Limits) -> bytes:
    """The head of ``Echo(ident, body)`` for a body of ``body_len`` bytes, as
    :func:`echo_reply_head` is the head of its answer.

    Raises:
        FrameTooLarge: the header or body would exceed ``limits``.
    """
    return _close_head(f"{_ECHO_START}{ident}", body_len, limits)


def _close_head(start: str, body_len: int, limits: Limits) -> bytes:
    """The head of a header written up to ``start``: ``body_len`` and the end added."""
    if not body_len:
        return frame_head(f"{start}}}".encode("ascii"), limits)
    if body_len > limits.max_body:
        raise FrameTooLarge("body", body_len, limits.max_body)
    return frame_head(f'{start},"body_len":{body_len}}}'.encode("ascii"), limits)


def _encode_generic(msg: Message, limits: Limits | None) -> tuple[bytes, Body]:
    header, body = to_frame_parts(msg)
    return encode_frame_head(header, len(body), limits), body


def decode_client_message(frame: Frame) -> Message:
    """Decode a frame sent by a client.

    Raises:
        ProtocolError: code ``unknown_op`` for an op not in the table, or
            ``bad_request`` for a missing or mistyped field.
    """
    return _decode(frame, CLIENT_MESSAGES)


def decode_server_message(frame: Frame) -> Message:
    """Decode a frame sent by an agent (see :func:`decode_client_message`)."""
    return _decode(frame, SERVER_MESSAGES)


def _decode(frame: Frame, table: dict[str, type[Message]]) -> Message:
    # Only exact names in the table dispatch: no case folding, no stripping,
    # no attribute lookup by name (docs/protocol.md §3).
    cls = table.get(frame.op)
    if cls is None:
        # The peer's text is cut short: it goes back out in our error frame.
        raise ProtocolError(f"unknown op {shorten(frame.op)!r}", code=ErrorCode.UNKNOWN_OP)
    header = frame.header
    kwargs: dict[str, Any] = {"id": frame.id}
    for name, check in _FIELDS[cls].items():
        if name == "body":
            kwargs["body"] = frame.body
            continue
        value = header.get(name)
        if value is None:
            if name in _REQUIRED[cls]:
                raise ProtocolError(
                    f"{frame.op}: missing field {name!r}", code=ErrorCode.BAD_REQUEST
                )
            continue
        try:
            kwargs[name] = check(value)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(
                f"{frame.op}: field {name!r} {exc}", code=ErrorCode.BAD_REQUEST
            ) from None
    if frame.body and not cls.HAS_BODY:
        raise ProtocolError(f"{frame.op}: takes no body", code=ErrorCode.BAD_REQUEST)
    msg = cls(**kwargs)
    if cls in _CHECKED:
        problem = msg.problem()
        if problem is not None:
            raise ProtocolError(f"{frame.op}: {problem}", code=ErrorCode.BAD_REQUEST)
    return msg


_Checker = typing.Callable[[Any], Any]


def _check_int(v: Any) -> int:
    if type(v) is not int:
        raise TypeError("must be an integer")
    return v


def _check_float(v: Any) -> float:
    try:
        if type(v) not in (int, float) or not math.isfinite(v):
            raise TypeError("must be a finite number")
        return float(v)
    except OverflowError:  # an integer too large for a float (10**400)
        raise TypeError("must be a finite number") from None


def _check_str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("must be a string")
    return v


def _check_bool(v: Any) -> bool:
    if type(v) is not bool:
        raise TypeError("must be true or false")
    return v


def _check_str_list(v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TypeError("must be a list of strings")
    return v


def _check_str_dict(v: Any) -> dict[str, str]:
    if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
        raise TypeError("must be an object of strings")
    return v


# By annotation as written in messages.py (postponed annotations are strings:
# reading them so costs nothing at import, where typing.get_type_hints compiled
# each one). "X | None" is a field that may be absent: the caller handles None.
_CHECKERS: dict[str, _Checker] = {
    "int": _check_int,
    "float": _check_float,
    "str": _check_str,
    "bool": _check_bool,
    "Body": lambda v: v,  # the body is never in the header
    "list[str]": _check_str_list,
    "dict[str, str]": _check_str_dict,
}


def _schema(cls: type[Message]) -> dict[str, _Checker]:
    return {f.name: _CHECKERS[f.type.removesuffix(" | None")] for f in cls.FIELDS if f.name != "id"}


def _required(cls: type[Message]) -> frozenset[str]:
    return frozenset(f.name for f in cls.FIELDS if f.name != "id" and f.default is NO_DEFAULT)


_FIELDS: dict[type[Message], dict[str, _Checker]] = {cls: _schema(cls) for cls in ALL_MESSAGES}
_REQUIRED: dict[type[Message], frozenset[str]] = {cls: _required(cls) for cls in ALL_MESSAGES}
_CHECKED = frozenset(
    cls for cls in ALL_MESSAGES if cls.problem is not Message.problem
)  # has problem()
_DEFAULT_LIMITS = Limits()
# Per class: the header's start up to the id's value, and each other header
# field's name with the JSON that precedes its value (encode_message).
_TEMPLATES: dict[type[Message], tuple[str, tuple[tuple[str, str], ...]]] = {
    cls: (
        f'{{"op":{_quote(cls.OP.value)},"id":',
        tuple((name, f",{_quote(name)}:") for name in _FIELDS[cls] if name != "body"),
    )
    for cls in ALL_MESSAGES
}
_OK_START = _TEMPLATES[Ok][0]  # '{"op":"ok","id":'
_ECHO_START = _TEMPLATES[Echo][0]  # '{"op":"echo","id":'

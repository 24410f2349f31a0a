"""Typed messages to frames and back, with bytes alone (docs/protocol.md §3-4)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from tether.codec import (
    decode_client_message,
    decode_server_message,
    echo_reply_head,
    echo_request_head,
    encode_message,
    to_frame_parts,
)
from tether.exceptions import FrameTooLarge, ProtocolError
from tether.frames import Frame, FrameDecoder, encode_frame, encode_frame_head
from tether.limits import MAX_BODY_LEN, MAX_HEADER_LEN, STDIN_WINDOW, Limits
from tether.messages import (
    CLIENT_MESSAGES,
    NO_DEFAULT,
    SERVER_MESSAGES,
    SIGNAL_NAMES,
    Cancel,
    Credit,
    Data,
    Done,
    Echo,
    Entries,
    Error,
    ErrorCode,
    Exec,
    Exit,
    FileInfo,
    Get,
    Hello,
    HelloReply,
    ListDir,
    Message,
    Mkdir,
    Ok,
    Put,
    Ready,
    SetAttr,
    Signal,
    Stat,
    StatReply,
    Stderr,
    Stdin,
    Stdout,
    Symlink,
)

Decode = Callable[[Frame], Message]

CLIENT_SAMPLES: list[Message] = [
    Hello(0, 1, "s3cret-token"),
    Echo(1, "你好，世界".encode()),
    Echo(2, b""),
    Echo(3, bytes(range(256))),
    Exec(4, argv=["ls", "-l", "/tmp/中文"], cwd="/srv", env={"LANG": "C", "X": ""}, timeout=2.5),
    Exec(5, shell="echo hi | tr a-z A-Z", stdin=True),
    Exec(6, shell="echo hi | tr a-z A-Z"),
    Exec(7, argv=["env"], env={}, timeout=0.5),
    Exec(8, argv=["cat", "caf\udce9"]),  # a non-UTF-8 argument, PEP 383
    Stdin(4, b"line 1\nline 2\n"),
    Stdin(4, b"", eof=True),
    Signal(4, "TERM"),
    Stat(9, "dir/文件"),
    ListDir(10, "."),
    Get(11, "big.iso"),
    Get(12, "big.iso", offset=1024, prefix_digest="ab" * 32),
    Put(13, "up/caf\udce9", 3, mode=0o600, mtime_ns=1_700_000_000_123_456_789, resume=True),
    Data(13, b"abc", offset=0),
    Data(13, b"\x00\xff"),
    Done(13, digest="0f" * 32),
    Cancel(13, reason="source changed"),
    Cancel(13, keep=True),
    Stat(9, "a-link", follow=True),
    Mkdir(14, "a/b", 0o755),
    Symlink(15, "link", "../target"),
    SetAttr(16, "a", mode=0o700, mtime_ns=1),
]

SERVER_SAMPLES: list[Message] = [
    HelloReply(0, 1, "agent-1", "gbk", MAX_HEADER_LEN, MAX_BODY_LEN, STDIN_WINDOW),
    HelloReply(0, 1, "agent-2", "utf-8", MAX_HEADER_LEN, MAX_BODY_LEN, 1, idle_timeout=300.0),
    Stdout(4, b"\xc4\xe3\xba\xc3 GBK bytes \xff\x00"),
    Stdout(4, b""),
    Stderr(4, "警告\n".encode()),
    Exit(4, status=0),
    Exit(5, status=255),
    Exit(6, signal=9, signal_name="KILL"),
    Exit(7, signal=15, signal_name="TERM", timed_out=True),
    Exit(8),
    Ok(1, b"echoed"),
    Ok(2),
    Error(3, ErrorCode.NOT_FOUND, "no such program: nope"),
    Error(0, ErrorCode.AUTH_FAILED, ""),
    StatReply(9, "file", 3, 0o644, 1_700_000_000_000_000_000),
    StatReply(9, "link", 9, 0o777, 1, target="../target"),
    Entries(10, b'[{"name":"a","type":"file","size":1,"mode":420,"mtime_ns":5}]'),
    FileInfo(11, size=10, mode=0o644, mtime_ns=7, offset=4),
    Ready(13, offset=1024, prefix_digest="cd" * 32),
    Ready(13),
    Data(11, b"file bytes"),
    Done(11, digest="ef" * 32),
    Done(10),
    Credit(4, 1),
    Credit(4, STDIN_WINDOW),
]


def through_the_wire(msg: Message) -> Frame:
    header, body = to_frame_parts(msg)
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(header, body))
    (frame,) = decoder.frames()
    return frame


def decode_error(decode: Decode, header: dict[str, Any], body: bytes = b"") -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(Frame(header, body))
    return info.value


def test_every_message_class_has_a_sample() -> None:
    assert {type(m) for m in CLIENT_SAMPLES} == set(CLIENT_MESSAGES.values())
    assert {type(m) for m in SERVER_SAMPLES} == set(SERVER_MESSAGES.values())


def test_op_tables_are_exactly_the_documented_ops() -> None:
    assert set(CLIENT_MESSAGES) == {
        *("hello", "echo", "exec", "stdin", "signal", "stat", "list", "get", "put"),
        *("data", "done", "cancel", "mkdir", "symlink", "setattr"),
    }
    assert set(SERVER_MESSAGES) == {
        *("hello", "stdout", "stderr", "exit", "ok", "error", "stat", "entries", "file"),
        *("ready", "data", "done", "credit"),
    }
    for table in (CLIENT_MESSAGES, SERVER_MESSAGES):
        for op, cls in table.items():
            assert op == cls.OP


# The message classes themselves (messages._MessageClass) ------------------------


def test_fields_are_the_annotations_in_order_base_first() -> None:
    assert [(f.name, f.type) for f in Put.FIELDS] == [
        ("id", "int"),
        ("path", "str"),
        ("size", "int"),
        ("mode", "int"),
        ("mtime_ns", "int | None"),
        ("hash", "str"),
        ("resume", "bool"),
    ]
    defaults = {f.name: f.default for f in Put.FIELDS if f.default is not NO_DEFAULT}
    assert defaults == {"mode": 0o644, "mtime_ns": None, "hash": "blake3", "resume": False}
    # Class variables are not fields.
    assert {"OP", "HAS_BODY", "FIELDS"}.isdisjoint(f.name for f in Echo.FIELDS)


def test_init_takes_fields_by_position_or_name_with_their_defaults() -> None:
    put = Put(7, "a/b", 5, resume=True)
    assert (put.id, put.path, put.size, put.mode, put.mtime_ns, put.hash, put.resume) == (
        7, "a/b", 5, 0o644, None, "blake3", True,
    )  # fmt: skip
    assert Put(id=7, path="a/b", size=5, resume=True) == put
    with pytest.raises(TypeError):
        Put(7, "a/b")  # type: ignore[call-arg]  # size has no default
    with pytest.raises(TypeError):
        Put(7, "a/b", 5, colour="red")  # type: ignore[call-arg]


def test_replace_makes_a_changed_copy() -> None:
    run = Exec(4, ["ls", "-l"], cwd="src")
    moved = run.replace(argv=["/bin/ls", "-l"])
    assert moved == Exec(4, ["/bin/ls", "-l"], cwd="src")
    assert run == Exec(4, ["ls", "-l"], cwd="src")  # the original is unchanged
    with pytest.raises(TypeError):
        run.replace(colour="red")


def test_messages_are_slotted_records_equal_by_class_and_fields() -> None:
    msg = Stat(3, "x")
    assert not hasattr(msg, "__dict__")
    with pytest.raises(AttributeError):
        msg.colour = "red"  # type: ignore[attr-defined]
    assert msg == Stat(3, "x", follow=False)
    assert msg != Stat(3, "x", follow=True)
    assert msg != ListDir(3, "x")  # same fields, another class
    assert repr(msg) == "Stat(id=3, path='x', follow=False)"
    with pytest.raises(TypeError):
        hash(msg)


def test_a_field_without_default_after_one_with_default_is_refused() -> None:
    with pytest.raises(TypeError, match="without a default follows one with a default"):

        class Broken(Message):
            first: int = 0
            second: int


@pytest.mark.parametrize("msg", CLIENT_SAMPLES, ids=repr)
def test_client_message_round_trip(msg: Message) -> None:
    assert decode_client_message(through_the_wire(msg)) == msg


@pytest.mark.parametrize("msg", SERVER_SAMPLES, ids=repr)
def test_server_message_round_trip(msg: Message) -> None:
    assert decode_server_message(through_the_wire(msg)) == msg


@pytest.mark.parametrize(
    "msg",
    [
        *CLIENT_SAMPLES,
        *SERVER_SAMPLES,
        Stat(3, 'caf\u00e9/\udcff "quoted"\n'),  # escapes, a PEP 383 surrogate
        Exit(4, status=-(2**70)),  # integers of any size
        Stdout(5, bytearray(b"in place")),  # a body received in place
    ],
    ids=repr,
)
def test_encode_message_writes_what_the_general_encoder_writes(msg: Message) -> None:
    # encode_message writes headers of integers and strings from a template;
    # anything else goes the general way. Either way, the same bytes.
    header, body = to_frame_parts(msg)
    assert encode_message(msg) == (encode_frame_head(header, len(body)), body)


@pytest.mark.parametrize("ident", [1, 7, 2**53])
@pytest.mark.parametrize("body", [b"", b"x", bytearray(b"\x00" * 1000)])
@pytest.mark.parametrize(("head", "message"), [(echo_reply_head, Ok), (echo_request_head, Echo)])
def test_echo_heads_are_the_heads_of_their_messages(
    ident: int, body: bytes, head: Any, message: type[Ok] | type[Echo]
) -> None:
    limits = Limits()
    assert (head(ident, len(body), limits), body) == encode_message(message(ident, body), limits)


@pytest.mark.parametrize("head", [echo_reply_head, echo_request_head])
def test_echo_heads_check_the_limits(head: Any) -> None:
    with pytest.raises(FrameTooLarge):
        head(1, 9, Limits(max_body=8))
    with pytest.raises(FrameTooLarge):
        head(1, 0, Limits(max_header=10))


def test_encode_message_checks_the_limits() -> None:
    limits = Limits(max_header=64, max_body=8)
    with pytest.raises(FrameTooLarge):
        encode_message(Stdout(1, b"x" * 9), limits)
    with pytest.raises(FrameTooLarge):
        encode_message(Stat(1, "p" * 64), limits)
    assert encode_message(Stdout(1, b"x" * 8), limits)[1] == b"x" * 8


def test_to_frame_parts_leaves_out_none_and_moves_body() -> None:
    header, body = to_frame_parts(Exec(9, argv=["true"]))
    assert header == {"op": "exec", "id": 9, "argv": ["true"], "stdin": False}
    assert body == b""
    header, body = to_frame_parts(Stdin(9, b"abc", eof=True))
    assert header == {"op": "stdin", "id": 9, "eof": True}
    assert body == b"abc"
    header, _ = to_frame_parts(Exit(9, signal=2, signal_name="INT"))
    assert header == {"op": "exit", "id": 9, "signal": 2, "signal_name": "INT", "timed_out": False}


def test_decoded_timeout_is_a_float() -> None:
    msg = decode_client_message(Frame({"op": "exec", "id": 1, "argv": ["x"], "timeout": 3}))
    assert isinstance(msg, Exec)
    assert msg.timeout == 3.0
    assert type(msg.timeout) is float


# Unknown ops ------------------------------------------------------------------

UNKNOWN_OPS = [
    "EXEC",
    "Exec",
    "exec ",
    " exec",
    "exec\x00",
    "ехес",  # Cyrillic look-alike of "exec"
    "hеllo",  # Cyrillic "е"
    "__init__",
    "__class__",
    "_private",
    "_decode",
    "mro",
    "body",
    "OP",
    "Hello",
    "GET",
    "put ",
    "resize",
]


@pytest.mark.parametrize("op", [*UNKNOWN_OPS, "stdout", "exit", "ok", "error"])
def test_unknown_client_op(op: str) -> None:
    exc = decode_error(decode_client_message, {"op": op, "id": 1})
    assert exc.code == "unknown_op"
    assert str(exc) == f"unknown op {op!r}"


@pytest.mark.parametrize("op", [*UNKNOWN_OPS, "exec", "echo", "stdin", "signal"])
def test_unknown_server_op(op: str) -> None:
    exc = decode_error(decode_server_message, {"op": op, "id": 1})
    assert exc.code == "unknown_op"
    assert str(exc) == f"unknown op {op!r}"


# Missing and mistyped fields --------------------------------------------------


@pytest.mark.parametrize(
    ("decode", "header", "field"),
    [
        (decode_client_message, {"op": "hello", "id": 0, "token": "t"}, "version"),
        (decode_client_message, {"op": "hello", "id": 0, "version": 1}, "token"),
        (decode_client_message, {"op": "hello", "id": 0, "version": None, "token": "t"}, "version"),
        (decode_client_message, {"op": "signal", "id": 1}, "signal"),
        (decode_client_message, {"op": "signal", "id": 1, "signal": None}, "signal"),
        (decode_server_message, {"op": "error", "id": 1, "message": "m"}, "code"),
        (
            decode_server_message,
            {"op": "hello", "id": 0, "version": 1, "server": "s", "encoding": "utf-8"},
            "max_header",
        ),
        (
            decode_server_message,
            {"op": "hello", "id": 0, "version": 1, "encoding": "e", "max_header": 1, "max_body": 1},
            "server",
        ),
    ],
)
def test_missing_required_field(decode: Decode, header: dict[str, Any], field: str) -> None:
    exc = decode_error(decode, header)
    assert exc.code == "bad_request"
    assert str(exc) == f"{header['op']}: missing field {field!r}"


HELLO = {"op": "hello", "id": 0, "version": 1, "token": "t"}
EXEC = {"op": "exec", "id": 1, "argv": ["true"]}
REPLY = {
    "op": "hello",
    "id": 0,
    "version": 1,
    "server": "s",
    "encoding": "utf-8",
    "max_header": 1,
    "max_body": 1,
    "stdin_window": 1,
}


@pytest.mark.parametrize(
    ("decode", "base", "field", "value", "expected"),
    [
        (decode_client_message, HELLO, "version", True, "must be an integer"),
        (decode_client_message, HELLO, "version", 1.0, "must be an integer"),
        (decode_client_message, HELLO, "version", "1", "must be an integer"),
        (decode_client_message, HELLO, "token", 123, "must be a string"),
        (decode_client_message, HELLO, "token", ["t"], "must be a string"),
        (decode_client_message, EXEC, "argv", "ls -l", "must be a list of strings"),
        (decode_client_message, EXEC, "argv", ["ls", 1], "must be a list of strings"),
        (decode_client_message, EXEC, "argv", ["ls", None], "must be a list of strings"),
        (decode_client_message, EXEC, "argv", [["ls"]], "must be a list of strings"),
        (decode_client_message, EXEC, "argv", {"0": "ls"}, "must be a list of strings"),
        (decode_client_message, EXEC, "shell", ["echo"], "must be a string"),
        (decode_client_message, EXEC, "cwd", 1, "must be a string"),
        (decode_client_message, EXEC, "env", {"A": 1}, "must be an object of strings"),
        (decode_client_message, EXEC, "env", {"A": None}, "must be an object of strings"),
        (decode_client_message, EXEC, "env", {"A": ["x"]}, "must be an object of strings"),
        (decode_client_message, EXEC, "env", ["A=1"], "must be an object of strings"),
        (decode_client_message, EXEC, "env", "A=1", "must be an object of strings"),
        (decode_client_message, EXEC, "timeout", "5", "must be a finite number"),
        (decode_client_message, EXEC, "timeout", True, "must be a finite number"),
        (decode_client_message, EXEC, "timeout", [5], "must be a finite number"),
        (decode_client_message, EXEC, "timeout", math.inf, "must be a finite number"),
        (decode_client_message, EXEC, "timeout", -math.inf, "must be a finite number"),
        (decode_client_message, EXEC, "timeout", math.nan, "must be a finite number"),
        (decode_client_message, EXEC, "stdin", 1, "must be true or false"),
        (decode_client_message, EXEC, "stdin", 0, "must be true or false"),
        (decode_client_message, EXEC, "stdin", "true", "must be true or false"),
        (decode_client_message, {"op": "stdin", "id": 1}, "eof", 1, "must be true or false"),
        (decode_client_message, {"op": "signal", "id": 1}, "signal", 15, "must be a string"),
        (decode_server_message, {"op": "exit", "id": 1}, "status", "0", "must be an integer"),
        (decode_server_message, {"op": "exit", "id": 1}, "status", False, "must be an integer"),
        (decode_server_message, {"op": "exit", "id": 1}, "signal", 9.0, "must be an integer"),
        (decode_server_message, {"op": "exit", "id": 1}, "signal_name", 9, "must be a string"),
        (decode_server_message, {"op": "exit", "id": 1}, "timed_out", 1, "must be true or false"),
        (decode_server_message, REPLY, "max_body", 1.5, "must be an integer"),
        (decode_server_message, REPLY, "encoding", None, None),
        (decode_server_message, {"op": "error", "id": 1}, "code", 404, "must be a string"),
        (
            decode_server_message,
            {"op": "error", "id": 1, "code": "x"},
            "message",
            1,
            "must be a string",
        ),
    ],
)
def test_mistyped_field(
    decode: Decode, base: dict[str, Any], field: str, value: Any, expected: str | None
) -> None:
    exc = decode_error(decode, {**base, field: value})
    assert exc.code == "bad_request"
    if expected is None:  # null means absent, and the field is required
        assert str(exc) == f"{base['op']}: missing field {field!r}"
    else:
        assert str(exc) == f"{base['op']}: field {field!r} {expected}"


@pytest.mark.parametrize(
    ("decode", "header"),
    [
        (decode_client_message, HELLO),
        (decode_client_message, EXEC),
        (decode_client_message, {"op": "signal", "id": 1, "signal": "INT"}),
        (decode_server_message, REPLY),
        (decode_server_message, {"op": "exit", "id": 1, "status": 0}),
        (decode_server_message, {"op": "error", "id": 1, "code": "internal"}),
    ],
)
def test_body_on_a_message_that_takes_none(decode: Decode, header: dict[str, Any]) -> None:
    # The decoder accepts a body_len on any frame; it is the message that refuses it.
    exc = decode_error(decode, {**header, "body_len": 1}, b"x")
    assert exc.code == "bad_request"
    assert str(exc) == f"{header['op']}: takes no body"


def test_unknown_extra_fields_are_ignored() -> None:
    header = {**EXEC, "pty": True, "future": {"nested": [1, 2]}, "id2": "x", "OP": "echo"}
    assert decode_client_message(Frame(header)) == Exec(1, argv=["true"])
    reply = decode_server_message(Frame({**REPLY, "features": ["tls"], "max_files": 3}))
    assert reply == HelloReply(0, 1, "s", "utf-8", 1, 1, 1)


def test_a_body_field_in_the_header_does_not_replace_the_body() -> None:
    frame = Frame({"op": "echo", "id": 1, "body": "fake", "body_len": 4}, b"real")
    assert decode_client_message(frame) == Echo(1, b"real")


def test_null_optional_fields_mean_absent() -> None:
    header = {"op": "exec", "id": 1, "argv": None, "shell": "true", "env": None, "timeout": None}
    assert decode_client_message(Frame(header)) == Exec(1, shell="true")


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ({}, "exactly one of argv and shell"),
        ({"argv": ["a"], "shell": "b"}, "exactly one of argv and shell"),
        ({"argv": []}, "argv is empty"),
        ({"argv": ["a"], "timeout": 0}, "timeout must be > 0"),
        ({"argv": ["a"], "timeout": -1.5}, "timeout must be > 0"),
        ({"argv": ["a\x00b"]}, "cannot be passed to a program"),
        ({"argv": ["\ud800"]}, "cannot be passed to a program"),
        ({"shell": "x", "cwd": "a\x00"}, "cannot be passed to a program"),
        ({"argv": ["a"], "env": {"": "v"}}, "bad environment variable name"),
        ({"argv": ["a"], "env": {"A=B": "v"}}, "bad environment variable name"),
        ({"argv": ["a"], "env": {"A": "v\x00"}}, "cannot be passed to a program"),
    ],
)
def test_exec_that_cannot_run_is_bad_request(header: dict[str, Any], problem: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_client_message(Frame({"op": "exec", "id": 1, **header}))
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert problem in str(info.value)


@pytest.mark.parametrize("name", ["BOGUS", "SIGTERM", "term", "RTMIN", "_IGN", ""])
def test_signal_names_outside_the_list_are_bad_request(name: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_client_message(Frame({"op": "signal", "id": 1, "signal": name}))
    assert info.value.code == ErrorCode.BAD_REQUEST


def test_every_listed_signal_name_decodes() -> None:
    for name in sorted(SIGNAL_NAMES):
        msg = decode_client_message(Frame({"op": "signal", "id": 1, "signal": name}))
        assert msg == Signal(1, name)


@pytest.mark.parametrize(
    "header",
    [
        {"op": "credit", "id": 4, "bytes": 0},
        {"op": "credit", "id": 4, "bytes": -1},
        {**REPLY, "stdin_window": 0},
    ],
    ids=["credit-0", "credit-negative", "window-0"],
)
def test_credits_and_windows_of_no_bytes_are_refused(header: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_server_message(Frame(header))
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert "must be > 0" in str(info.value)

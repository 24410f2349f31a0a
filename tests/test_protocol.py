"""The connection state machines driven with bytes alone (docs/protocol.md §4).

Like h11's ``ConnectionPair``: a client and a server core joined by a fake wire,
where one side's ``data_to_send()`` is the other side's ``receive_data()``.
"""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.codec import decode_server_message, to_frame_parts
from tether.frames import Frame, FrameDecoder, encode_frame
from tether.limits import MAX_BODY_LEN, MAX_HEADER_LEN, PROTOCOL_VERSION, STDIN_WINDOW, Limits
from tether.messages import (
    Credit,
    Echo,
    Error,
    ErrorCode,
    Exec,
    Exit,
    Hello,
    HelloReply,
    Message,
    Ok,
    Signal,
    Stat,
    Stderr,
    Stdin,
    Stdout,
)
from tether.protocol import (
    ClientProtocol,
    ConnectionFailed,
    ControlReceived,
    Event,
    HelloReceived,
    ReplyReceived,
    RequestReceived,
    ServerProtocol,
    State,
    encode_messages,
)

TOKEN = "s3cret"
REPLY = HelloReply(
    0, PROTOCOL_VERSION, "test-agent", "utf-8", MAX_HEADER_LEN, MAX_BODY_LEN, STDIN_WINDOW
)

Side = ServerProtocol | ClientProtocol


def wire(msg: Message) -> bytes:
    header, body = to_frame_parts(msg)
    return encode_frame(header, body)


def raw(header: dict[str, Any], body: bytes = b"") -> bytes:
    """A frame with any header at all, bypassing the message types."""
    return encode_frame(header, body)


def state_of(side: Side) -> State:
    return side.state  # a call, so that mypy does not narrow the state across steps


def output(side: Side) -> bytes:
    return b"".join(side.data_to_send())


def sent_frames(side: Side) -> list[Frame]:
    decoder = FrameDecoder()
    decoder.receive_data(output(side))
    frames = list(decoder.frames())
    assert decoder.buffered == 0
    return frames


def sent_messages(side: Side) -> list[Message]:
    return [decode_server_message(f) for f in sent_frames(side)]


def feed(side: Side, data: bytes | memoryview) -> list[Event]:
    side.receive_data(data)
    return side.events_received()


class ConnectionPair:
    """A client and a server joined by an in-memory wire."""

    def __init__(self) -> None:
        self.client = ClientProtocol()
        self.server = ServerProtocol()

    def to_server(self) -> list[Event]:
        return feed(self.server, output(self.client))

    def to_client(self) -> list[Event]:
        return feed(self.client, output(self.server))

    def open(self) -> None:
        self.client.send_hello(TOKEN)
        assert self.to_server() == [HelloReceived(Hello(0, PROTOCOL_VERSION, TOKEN))]
        self.server.accept_hello(REPLY)
        assert self.to_client() == [ReplyReceived(REPLY)]


def open_server() -> ServerProtocol:
    server = ServerProtocol()
    assert feed(server, wire(Hello(0, PROTOCOL_VERSION, TOKEN))) == [
        HelloReceived(Hello(0, PROTOCOL_VERSION, TOKEN))
    ]
    server.accept_hello(REPLY)
    assert sent_messages(server) == [REPLY]
    return server


def assert_failed(
    side: Side, events: Sequence[Event], code: str, message: str | None = None
) -> None:
    """The side sent exactly one connection error with ``code`` and is closed."""
    assert len(events) >= 1
    failed = events[-1]
    assert isinstance(failed, ConnectionFailed)
    assert failed.code == code
    assert failed.by_peer is False
    if message is not None:
        assert failed.message == message
    frames = sent_frames(side)
    assert frames[-1].header == {"op": "error", "id": 0, "code": code, "message": failed.message}
    assert [f for f in frames if f.op == "error" and f.id == 0] == frames[-1:]
    assert side.state is State.CLOSED
    assert side.closed
    assert_inert(side)


def assert_inert(side: Side) -> None:
    """A closed side ignores all later input, however valid."""
    for data in (
        wire(Hello(0, PROTOCOL_VERSION, TOKEN)),
        wire(Exec(50, argv=["true"])),
        wire(REPLY),
        b"\xff" * 64,
    ):
        assert feed(side, data) == []
        assert side.data_to_send() == []
    assert side.state is State.CLOSED


# Hello ------------------------------------------------------------------------


def test_handshake_and_a_request_round_trip() -> None:
    pair = ConnectionPair()
    assert pair.server.state is State.AWAIT_HELLO
    assert pair.client.state is State.AWAIT_HELLO
    pair.client.send_hello(TOKEN)
    assert pair.to_server() == [HelloReceived(Hello(0, PROTOCOL_VERSION, TOKEN))]
    # Nothing is sent until the I/O layer has checked the token.
    assert pair.server.data_to_send() == []
    assert pair.server.state is State.AWAIT_HELLO

    pair.server.accept_hello(REPLY)
    assert state_of(pair.server) is State.OPEN
    assert pair.to_client() == [ReplyReceived(REPLY)]
    assert state_of(pair.client) is State.OPEN

    rid = pair.client.new_request_id()
    pair.client.send(Exec(rid, argv=["cat"], stdin=True))
    pair.client.send(Stdin(rid, "数据".encode(), eof=True))
    assert pair.to_server() == [
        RequestReceived(Exec(rid, argv=["cat"], stdin=True)),
        ControlReceived(Stdin(rid, "数据".encode(), eof=True)),
    ]
    assert pair.server.active_requests == {rid}
    pair.server.send(Stdout(rid, "数据".encode()))
    pair.server.finish_request(rid, Exit(rid, status=0))
    assert pair.server.active_requests == frozenset()
    assert pair.to_client() == [
        ReplyReceived(Stdout(rid, "数据".encode())),
        ReplyReceived(Exit(rid, status=0)),
    ]


@pytest.mark.parametrize("body", [b"", b"ping", bytes(range(256)) * 100])
def test_send_echo_writes_what_send_writes(body: bytes) -> None:
    fast, general = ClientProtocol(), ClientProtocol()
    fast.send_echo(7, body)
    general.send(Echo(7, body))
    assert output(fast) == output(general)


_JSON_VALUES = st.none() | st.booleans() | st.integers() | st.text(max_size=8)


@settings(max_examples=200, deadline=None)
@given(
    ident=st.integers(min_value=0, max_value=2**53),
    body=st.binary(max_size=64),
    extra=st.dictionaries(
        st.text(max_size=8).filter(lambda k: k not in ("op", "id", "body_len")),
        _JSON_VALUES,
        max_size=3,
    ),
)
def test_client_takes_ok_as_decoding_would(ident: int, body: bytes, extra: dict[str, Any]) -> None:
    # The client's shortcut for ok frames (every echo's answer) must give the
    # message the general decoder gives, unknown header fields ignored.
    client = ClientProtocol()
    client.send_hello(TOKEN)
    assert feed(client, wire(REPLY)) == [ReplyReceived(REPLY)]
    data = raw({"op": "ok", "id": ident, **extra}, body)
    decoder = FrameDecoder()
    decoder.receive_data(data)
    (frame,) = decoder.frames()
    assert feed(client, data) == [ReplyReceived(decode_server_message(frame))]
    assert client.state is State.OPEN


def test_client_refuses_ok_before_the_hello_reply() -> None:
    client = ClientProtocol()
    client.send_hello(TOKEN)
    events = feed(client, wire(Ok(1, b"early")))
    assert events == [ConnectionFailed(ErrorCode.PROTOCOL_ERROR, "expected hello, got ok")]
    assert client.closed


def test_echo_round_trip_with_empty_body() -> None:
    pair = ConnectionPair()
    pair.open()
    pair.client.send(Echo(1, b""))
    assert pair.to_server() == [RequestReceived(Echo(1, b""))]
    pair.server.finish_request(1, Ok(1, b""))
    assert pair.to_client() == [ReplyReceived(Ok(1, b""))]


@pytest.mark.parametrize("body", [b"", b"\x00\xff ping", bytes(range(256)) * 100])
def test_answer_echo_replies_at_once_without_an_event(body: bytes) -> None:
    server = open_server()
    server.answer_echo = True
    assert feed(server, wire(Echo(7, body))) == []
    assert sent_messages(server) == [Ok(7, body)]
    assert server.active_requests == frozenset()
    # The id is free again at once, and later requests still become events.
    assert feed(server, wire(Echo(7, b"again")) + wire(Exec(8, argv=["id"]))) == [
        RequestReceived(Exec(8, argv=["id"]))
    ]
    assert sent_messages(server) == [Ok(7, b"again")]


@pytest.mark.parametrize(
    ("opened", "before", "echo", "code", "message"),
    [
        (True, [Exec(3, argv=["sleep", "1"])], Echo(3, b"x"), "protocol_error",
         "request id 3 is already in use"),
        (True, [], Echo(0, b"x"), "protocol_error", "echo needs a request id > 0"),
        (False, [], Echo(1, b"x"), "unauthenticated", "the first frame must be hello"),
    ],
)  # fmt: skip
def test_answer_echo_still_refuses_what_any_request_is_refused_for(
    opened: bool, before: list[Message], echo: Echo, code: str, message: str
) -> None:
    server = open_server() if opened else ServerProtocol()
    server.answer_echo = True
    for msg in before:
        feed(server, wire(msg))
    events = feed(server, wire(echo))
    assert_failed(server, events, code, message)


def test_answer_echo_ignores_unknown_fields_as_any_request_does() -> None:
    server = open_server()
    server.answer_echo = True
    # Unknown fields are ignored (forward compatibility), as for any request.
    assert feed(server, raw({"op": "echo", "id": 4, "future": [1]}, b"hi")) == []
    assert sent_messages(server) == [Ok(4, b"hi")]


def test_client_request_ids_start_at_one_and_are_fresh() -> None:
    client = ClientProtocol()
    assert [client.new_request_id() for _ in range(3)] == [1, 2, 3]


def test_send_hello_encodes_version_and_token() -> None:
    client = ClientProtocol()
    client.send_hello("tok", version=7)
    (frame,) = sent_frames(client)
    assert frame.header == {"op": "hello", "id": 0, "version": 7, "token": "tok"}


@pytest.mark.parametrize(
    "first",
    [
        wire(Exec(1, argv=["id"])),
        wire(Echo(1, b"hi")),
        wire(Stdin(1, b"x")),
        wire(Signal(1, "KILL")),
        wire(Exec(0, argv=["id"])),
        raw({"op": "exec", "id": 1, "argv": "not a list"}),  # fields are never looked at
        raw({"op": "nope", "id": 0}),
        raw({"op": "HELLO", "id": 0, "version": 1, "token": TOKEN}),
        raw({"op": "ok", "id": 0}),
        raw({"op": "error", "id": 0, "code": "auth_failed"}),
    ],
    ids=[
        "exec",
        "echo",
        "stdin",
        "signal",
        "exec-id0",
        "bad-exec",
        "unknown",
        "HELLO",
        "ok",
        "error",
    ],
)
def test_anything_before_hello_is_unauthenticated(first: bytes) -> None:
    server = ServerProtocol()
    events = feed(server, first)
    assert events == [ConnectionFailed("unauthenticated", "the first frame must be hello")]
    assert_failed(server, events, "unauthenticated")


def test_a_request_and_a_hello_in_one_chunk_before_auth() -> None:
    server = ServerProtocol()
    data = wire(Exec(1, argv=["id"])) + wire(Hello(0, PROTOCOL_VERSION, TOKEN))
    events = feed(server, data)
    # The hello behind the request is never looked at.
    assert events == [ConnectionFailed("unauthenticated", "the first frame must be hello")]
    assert_failed(server, events, "unauthenticated")


@pytest.mark.parametrize("version", [0, 2, PROTOCOL_VERSION + 100, -1])
def test_hello_with_unsupported_version(version: int) -> None:
    server = ServerProtocol()
    events = feed(server, wire(Hello(0, version, TOKEN)))
    assert_failed(
        server,
        events,
        "unsupported_version",
        f"protocol version {version} is not supported (this agent speaks {PROTOCOL_VERSION})",
    )


@pytest.mark.parametrize("ident", [1, 7, 2**40])
def test_hello_with_nonzero_id(ident: int) -> None:
    server = ServerProtocol()
    events = feed(server, wire(Hello(ident, PROTOCOL_VERSION, TOKEN)))
    assert_failed(server, events, "protocol_error", "hello must have id 0")


@pytest.mark.parametrize(
    "header",
    [
        {"op": "hello", "id": 0, "version": 1},
        {"op": "hello", "id": 0, "token": TOKEN},
        {"op": "hello", "id": 0, "version": "1", "token": TOKEN},
        {"op": "hello", "id": 0, "version": 1, "token": 5},
    ],
)
def test_hello_with_bad_fields_fails_the_connection(header: dict[str, Any]) -> None:
    server = ServerProtocol()
    events = feed(server, raw(header))
    # The field error's own code is reported, with id 0, and the connection closes.
    assert_failed(server, events, "bad_request")


def test_hello_with_a_body_fails_the_connection() -> None:
    server = ServerProtocol()
    header, _ = to_frame_parts(Hello(0, PROTOCOL_VERSION, TOKEN))
    events = feed(server, raw(header, b"extra"))
    assert_failed(server, events, "bad_request", "hello: takes no body")


@pytest.mark.parametrize(("op", "code"), [("hello", "bad_request"), ("echo", "unauthenticated")])
def test_a_first_frame_declaring_a_body_fails_from_its_header_alone(op: str, code: str) -> None:
    """Nothing of its body is awaited or allocated: a client that has not
    authenticated cannot make the agent hold 16 MiB with a 41-byte header."""
    server = ServerProtocol()
    header = {"op": op, "id": 0, "version": PROTOCOL_VERSION, "token": TOKEN}
    frame = raw({**header, "body_len": 16 * 1024 * 1024})  # a head and no body
    events = feed(server, frame)
    assert_failed(server, events, code)
    assert server._decoder._body is None  # no 16 MiB buffer was made


def test_frames_behind_the_first_may_carry_bodies() -> None:
    server = ServerProtocol()
    body = b"b" * (64 * 1024)  # received into a buffer of its own
    events = feed(server, wire(Hello(0, PROTOCOL_VERSION, TOKEN)) + wire(Echo(1, body)))
    assert events == [HelloReceived(Hello(0, PROTOCOL_VERSION, TOKEN))]
    server.accept_hello(REPLY)
    assert server.events_received() == [RequestReceived(Echo(1, body))]


def test_frames_behind_an_undecided_hello_stay_unparsed_bytes() -> None:
    """A request pipelined behind the hello declaring 16 MiB: no buffer is made
    for its body until the hello is accepted (a refused one never gets one)."""
    server = ServerProtocol()
    big = 16 * 1024 * 1024
    head = raw({"op": "echo", "id": 1, "body_len": big})
    events = feed(server, wire(Hello(0, PROTOCOL_VERSION, TOKEN)) + head + b"0123456789")
    assert events == [HelloReceived(Hello(0, PROTOCOL_VERSION, TOKEN))]
    assert server._decoder._body is None
    server.accept_hello(REPLY)
    assert server._decoder._body is not None  # authenticated: received in place now
    events = feed(server, b"x" * (big - 10))
    assert events == [RequestReceived(Echo(1, b"0123456789" + b"x" * (big - 10)))]


def test_second_hello_is_a_protocol_error() -> None:
    server = open_server()
    events = feed(server, wire(Hello(0, PROTOCOL_VERSION, TOKEN)))
    assert_failed(server, events, "protocol_error", "hello was already received")


def test_hellos_packed_in_one_chunk_give_one_token_check() -> None:
    # While the I/O layer is still checking the first token (it waits before
    # refusing one, to slow guessing), further hellos must not each become a
    # HelloReceived: that would allow many token guesses per refusal delay.
    # They stay buffered until the first is decided.
    server = ServerProtocol()
    guesses = b"".join(wire(Hello(0, PROTOCOL_VERSION, f"guess-{i}")) for i in range(3))
    events = feed(server, guesses)
    assert events == [HelloReceived(Hello(0, PROTOCOL_VERSION, "guess-0"))]
    assert feed(server, guesses) == []  # more guesses: still nothing
    server.reject_hello(ErrorCode.AUTH_FAILED, "authentication failed")
    assert server.events_received() == [ConnectionFailed("auth_failed", "authentication failed")]
    assert sent_messages(server) == [Error(0, "auth_failed", "authentication failed")]
    assert server.closed
    assert_inert(server)


def test_a_second_hello_after_acceptance_fails_the_connection() -> None:
    server = ServerProtocol()
    feed(server, wire(Hello(0, PROTOCOL_VERSION, "good")) * 2)
    server.accept_hello(REPLY)
    (event,) = server.events_received()
    assert isinstance(event, ConnectionFailed)
    assert event.code == "protocol_error"
    assert server.closed


def test_requests_pipelined_behind_hello_are_served_after_acceptance() -> None:
    server = ServerProtocol()
    data = wire(Hello(0, PROTOCOL_VERSION, "good")) + wire(Echo(1, body=b"early"))
    assert feed(server, data) == [HelloReceived(Hello(0, PROTOCOL_VERSION, "good"))]
    server.accept_hello(REPLY)
    assert server.events_received() == [RequestReceived(Echo(1, body=b"early"))]


def test_reject_hello_sends_auth_failed_then_closes() -> None:
    server = ServerProtocol()
    assert feed(server, wire(Hello(0, PROTOCOL_VERSION, "wrong"))) == [
        HelloReceived(Hello(0, PROTOCOL_VERSION, "wrong"))
    ]
    server.reject_hello(ErrorCode.AUTH_FAILED, "authentication failed")
    assert server.events_received() == [ConnectionFailed("auth_failed", "authentication failed")]
    assert sent_messages(server) == [Error(0, "auth_failed", "authentication failed")]
    assert server.closed
    server.accept_hello(REPLY)  # too late: nothing is sent, the state stays closed
    assert server.data_to_send() == []
    assert_inert(server)


def test_fail_from_the_io_layer_sends_one_error() -> None:
    server = ServerProtocol()
    server.fail(ErrorCode.HELLO_TIMEOUT, "no hello within 10 s")
    server.fail(ErrorCode.INTERNAL, "second failure is ignored")
    assert server.events_received() == [ConnectionFailed("hello_timeout", "no hello within 10 s")]
    assert sent_messages(server) == [Error(0, "hello_timeout", "no hello within 10 s")]
    assert_inert(server)


# Requests ---------------------------------------------------------------------


@pytest.mark.parametrize("msg", [Exec(0, argv=["id"]), Echo(0, b"x")])
def test_request_id_zero_is_a_protocol_error(msg: Message) -> None:
    server = open_server()
    events = feed(server, wire(msg))
    assert_failed(server, events, "protocol_error", f"{msg.OP} needs a request id > 0")


@pytest.mark.parametrize("msg", [Stdin(0, b"x"), Signal(0, "INT")])
def test_control_id_zero_is_a_protocol_error(msg: Message) -> None:
    server = open_server()
    events = feed(server, wire(msg))
    assert_failed(server, events, "protocol_error", f"{msg.OP} needs a request id > 0")


def test_bad_exec_with_id_zero_is_a_protocol_error() -> None:
    server = open_server()
    events = feed(server, raw({"op": "exec", "id": 0, "argv": [1]}))
    assert_failed(server, events, "protocol_error", "request id 0 is not usable")


@pytest.mark.parametrize("second", [Exec(3, argv=["id"]), Echo(3, b"again")])
def test_duplicate_active_id_is_a_protocol_error(second: Message) -> None:
    server = open_server()
    assert feed(server, wire(Exec(3, argv=["sleep", "1"]))) == [
        RequestReceived(Exec(3, argv=["sleep", "1"]))
    ]
    events = feed(server, wire(second))
    assert_failed(server, events, "protocol_error", "request id 3 is already in use")


def test_bad_exec_on_an_active_id_is_a_protocol_error() -> None:
    server = open_server()
    feed(server, wire(Exec(3, argv=["sleep", "1"])))
    events = feed(server, raw({"op": "exec", "id": 3, "argv": "x"}))
    assert_failed(server, events, "protocol_error", "request id 3 is not usable")


def test_finished_id_can_be_used_again() -> None:
    # The server forgets an id once its last frame is sent, so it does not refuse
    # a client that reuses it (ClientProtocol itself never does).
    server = open_server()
    assert feed(server, wire(Echo(5, b"a"))) == [RequestReceived(Echo(5, b"a"))]
    server.finish_request(5, Ok(5, b"a"))
    assert sent_messages(server) == [Ok(5, b"a")]
    assert server.active_requests == frozenset()
    assert feed(server, wire(Exec(5, argv=["true"]))) == [RequestReceived(Exec(5, argv=["true"]))]
    assert server.active_requests == {5}
    assert server.state is State.OPEN


def test_many_requests_at_once_on_one_connection() -> None:
    server = open_server()
    events = feed(server, b"".join(wire(Echo(i, str(i).encode())) for i in range(1, 101)))
    assert events == [RequestReceived(Echo(i, str(i).encode())) for i in range(1, 101)]
    assert server.active_requests == set(range(1, 101))
    for i in reversed(range(1, 101)):
        server.finish_request(i, Ok(i, str(i).encode()))
    assert sent_messages(server) == [Ok(i, str(i).encode()) for i in reversed(range(1, 101))]


def test_finish_request_for_an_unknown_id_sends_nothing() -> None:
    server = open_server()
    server.finish_request(42, Exit(42, status=0))
    assert server.data_to_send() == []
    assert server.state is State.OPEN


def test_finish_request_after_close_sends_nothing_but_forgets_the_id() -> None:
    server = open_server()
    feed(server, wire(Echo(1, b"x")))
    server.fail(ErrorCode.SHUTTING_DOWN, "bye")
    server.data_to_send()
    server.finish_request(1, Ok(1, b"x"))
    assert server.data_to_send() == []
    assert server.active_requests == frozenset()


@pytest.mark.parametrize("msg", [Stdin(99, b"late"), Stdin(99, b"", eof=True), Signal(99, "TERM")])
def test_control_for_an_unknown_id_is_dropped_silently(msg: Message) -> None:
    server = open_server()
    assert feed(server, wire(msg)) == []
    assert server.data_to_send() == []
    assert server.state is State.OPEN
    # The connection still works.
    assert feed(server, wire(Echo(1, b"ok"))) == [RequestReceived(Echo(1, b"ok"))]


def test_control_after_finish_is_dropped() -> None:
    server = open_server()
    feed(server, wire(Exec(2, argv=["cat"], stdin=True)))
    assert feed(server, wire(Signal(2, "INT"))) == [ControlReceived(Signal(2, "INT"))]
    server.finish_request(2, Exit(2, signal=2, signal_name="INT"))
    server.data_to_send()
    assert feed(server, wire(Stdin(2, b"too late"))) == []
    assert server.data_to_send() == []
    assert server.state is State.OPEN


@pytest.mark.parametrize(
    ("header", "body", "message"),
    [
        (
            {"op": "exec", "id": 4, "argv": "ls"},
            b"",
            "exec: field 'argv' must be a list of strings",
        ),
        (
            {"op": "exec", "id": 4, "env": {"A": 1}},
            b"",
            "exec: field 'env' must be an object of strings",
        ),
        ({"op": "exec", "id": 4, "stdin": 1}, b"", "exec: field 'stdin' must be true or false"),
        (
            {"op": "exec", "id": 4, "timeout": "5"},
            b"",
            "exec: field 'timeout' must be a finite number",
        ),
        ({"op": "exec", "id": 4, "argv": ["ls"]}, b"body", "exec: takes no body"),
    ],
)
def test_bad_request_fails_only_that_request(
    header: dict[str, Any], body: bytes, message: str
) -> None:
    server = open_server()
    assert feed(server, raw(header, body)) == []
    assert sent_messages(server) == [Error(4, "bad_request", message)]
    assert server.state is State.OPEN
    assert server.active_requests == frozenset()
    # The same id is still fresh, and a good request under it works.
    assert feed(server, wire(Exec(4, argv=["ls"]))) == [RequestReceived(Exec(4, argv=["ls"]))]
    assert feed(server, wire(Echo(5, b"e"))) == [RequestReceived(Echo(5, b"e"))]


def test_bad_control_frame_fails_the_connection() -> None:
    # Only requests (exec, echo) fail alone; a malformed stdin or signal fails
    # the connection with the field error's code.
    server = open_server()
    feed(server, wire(Exec(2, argv=["cat"], stdin=True)))
    events = feed(server, raw({"op": "stdin", "id": 2, "eof": "yes"}))
    assert_failed(server, events, "bad_request", "stdin: field 'eof' must be true or false")


@pytest.mark.parametrize("op", ["EXEC", "ехес", "__init__", "_private", "GET", "stdout", "error"])
def test_unknown_op_after_hello_fails_the_connection(op: str) -> None:
    server = open_server()
    events = feed(server, raw({"op": op, "id": 1}))
    assert_failed(server, events, "unknown_op", f"unknown op {op!r}")


def test_unknown_op_with_a_long_name_is_still_unknown_op() -> None:
    # A header at the limit whose op is almost all of it: the error frame must
    # still say unknown_op (and fit in a frame), not be turned into too_large.
    server = open_server()
    op = "x" * (MAX_HEADER_LEN - len(b'{"op":"","id":1}'))
    frame = raw({"op": op, "id": 1})
    assert len(frame) == 4 + MAX_HEADER_LEN
    events = feed(server, frame)
    assert len(events) == 1
    assert isinstance(events[0], ConnectionFailed)
    assert events[0].code == "unknown_op"
    (error,) = sent_messages(server)
    assert isinstance(error, Error)
    assert error.code == "unknown_op"


# Framing violations -----------------------------------------------------------


@pytest.mark.parametrize("opened", [False, True], ids=["before-hello", "after-hello"])
def test_header_over_the_limit_is_too_large(opened: bool) -> None:
    server = open_server() if opened else ServerProtocol()
    events = feed(server, struct.pack(">I", MAX_HEADER_LEN + 1))
    assert_failed(
        server, events, "too_large", "header of 65537 bytes is over the limit of 65536 bytes"
    )


def test_body_over_the_limit_is_too_large() -> None:
    server = open_server()
    events = feed(server, raw({"op": "echo", "id": 1, "body_len": MAX_BODY_LEN + 1}))
    assert_failed(
        server, events, "too_large", "body of 16777217 bytes is over the limit of 16777216 bytes"
    )


def test_custom_limits_apply_to_received_frames() -> None:
    server = ServerProtocol(Limits(max_header=200, max_body=10))
    events = feed(server, struct.pack(">I", 201))
    assert_failed(server, events, "too_large", "header of 201 bytes is over the limit of 200 bytes")
    server = ServerProtocol(Limits(max_header=200, max_body=10))
    feed(server, wire(Hello(0, PROTOCOL_VERSION, TOKEN)))
    server.accept_hello(REPLY)
    server.data_to_send()
    assert feed(server, wire(Echo(1, b"x" * 10))) == [RequestReceived(Echo(1, b"x" * 10))]
    events = feed(server, wire(Echo(2, b"x" * 11)))
    assert_failed(server, events, "too_large", "body of 11 bytes is over the limit of 10 bytes")


def test_receive_data_never_raises_when_the_error_frame_is_over_the_limits() -> None:
    # With small limits the agent's own error frame does not fit them; the
    # violation must still end in a closed connection, not an exception.
    server = ServerProtocol(Limits(max_header=60, max_body=10))
    server.receive_data(struct.pack(">I", 61))
    (failed,) = server.events_received()
    assert isinstance(failed, ConnectionFailed)
    assert failed.code == "too_large"
    assert server.closed


def test_an_http_request_is_refused() -> None:
    server = ServerProtocol()
    events = feed(server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    # "GET " read as a length prefix is about 1.2 GB.
    assert_failed(server, events, "too_large")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (struct.pack(">I", 5) + b"hello", "frame header is not UTF-8 JSON"),
        (struct.pack(">I", 2) + b"\xff\xfe", "frame header is not UTF-8 JSON"),
        (struct.pack(">I", 2) + b"[]", "frame header is not a JSON object"),
        (struct.pack(">I", 0), "frame header is empty"),
        (raw({"op": "", "id": 1}), "frame header has no string 'op'"),
        (raw({"op": "hello", "id": -1}), "frame header has no integer 'id' >= 0"),
        (
            raw({"op": "hello", "id": 0, "body_len": "1"}),
            "frame header 'body_len' is not an integer >= 0",
        ),
    ],
)
def test_garbage_is_bad_frame(data: bytes, message: str) -> None:
    server = ServerProtocol()
    events = feed(server, data)
    assert_failed(server, events, "bad_frame", message)


def test_garbage_after_hello_is_bad_frame() -> None:
    server = open_server()
    events = feed(server, struct.pack(">I", 3) + b"{{{")
    assert_failed(server, events, "bad_frame", "frame header is not UTF-8 JSON")


def test_frames_after_a_violation_in_the_same_chunk_are_ignored() -> None:
    server = open_server()
    data = wire(Echo(1, b"a")) + raw({"op": "nope", "id": 2}) + wire(Echo(3, b"c"))
    events = feed(server, data)
    assert events == [
        RequestReceived(Echo(1, b"a")),
        ConnectionFailed("unknown_op", "unknown op 'nope'"),
    ]
    assert server.closed


def test_truncated_frame_produces_nothing() -> None:
    server = ServerProtocol()
    data = wire(Hello(0, PROTOCOL_VERSION, TOKEN))
    assert feed(server, data[:-1]) == []
    assert server.data_to_send() == []
    assert server.state is State.AWAIT_HELLO
    assert feed(server, data[-1:]) == [HelloReceived(Hello(0, PROTOCOL_VERSION, TOKEN))]


def test_client_frames_one_byte_at_a_time() -> None:
    server = ServerProtocol()
    data = wire(Hello(0, PROTOCOL_VERSION, TOKEN))
    events: list[Event] = []
    for i in range(len(data)):
        events += feed(server, data[i : i + 1])
    assert events == [HelloReceived(Hello(0, PROTOCOL_VERSION, TOKEN))]
    server.accept_hello(REPLY)
    server.data_to_send()
    stream = encode_messages(
        [Exec(1, argv=["cat"], stdin=True), Stdin(1, b"x" * 10), Stdin(1, b"", eof=True)]
    )
    for i in range(len(stream)):
        events += feed(server, memoryview(stream)[i : i + 1])
    assert events[1:] == [
        RequestReceived(Exec(1, argv=["cat"], stdin=True)),
        ControlReceived(Stdin(1, b"x" * 10)),
        ControlReceived(Stdin(1, b"", eof=True)),
    ]


# Client side ------------------------------------------------------------------


def test_server_frames_one_byte_at_a_time() -> None:
    client = ClientProtocol()
    client.send_hello(TOKEN)
    replies: list[Message] = [
        REPLY,
        Stdout(1, "输出\n".encode()),
        Stderr(1, b"\xff\xfe"),
        Exit(1, status=3),
        Ok(2, b""),
        Error(3, "not_found", "no such program"),
    ]
    data = encode_messages(replies)
    events: list[Event] = []
    for i in range(len(data)):
        events += feed(client, data[i : i + 1])
    assert events == [ReplyReceived(m) for m in replies]
    assert client.state is State.OPEN


@pytest.mark.parametrize("opened", [False, True], ids=["before-hello", "after-hello"])
def test_client_sees_connection_error_from_server(opened: bool) -> None:
    pair = ConnectionPair()
    if opened:
        pair.open()
    else:
        pair.client.send_hello("wrong")
        pair.to_server()
    if opened:
        code, message = "shutting_down", "agent is stopping"
        pair.server.fail(code, message)
    else:
        code, message = "auth_failed", "authentication failed"
        pair.server.reject_hello(code, message)
    events = pair.to_client()
    assert events == [ConnectionFailed(code, message, by_peer=True)]
    assert pair.client.closed
    # Nothing is sent back to a peer that has already failed the connection.
    assert pair.client.data_to_send() == []
    assert_inert(pair.client)


def test_client_request_error_does_not_close() -> None:
    pair = ConnectionPair()
    pair.open()
    pair.server.send(Error(1, "not_found", "nope"))
    assert pair.to_client() == [ReplyReceived(Error(1, "not_found", "nope"))]
    assert pair.client.state is State.OPEN


@pytest.mark.parametrize(
    "data",
    [b"\x00\x00\x00\x03abc", b"\x00\x00\x00\x00", b"HTTP/1.1 200 OK\r\n\r\n"],
    ids=["not-json", "empty-header", "http"],
)
def test_client_garbage_from_server_fails_locally(data: bytes) -> None:
    client = ClientProtocol()
    client.send_hello(TOKEN)
    client.data_to_send()
    events = feed(client, data)
    assert len(events) == 1
    failed = events[0]
    assert isinstance(failed, ConnectionFailed)
    assert failed.by_peer is False
    assert failed.code in ("bad_frame", "too_large")
    assert_failed(client, events, failed.code)


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (Stdout(1, b"x"), "expected hello, got stdout"),
        (Ok(1), "expected hello, got ok"),
        (Error(1, "internal", "x"), "expected hello, got error"),
    ],
)
def test_client_expects_hello_first(msg: Message, message: str) -> None:
    client = ClientProtocol()
    client.send_hello(TOKEN)
    client.data_to_send()
    events = feed(client, wire(msg))
    assert_failed(client, events, "protocol_error", message)


@pytest.mark.parametrize("op", ["exec", "stdin", "nope"])
def test_client_unknown_op_from_server(op: str) -> None:
    client = ClientProtocol()
    events = feed(client, raw({"op": op, "id": 1}))
    assert_failed(client, events, "unknown_op", f"unknown op {op!r}")


def test_client_bad_reply_fields() -> None:
    client = ClientProtocol()
    client.send_hello(TOKEN)
    client.data_to_send()
    feed(client, wire(REPLY))
    events = feed(client, raw({"op": "exit", "id": 1, "status": "0"}))
    assert_failed(client, events, "bad_request", "exit: field 'status' must be an integer")


# Hypothesis -------------------------------------------------------------------

FIELDS = ["version", "token", "argv", "shell", "env", "timeout", "stdin", "eof", "signal", "cwd"]
json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-3, max_value=3),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=5),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)
header_st = st.fixed_dictionaries(
    {
        "op": st.one_of(
            st.sampled_from(["hello", "echo", "exec", "stdin", "signal", "ok", "error", "x"]),
            st.text(max_size=4),
        ),
        "id": st.one_of(st.integers(min_value=0, max_value=3), st.integers(), st.just(True)),
    },
    optional={name: json_values for name in FIELDS},
)
good_hello = st.just(wire(Hello(0, PROTOCOL_VERSION, TOKEN)))


def framed(header: dict[str, Any], body: bytes) -> bytes:
    return struct.pack(">I", len(h := json.dumps(header).encode())) + h + body


stream_st = st.lists(
    st.one_of(
        good_hello,
        st.tuples(header_st, st.binary(max_size=8)).map(lambda hb: framed(*hb)),
        st.tuples(header_st, st.binary(max_size=8)).map(
            lambda hb: framed({**hb[0], "body_len": len(hb[1])}, hb[1])
        ),
        st.sampled_from([wire(Exec(1, argv=["a"])), wire(Stdin(1, b"x")), wire(Signal(1, "INT"))]),
        st.binary(max_size=12),
    ),
    max_size=8,
).map(b"".join)
cuts_st = st.lists(st.integers(min_value=0, max_value=600), max_size=12)


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted({min(c, len(data)) for c in cuts}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def check_side_never_raises(side: Side, data: bytes, cuts: list[int], accept: bool) -> None:
    events: list[Event] = []
    out = bytearray()
    for chunk in chunks(data, cuts):
        side.receive_data(chunk)  # must never raise
        new = side.events_received()
        hello = any(isinstance(e, HelloReceived) for e in new)
        if isinstance(side, ServerProtocol) and accept and hello:
            side.accept_hello(REPLY)
            new += side.events_received()  # requests pipelined behind the hello
        if events and isinstance(events[-1], ConnectionFailed):
            assert new == []  # nothing ever follows a failure
        events += new
        out += b"".join(side.data_to_send())
        if side.closed:
            assert any(isinstance(e, ConnectionFailed) for e in events)
    failures = [i for i, e in enumerate(events) if isinstance(e, ConnectionFailed)]
    assert failures in ([], [len(events) - 1])
    # Whatever this side wrote is well-formed for its peer.
    decoder = FrameDecoder()
    decoder.receive_data(out)
    sent = list(decoder.frames())
    assert decoder.buffered == 0
    errors0 = [f for f in sent if f.op == "error" and f.id == 0]
    last = events[-1] if events else None
    if isinstance(last, ConnectionFailed) and not last.by_peer:
        assert len(errors0) == 1
        assert sent[-1] is errors0[0]
        assert errors0[0].header["code"] == last.code
    else:
        assert errors0 == []
    if isinstance(side, ServerProtocol):
        for frame in sent:
            decode_server_message(frame)


@settings(max_examples=400, deadline=None)
@given(stream_st, cuts_st, st.booleans())
def test_server_never_raises_and_goes_quiet_after_failure(
    data: bytes, cuts: list[int], accept: bool
) -> None:
    check_side_never_raises(ServerProtocol(Limits(max_header=512, max_body=16)), data, cuts, accept)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), cuts_st)
def test_server_never_raises_on_raw_bytes(data: bytes, cuts: list[int]) -> None:
    check_side_never_raises(ServerProtocol(), data, cuts, accept=True)


@settings(max_examples=300, deadline=None)
@given(stream_st, cuts_st)
def test_client_never_raises_and_goes_quiet_after_failure(data: bytes, cuts: list[int]) -> None:
    check_side_never_raises(ClientProtocol(Limits(max_header=512, max_body=16)), data, cuts, False)


def test_a_long_request_error_is_cut_to_fit_the_header_limit() -> None:
    # Error messages may quote the peer (a 45 KB program name): the reply
    # must still be a valid frame, or the client would wait forever.
    server = ServerProtocol()
    feed(server, wire(Hello(0, PROTOCOL_VERSION, TOKEN)))
    server.accept_hello(REPLY)
    server.data_to_send()
    feed(server, wire(Exec(1, argv=["true"])))
    server.finish_request(1, Error(1, "not_found", "no such program: " + "中" * 15_000))
    (msg,) = sent_messages(server)
    assert isinstance(msg, Error)
    assert msg.code == "not_found"
    assert msg.message.startswith("no such program: 中")
    assert msg.message.endswith("...")
    assert len(msg.message) <= 1024


# The stdin window (§4.6) -------------------------------------------------------------


def open_server_with_window(window: int) -> ServerProtocol:
    server = ServerProtocol(Limits(stdin_window=window))
    feed(server, wire(Hello(0, PROTOCOL_VERSION, TOKEN)))
    server.accept_hello(REPLY)
    sent_messages(server)
    return server


def test_stdin_up_to_the_window_is_taken_and_credits_open_it_again() -> None:
    server = open_server_with_window(10)
    assert feed(server, wire(Exec(1, argv=["cat"], stdin=True))) == [
        RequestReceived(Exec(1, argv=["cat"], stdin=True))
    ]
    events = feed(server, wire(Stdin(1, b"x" * 6)) + wire(Stdin(1, b"y" * 4)))
    assert events == [ControlReceived(Stdin(1, b"x" * 6)), ControlReceived(Stdin(1, b"y" * 4))]
    server.credit_stdin(1, 7)
    assert sent_messages(server) == [Credit(1, 7)]
    assert feed(server, wire(Stdin(1, b"z" * 7))) == [ControlReceived(Stdin(1, b"z" * 7))]
    assert not server.closed


def test_stdin_past_the_window_fails_the_connection() -> None:
    server = open_server_with_window(10)
    feed(server, wire(Exec(1, argv=["cat"], stdin=True)) + wire(Stdin(1, b"x" * 6)))
    server.credit_stdin(1, 6)
    sent_messages(server)
    events = feed(server, wire(Stdin(1, b"x" * 10)) + wire(Stdin(1, b"!")))
    assert events[0] == ControlReceived(Stdin(1, b"x" * 10))
    assert_failed(
        server,
        events,
        ErrorCode.PROTOCOL_ERROR,
        "stdin of request 1: 11 bytes not credited, over the window of 10",
    )


def test_credits_are_only_for_stdin_received_by_a_running_exec() -> None:
    server = open_server_with_window(10)
    feed(server, wire(Exec(1, argv=["cat"], stdin=True)) + wire(Stdin(1, b"abc")))
    server.credit_stdin(1, 4)  # more than it holds
    server.credit_stdin(1, 0)
    server.credit_stdin(2, 1)  # not a request
    assert sent_messages(server) == []
    server.finish_request(1, Exit(1, status=0))
    server.credit_stdin(1, 3)  # ended
    assert sent_messages(server) == [Exit(1, status=0)]


def test_stdin_for_requests_other_than_exec_is_not_counted() -> None:
    """It is dropped by the agent (§4.3), never credited: no window to fill."""
    server = open_server_with_window(10)
    events = feed(server, wire(Stat(3, "f")) + wire(Stdin(3, b"x" * 10)) + wire(Stdin(3, b"x")))
    assert len(events) == 3 and not server.closed


def test_the_client_takes_credit_frames_as_replies() -> None:
    pair = ConnectionPair()
    pair.open()
    pair.server.receive_data(wire(Exec(5, argv=["cat"], stdin=True)) + wire(Stdin(5, b"ab")))
    pair.server.events_received()
    pair.server.credit_stdin(5, 2)
    assert pair.to_client() == [ReplyReceived(Credit(5, 2))]

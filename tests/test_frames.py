"""Frame encoding and incremental decoding, with bytes alone (docs/protocol.md §2)."""

from __future__ import annotations

import concurrent.futures
import json
import math
import struct
import tracemalloc
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.exceptions import FrameTooLarge, ProtocolError, TetherError
from tether.frames import PREFIX_LEN, Frame, FrameDecoder, encode_frame, encode_frame_head
from tether.limits import MAX_BODY_LEN, MAX_HEADER_LEN, Limits

SMALL = Limits(max_header=64, max_body=16)


def raw_frame(header: bytes, body: bytes = b"") -> bytes:
    """A frame built by hand: any header bytes, with the prefix giving their length."""
    return struct.pack(">I", len(header)) + header + body


def json_frame(header: Any, body: bytes = b"") -> bytes:
    return raw_frame(json.dumps(header).encode(), body)


def decode_all(data: bytes, limits: Limits | None = None) -> list[Frame]:
    decoder = FrameDecoder(limits)
    decoder.receive_data(data)
    frames = list(decoder.frames())
    assert decoder.buffered == 0
    return frames


def decode_chunks(chunks: Iterable[bytes], limits: Limits | None = None) -> list[Frame]:
    decoder = FrameDecoder(limits)
    out: list[Frame] = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        out.extend(decoder.frames())
    assert decoder.buffered == 0
    return out


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


def decode_error(data: bytes, limits: Limits | None = None) -> ProtocolError:
    decoder = FrameDecoder(limits)
    decoder.receive_data(data)
    with pytest.raises(ProtocolError) as info:
        list(decoder.frames())
    return info.value


# Round trips ----------------------------------------------------------------


def test_round_trip_empty_body() -> None:
    data = encode_frame({"op": "echo", "id": 1})
    assert data == b'\x00\x00\x00\x14{"op":"echo","id":1}'
    (frame,) = decode_all(data)
    assert frame == Frame({"op": "echo", "id": 1}, b"")
    assert frame.op == "echo"
    assert frame.id == 1
    assert "body_len" not in frame.header


def test_round_trip_binary_body() -> None:
    body = bytes(range(256)) * 3
    data = encode_frame({"op": "stdout", "id": 7}, body)
    (frame,) = decode_all(data)
    assert frame.header == {"op": "stdout", "id": 7, "body_len": len(body)}
    assert frame.body == body


@pytest.mark.parametrize("body", [bytearray(b"\x00\xffabc"), memoryview(b"\x00\xffabc")])
def test_encode_accepts_bytes_like_bodies(body: bytearray | memoryview) -> None:
    (frame,) = decode_all(encode_frame({"op": "stdin", "id": 2}, body))
    assert frame.body == b"\x00\xffabc"
    assert type(frame.body) is bytes


def test_round_trip_non_ascii_header_is_sent_as_escapes() -> None:
    header = {"op": "echo", "id": 3, "text": "你好，世界 — ünïcødé 🚀"}
    data = encode_frame(header, "中文".encode())
    # Our encoder writes ASCII JSON (\\u escapes), so lone surrogates can travel too.
    assert data[4 : len(data) - 6].isascii()
    (frame,) = decode_all(data)
    assert frame.header["text"] == "你好，世界 — ünïcødé 🚀"
    assert frame.body.decode() == "中文"


def test_raw_utf8_header_from_another_encoder_is_accepted() -> None:
    raw = '{"op":"echo","id":3,"text":"你好"}'.encode()
    (frame,) = decode_all(len(raw).to_bytes(4, "big") + raw)
    assert frame.header["text"] == "你好"


def test_lone_surrogates_round_trip_as_escapes() -> None:
    name = b"caf\xe9".decode("utf-8", "surrogateescape")  # a Latin-1 file name
    (frame,) = decode_all(encode_frame({"op": "exec", "id": 1, "argv": [name]}))
    assert frame.header["argv"][0].encode("utf-8", "surrogateescape") == b"caf\xe9"


def test_encode_frame_head_plus_body_equals_encode_frame() -> None:
    body = b"x" * 100
    head = encode_frame_head({"op": "stdout", "id": 9}, len(body))
    assert head + body == encode_frame({"op": "stdout", "id": 9}, body)
    (header_len,) = struct.unpack(">I", head[:PREFIX_LEN])
    assert header_len == len(head) - PREFIX_LEN


def test_id_zero_is_a_valid_frame_id() -> None:
    (frame,) = decode_all(encode_frame({"op": "hello", "id": 0}))
    assert frame.id == 0


def test_unknown_header_fields_are_kept() -> None:
    (frame,) = decode_all(json_frame({"op": "x", "id": 1, "future": [1, {"a": None}]}))
    assert frame.header["future"] == [1, {"a": None}]


# Limits on the decode side ----------------------------------------------------


def header_of_length(n: int) -> bytes:
    """A valid JSON header of exactly ``n`` bytes."""
    base = b'{"op":"x","id":1,"pad":""}'
    raw = base[:-2] + b"a" * (n - len(base)) + b'"}'
    assert len(raw) == n
    json.loads(raw)
    return raw


def test_header_exactly_at_default_limit_is_accepted() -> None:
    (frame,) = decode_all(raw_frame(header_of_length(MAX_HEADER_LEN)))
    assert len(frame.header["pad"]) > MAX_HEADER_LEN - 40


def test_header_one_over_default_limit_is_rejected_from_the_prefix_alone() -> None:
    decoder = FrameDecoder()
    # Only the length prefix: the header itself is never waited for.
    decoder.receive_data(struct.pack(">I", MAX_HEADER_LEN + 1))
    with pytest.raises(FrameTooLarge) as info:
        list(decoder.frames())
    exc = info.value
    assert (exc.part, exc.size, exc.limit) == ("header", MAX_HEADER_LEN + 1, MAX_HEADER_LEN)
    assert exc.code == "too_large"
    assert str(exc) == "header of 65537 bytes is over the limit of 65536 bytes"


def test_header_limit_boundaries_with_custom_limits() -> None:
    (frame,) = decode_all(raw_frame(header_of_length(64)), SMALL)
    assert frame.op == "x"
    exc = decode_error(raw_frame(header_of_length(65)), SMALL)
    assert isinstance(exc, FrameTooLarge)
    assert (exc.part, exc.size, exc.limit) == ("header", 65, 64)


def test_largest_possible_prefix_is_rejected() -> None:
    exc = decode_error(b"\xff\xff\xff\xff")
    assert isinstance(exc, FrameTooLarge)
    assert exc.size == 2**32 - 1


def test_body_exactly_at_default_limit_is_accepted() -> None:
    body = bytes(MAX_BODY_LEN)
    (frame,) = decode_all(json_frame({"op": "x", "id": 1, "body_len": MAX_BODY_LEN}, body))
    assert len(frame.body) == MAX_BODY_LEN


def test_body_one_over_default_limit_is_rejected_before_any_body_arrives() -> None:
    decoder = FrameDecoder()
    # Prefix and header only: the decoder must not wait for 16 MiB to refuse them.
    decoder.receive_data(json_frame({"op": "x", "id": 1, "body_len": MAX_BODY_LEN + 1}))
    with pytest.raises(FrameTooLarge) as info:
        list(decoder.frames())
    exc = info.value
    assert (exc.part, exc.size, exc.limit) == ("body", MAX_BODY_LEN + 1, MAX_BODY_LEN)
    assert str(exc) == "body of 16777217 bytes is over the limit of 16777216 bytes"
    assert decoder.buffered == 0


def test_body_limit_boundaries_with_custom_limits() -> None:
    (frame,) = decode_all(json_frame({"op": "x", "id": 1, "body_len": 16}, b"b" * 16), SMALL)
    assert frame.body == b"b" * 16
    exc = decode_error(json_frame({"op": "x", "id": 1, "body_len": 17}), SMALL)
    assert isinstance(exc, FrameTooLarge)
    assert (exc.part, exc.size, exc.limit) == ("body", 17, 16)


def test_huge_declared_body_is_rejected_without_buffering() -> None:
    exc = decode_error(json_frame({"op": "x", "id": 1, "body_len": 10**30}))
    assert isinstance(exc, FrameTooLarge)
    assert exc.size == 10**30


# Rejection paths -------------------------------------------------------------


def test_zero_header_length() -> None:
    exc = decode_error(b"\x00\x00\x00\x00")
    assert type(exc) is ProtocolError
    assert exc.code == "bad_frame"
    assert str(exc) == "frame header is empty"


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe{}",  # not UTF-8
        b'{"op":"x","id":1,"s":"\xc3"}',  # truncated UTF-8 sequence inside a string
        b"{not json",
        b'{"op":"x","id":1',
        b'{"op":"x","id":1}{}',  # trailing data
        b"\xef\xbb\xbf" + b'{"op":"x","id":1}',  # a BOM is not JSON
        b"[" * 100_00 + b"]" * 100_00,  # deep nesting (RecursionError inside json)
    ],
    ids=["not-utf8", "truncated-utf8", "not-json", "unterminated", "trailing", "bom", "deep"],
)
def test_header_not_utf8_json(raw: bytes) -> None:
    exc = decode_error(raw_frame(raw), Limits(max_header=len(raw)))
    assert type(exc) is ProtocolError
    assert exc.code == "bad_frame"
    assert str(exc) == "frame header is not UTF-8 JSON"


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(constant: str) -> None:
    raw = b'{"op":"x","id":1,"v":' + constant.encode() + b"}"
    exc = decode_error(raw_frame(raw))
    assert type(exc) is ProtocolError
    assert str(exc) == "frame header is not UTF-8 JSON"
    assert constant in str(exc.__cause__)


@pytest.mark.parametrize("raw", [b"[]", b'["op","x"]', b'"op"', b"1", b"1.5", b"null", b"true"])
def test_header_not_an_object(raw: bytes) -> None:
    exc = decode_error(raw_frame(raw))
    assert type(exc) is ProtocolError
    assert exc.code == "bad_frame"
    assert str(exc) == "frame header is not a JSON object"


@pytest.mark.parametrize(
    "header",
    [
        {"id": 1},
        {"op": None, "id": 1},
        {"op": "", "id": 1},
        {"op": 1, "id": 1},
        {"op": True, "id": 1},
        {"op": ["exec"], "id": 1},
        {"op": {"name": "exec"}, "id": 1},
    ],
)
def test_missing_or_bad_op(header: dict[str, Any]) -> None:
    exc = decode_error(json_frame(header))
    assert type(exc) is ProtocolError
    assert str(exc) == "frame header has no string 'op'"


@pytest.mark.parametrize(
    "header",
    [
        {"op": "x"},
        {"op": "x", "id": None},
        {"op": "x", "id": -1},
        {"op": "x", "id": True},
        {"op": "x", "id": False},
        {"op": "x", "id": 1.0},
        {"op": "x", "id": "1"},
        {"op": "x", "id": [1]},
    ],
)
def test_missing_or_bad_id(header: dict[str, Any]) -> None:
    exc = decode_error(json_frame(header))
    assert type(exc) is ProtocolError
    assert str(exc) == "frame header has no integer 'id' >= 0"


@pytest.mark.parametrize("body_len", [-1, "1", True, False, 1.0, [1]])
def test_bad_body_len(body_len: Any) -> None:
    exc = decode_error(json_frame({"op": "x", "id": 1, "body_len": body_len}, b"x"))
    assert type(exc) is ProtocolError
    assert exc.code == "bad_frame"
    assert str(exc) == "frame header 'body_len' is not an integer >= 0"


def test_hold_stops_at_a_frame_boundary_until_release() -> None:
    """Whatever arrives while held stays bytes (the scratch grows if it must,
    for receive_data), and release() parses it as if it had just arrived."""
    decoder = FrameDecoder()
    frames_in = [
        encode_frame({"op": "f", "id": i}, bytes([i % 256]) * (i * 100)) for i in range(300)
    ]

    def hold_after_the_first(header: dict[str, Any]) -> None:
        decoder.check_header = None
        decoder.hold = True

    decoder.check_header = hold_after_the_first
    decoder.receive_data(b"".join(frames_in))  # about 4.5 MB: more than the scratch
    assert [f.id for f in decoder.frames()] == [0]
    decoder.release()
    assert [f.id for f in decoder.frames()] == list(range(1, 300))
    assert decoder.buffered == 0


def test_null_body_len_is_an_absent_one() -> None:
    """§2.2: a field set to null is treated exactly as if it were absent."""
    decoder = FrameDecoder()
    data = raw_frame(b'{"op":"x","id":1,"body_len":null}') + encode_frame(
        {"op": "y", "id": 2}, b"after"
    )
    decoder.receive_data(data)
    frames = list(decoder.frames())
    assert [(f.op, f.header, f.body) for f in frames] == [
        ("x", {"op": "x", "id": 1}, b""),
        ("y", {"op": "y", "id": 2, "body_len": 5}, b"after"),
    ]


def test_explicit_zero_body_len_is_an_empty_body() -> None:
    (frame,) = decode_all(json_frame({"op": "x", "id": 1, "body_len": 0}))
    assert frame.body == b""


# Incremental decoding ----------------------------------------------------------


def sample_stream() -> tuple[bytes, list[Frame]]:
    frames = [
        Frame({"op": "hello", "id": 0, "version": 1, "token": "t"}),
        Frame({"op": "echo", "id": 1, "body_len": 6}, "你好".encode()),
        Frame({"op": "stdout", "id": 2, "body_len": 3}, b"\x00\r\n"),
        Frame({"op": "exit", "id": 2, "status": 0}),
        Frame({"op": "ok", "id": 1}),
    ]
    data = b"".join(
        encode_frame({k: v for k, v in f.header.items() if k != "body_len"}, f.body) for f in frames
    )
    return data, frames


def test_many_frames_in_one_chunk_are_not_stuck_together() -> None:
    data, expected = sample_stream()
    assert decode_all(data) == expected


def test_one_byte_at_a_time_gives_the_same_frames() -> None:
    data, expected = sample_stream()
    decoder = FrameDecoder()
    got: list[Frame] = []
    for i in range(len(data)):
        decoder.receive_data(data[i : i + 1])
        got.extend(decoder.frames())
    assert got == expected
    assert decoder.buffered == 0


def test_partial_frame_waits_for_more_data() -> None:
    data = encode_frame({"op": "echo", "id": 1}, b"abcdef")
    decoder = FrameDecoder()
    decoder.receive_data(data[:-1])
    assert list(decoder.frames()) == []
    # The header has been parsed; only the body is still waited for.
    assert decoder.buffered == 5
    decoder.receive_data(data[-1:])
    (frame,) = decoder.frames()
    assert frame.body == b"abcdef"


def test_buffered_counts_bytes_not_yet_returned() -> None:
    one = encode_frame({"op": "echo", "id": 1}, b"abc")
    two = encode_frame({"op": "echo", "id": 2}, b"defg")
    decoder = FrameDecoder()
    decoder.receive_data(one + two[:5])
    assert decoder.buffered == len(one) + 5
    (frame,) = decoder.frames()
    assert frame.id == 1
    assert decoder.buffered == 5
    decoder.receive_data(two[5:])
    (frame,) = decoder.frames()
    assert frame.body == b"defg"
    assert decoder.buffered == 0


def test_frames_before_a_bad_one_are_delivered() -> None:
    good = encode_frame({"op": "echo", "id": 1}, b"hi")
    decoder = FrameDecoder()
    decoder.receive_data(good + raw_frame(b"garbage") + good)
    it = decoder.frames()
    assert next(it).body == b"hi"
    with pytest.raises(ProtocolError):
        next(it)


def test_decoder_stays_broken_after_an_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(raw_frame(b"[]"))
    with pytest.raises(ProtocolError) as first:
        list(decoder.frames())
    assert decoder.buffered == 0
    # Later input, however valid, is discarded and the same error comes back.
    decoder.receive_data(encode_frame({"op": "echo", "id": 1}))
    assert decoder.buffered == 0
    with pytest.raises(ProtocolError) as again:
        list(decoder.frames())
    assert again.value is first.value
    with pytest.raises(ProtocolError):
        list(decoder.frames())


def test_decoder_stays_broken_after_too_large() -> None:
    decoder = FrameDecoder(SMALL)
    decoder.receive_data(struct.pack(">I", 65))
    with pytest.raises(FrameTooLarge) as first:
        list(decoder.frames())
    decoder.receive_data(encode_frame({"op": "echo", "id": 1}))
    with pytest.raises(FrameTooLarge) as again:
        list(decoder.frames())
    assert again.value is first.value


# Limits on the encode side ---------------------------------------------------


def test_encode_body_over_limit() -> None:
    assert encode_frame({"op": "x", "id": 1}, b"b" * 16, SMALL)
    with pytest.raises(FrameTooLarge) as info:
        encode_frame({"op": "x", "id": 1}, b"b" * 17, SMALL)
    assert (info.value.part, info.value.size, info.value.limit) == ("body", 17, 16)


def test_encode_head_checks_body_len_without_a_body() -> None:
    with pytest.raises(FrameTooLarge) as info:
        encode_frame_head({"op": "x", "id": 1}, MAX_BODY_LEN + 1)
    assert (info.value.part, info.value.size, info.value.limit) == (
        "body",
        MAX_BODY_LEN + 1,
        MAX_BODY_LEN,
    )


def test_encode_header_over_limit() -> None:
    base = len(b'{"op":"x","id":1,"p":""}')
    exact = {"op": "x", "id": 1, "p": "a" * (64 - base)}
    assert len(encode_frame(exact, limits=SMALL)) == PREFIX_LEN + 64
    over = {"op": "x", "id": 1, "p": "a" * (65 - base)}
    with pytest.raises(FrameTooLarge) as info:
        encode_frame(over, limits=SMALL)
    assert (info.value.part, info.value.size, info.value.limit) == ("header", 65, 64)


def test_encode_header_limit_counts_encoded_bytes_not_characters() -> None:
    base = len(b'{"op":"x","id":1,"p":""}')
    # 20 characters, each sent as a six-byte \\u escape: 120 bytes.
    with pytest.raises(FrameTooLarge) as info:
        encode_frame({"op": "x", "id": 1, "p": "中" * 20}, limits=SMALL)
    assert info.value.size == base + 120


def test_encode_header_limit_includes_the_added_body_len() -> None:
    base = len(b'{"op":"x","id":1,"p":""}')
    header = {"op": "x", "id": 1, "p": "a" * (64 - base)}
    assert encode_frame(header, limits=SMALL)
    with pytest.raises(FrameTooLarge) as info:
        encode_frame(header, b"z", limits=SMALL)
    assert info.value.part == "header"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_encoder_never_emits_a_frame_its_decoder_rejects(value: float) -> None:
    # JSON has no NaN or Infinity (the decoder rejects them), so encoding one
    # must fail locally instead of sending a frame that fails the connection.
    try:
        data = encode_frame({"op": "exec", "id": 1, "timeout": value})
    except (TetherError, ValueError):
        return
    decode_all(data)


# Hypothesis ------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),  # no lone surrogates: they are not UTF-8,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
    ),
    max_leaves=10,
)
required: dict[str, st.SearchStrategy[Any]] = {
    "op": st.text(min_size=1, max_size=12),
    "id": st.integers(min_value=0, max_value=2**64),
}
headers = st.fixed_dictionaries(
    required,
    optional={
        "a": json_values,
        "token": st.text(max_size=30).filter(lambda s: s.isprintable()),
        "中文": json_values,
    },
)
frames_st = st.lists(st.tuples(headers, st.binary(max_size=64)), max_size=6)
cuts_st = st.lists(st.integers(min_value=0, max_value=2000), max_size=20)


@settings(max_examples=300, deadline=None)
@given(frames_st, cuts_st)
def test_valid_frames_round_trip_under_any_chunking(
    frames: list[tuple[dict[str, Any], bytes]], cuts: list[int]
) -> None:
    data = b"".join(encode_frame(h, b) for h, b in frames)
    got = decode_chunks(split_at(data, cuts))
    assert len(got) == len(frames)
    for frame, (header, body) in zip(got, frames, strict=True):
        expected = {**header, "body_len": len(body)} if body else header
        assert frame.header == expected
        assert frame.body == body


def framed_garbage() -> st.SearchStrategy[bytes]:
    """Bytes with a plausible length prefix, so the fuzz reaches the header parser."""
    header_bytes = st.one_of(
        st.binary(max_size=40),
        headers.map(lambda h: json.dumps(h).encode()),
        st.dictionaries(st.sampled_from(["op", "id", "body_len"]), json_values).map(
            lambda h: json.dumps(h).encode()
        ),
    )
    return st.lists(
        st.tuples(header_bytes, st.binary(max_size=20)).map(lambda hb: raw_frame(*hb)),
        max_size=4,
    ).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=200), framed_garbage()), cuts_st)
def test_arbitrary_bytes_only_raise_protocol_errors(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(Limits(max_header=1024, max_body=64))
    try:
        for chunk in split_at(data, cuts):
            decoder.receive_data(chunk)
            for frame in decoder.frames():
                assert isinstance(frame.header, dict)
                assert isinstance(frame.op, str) and frame.op
                assert type(frame.id) is int and frame.id >= 0
                assert len(frame.body) == frame.header.get("body_len", 0)
    except ProtocolError as exc:  # FrameTooLarge is a ProtocolError
        assert exc.code in ("bad_frame", "too_large")
        assert isinstance(exc, FrameTooLarge) == (exc.code == "too_large")
        with pytest.raises(ProtocolError):
            list(decoder.frames())


# Reading in place (BufferedProtocol) ------------------------------------------------

BIG = FrameDecoder.DIRECT_BODY  # the smallest body received into its own buffer


def feed_in_place(decoder: FrameDecoder, data: bytes, most: int) -> None:
    """Feed ``data`` as a BufferedProtocol transport would: at most ``most`` bytes per read."""
    view = memoryview(data)
    while view:
        buf = decoder.get_buffer(-1)
        assert len(buf) > 0
        n = min(len(buf), len(view), most)
        buf[:n] = view[:n]
        buf.release()
        decoder.buffer_updated(n)
        view = view[n:]


def test_a_large_body_is_read_straight_into_its_own_buffer() -> None:
    body = bytes(range(256)) * (BIG // 256 + 3)
    data = encode_frame({"op": "data", "id": 1}, body)
    head = len(data) - len(body)
    decoder = FrameDecoder()
    feed_in_place(decoder, data[: head + 10], most=len(data))
    # Past the header, the decoder hands out exactly the rest of the body:
    # the kernel writes it where the frame will keep it, and no further.
    buf = decoder.get_buffer(-1)
    assert len(buf) == len(body) - 10
    buf[:] = body[10:]
    buf.release()
    decoder.buffer_updated(len(body) - 10)
    (frame,) = decoder.frames()
    assert frame.body == body
    assert isinstance(frame.body, bytearray)  # no copy into bytes
    assert decoder.buffered == 0


def test_small_bodies_are_bytes_and_an_idle_decoder_starts_afresh() -> None:
    data = encode_frame({"op": "echo", "id": 1}, b"x" * 100)
    decoder = FrameDecoder()
    feed_in_place(decoder, data, most=7)
    (frame,) = decoder.frames()
    assert frame.body == b"x" * 100 and isinstance(frame.body, bytes)
    # Nothing partial is held: the next read gets a whole scratch buffer.
    assert len(decoder.get_buffer(-1)) == FrameDecoder.SCRATCH_SIZE


def test_decoders_with_nothing_partial_hold_no_buffer() -> None:
    """An agent may hold 10,000 idle connections: once every frame is out, a
    decoder keeps no scratch buffer (16 KiB each otherwise)."""
    data = encode_frame({"op": "echo", "id": 1}, b"x" * 100)
    decoders = [FrameDecoder() for _ in range(200)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for decoder in decoders:
            feed_in_place(decoder, data, most=len(data))
            assert len(list(decoder.frames())) == 1
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 200 * FrameDecoder.SCRATCH_SIZE // 10, held


def read_once(decoder: FrameDecoder, data: memoryview, most: int) -> memoryview:
    """One read as a BufferedProtocol transport makes it; what is left of ``data``."""
    buf = decoder.get_buffer(-1)
    n = min(len(buf), len(data), most)
    buf[:n] = data[:n]
    buf.release()
    decoder.buffer_updated(n)
    return data[n:]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(headers, st.sampled_from([0, 1, 100, 5000, BIG])), min_size=1, max_size=4),
    st.lists(st.integers(min_value=1, max_value=3 * BIG), min_size=1, max_size=8),
    st.integers(min_value=2, max_value=4),
)
def test_decoders_sharing_the_scratch_keep_their_own_partial_frames(
    frames: list[tuple[dict[str, Any], int]], reads: list[int], count: int
) -> None:
    # Connections take turns reading into the thread's one scratch buffer,
    # each stopping anywhere in a frame: every decoder still gets its frames.
    streams = []
    for k in range(count):
        sent = [(header, bytes([k + 1]) * size) for header, size in frames]
        streams.append((sent, b"".join(encode_frame(h, b) for h, b in sent)))
    decoders = [FrameDecoder() for _ in range(count)]
    left = [memoryview(data) for _, data in streams]
    turn = 0
    while any(left):
        for k, decoder in enumerate(decoders):
            if left[k]:
                left[k] = read_once(decoder, left[k], reads[turn % len(reads)])
                turn += 1
    for (sent, _), decoder in zip(streams, decoders, strict=True):
        got = [(f.header.get("op"), bytes(f.body)) for f in decoder.frames()]
        assert got == [(h["op"], b) for h, b in sent]
        assert decoder.buffered == 0


def test_a_read_that_never_came_leaves_nothing_behind() -> None:
    # A transport asked for a buffer, then its read failed (EAGAIN): no
    # buffer_updated. Another connection reads into the same scratch meanwhile.
    first, second = FrameDecoder(), FrameDecoder()
    frame, other = (encode_frame({"op": "first", "id": 1}, b"first"),
                    encode_frame({"op": "echo", "id": 22222}, b"second"))  # fmt: skip
    first.get_buffer(-1).release()
    feed_in_place(second, other[:9], most=9)  # part of a frame stays with second
    feed_in_place(first, frame, most=len(frame))
    feed_in_place(second, other[9:], most=len(other))
    assert [bytes(f.body) for f in first.frames()] == [b"first"]
    assert [bytes(f.body) for f in second.frames()] == [b"second"]
    assert first.buffered == 0 and second.buffered == 0


def test_each_thread_has_its_own_scratch() -> None:
    def scratch_of_a_new_decoder() -> object:
        with FrameDecoder().get_buffer(-1) as view:
            return view.obj

    here = scratch_of_a_new_decoder()
    assert scratch_of_a_new_decoder() is here  # shared within the thread
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        there = pool.submit(scratch_of_a_new_decoder).result()
    assert there is not here


def test_a_reused_body_buffer_takes_the_next_body_of_that_size() -> None:
    one, two = b"\x01" * BIG, b"\x02" * BIG
    decoder = FrameDecoder()
    feed_in_place(decoder, encode_frame({"op": "data", "id": 1}, one), most=BIG)
    (first,) = decoder.frames()
    assert first.body == one
    decoder.reuse_body(first.body)
    feed_in_place(decoder, encode_frame({"op": "data", "id": 1}, two), most=BIG)
    (second,) = decoder.frames()
    assert second.body is first.body  # the same buffer, refilled
    assert second.body == two
    # A different size gets a buffer of its own.
    decoder.reuse_body(second.body)
    feed_in_place(decoder, encode_frame({"op": "data", "id": 1}, one + b"!"), most=BIG)
    (third,) = decoder.frames()
    assert third.body is not first.body and third.body == one + b"!"


def test_a_header_larger_than_the_scratch_buffer_is_received_whole() -> None:
    limits = Limits(max_header=4 * FrameDecoder.SCRATCH_SIZE)
    (frame,) = decode_all(raw_frame(header_of_length(3 * FrameDecoder.SCRATCH_SIZE)), limits)
    assert len(frame.header["pad"]) > 2 * FrameDecoder.SCRATCH_SIZE


def test_reading_in_place_after_a_violation_discards_input() -> None:
    decoder = FrameDecoder()
    feed_in_place(decoder, raw_frame(b"[]"), most=100)
    feed_in_place(decoder, encode_frame({"op": "echo", "id": 1}), most=100)
    assert decoder.buffered == 0
    with pytest.raises(ProtocolError):
        list(decoder.frames())


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(headers, st.sampled_from([0, 1, 100, BIG - 1, BIG, BIG + 1, 3 * BIG])),
        max_size=5,
    ),
    st.integers(min_value=1, max_value=4 * BIG),
)
def test_in_place_reads_give_the_frames_that_were_sent(
    frames: list[tuple[dict[str, Any], int]], most: int
) -> None:
    sent = [(header, bytes([len(header) % 251]) * size) for header, size in frames]
    data = b"".join(encode_frame(header, body) for header, body in sent)
    decoder = FrameDecoder()
    feed_in_place(decoder, data, most)
    got = list(decoder.frames())
    assert [(f.header.get("op"), bytes(f.body)) for f in got] == [(h["op"], b) for h, b in sent]
    assert decoder.buffered == 0

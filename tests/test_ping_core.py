"""UDP ping datagrams without I/O (docs/protocol.md §8)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.limits import MAX_PING_LEN
from tether.pingwire import (
    MIN_PING_LEN,
    PING_MAGIC,
    PONG_MAGIC,
    Ping,
    encode_ping,
    parse_pong,
    reply_to,
)


def test_ping_layout() -> None:
    ping = encode_ping(7, 123456789)
    assert len(ping) == MIN_PING_LEN == 16
    assert ping == b"TPNG" + (7).to_bytes(4, "big") + (123456789).to_bytes(8, "big")


@pytest.mark.parametrize(
    ("size", "length"),
    [(0, 16), (15, 16), (16, 16), (17, 17), (100, 100), (MAX_PING_LEN, 1024), (10**6, 1024)],
)
def test_encode_ping_size_is_clamped(size: int, length: int) -> None:
    ping = encode_ping(1, 2, size)
    assert len(ping) == length
    assert ping[16:] == bytes(length - 16)


def test_sequence_and_time_wrap_instead_of_failing() -> None:
    pong = reply_to(encode_ping(2**32 + 5, 2**64 + 9))
    assert pong is not None
    assert parse_pong(pong) == Ping(5, 9)


@pytest.mark.parametrize("size", [16, 17, 64, 1000, MAX_PING_LEN])
def test_reply_is_the_same_length_with_the_magic_changed(size: int) -> None:
    ping = encode_ping(42, 10**18, size)
    pong = reply_to(ping)
    assert pong is not None
    assert len(pong) == len(ping) == size
    assert pong[:4] == PONG_MAGIC
    assert pong[4:] == ping[4:]
    assert parse_pong(pong) == Ping(42, 10**18)


@pytest.mark.parametrize(
    "datagram",
    [
        b"",
        b"TPNG",
        PING_MAGIC + bytes(11),  # 15 bytes: one short
        PING_MAGIC + bytes(MAX_PING_LEN - 3),  # one over the limit
        PING_MAGIC + bytes(65000),
        b"XPNG" + bytes(12),
        b"tpng" + bytes(12),
        PONG_MAGIC + bytes(12),  # a reply is never answered: no ping-pong loops
        b"GET / HTTP/1.1\r\n\r\n",
    ],
    ids=["empty", "magic-only", "short", "one-over", "huge", "magic", "case", "pong", "http"],
)
def test_invalid_datagrams_get_no_reply(datagram: bytes) -> None:
    assert reply_to(datagram) is None


@pytest.mark.parametrize(
    "datagram",
    [b"", PONG_MAGIC + bytes(11), encode_ping(1, 2), b"XPNR" + bytes(12)],
    ids=["empty", "short", "a-ping", "magic"],
)
def test_parse_pong_refuses_what_is_not_a_reply(datagram: bytes) -> None:
    assert parse_pong(datagram) is None


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=1100),
        st.binary(max_size=1100).map(lambda b: PING_MAGIC + b),
        st.binary(max_size=1100).map(lambda b: PONG_MAGIC + b),
    )
)
def test_reply_is_never_larger_than_the_request(datagram: bytes) -> None:
    pong = reply_to(datagram)
    if pong is None:
        valid = MIN_PING_LEN <= len(datagram) <= MAX_PING_LEN and datagram[:4] == PING_MAGIC
        assert not valid
    else:
        assert len(pong) == len(datagram)
        assert pong == PONG_MAGIC + datagram[4:]
        assert parse_pong(pong) is not None
        assert reply_to(pong) is None


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=0, max_value=2**32 - 1),
    st.integers(min_value=0, max_value=2**64 - 1),
    st.integers(min_value=0, max_value=2000),
)
def test_ping_round_trip(seq: int, sent_ns: int, size: int) -> None:
    pong = reply_to(encode_ping(seq, sent_ns, size))
    assert pong is not None
    assert parse_pong(pong) == Ping(seq, sent_ns)


def test_tether_ping_stays_the_function_once_the_client_is_loaded() -> None:
    """The core module was tether/ping.py: importing the UDP client made
    `tether.ping` that module, so `tether.ping(address)` raised TypeError."""
    code = (
        "import inspect, tether, tether.asyncio.udp;"
        "print(callable(tether.ping), inspect.ismodule(tether.ping))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == ["True", "False"], result

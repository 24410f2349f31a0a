"""Parsing of HOST arguments: ``name[:port]``, ``[v6addr]:port``, ``unix:/path``."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.addresses import Address, parse_address
from tether.exceptions import UsageError
from tether.limits import DEFAULT_PORT


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com", Address(host="example.com", port=DEFAULT_PORT)),
        ("localhost:8000", Address(host="localhost", port=8000)),
        ("127.0.0.1:1", Address(host="127.0.0.1", port=1)),
        ("127.0.0.1:65535", Address(host="127.0.0.1", port=65535)),
        ("  host:22  ", Address(host="host", port=22)),
        ("[::1]:7447", Address(host="::1", port=7447)),
        ("[fe80::1%eth0]:9", Address(host="fe80::1%eth0", port=9)),
        ("[::1]", Address(host="::1", port=DEFAULT_PORT)),
        ("::1", Address(host="::1", port=DEFAULT_PORT)),
        ("2001:db8::42", Address(host="2001:db8::42", port=DEFAULT_PORT)),
        ("fe80::1%eth0", Address(host="fe80::1%eth0", port=DEFAULT_PORT)),
        ("::ffff:127.0.0.1", Address(host="::ffff:127.0.0.1", port=DEFAULT_PORT)),
        ("unix:/run/tether.sock", Address(path="/run/tether.sock")),
        ("unix:relative.sock", Address(path="relative.sock")),
        ("unix:/tmp/with:colon [x]", Address(path="/tmp/with:colon [x]")),
        ("中文.example:80", Address(host="中文.example", port=80)),
    ],
)
def test_parse_address(text: str, expected: Address) -> None:
    assert parse_address(text) == expected


def test_default_port_can_be_given() -> None:
    assert parse_address("h", default_port=1234) == Address(host="h", port=1234)
    assert parse_address("[::1]", default_port=1234) == Address(host="::1", port=1234)
    assert parse_address("h:99", default_port=1234).port == 99


def test_address_str_and_is_unix() -> None:
    assert str(parse_address("h:80")) == "h:80"
    assert str(parse_address("h")) == f"h:{DEFAULT_PORT}"
    assert str(parse_address("::1")) == f"[::1]:{DEFAULT_PORT}"
    assert str(parse_address("unix:/s")) == "unix:/s"
    assert parse_address("unix:/s").is_unix
    assert not parse_address("h").is_unix


@pytest.mark.parametrize("text", ["h:80", "[::1]:9", "::1", "unix:/a/b", "[2001:db8::1]:65535"])
def test_str_round_trips(text: str) -> None:
    address = parse_address(text)
    assert parse_address(str(address)) == address


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty host"),
        ("   ", "empty host"),
        ("host:0", "bad port in 'host:0': expected 1-65535"),
        ("host:65536", "bad port in 'host:65536': expected 1-65535"),
        ("host:99999999999999999999", "bad port in 'host:99999999999999999999': expected 1-65535"),
        ("host:abc", "bad port in 'host:abc': expected 1-65535"),
        ("host:", "bad port in 'host:': expected 1-65535"),
        ("host:-1", "bad port in 'host:-1': expected 1-65535"),
        ("host:+80", "bad port in 'host:+80': expected 1-65535"),
        ("host: 80", "bad port in 'host: 80': expected 1-65535"),
        ("[::1]:0", "bad port in '[::1]:0': expected 1-65535"),
        ("[::1]:", "bad port in '[::1]:': expected 1-65535"),
        ("[::1", "unclosed '[' in '[::1'"),
        ("[", "unclosed '[' in '['"),
        ("[]:80", "unclosed '[' in '[]:80'"),
        ("[::1]80", "expected ':port' after ']' in '[::1]80'"),
        ("unix:", "no socket path in 'unix:'"),
        (":80", "no host name in ':80'"),
        (":", "no host name in ':'"),
        ("127.0.0.1 :37119", "bad host name in '127.0.0.1 :37119'"),
        ("web 1:22", "bad host name in 'web 1:22'"),
        ("web1\t:22", "bad host name in 'web1\\t:22'"),
    ],
)
def test_parse_address_errors(text: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_address(text)
    assert str(info.value) == message
    assert info.value.code == "usage"


@pytest.mark.parametrize(
    "text", ["127.0.0.1:37119:9", "web1:22:", "host:port:extra", "1:2:3", "::1 %eth0", "::1%e 0"]
)
def test_more_than_one_colon_is_an_ipv6_address_or_a_usage_error(text: str) -> None:
    """Not a bare IPv6 address: a usage error, not a name for the resolver."""
    with pytest.raises(UsageError) as info:
        parse_address(text)
    assert str(info.value) == (
        f"bad address in {text!r}: more than one ':' and not an IPv6 address (write [v6addr]:port)"
    )


@pytest.mark.parametrize(
    "port",
    ["²", "٣", "８０", "1²"],
    ids=["superscript-two", "arabic-indic-three", "fullwidth-80", "one-superscript-two"],
)
def test_only_ascii_digits_make_a_port(port: str) -> None:
    # str.isdigit() is true for superscripts and other scripts' digits, which
    # int() either refuses (a bare ValueError) or reads as another number.
    with pytest.raises(UsageError):
        parse_address(f"host:{port}")
    with pytest.raises(UsageError):
        parse_address(f"[::1]:{port}")


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=30))
def test_any_text_is_an_address_or_a_usage_error(text: str) -> None:
    try:
        address = parse_address(text)
    except UsageError:
        return
    if address.is_unix:
        assert address.path
        assert address.host is None and address.port is None
    else:
        assert address.host
        assert address.port is not None and 1 <= address.port <= 65535

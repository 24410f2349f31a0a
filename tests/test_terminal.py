"""printable(): what tether prints of a name or message carries no control character."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.terminal import printable

CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\udc80-\udc9f]")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain name.txt", "plain name.txt"),
        ("a\x1b]0;title\x07b", "a\\x1b]0;title\\x07b"),  # retitles the window
        ("x\x1b[2Jy", "x\\x1b[2Jy"),  # clears the screen
        ("line\nbreak\ttab\rcr", "line\\x0abreak\\x09tab\\x0dcr"),
        ("del\x7f c1\x9b", "del\\x7f c1\\x9b"),  # \x9b: CSI of 8-bit terminals
        ("bytes\udc9b\udcff", "bytes\\x9b\udcff"),  # a non-UTF-8 name's 0x9b, 0xff
        ("naïve ünïcode ✓", "naïve ünïcode ✓"),
        ("[red]", "[red]"),
        # A message may quote a repr: its backslashes are escapes already.
        ("bad name 'a\\tb'", "bad name 'a\\tb'"),
    ],
)
def test_control_characters_are_escaped(text: str, shown: str) -> None:
    assert printable(text) == shown


def test_a_listing_doubles_backslashes() -> None:
    """In a listing a name holding a backslash and "x0a" must not print like
    one holding a newline (as ls -b)."""
    assert printable("new\\x0aline", backslashes=True) == "new\\\\x0aline"
    assert printable("new\nline", backslashes=True) == "new\\x0aline"


# Every category, lone surrogates (PEP 383's undecodable bytes) included.
NO_BACKSLASH = st.text(st.characters(exclude_characters="\\", exclude_categories=()))


@given(NO_BACKSLASH)
def test_no_control_character_survives_and_nothing_is_lost(text: str) -> None:
    out = printable(text)
    assert CONTROL.search(out) is None
    # Without backslashes of its own, every \xNN in the output is an escape:
    # undone, it gives the text back (a lone surrogate as the byte it stood for).
    undone = re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m[1], 16)), out)
    assert undone == re.sub("[\udc80-\udc9f]", lambda m: chr(ord(m[0]) - 0xDC00), text)


@given(st.text(st.characters(exclude_categories=())))
def test_any_text_comes_back_from_what_is_shown(text: str) -> None:
    """Unambiguous in a listing: undoing the escapes gives the name back."""
    out = printable(text, backslashes=True)
    assert CONTROL.search(out) is None
    undone = re.sub(r"\\\\|\\x([0-9a-f]{2})", lambda m: chr(int(m[1], 16)) if m[1] else "\\", out)
    assert undone == re.sub("[\udc80-\udc9f]", lambda m: chr(ord(m[0]) - 0xDC00), text)


@given(NO_BACKSLASH)
def test_text_without_controls_is_unchanged(text: str) -> None:
    if CONTROL.search(text) is None:
        assert printable(text) == text

"""Lexical path confinement (src/tether/paths.py): strings in, strings or errors out.

No file system is touched here: ``confine`` and ``is_within`` are pure, and
everything they promise is checked on strings alone, including a property
test over arbitrary paths built from the components that make escapes.
"""

from __future__ import annotations

import os
import posixpath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether import RemoteError
from tether.paths import confine, is_within, link_temp_name, looks_partial, partial_name

ROOT = "/srv/root"


def refused(root: str, requested: str) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        confine(root, requested)
    return info.value


# Accepted paths -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("a", "/srv/root/a"),
        ("a/b/c.txt", "/srv/root/a/b/c.txt"),
        (".", "/srv/root"),
        ("./", "/srv/root"),
        ("./a", "/srv/root/a"),
        ("a/./b", "/srv/root/a/b"),
        ("a/././b/.", "/srv/root/a/b"),
        ("a//b", "/srv/root/a/b"),
        ("a///b////c", "/srv/root/a/b/c"),
        ("a/b/", "/srv/root/a/b"),
        ("a/../b", "/srv/root/b"),
        ("a/b/../../c", "/srv/root/c"),
        ("a/..", "/srv/root"),
        ("...", "/srv/root/..."),  # a name, not a parent
        ("..a", "/srv/root/..a"),
        ("a..", "/srv/root/a.."),
        ("with space", "/srv/root/with space"),
        ("é/中文", "/srv/root/é/中文"),
        ("bad\udcffname", "/srv/root/bad\udcffname"),  # PEP 383: the byte 0xff
        ("/srv/root", "/srv/root"),
        ("/srv/root/", "/srv/root"),
        ("/srv/root/a", "/srv/root/a"),
        ("//srv//root//a//b", "/srv/root/a/b"),
        ("/srv/root/./a", "/srv/root/a"),
        ("/srv/root/a/../b", "/srv/root/b"),
        ("/srv/root/a/..", "/srv/root"),
    ],
)
def test_confine_accepts_paths_inside_the_root(requested: str, expected: str) -> None:
    assert confine(ROOT, requested) == expected


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("/etc/passwd", "/etc/passwd"),
        ("/", "/"),
        ("//", "/"),
        ("etc/passwd", "/etc/passwd"),
        (".", "/"),
        ("/srv/rootx", "/srv/rootx"),
        ("/a/b/../c", "/a/c"),
    ],
)
def test_root_slash_allows_everything(requested: str, expected: str) -> None:
    assert confine("/", requested) == expected


def test_result_is_normalized_and_absolute() -> None:
    for requested in ["a//b/./c/", "./x/../y", "/srv/root//q/./r"]:
        path = confine(ROOT, requested)
        assert path.startswith("/")
        assert posixpath.normpath(path) == path
        assert is_within(ROOT, path)


# Refused paths ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "requested",
    [
        "..",
        "../",
        "../x",
        "../root/x",  # climbs out, then back in: still an escape
        "a/../../x",
        "a/b/../../../x",
        "./../x",
        "a/./../../x",
        "..//x",
        "/etc/passwd",
        "/",
        "/srv",
        "/srv/",
        "/srv/root/../x",
        "/srv/root/../root/x",
        "/srv/root/a/../../x",
        "/srv/rootx",  # the prefix trick
        "/srv/rootx/a",
        "/srv/root2/a",
        "/srv/ro",
        "/srv/root\0/a",
        "a\0b",
        "\0",
        "a/b\0",
        "\ud800",  # lone surrogate outside PEP 383's \udc80-\udcff
        "a/\udfff",
        "\udc7f",
    ],
)
def test_confine_refuses_every_escape(requested: str) -> None:
    err = refused(ROOT, requested)
    assert err.code == "path_outside_root"
    assert "outside" in err.message


@pytest.mark.parametrize("requested", ["a\0b", "\ud800", "../x", "x/../.."])
def test_root_slash_still_refuses_nul_surrogates_and_climbing(requested: str) -> None:
    assert refused("/", requested).code == "path_outside_root"


def test_empty_path_is_a_bad_request() -> None:
    assert refused(ROOT, "").code == "bad_request"
    assert refused("/", "").code == "bad_request"


def test_error_message_is_bounded() -> None:
    err = refused(ROOT, "../" + "x" * 10_000)
    assert err.code == "path_outside_root"
    assert len(err.message) < 400


# is_within ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "inside"),
    [
        ("/srv/root", True),
        ("/srv/root/a", True),
        ("/srv/root/a/b", True),
        ("/srv/rootx", False),
        ("/srv/root2/a", False),
        ("/srv/ro", False),
        ("/srv", False),
        ("/", False),
        ("/etc/passwd", False),
        ("srv/root/a", False),
    ],
)
def test_is_within(path: str, inside: bool) -> None:
    assert is_within(ROOT, path) is inside


def test_is_within_root_slash() -> None:
    assert is_within("/", "/")
    assert is_within("/", "/etc/passwd")
    assert is_within("/", "/srv/root")
    assert not is_within("/", "relative")


# Property: never an answer outside the root -------------------------------------------

COMPONENTS = ["a", "b", "..", ".", "", "root", "rootx", "srv", "..."]
PREFIXES = ["", "/", "//", "/srv/root/", "/srv/root", "/srv/", "/srv/rootx/", "./"]


@st.composite
def request_paths(draw: st.DrawFn) -> str:
    prefix = draw(st.sampled_from(PREFIXES))
    parts = draw(st.lists(st.sampled_from(COMPONENTS), max_size=8))
    return prefix + "/".join(parts)


def lexical_target(root: str, requested: str) -> str:
    """Where the kernel's lexical reading of ``requested`` would land (no symlinks)."""
    if requested.startswith("/"):
        return posixpath.normpath("/" + requested.lstrip("/"))
    return posixpath.normpath(posixpath.join(root, requested))


@given(request_paths())
def test_confine_never_leaves_the_root(requested: str) -> None:
    try:
        path = confine(ROOT, requested)
    except RemoteError as exc:
        code = "bad_request" if requested == "" else "path_outside_root"
        assert exc.code == code
        return
    assert is_within(ROOT, path)
    parts = path.split("/")
    assert ".." not in parts
    assert "." not in parts
    assert "" not in parts[1:]  # no doubled or trailing slash
    assert path == lexical_target(ROOT, requested)


@given(request_paths())
def test_confine_refuses_whatever_lands_outside(requested: str) -> None:
    if requested and not is_within(ROOT, lexical_target(ROOT, requested)):
        assert refused(ROOT, requested).code == "path_outside_root"


@given(st.lists(st.sampled_from(["a", "b", ".", "", "...", "é", "x y"]), min_size=1, max_size=8))
def test_relative_paths_without_dotdot_are_always_accepted(parts: list[str]) -> None:
    requested = "/".join(parts)
    if not requested or requested.startswith("/"):
        return  # empty, or absolute: not what this property is about
    path = confine(ROOT, requested)
    assert path == posixpath.normpath(posixpath.join(ROOT, requested))


@given(st.text(max_size=30))
def test_confine_on_arbitrary_text(requested: str) -> None:
    try:
        path = confine(ROOT, requested)
    except RemoteError as exc:
        assert exc.code in ("bad_request", "path_outside_root")
        assert (exc.code == "bad_request") == (requested == "")
        return
    assert "\0" not in path
    assert is_within(ROOT, path)
    assert ".." not in path.split("/")
    path.encode("utf-8", "surrogateescape")  # a name the OS can hold


@pytest.mark.parametrize("name", ["f", "n" * 242, "n" * 243, "n" * 255, "é" * 127, "\udcff" * 255])
def test_names_beside_a_file_are_file_names_too(name: str) -> None:
    """A partial file's or a link's temporary name fits in 255 bytes for any
    name that does, is the same each time (a resume finds it), and differs
    between names; short names keep their readable form."""
    for made in (partial_name(name), link_temp_name(name)):
        assert len(os.fsencode(made)) <= 255 and "/" not in made
    assert partial_name(name) == partial_name(name)
    assert partial_name(name) != partial_name(name + "x") or len(os.fsencode(name)) >= 255
    if len(os.fsencode(name)) <= 242:
        assert partial_name(name) == f".{name}.tether-part"
        assert link_temp_name(name) == f"{name}.tether-link"
    assert looks_partial(partial_name(name))

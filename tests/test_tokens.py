"""Where tokens live: the state directory, token files, the environment."""

from __future__ import annotations

import errno
import os
import pwd
import stat
from pathlib import Path

import pytest

from conftest import PAGE, SmallDisk
from tether.exceptions import UsageError
from tether.tokens import (
    TOKEN_ENV,
    add_token,
    create_token_file,
    default_state_dir,
    find_client_token,
    load_tokens,
    read_token_file,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def no_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An environment with no token anywhere; returns the (empty) XDG state home."""
    state_home = tmp_path / "xdg-state"
    state_home.mkdir()
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(state_home))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return state_home


def test_create_token_file_modes_and_reuse(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        state = tmp_path / "a" / "state"
        token, path, created = create_token_file(state)
    finally:
        os.umask(old_umask)
    assert created is True
    assert path == state / "token"
    assert mode(state) == 0o700
    assert mode(path) == 0o600
    assert path.read_text(encoding="utf-8") == token + "\n"
    assert len(token) >= 40  # 32 random bytes, url-safe base64
    assert token.replace("-", "").replace("_", "").isalnum()

    again, path2, created2 = create_token_file(state)
    assert (again, path2, created2) == (token, path, False)
    assert path.read_text(encoding="utf-8") == token + "\n"


def test_tokens_are_random(tmp_path: Path) -> None:
    one, _, _ = create_token_file(tmp_path / "one")
    two, _, _ = create_token_file(tmp_path / "two")
    assert one != two


def test_existing_token_file_is_kept(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("  given-token \n", encoding="utf-8")
    (tmp_path / "token").chmod(0o600)
    assert create_token_file(tmp_path) == ("given-token", tmp_path / "token", False)
    (tmp_path / "token").chmod(0o640)  # others may read it: refused, as ssh refuses a key
    with pytest.raises(UsageError, match="chmod 600"):
        create_token_file(tmp_path)


def test_read_token_file_strips_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_text("\n  abc.def  \n\n", encoding="utf-8")
    assert read_token_file(path) == "abc.def"
    assert read_token_file(str(path)) == "abc.def"


def test_read_token_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "missing"
    with pytest.raises(UsageError) as info:
        read_token_file(path)
    assert str(info.value) == f"cannot read token file {path}: No such file or directory"
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_read_token_file_with_a_byte_order_mark(tmp_path: Path) -> None:
    """Some editors start a UTF-8 file with a BOM: it is no part of the token
    (it was, and the token was refused as wrong)."""
    path = tmp_path / "t"
    path.write_bytes(b"\xef\xbb\xbfabc.def\r\n")
    assert read_token_file(path) == "abc.def"


@pytest.mark.parametrize("content", [b"", b"   \n\t\n"], ids=["empty", "whitespace"])
def test_read_token_file_empty(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "token"
    path.write_bytes(content)
    with pytest.raises(UsageError) as info:
        read_token_file(path)
    assert str(info.value) == f"token file {path} is empty"


def test_read_token_file_directory_and_bad_encoding(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read token file"):
        read_token_file(tmp_path)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\xff\xfe token")
    with pytest.raises(UsageError, match="is not UTF-8 text"):
        read_token_file(bad)


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "tether"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_STATE_HOME", "")
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "tether"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "tether"


def test_default_state_dir_needs_an_absolute_home_and_xdg_state_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``HOME= tether ...`` put the state directory under /, a relative HOME
    or XDG_STATE_HOME under the current directory."""
    home = pwd.getpwuid(os.getuid()).pw_dir
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    for value in ("", "relative/home", "~"):
        monkeypatch.setenv("HOME", value)
        assert default_state_dir() == Path(home, ".local", "state", "tether"), value
    monkeypatch.delenv("HOME")
    assert default_state_dir() == Path(home, ".local", "state", "tether")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_STATE_HOME", "relative/state")  # ignored, as the XDG spec says
    assert default_state_dir() == tmp_path / ".local" / "state" / "tether"


def test_create_token_file_on_a_full_disk_leaves_nothing(small_disk: SmallDisk) -> None:
    """A full disk at first start left an empty token file, and every later
    start failed on it ("token file ... is empty")."""
    state = small_disk.path / "state"
    small_disk.fill()
    with pytest.raises(OSError) as info:
        create_token_file(state)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(state / "token")  # the message names the file
    assert os.listdir(state) == []  # no empty token, no temporary file
    small_disk.free()
    token, path, created = create_token_file(state)
    assert created is True
    assert read_token_file(path) == token
    assert mode(path) == 0o600
    assert os.listdir(state) == ["token"]


def test_a_token_added_after_a_last_line_without_newline_is_a_line_of_its_own(
    tmp_path: Path,
) -> None:
    """It was appended to that line, which then had three fields: the new
    token never worked and the agent refused to start."""
    path = tmp_path / "tokens"
    alice = "a" * 43
    path.write_text(f"alice {alice}")
    path.chmod(0o600)
    bob = add_token(path, "bob")
    assert path.read_text() == f"alice {alice}\nbob {bob}\n"
    assert load_tokens(path) == {alice: "alice", bob: "bob"}


def test_a_token_that_does_not_fit_on_the_disk_is_not_added_in_part(
    small_disk: SmallDisk,
) -> None:
    """The disk filled up in the middle of the line: what fitted stayed, and
    "bob AB" is a line with a token of its own, two characters long."""
    path = small_disk.path / "tokens"
    before = "# " + "x" * (PAGE - 9) + "\n"  # 6 bytes short of a page
    path.write_text(before)
    path.chmod(0o600)
    small_disk.fill()
    with pytest.raises(OSError) as info:
        add_token(path, "bob")
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(path)
    assert path.read_text() == before
    small_disk.free()
    bob = add_token(path, "bob")
    assert load_tokens(path) == {bob: "bob"}


def test_a_token_file_that_could_not_be_made_is_not_left_empty(small_disk: SmallDisk) -> None:
    """No tokens file, and no room for its first line: as it was is no file
    at all (an empty one was left behind)."""
    path = small_disk.path / "tokens"
    small_disk.fill()
    with pytest.raises(OSError) as info:
        add_token(path, "bob")
    assert info.value.errno == errno.ENOSPC
    assert not path.exists()


def test_find_client_token_precedence(
    no_token_sources: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local_token, _, _ = create_token_file(no_token_sources / "tether")
    token_file = tmp_path / "file-token"
    token_file.write_text("from-file\n", encoding="utf-8")
    monkeypatch.setenv(TOKEN_ENV, "  from-env  ")

    assert find_client_token("explicit", token_file) == "explicit"
    assert find_client_token(None, token_file) == "from-file"
    assert find_client_token() == "from-env"
    monkeypatch.delenv(TOKEN_ENV)
    assert find_client_token() == local_token
    monkeypatch.setenv(TOKEN_ENV, "   ")  # blank is the same as unset
    assert find_client_token() == local_token


def test_explicit_token_wins_even_over_a_missing_file(
    no_token_sources: Path, tmp_path: Path
) -> None:
    assert find_client_token("explicit", tmp_path / "missing") == "explicit"


def test_empty_explicit_token_falls_through(
    no_token_sources: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert find_client_token("") == "from-env"


def test_a_named_token_file_that_fails_is_an_error_not_a_fallback(
    no_token_sources: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Asking for a file and silently using another token would be a surprise.
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    with pytest.raises(UsageError, match="cannot read token file"):
        find_client_token(None, tmp_path / "missing")
    (tmp_path / "empty").write_text("", encoding="utf-8")
    with pytest.raises(UsageError, match="is empty"):
        find_client_token(None, tmp_path / "empty")


def test_no_token_anywhere(no_token_sources: Path) -> None:
    with pytest.raises(UsageError) as info:
        find_client_token()
    message = str(info.value)
    assert "no token" in message
    assert "--token-file" in message
    assert TOKEN_ENV in message
    assert str(no_token_sources / "tether" / "token") in message


def test_empty_local_token_file_is_an_error(no_token_sources: Path) -> None:
    (no_token_sources / "tether").mkdir()
    (no_token_sources / "tether" / "token").write_text("\n", encoding="utf-8")
    with pytest.raises(UsageError, match="is empty"):
        find_client_token()

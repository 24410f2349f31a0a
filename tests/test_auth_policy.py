"""Sans-I/O units of the security issue: who may connect, what may run, which
certificate is trusted.

``auth.FailureLimiter`` and ``auth.Authenticator`` (tokens and the brake on
guessing), ``policy.ExecPolicy`` (``--no-exec``, ``--allow``), the named tokens
file (``tokens.load_tokens`` / ``add_token``) and the client's known-hosts
file (``known_hosts``). Time is passed in, so nothing here sleeps.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.auth import Authenticator, AuthFailure, FailureLimiter
from tether.exceptions import UsageError
from tether.known_hosts import (
    KnownHost,
    add_known_host,
    default_known_hosts,
    fingerprint,
    lookup_known_host,
    normalize_fingerprint,
)
from tether.policy import ExecPolicy
from tether.tokens import add_token, check_token_name, load_tokens

A = "192.0.2.1"  # documentation addresses: these tests never send anything
B = "192.0.2.2"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_0() -> Iterator[None]:
    """A umask that hides nothing: files are private only if the code makes them so."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# FailureLimiter ------------------------------------------------------------------------


def test_limiter_blocks_after_max_failures_not_before() -> None:
    limiter = FailureLimiter(max_failures=5, window=60.0, block_seconds=60.0)
    for i in range(4):
        limiter.failed(A, 100.0 + i)
        assert limiter.blocked(A, 100.0 + i) == 0.0, f"blocked after only {i + 1} failures"
    limiter.failed(A, 104.0)
    wait = limiter.blocked(A, 104.0)
    assert wait == pytest.approx(60.0)
    assert limiter.blocked(A, 130.0) == pytest.approx(34.0)  # the block counts down


def test_limiter_window_slides() -> None:
    limiter = FailureLimiter(max_failures=3, window=60.0, block_seconds=60.0)
    limiter.failed(A, 0.0)
    limiter.failed(A, 30.0)
    # The first failure has left the window: two in the last minute, not three.
    limiter.failed(A, 61.0)
    assert limiter.blocked(A, 61.0) == 0.0
    # Three within one minute (30, 61, 89): blocked.
    limiter.failed(A, 89.0)
    assert limiter.blocked(A, 89.0) > 0


def test_limiter_failures_spread_out_never_block() -> None:
    limiter = FailureLimiter(max_failures=3, window=60.0, block_seconds=60.0)
    for i in range(50):
        limiter.failed(A, i * 31.0)  # never three within a minute
        assert limiter.blocked(A, i * 31.0) == 0.0


def test_limiter_block_expires_and_starts_afresh() -> None:
    limiter = FailureLimiter(max_failures=2, window=60.0, block_seconds=10.0)
    limiter.failed(A, 0.0)
    limiter.failed(A, 1.0)
    assert limiter.blocked(A, 1.0) == pytest.approx(10.0)
    assert limiter.blocked(A, 10.5) == pytest.approx(0.5)
    assert limiter.blocked(A, 11.0) == 0.0
    assert limiter.blocked(A, 500.0) == 0.0
    # The failures that caused the block do not count again: one more is not two.
    limiter.failed(A, 12.0)
    assert limiter.blocked(A, 12.0) == 0.0
    limiter.failed(A, 13.0)
    assert limiter.blocked(A, 13.0) > 0


def test_limiter_other_address_unaffected() -> None:
    limiter = FailureLimiter(max_failures=2, window=60.0, block_seconds=60.0)
    limiter.failed(A, 0.0)
    limiter.failed(A, 0.5)
    assert limiter.blocked(A, 1.0) > 0
    assert limiter.blocked(B, 1.0) == 0.0
    limiter.failed(B, 1.0)  # one failure of its own: still below the limit
    assert limiter.blocked(B, 1.0) == 0.0


def test_limiter_memory_bounded_under_address_spray() -> None:
    limiter = FailureLimiter(max_failures=10, window=60.0, block_seconds=60.0)
    for i in range(12_000):
        limiter.failed(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", float(i) / 1000)
    # Long after, one more failure sweeps the histories that left the window.
    limiter.failed(A, 10_000.0)
    assert len(limiter._failures) <= 10_001


def test_limiter_forgets_expired_histories_and_blocks_of_any_number_of_addresses() -> None:
    """30,000 addresses, each blocked: once their windows and blocks are
    over, one more failure leaves nothing of them. Blocks were never dropped
    (only when the same address came back), and below 10,000 addresses no
    history was."""
    limiter = FailureLimiter(max_failures=2, window=60.0, block_seconds=60.0)
    for i in range(30_000):
        address = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        limiter.failed(address, i / 1000)
        limiter.failed(address, i / 1000)
    assert len(limiter._blocked_until) == 30_000
    limiter.failed(B, 200.0)
    assert (len(limiter._failures), len(limiter._blocked_until)) == (1, 0)
    assert limiter.blocked(A, 200.0) == 0.0 and limiter.blocked(B, 200.0) == 0.0


# Authenticator ---------------------------------------------------------------------------

ALICE = "alice-token-0123456789abcdefghijklmnopqrstuv"
BOB = "bob-token-0123456789abcdefghijklmnopqrstuvwx"


def authenticator(max_failures: int = 10) -> Authenticator:
    return Authenticator(
        {ALICE: "alice", BOB: "bob"}, FailureLimiter(max_failures=max_failures, window=60.0)
    )


def test_right_token_maps_to_its_name() -> None:
    auth = authenticator()
    assert auth.check(ALICE, A, 0.0) == "alice"
    assert auth.check(BOB, A, 0.0) == "bob"
    assert auth.check(BOB, None, 0.0) == "bob"


@pytest.mark.parametrize(
    "token",
    [
        "",
        " ",
        "wrong",
        ALICE[:-1],  # a prefix
        ALICE + "x",  # an extension
        ALICE + "\n",
        " " + ALICE,
        ALICE.upper(),
        ALICE + "\0",
        "\0",
        "\udc80",  # a lone surrogate: JSON can carry it, UTF-8 cannot
        ALICE[:5] + "\ud800" + ALICE[6:],
        "alice",  # a name is not a token
        "alice " + ALICE,  # a tokens-file line is not a token
        "é" * 1000,
        "x" * 100_000,
    ],
    ids=repr,
)
def test_wrong_or_malformed_token_never_maps_to_an_identity(token: str) -> None:
    auth = authenticator()
    result = auth.check(token, A, 0.0)
    assert isinstance(result, AuthFailure)
    # The reason is for logs and the client: it never repeats what was offered.
    if token.strip():
        assert token.strip() not in result.reason
    assert ALICE not in result.reason and BOB not in result.reason


def test_empty_token_matches_nothing_even_an_empty_entry() -> None:
    # However the table got an empty entry, an empty token still is no identity.
    auth = Authenticator({"": "ghost", ALICE: "alice"})
    assert isinstance(auth.check("", A, 0.0), AuthFailure)
    assert isinstance(auth.check("", None, 0.0), AuthFailure)


def test_no_tokens_at_all_authenticates_nobody() -> None:
    auth = Authenticator({})
    for token in ("", "x", ALICE):
        assert isinstance(auth.check(token, A, 0.0), AuthFailure)


def test_blocked_address_refused_even_with_right_token() -> None:
    auth = authenticator(max_failures=3)
    for i in range(3):
        assert isinstance(auth.check(f"guess-{i}", A, float(i)), AuthFailure)
    refused = auth.check(ALICE, A, 3.0)
    assert isinstance(refused, AuthFailure)
    assert "too many failed attempts" in refused.reason
    assert ALICE not in refused.reason
    # Another address, with the same right token: fine.
    assert auth.check(ALICE, B, 3.0) == "alice"
    # After the block ends (60 s by default), the right token works again.
    assert auth.check(ALICE, A, 3.0 + 61.0) == "alice"


def test_failures_below_limit_do_not_block_right_token() -> None:
    auth = authenticator(max_failures=3)
    for i in range(2):
        assert isinstance(auth.check(f"guess-{i}", A, float(i)), AuthFailure)
    assert auth.check(ALICE, A, 2.0) == "alice"


def test_successes_do_not_count_as_failures() -> None:
    auth = authenticator(max_failures=2)
    for i in range(20):
        assert auth.check(ALICE, A, float(i)) == "alice"


def test_unix_peers_are_never_blocked() -> None:
    auth = authenticator(max_failures=2)
    for i in range(50):
        assert isinstance(auth.check(f"guess-{i}", None, float(i)), AuthFailure)
    assert auth.check(ALICE, None, 50.0) == "alice"
    # And their failures were not counted against some shared "None" address.
    assert auth.check(ALICE, A, 50.0) == "alice"
    assert auth.limiter.blocked("None", 50.0) == 0.0


def test_tokens_can_be_replaced_while_running() -> None:
    auth = authenticator()
    auth.tokens = {BOB: "bob"}  # what the agent does when the tokens file changes
    assert isinstance(auth.check(ALICE, A, 0.0), AuthFailure)
    assert auth.check(BOB, A, 0.0) == "bob"


# ExecPolicy -----------------------------------------------------------------------------


def test_policy_disabled_refuses_everything() -> None:
    policy = ExecPolicy(enabled=False)
    for program, resolved in [("echo", "/bin/echo"), ("/bin/sh", "/bin/sh"), ("x", None)]:
        reason = policy.refusal(program, resolved)
        assert reason is not None and "disabled" in reason
    # Even with an allow-list that would match.
    assert ExecPolicy(enabled=False, allow=("*", "/*")).refusal("echo", "/bin/echo") is not None


def test_policy_empty_allow_allows_everything() -> None:
    policy = ExecPolicy()
    for program, resolved in [
        ("echo", "/bin/echo"),
        ("./ls", "/root/ls"),
        ("/bin/sh", "/bin/sh"),
        ("missing", None),
    ]:
        assert policy.refusal(program, resolved) is None


def test_policy_bare_pattern_matches_bare_argv0_only() -> None:
    policy = ExecPolicy(allow=("ls", "python3*"))
    assert policy.refusal("ls", "/usr/bin/ls") is None
    assert policy.refusal("python3", "/usr/bin/python3") is None
    assert policy.refusal("python3.11", "/usr/bin/python3.11") is None
    refused = [
        ("./ls", "/srv/root/ls"),  # a path the client wrote is not "ls"
        ("/usr/bin/ls", "/usr/bin/ls"),
        ("bin/ls", "/srv/root/bin/ls"),
        ("../ls", "/srv/ls"),
        ("lsof", "/usr/bin/lsof"),
        ("LS", "/usr/bin/LS"),
        ("cat", "/usr/bin/cat"),
        ("/bin/sh", "/bin/sh"),  # --shell
    ]
    for program, resolved in refused:
        reason = policy.refusal(program, resolved)
        assert reason is not None and "not allowed" in reason, (program, reason)


def test_policy_slash_pattern_matches_resolved_path() -> None:
    policy = ExecPolicy(allow=("/usr/bin/*",))
    assert policy.refusal("ls", "/usr/bin/ls") is None
    assert policy.refusal("/usr/bin/ls", "/usr/bin/ls") is None
    # What the client wrote does not matter, only where the agent found it.
    assert policy.refusal("ls", "/usr/local/bin/ls") is not None
    assert policy.refusal("./ls", "/srv/root/ls") is not None
    assert policy.refusal("/usr/bin-evil/ls", "/usr/bin-evil/ls") is not None
    # Not found in the agent's PATH: nothing to match, refused.
    assert policy.refusal("ls", None) is not None
    assert policy.refusal("/usr/bin/nothing", None) is not None


def test_policy_exact_path_pattern() -> None:
    policy = ExecPolicy(allow=("/usr/bin/env",))
    assert policy.refusal("env", "/usr/bin/env") is None
    assert policy.refusal("env", "/bin/env") is not None
    assert policy.refusal("envsubst", "/usr/bin/envsubst") is not None


def test_policy_shell_needs_bin_sh() -> None:
    # The agent asks about program "/bin/sh" for --shell.
    assert ExecPolicy(allow=("echo",)).refusal("/bin/sh", "/bin/sh") is not None
    assert ExecPolicy(allow=("sh",)).refusal("/bin/sh", "/bin/sh") is not None
    assert ExecPolicy(allow=("echo", "/bin/sh")).refusal("/bin/sh", "/bin/sh") is None
    assert ExecPolicy(allow=("/bin/*",)).refusal("/bin/sh", "/bin/sh") is None


def test_policy_refusal_names_the_program() -> None:
    reason = ExecPolicy(allow=("echo",)).refusal("cat", "/usr/bin/cat")
    assert reason is not None and "cat" in reason


# tokens file ----------------------------------------------------------------------------


def test_add_token_creates_private_file_and_loads(tmp_path: Path, umask_0: None) -> None:
    path = tmp_path / "state" / "tokens"
    alice = add_token(path, "alice")
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert re.fullmatch(r"[A-Za-z0-9_-]{40,}", alice), alice
    assert path.read_text() == f"alice {alice}\n"
    bob = add_token(path, "bob@laptop")
    assert bob != alice
    assert mode(path) == 0o600
    assert load_tokens(path) == {alice: "alice", bob: "bob@laptop"}


def test_add_token_duplicate_name_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    first = add_token(path, "alice")
    with pytest.raises(UsageError, match="alice"):
        add_token(path, "alice")
    assert load_tokens(path) == {first: "alice"}


@pytest.mark.parametrize(
    "name",
    ["", "a b", "al/ice", "x" * 65, "ålice", "name:1", "tab\tname", "new\nline", "#x", "a=b"],
    ids=repr,
)
def test_bad_token_names_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / "tokens"
    with pytest.raises(UsageError):
        add_token(path, name)
    assert not path.exists()
    with pytest.raises(UsageError):
        check_token_name(name)


@pytest.mark.parametrize("name", ["a", "x" * 64, "alice", "ci-runner_2", "bob@host.example"])
def test_good_token_names(name: str) -> None:
    check_token_name(name)


def test_default_is_reserved_for_the_agents_own_token(tmp_path: Path) -> None:
    # "default" is the identity of the agent's own token: a named token may
    # not pass itself off as it in the audit log.
    with pytest.raises(UsageError, match="default"):
        check_token_name("default")
    path = tmp_path / "tokens"
    with pytest.raises(UsageError):
        add_token(path, "default")
    path.write_text("default tok-a\n")
    path.chmod(0o600)
    with pytest.raises(UsageError):
        load_tokens(path)


def test_load_tokens_refuses_group_or_world_readable(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("alice sometoken\n")
    for bad in (0o644, 0o640, 0o604, 0o660, 0o606):
        path.chmod(bad)
        with pytest.raises(UsageError, match="chmod") as info:
            load_tokens(path)
        assert "sometoken" not in str(info.value)
        assert str(path) in str(info.value)
    path.chmod(0o600)
    assert load_tokens(path) == {"sometoken": "alice"}


def test_add_token_refuses_unsafe_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("alice sometoken\n")
    path.chmod(0o644)
    with pytest.raises(UsageError, match="chmod"):
        add_token(path, "bob")
    assert path.read_text() == "alice sometoken\n"


def test_load_tokens_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# who may connect\n\nalice tok-a\n   \n  # indented comment\nbob tok-b\n")
    path.chmod(0o600)
    assert load_tokens(path) == {"tok-a": "alice", "tok-b": "bob"}


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("alice\n", 1),
        ("alice tok extra\n", 1),
        ("# ok\nalice tok-a\nbob\n", 3),
        ("alice tok-a\nbob tok-b third\n", 2),
    ],
)
def test_load_tokens_malformed_lines(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(UsageError, match=f"line {line}"):
        load_tokens(path)


@pytest.mark.parametrize(
    "text",
    [
        "alice tok-a\nalice tok-b\n",  # one name, two tokens
        "alice tok-a\nbob tok-a\n",  # one token, two names: whose is it?
    ],
)
def test_load_tokens_duplicates_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(UsageError, match="line 2"):
        load_tokens(path)


def test_load_tokens_bad_name_in_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("al/ice tok-a\n")
    path.chmod(0o600)
    with pytest.raises(UsageError, match="name"):
        load_tokens(path)


def test_load_tokens_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read"):
        load_tokens(tmp_path / "nothing")


def test_load_tokens_does_not_follow_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.write_text("alice tok-a\n")
    real.chmod(0o600)
    link = tmp_path / "tokens"
    link.symlink_to(real)
    with pytest.raises(UsageError):
        load_tokens(link)


# known_hosts ----------------------------------------------------------------------------

DER = b"not really a certificate, but bytes all the same"
DIGEST = hashlib.sha256(DER).digest()
PRINT = "SHA256:" + base64.b64encode(DIGEST).decode().rstrip("=")


def test_fingerprint_format() -> None:
    assert fingerprint(DER) == PRINT
    assert re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", PRINT)
    assert fingerprint(DER + b"x") != PRINT


@pytest.mark.parametrize(
    "text",
    [
        PRINT,
        PRINT + "=",  # padded base64
        "  " + PRINT + "\n",
        DIGEST.hex(),
        DIGEST.hex().upper(),
        ":".join(f"{b:02x}" for b in DIGEST),
        ":".join(f"{b:02X}" for b in DIGEST),
        "SHA256:" + DIGEST.hex(),
    ],
)
def test_normalize_fingerprint_accepts(text: str) -> None:
    assert normalize_fingerprint(text) == PRINT


@pytest.mark.parametrize(
    "text",
    [
        "",
        "SHA256:",
        "junk",
        "SHA256:junk",
        PRINT[:-1],  # 31 and a bit bytes
        PRINT + "AAAA",  # 35 bytes
        DIGEST.hex()[:-1],
        DIGEST.hex() + "0",
        "g" * 64,
        "MD5:" + DIGEST.hex(),
        "SHA256:" + base64.b64encode(hashlib.sha1(DER).digest()).decode(),
        "SHA256:" + base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode().rstrip("="),
        "SHA256:" + PRINT[7:20] + " " + PRINT[20:],
    ],
)
def test_normalize_fingerprint_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        normalize_fingerprint(text)


def test_known_hosts_add_and_lookup(tmp_path: Path, umask_0: None) -> None:
    path = tmp_path / "config" / "tether" / "known_hosts"
    assert lookup_known_host(path, "127.0.0.1:7447") is None  # no file yet
    add_known_host(path, "127.0.0.1:7447", PRINT)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert path.read_text() == f"127.0.0.1:7447 {PRINT}\n"
    other = fingerprint(b"other")
    add_known_host(path, "[::1]:7447", other)
    assert lookup_known_host(path, "127.0.0.1:7447") == KnownHost("127.0.0.1:7447", PRINT, 1)
    assert lookup_known_host(path, "[::1]:7447") == KnownHost("[::1]:7447", other, 2)
    # Exact host strings: another port, or a name for the same address, is another host.
    assert lookup_known_host(path, "127.0.0.1:7448") is None
    assert lookup_known_host(path, "localhost:7447") is None
    assert lookup_known_host(path, "127.0.0.1") is None


def test_known_hosts_names_have_no_case_and_lines_end_at_newlines(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(f"# a comment\u2028with a line separator\fand a form feed\nWeb1:7447 {PRINT}\n")
    assert lookup_known_host(path, "web1:7447") == KnownHost("web1:7447", PRINT, 2)
    assert lookup_known_host(path, "WEB1:7447") == KnownHost("WEB1:7447", PRINT, 2)
    add_known_host(path, "DB.Example:7447", PRINT)
    assert path.read_text().endswith(f"\ndb.example:7447 {PRINT}\n")
    # A Unix socket's path keeps its case.
    add_known_host(path, "unix:/run/A.sock", PRINT)
    assert lookup_known_host(path, "unix:/run/A.sock") is not None
    assert lookup_known_host(path, "unix:/run/a.sock") is None


def test_known_hosts_comments_ignored_and_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(
        "# pinned agents\n"
        f"#127.0.0.1:7447 {fingerprint(b'commented out')}\n"
        "\n"
        "onlyhost\n"
        f"web1:7447 {fingerprint(b'web1')}\n"
        f"127.0.0.1:7447 {PRINT}\n"
    )
    found = lookup_known_host(path, "127.0.0.1:7447")
    assert found == KnownHost("127.0.0.1:7447", PRINT, 6)
    assert lookup_known_host(path, "#127.0.0.1:7447") is None
    assert lookup_known_host(path, "onlyhost") is None
    add_known_host(path, "db:7447", PRINT)
    assert lookup_known_host(path, "db:7447") == KnownHost("db:7447", PRINT, 7)
    assert path.read_text().startswith("# pinned agents\n")  # comments kept


def test_default_known_hosts_under_xdg_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert default_known_hosts() == str(tmp_path / "cfg" / "tether" / "known_hosts")
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_known_hosts() == str(tmp_path / "home" / ".config" / "tether" / "known_hosts")


def test_default_known_hosts_needs_an_absolute_home_and_xdg_config_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``HOME= tether exec`` pinned agents in /.config/tether/known_hosts, a
    relative HOME or XDG_CONFIG_HOME in a file under the current directory."""
    home = pwd.getpwuid(os.getuid()).pw_dir
    monkeypatch.delenv("XDG_CONFIG_HOME")
    for value in ("", "relative/home"):
        monkeypatch.setenv("HOME", value)
        assert default_known_hosts() == os.path.join(home, ".config", "tether", "known_hosts")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/config")  # ignored, as the XDG spec says
    assert default_known_hosts() == str(tmp_path / ".config" / "tether" / "known_hosts")


def test_a_pin_after_a_last_line_without_newline_is_a_line_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(f"web1:7447 {PRINT}")
    add_known_host(path, "db:7447", PRINT)
    assert path.read_text() == f"web1:7447 {PRINT}\ndb:7447 {PRINT}\n"
    assert lookup_known_host(path, "db:7447") == KnownHost("db:7447", PRINT, 2)

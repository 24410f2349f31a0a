"""The command line when something local goes wrong: its own output, its stdin,
its arguments; and exit codes a shell user relies on.

Real ``tether`` processes (``python -m tether``) against a real agent, with
real pipes, ``/dev/full`` and descriptors set up as a shell or a wrapper would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Agent, check_clean_log, start_agent

TETHER = [sys.executable, "-m", "tether"]
TIMEOUT = 60.0


def tether(agent: Agent, *args: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    """``python -m tether ARGS``; stdout and stderr captured unless given."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.run([*TETHER, *args], env=agent.env, timeout=TIMEOUT, **kwargs)  # type: ignore[call-overload, no-any-return]


def in_shell(agent: Agent, script: str) -> subprocess.CompletedProcess[bytes]:
    """``script`` run by bash, with ``$T`` the tether command and ``$H`` the agent."""
    env = {**agent.env, "T": " ".join(TETHER), "H": agent.host}
    return subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, timeout=TIMEOUT, check=False
    )


@pytest.mark.parametrize(
    "args",
    [["exec", "{host}", "--", "echo", "hi"], ["ls", "{host}:."], ["echo", "{host}", "hi"]],
    ids=["exec", "ls", "echo"],
)
def test_output_that_cannot_be_written_is_one_line_and_255(agent: Agent, args: list[str]) -> None:
    """stdout on a full device (ENOSPC): one line, 255, no traceback; the
    remote command's exit code 1 would have been indistinguishable."""
    (agent.root / "file").write_text("x")
    with open("/dev/full", "wb") as full:
        r = tether(
            agent, *(a.format(host=agent.host) for a in args), stdout=full, stderr=subprocess.PIPE
        )
    assert r.returncode == 255
    assert r.stderr.count(b"\n") == 1, r.stderr
    assert b"No space left on device" in r.stderr
    assert b"Traceback" not in r.stderr


@pytest.mark.parametrize("command", ["ls $H:many", "ping $H -c 5 -i 0.05"])
def test_a_reader_that_goes_away_is_141_quietly(agent: Agent, command: str) -> None:
    """As ``tether exec ... | head`` and as a process killed by SIGPIPE: 141,
    nothing on stderr (``ls`` and ``ping`` exited 1 before)."""
    many = agent.root / "many"
    many.mkdir()
    for i in range(3000):
        (many / f"file-{i:04}").touch()
    r = in_shell(agent, f"$T {command} | head -1 >/dev/null; exit ${{PIPESTATUS[0]}}")
    assert (r.returncode, r.stderr) == (141, b"")


def test_exec_into_a_reader_that_goes_away_is_141_and_ends_the_command(agent: Agent) -> None:
    word = f"tether-pipe-{os.getpid()}"
    r = in_shell(agent, f"$T exec $H -- yes {word} | head -1 >/dev/null; exit ${{PIPESTATUS[0]}}")
    assert (r.returncode, r.stderr) == (141, b"")
    for _ in range(50):  # the agent ends the command once the connection is gone
        if subprocess.run(["pgrep", "-f", f"^yes {word}$"], capture_output=True).returncode:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"yes {word} still runs")


def test_stdin_left_non_blocking_is_waited_for(agent: Agent) -> None:
    """A wrapper that leaves stdin non-blocking (O_NONBLOCK) before starting
    tether: input that comes late still reaches the command, as with ssh; it
    was taken for the end of input, and the command got nothing."""
    wrapper = (
        "import os, sys; os.set_blocking(0, False); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    r = in_shell(
        agent,
        f"(sleep 1; echo late data) | {sys.executable} -c '{wrapper}' -m tether exec $H -- cat",
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, b"late data\n", b"")


def test_stdin_a_command_does_not_read_leaves_stderr_clean(agent: Agent, tmp_path: Path) -> None:
    """The command ends before reading its stdin: no warning or traceback from
    the thread that still forwards it (it appeared in about one run in ten)."""
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(16 * 1024 * 1024))
    for _ in range(25):
        with big.open("rb") as stdin:
            r = tether(agent, "exec", agent.host, "--", "true", stdin=stdin)
        assert (r.returncode, r.stderr) == (0, b"")


def test_a_file_that_is_no_program_exits_126(agent: Agent) -> None:
    """Found but not runnable (ENOEXEC), as a shell: 126, not tether's own 255."""
    bad = agent.root / "not-a-program"
    bad.write_bytes(b"\x7fELF and nothing else")
    bad.chmod(0o755)
    r = tether(agent, "exec", agent.host, "--", "./not-a-program")
    assert r.returncode == 126
    assert r.stderr == b"tether: cannot run ./not-a-program: Exec format error\n"


@pytest.mark.parametrize("host", ["web1..lan", ".web1", "a" * 64 + ".lan"])
def test_a_host_name_the_resolver_refuses_is_one_line(agent: Agent, host: str) -> None:
    for args in (["exec", f"{host}:7447", "--", "true"], ["ping", host], ["cp", "x", f"{host}:x"]):
        r = tether(agent, *args)
        assert r.returncode == 2, (args, r.stderr)
        assert (
            r.stderr.decode()
            == f"tether: bad host name in {host + (':7447' if args[0] == 'exec' else '')!r}\n"
        )
    r = tether(agent, "serve", "--host", host, "--port", "0")
    assert (r.returncode, r.stderr) == (2, f"tether: bad host name in '--host {host}'\n".encode())


def test_trailing_garbage_after_a_port_is_a_usage_error(agent: Agent) -> None:
    """More than one ':' is a bare IPv6 address only if it parses as one;
    else exit 2 at once, not a resolver failure (255) for a made-up name."""
    port = agent.port
    for host in (f"127.0.0.1:{port}:9", "web1:22:", "host:port:extra"):
        for args in (["exec", host, "--", "true"], ["ping", host, "-c", "1"]):
            r = tether(agent, *args)
            assert r.returncode == 2, (args, r.stderr)
            assert r.stderr.decode().startswith(f"tether: bad address in {host!r}: "), r.stderr
    r = tether(agent, "exec", f"127.0.0.1 :{port}", "--", "true")
    assert (r.returncode, r.stderr) == (
        2,
        f"tether: bad host name in '127.0.0.1 :{port}'\n".encode(),
    )


def test_a_directory_that_cannot_be_entered_is_named(tmp_path: Path) -> None:
    """``--cwd`` to a directory the agent may not enter: the error names the
    directory, not the program (it said "permission denied: true"). The agent
    runs as root without the capabilities that bypass permissions."""
    no_bypass = "-dac_override,-dac_read_search"
    agent = start_agent(
        tmp_path, launcher=["setpriv", f"--bounding-set={no_bypass}", f"--inh-caps={no_bypass}"]
    )
    try:
        (agent.root / "locked").mkdir(mode=0)
        r = tether(agent, "exec", agent.host, "--cwd", "locked", "--", "true")
        assert r.returncode == 126
        assert r.stderr == b"tether: cannot enter locked: Permission denied\n"
    finally:
        agent.stop()
    check_clean_log(agent)


@pytest.mark.parametrize(
    "args",
    [
        ["exec", "--timeout", "{}", "127.0.0.1:1", "--", "true"],
        ["exec", "--connect-timeout", "{}", "127.0.0.1:1", "--", "true"],
        ["ping", "-i", "{}", "127.0.0.1:1"],
        ["ping", "-W", "{}", "127.0.0.1:1"],
        ["serve", "--idle-timeout", "{}", "--port", "0"],
        ["serve", "--hello-timeout", "{}", "--port", "0"],
        ["serve", "--grace", "{}", "--port", "0"],
    ],
    ids=lambda args: f"{args[0]} {args[1]}",
)
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_a_duration_must_be_a_finite_number(args: list[str], value: str, tmp_path: Path) -> None:
    """Durations that are not numbers JSON can carry are usage errors. They
    passed: ``serve --idle-timeout inf`` then failed every connection with a
    traceback (the idle timeout is in each hello reply), ``exec --timeout inf``
    with "cannot encode frame header"."""
    argv = [*TETHER, *(a.format(value) for a in args)]
    if args[0] == "serve":
        argv += ["--state-dir", str(tmp_path / "state"), "--root", str(tmp_path)]
    r = subprocess.run(argv, capture_output=True, timeout=15, stdin=subprocess.DEVNULL)
    assert r.returncode == 2, r.stderr
    assert f"'{value}' is not a finite number of seconds" in r.stderr.decode(), r.stderr

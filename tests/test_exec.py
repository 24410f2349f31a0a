"""Remote exec end to end: the real agent, the real CLI and the public API.

Every test starts a real ``tether serve`` on loopback (conftest ``agent``) and
drives it through ``python -m tether exec`` or ``import tether``. The agent runs
on this machine, so the pids a remote command prints are local pids, and
"nothing of the command is left running" is checked in /proc.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import hashlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

import pytest

import tether
from conftest import Agent, Cli, check_clean_log, start_agent
from tether import ConnectError, ConnectionClosed, ExitStatus, Output, RemoteError
from tether.asyncio.connecting import Connecting

# Prints the shell's pid, starts a grandchild, prints its pid, waits for it.
PIDS_SH = "echo $$; sleep 300 & echo $!; wait"
# The same, deaf to SIGTERM (the grandchild inherits the ignored disposition);
# `kill -TERM $$` proves it before the pids are printed.
DEAF_PIDS_SH = "trap '' TERM; kill -TERM $$; echo $$; sleep 300 & echo $!; wait"
GONE_TIMEOUT = 8.0  # seconds a signalled process group gets to disappear (loaded machine)
LINE_TIMEOUT = 20.0  # seconds to wait for a line the command prints at once

# Bytes that no text codec would leave alone: every byte value, GBK, invalid UTF-8.
ODD_STDOUT = bytes(range(256)) + "你好".encode("gbk") + b"\xff\xfe\xc3\x28\xed\xa0\x80 end"
ODD_STDERR = "错误".encode("gbk") + b"\x80\x00\xff" + bytes(range(255, -1, -1))

BIG_SEED = 20240601
BIG_CHUNK = 1_000_000  # bytes per write of the remote generator
BIG_CHUNKS = 100  # 100 MB in all


# Helpers ------------------------------------------------------------------------


def py(code: str) -> list[str]:
    """argv that runs ``code`` with this Python (the agent is on this machine)."""
    return [sys.executable, "-c", code]


def writer(stdout: bytes = b"", stderr: bytes = b"") -> list[str]:
    """argv of a command writing exactly these bytes to its stdout, then stderr."""
    return py(
        "import sys\n"
        f"sys.stdout.buffer.write({stdout!r}); sys.stdout.flush()\n"
        f"sys.stderr.buffer.write({stderr!r}); sys.stderr.flush()\n"
    )


def big_output_argv() -> list[str]:
    """argv writing 100 MB of seeded pseudo-random bytes (order matters to the hash)."""
    return py(
        "import random, sys\n"
        f"rng = random.Random({BIG_SEED})\n"
        f"for _ in range({BIG_CHUNKS}):\n"
        f"    sys.stdout.buffer.write(rng.randbytes({BIG_CHUNK}))\n"
    )


@functools.cache
def big_output_digest() -> str:
    rng = random.Random(BIG_SEED)
    digest = hashlib.sha256()
    for _ in range(BIG_CHUNKS):
        digest.update(rng.randbytes(BIG_CHUNK))
    return digest.hexdigest()


def interleaved_argv(count: int) -> list[str]:
    """argv writing numbered lines to stdout and stderr alternately, flushing each."""
    return py(
        "import sys\n"
        f"for i in range({count}):\n"
        "    print('out', i, file=sys.stdout, flush=True)\n"
        "    print('err', i, file=sys.stderr, flush=True)\n"
    )


def numbered(prefix: str, count: int) -> bytes:
    return b"".join(f"{prefix} {i}\n".encode() for i in range(count))


def texec(
    cli: type[Cli],
    agent: Agent,
    *args: str,
    input: bytes | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[bytes]:
    """``tether exec AGENT ARGS...`` through the real CLI."""
    return cli.run(["exec", agent.host, *args], env=agent.env, input=input, timeout=timeout)


def _default_sigint() -> None:
    # A test run started as a background job inherits SIGINT ignored; a
    # Ctrl-C at a terminal reaches a CLI whose SIGINT is not.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn_exec(
    agent: Agent, *args: str, stdin: int | IO[bytes] = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    """``tether exec AGENT ARGS...`` started in the background, stdin empty unless given."""
    return subprocess.Popen(
        [sys.executable, "-m", "tether", "exec", agent.host, *args],
        env=agent.env,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_default_sigint,
    )


@contextmanager
def reaped(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """Kill ``proc`` (which this test started) if it is still running at the end."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        with proc:  # closes the pipes and waits
            pass


class LineReader:
    """Lines from a pipe, each with a deadline (select, so a silent pipe cannot hang us)."""

    def __init__(self, stream: IO[bytes] | None) -> None:
        assert stream is not None
        self.fd = stream.fileno()
        self.buffer = b""

    def readline(self, timeout: float = LINE_TIMEOUT) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no complete line within {timeout}s; got {self.buffer!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise AssertionError(f"end of output before a full line; got {self.buffer!r}")
                self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process; a zombie runs nothing, so it counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def survivors(pids: Sequence[int], timeout: float = GONE_TIMEOUT) -> list[int]:
    """The pids still running after waiting up to ``timeout`` for all to go."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if running(pid)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


async def async_survivors(pids: Sequence[int], timeout: float = GONE_TIMEOUT) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if running(pid)]
        if not alive or time.monotonic() >= deadline:
            return alive
        await asyncio.sleep(0.05)


def kill_leftovers(pids: Sequence[int]) -> None:
    """Clean up after a failed test: these processes were started by it."""
    for pid in pids:
        if running(pid):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def connect(agent: Agent) -> Connecting:
    return tether.connect(agent.host, token=agent.token)


async def read_stdout(
    proc: tether.RemoteProcess, *, lines: int = 0, size: int = 0, timeout: float = LINE_TIMEOUT
) -> bytes:
    """stdout of ``proc`` until ``lines`` full lines or ``size`` bytes have come."""
    data = b""
    async with asyncio.timeout(timeout):
        async for out in proc:
            if out.stream == "stdout":
                data += out.data
                if (lines and data.count(b"\n") >= lines) or (size and len(data) >= size):
                    return data
    raise AssertionError(f"command ended ({proc.exit_status}) after only {data!r}")


async def read_pids(proc: tether.RemoteProcess, count: int, into: list[int]) -> None:
    """Append the first ``count`` stdout lines of ``proc``, as pids, to ``into``."""
    data = await read_stdout(proc, lines=count)
    into.extend(int(line) for line in data.splitlines()[:count])


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() >= deadline:
            raise AssertionError(f"process {proc.pid} still running after {timeout}s")
        await asyncio.sleep(0.05)
    return proc.returncode


@pytest.fixture(scope="module")
def gbk_locale(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory for $LOCPATH holding a real zh_CN.GBK locale, built here."""
    localedef = shutil.which("localedef")
    if localedef is None:
        pytest.skip("localedef is not installed")
    directory = tmp_path_factory.mktemp("locales")
    built = subprocess.run(
        [localedef, "-f", "GBK", "-i", "zh_CN", str(directory / "zh_CN.GBK")],
        capture_output=True,
        timeout=60,
    )
    env = {**os.environ, "LOCPATH": str(directory), "LC_ALL": "zh_CN.GBK", "PYTHONUTF8": "0"}
    probe = subprocess.run(
        py("import locale; print(locale.getpreferredencoding(False))"),
        env=env,
        capture_output=True,
        timeout=30,
    )
    if probe.stdout.strip() != b"GBK":
        pytest.skip(f"cannot build a GBK locale: {built.stderr!r} {probe.stdout!r}")
    return directory


# 1. Separate, byte-exact streams; text decoded with the agent's encoding ------------


def test_cli_stdout_and_stderr_go_to_their_own_streams(agent: Agent, tether_cli: type[Cli]) -> None:
    r = texec(tether_cli, agent, "--shell", "echo out1; echo err1 >&2; echo out2; echo err2 >&2")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"out1\nout2\n"
    assert r.stderr == b"err1\nerr2\n"


def test_cli_exits_without_the_interpreter_teardown(
    agent: Agent, tether_cli: type[Cli], tmp_path: Path
) -> None:
    # A client command leaves with os._exit once stdout and stderr are
    # flushed: the teardown would only free modules, about a tenth of a fresh
    # `tether exec`. An atexit hook that a sitecustomize module installs shows
    # whether the teardown ran; all the output must be there regardless.
    site = tmp_path / "site"
    site.mkdir()
    marker = tmp_path / "teardown-ran"
    (site / "sitecustomize.py").write_text(
        f"import atexit\natexit.register(lambda: open({str(marker)!r}, 'w').close())\n"
    )
    path = [str(site), *filter(None, [agent.env.get("PYTHONPATH")])]
    env = {**agent.env, "PYTHONPATH": os.pathsep.join(path)}
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True, timeout=30)
    assert marker.exists(), "the hook does not run at a normal exit: the check below means nothing"
    marker.unlink()

    r = tether_cli.run(
        ["exec", agent.host, "--shell", "printf out; printf err >&2; exit 3"], env=env
    )
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out", b"err")
    assert not marker.exists()


@pytest.mark.parametrize("closed", [">&-", "2>&-", "<&-", ">&- 2>&- <&-"])
def test_cli_runs_with_standard_descriptors_closed(agent: Agent, closed: str) -> None:
    # A caller may start tether with stdin, stdout or stderr closed, as ssh
    # allows: the exit code must still be the command's, with no crash (libuv
    # used to abort when the descriptor number came back as a socket or pipe).
    argv = [sys.executable, "-m", "tether", "exec", agent.host, "--", "sh", "-c", "exit 3"]
    script = f'exec "$@" {closed}'
    r = subprocess.run(
        ["sh", "-c", script, "sh", *argv], env=agent.env, capture_output=True, timeout=60
    )
    assert r.returncode == 3, r.stderr
    assert b"Traceback" not in r.stderr and b"Assertion" not in r.stderr, r.stderr


def test_cli_binary_invalid_utf8_and_gbk_output_is_byte_exact(
    agent: Agent, tether_cli: type[Cli]
) -> None:
    r = texec(tether_cli, agent, "--", *writer(ODD_STDOUT, ODD_STDERR))
    assert r.returncode == 0, r.stderr
    assert r.stdout == ODD_STDOUT
    assert r.stderr == ODD_STDERR


async def test_api_text_is_decoded_with_the_agents_encoding(agent: Agent) -> None:
    async with connect(agent) as conn:
        # What the agent's own process environment calls its console encoding.
        probe = await conn.run(py("import locale; print(locale.getpreferredencoding(False))"))
        assert conn.encoding == probe.stdout.decode("ascii").strip()
        codecs.lookup(conn.encoding)
        odd = await conn.run(writer(ODD_STDOUT, ODD_STDERR))
        bad = await conn.run(writer(b"ok \xff end", b"\xfe!"))
    assert odd.stdout == ODD_STDOUT
    assert odd.stderr == ODD_STDERR
    assert odd.encoding == conn.encoding
    assert odd.stdout_text == ODD_STDOUT.decode(conn.encoding, errors="replace")
    assert odd.stderr_text == ODD_STDERR.decode(conn.encoding, errors="replace")
    # 0xff and 0xfe are invalid in UTF-8, ASCII and GBK alike.
    assert bad.stdout_text == "ok \ufffd end"
    assert bad.stderr_text == "\ufffd!"


async def test_api_text_of_a_gbk_agent_decodes_as_gbk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gbk_locale: Path
) -> None:
    monkeypatch.setenv("LOCPATH", str(gbk_locale))
    monkeypatch.setenv("LC_ALL", "zh_CN.GBK")
    monkeypatch.setenv("PYTHONUTF8", "0")
    gbk_agent = start_agent(tmp_path, name="gbk")
    try:
        async with tether.connect(gbk_agent.host, token=gbk_agent.token) as conn:
            assert codecs.lookup(conn.encoding).name == "gbk"
            text = "你好，世界\n"
            result = await conn.run(writer(text.encode("gbk"), "错误".encode("gbk") + b"\xff"))
    finally:
        gbk_agent.stop()
        check_clean_log(gbk_agent)
    assert result.stdout == text.encode("gbk")  # bytes untouched on the wire
    assert result.stdout_text == text  # and decoded with the agent's GBK, not our UTF-8
    assert result.stderr_text == "错误\ufffd"


async def test_api_text_of_an_ascii_agent_replaces_non_ascii(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A plain C locale with Python's UTF-8 coercions turned off: the agent's
    # console encoding is ASCII, so UTF-8 bytes must come out as U+FFFD.
    monkeypatch.setenv("LC_ALL", "C")
    monkeypatch.setenv("PYTHONCOERCECLOCALE", "0")
    monkeypatch.setenv("PYTHONUTF8", "0")
    ascii_agent = start_agent(tmp_path, name="ascii")
    try:
        async with tether.connect(ascii_agent.host, token=ascii_agent.token) as conn:
            assert codecs.lookup(conn.encoding).name == "ascii"
            result = await conn.run(writer("é!".encode()))
    finally:
        ascii_agent.stop()
        check_clean_log(ascii_agent)
    assert result.stdout == "é!".encode()
    assert result.stdout_text == "\ufffd\ufffd!"


# 2. Live output ----------------------------------------------------------------------

COUNT_SLOWLY = "for i in 1 2 3; do echo $i; sleep 1; done"


def test_cli_output_streams_live(agent: Agent) -> None:
    with reaped(spawn_exec(agent, "--shell", COUNT_SLOWLY)) as cli:
        started = time.monotonic()
        first = LineReader(cli.stdout).readline()
        first_at = time.monotonic()
        still_running = cli.poll() is None
        rest, err = cli.communicate(timeout=30)
        ended_at = time.monotonic()
    assert first == b"1\n"
    assert still_running, "the first line came only when the command had ended"
    assert first_at - started < 10  # not a pile-up at the end either
    assert rest == b"2\n3\n", err
    # The command runs about 2 s after its first line: that line was not held back.
    assert ended_at - first_at > 1.0
    assert cli.returncode == 0


async def test_api_output_streams_live(agent: Agent) -> None:
    async with connect(agent) as conn:
        proc = await conn.exec(shell=COUNT_SLOWLY)
        async with asyncio.timeout(30):
            first = await anext(proc)
            first_at = time.monotonic()
            assert proc.exit_status is None
            rest = [out async for out in proc]
        ended_at = time.monotonic()
    assert first == Output("stdout", b"1\n")
    assert b"".join(out.data for out in rest) == b"2\n3\n"
    assert {out.stream for out in rest} == {"stdout"}
    assert ended_at - first_at > 1.0
    assert proc.exit_status == ExitStatus(0)


# 3. 100 MB ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_cli_100mb_of_output_arrives_complete_and_in_order(agent: Agent) -> None:
    digest = hashlib.sha256()
    length = 0
    with reaped(spawn_exec(agent, "--", *big_output_argv())) as cli:
        assert cli.stdout is not None and cli.stderr is not None
        while chunk := cli.stdout.read(1 << 20):
            digest.update(chunk)
            length += len(chunk)
        err = cli.stderr.read()
        code = cli.wait(30)
    assert err == b""
    assert code == 0
    assert length == BIG_CHUNK * BIG_CHUNKS
    assert digest.hexdigest() == big_output_digest()


@pytest.mark.timeout(120)
async def test_api_100mb_of_output_then_the_next_request_works(agent: Agent) -> None:
    digest = hashlib.sha256()
    length = 0
    async with connect(agent) as conn:
        proc = await conn.exec(big_output_argv())
        async with asyncio.timeout(90):
            async for out in proc:
                assert out.stream == "stdout", out.data[:200]
                digest.update(out.data)
                length += len(out.data)
        assert proc.exit_status == ExitStatus(0)
        # Nothing of the big reply is left on the connection for the next ones.
        async with asyncio.timeout(30):
            after = await conn.run(["echo", "next"])
            echoed = await conn.echo("still in step")
    assert length == BIG_CHUNK * BIG_CHUNKS
    assert digest.hexdigest() == big_output_digest()
    assert after.stdout == b"next\n"
    assert after.stderr == b""
    assert echoed == "still in step"


# 4. Interleaved streams ------------------------------------------------------------------

INTERLEAVED = 3000  # lines on each stream


def test_cli_interleaved_streams_are_each_complete_and_in_order(
    agent: Agent, tether_cli: type[Cli]
) -> None:
    r = texec(tether_cli, agent, "--", *interleaved_argv(INTERLEAVED))
    assert r.returncode == 0
    assert r.stdout == numbered("out", INTERLEAVED)
    assert r.stderr == numbered("err", INTERLEAVED)


async def test_api_interleaved_streams_are_each_complete_and_in_order(agent: Agent) -> None:
    async with connect(agent) as conn:
        proc = await conn.exec(interleaved_argv(INTERLEAVED))
        chunks = {"stdout": bytearray(), "stderr": bytearray()}
        switches = 0
        last = None
        async with asyncio.timeout(60):
            async for out in proc:
                chunks[out.stream] += out.data
                switches += out.stream != last
                last = out.stream
    assert proc.exit_status == ExitStatus(0)
    assert bytes(chunks["stdout"]) == numbered("out", INTERLEAVED)
    assert bytes(chunks["stderr"]) == numbered("err", INTERLEAVED)
    assert switches > 10  # both streams flowed as written, not one after the other


# 5. stdin ----------------------------------------------------------------------------


def test_cli_forwards_stdin(agent: Agent, tether_cli: type[Cli]) -> None:
    r = texec(tether_cli, agent, "--", "sort", input=b"b\na\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"a\nb\n"


def test_cli_options_after_the_command_are_the_commands_own(
    agent: Agent, tether_cli: type[Cli]
) -> None:
    """As with ssh, the first word after HOST starts the command: `echo -n`,
    `grep -n` and `sleep --timeout` reach the program. tether took them as
    its own options (`-n`: no stdin; `--timeout`) and ran another command."""
    r = texec(tether_cli, agent, "echo", "-n", "hi")
    assert (r.returncode, r.stdout) == (0, b"hi"), r.stderr
    r = texec(tether_cli, agent, "grep", "-n", "foo", input=b"a\nfoo\n")
    assert (r.returncode, r.stdout) == (0, b"2:foo\n"), r.stderr
    r = texec(tether_cli, agent, "echo", "--timeout", "1", "--cwd", "x")
    assert (r.returncode, r.stdout) == (0, b"--timeout 1 --cwd x\n"), r.stderr
    # Options between HOST and the command are still tether's.
    r = texec(tether_cli, agent, "--timeout", "0.5", "--env", "V=1", "sh", "-c", "echo $V; sleep 5")
    assert (r.returncode, r.stdout) == (124, b"1\n"), r.stderr


def test_cli_exit_codes_of_what_cannot_run_are_a_shells(
    agent: Agent, tether_cli: type[Cli]
) -> None:
    """As sh would: an empty program name is not found (127: it was
    "permission denied", 126), a file as the directory cannot be entered
    (126: it was "no such directory", 127), and an empty --shell '' runs
    (it was refused as no command at all)."""
    (agent.root / "a-file").write_bytes(b"")
    r = texec(tether_cli, agent, "--", "")
    assert r.returncode == 127 and b"no such program" in r.stderr, r.stderr
    r = texec(tether_cli, agent, "--cwd", "a-file", "--", "true")
    assert r.returncode == 126 and b"cannot enter a-file: not a directory" in r.stderr, r.stderr
    r = texec(tether_cli, agent, "--shell", "")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")


def test_cli_delivers_end_of_file(agent: Agent, tether_cli: type[Cli]) -> None:
    # `cat` ends by itself only if EOF arrives; the shell then goes on.
    r = texec(tether_cli, agent, "--", "sh", "-c", "cat; echo after-eof", input=b"hello\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello\nafter-eof\n"
    empty = texec(tether_cli, agent, "--", "wc", "-c", input=b"")
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.strip() == b"0"


@pytest.mark.timeout(120)
def test_cli_20mb_of_stdin_round_trips_byte_exact(agent: Agent, tether_cli: type[Cli]) -> None:
    data = random.Random(7).randbytes(20_000_000)
    r = texec(tether_cli, agent, "--", "cat", input=data, timeout=100)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == len(data)
    assert hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(data).hexdigest()


def test_cli_n_gives_the_command_empty_stdin(agent: Agent, tether_cli: type[Cli]) -> None:
    r = texec(
        tether_cli, agent, "-n", "--", "sh", "-c", "cat; echo done", input=b"must not arrive\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"done\n"


async def test_api_run_with_input(agent: Agent) -> None:
    data = random.Random(3).randbytes(3_000_000)
    async with connect(agent) as conn:
        async with asyncio.timeout(30):
            sorted_ = await conn.run(["sort"], input=b"b\na\n")
            copied = await conn.run(["cat"], input=data)
            nothing = await conn.run(["cat"])  # no input: empty stdin, not a hang
    assert sorted_.stdout == b"a\nb\n"
    assert sorted_.returncode == 0
    assert copied.stdout == data
    assert nothing.stdout == b""
    assert nothing.returncode == 0


async def test_api_stdin_written_in_pieces_then_closed(agent: Agent) -> None:
    async with connect(agent) as conn:
        proc = await conn.exec(shell="echo ready; exec cat", stdin=True)
        async with asyncio.timeout(30):
            assert await read_stdout(proc, lines=1) == b"ready\n"
            await proc.write(b"ping\n")
            # cat answers while its stdin is still open: input is not held until EOF.
            assert await read_stdout(proc, lines=1) == b"ping\n"
            for piece in (b"one ", b"two ", bytearray(b"three"), memoryview(b" four")):
                await proc.write(piece)
            await proc.close_stdin()
            rest = [out async for out in proc]
    assert b"".join(out.data for out in rest) == b"one two three four"
    assert proc.exit_status == ExitStatus(0)


async def test_api_stdin_sent_right_after_exec_is_not_lost(agent: Agent) -> None:
    # Input may reach the agent together with the exec frame, before the
    # child exists: it must be delivered, not dropped.
    async with connect(agent) as conn:
        for i in range(20):
            try:
                async with asyncio.timeout(10):
                    result = await conn.run(["cat"], input=b"round %d" % i)
            except TimeoutError:
                pytest.fail(f"round {i}: stdin (and its EOF) sent right after exec was lost")
            assert result.stdout == b"round %d" % i, f"round {i}"


async def test_api_signal_sent_right_after_exec_is_not_lost(agent: Agent) -> None:
    async with connect(agent) as conn:
        for i in range(5):
            proc = await conn.exec(["sleep", "30"])
            await proc.send_signal("INT")
            try:
                async with asyncio.timeout(10):
                    status = await proc.wait()
            except TimeoutError:
                pytest.fail(f"round {i}: a signal sent right after exec was lost")
            assert status.signal == signal.SIGINT, f"round {i}"


# 6. Exit codes -------------------------------------------------------------------------


def test_cli_exits_with_the_remote_exit_code(agent: Agent, tether_cli: type[Cli]) -> None:
    runs = [texec(tether_cli, agent, "--", "sh", "-c", f"exit {code}") for code in (0, 1, 44, 255)]
    assert [r.returncode for r in runs] == [0, 1, 44, 255]
    assert all(r.stdout == b"" and r.stderr == b"" for r in runs), runs


def test_cli_exits_128_plus_the_signal_that_killed_the_command(
    agent: Agent, tether_cli: type[Cli]
) -> None:
    term = texec(tether_cli, agent, "--", "sh", "-c", "kill -TERM $$")
    killed = texec(tether_cli, agent, "--", "sh", "-c", "kill -KILL $$")
    assert term.returncode == 128 + 15, term.stderr
    assert killed.returncode == 128 + 9, killed.stderr


async def test_api_reports_the_signal_that_killed_the_command(agent: Agent) -> None:
    async with connect(agent) as conn:
        term = await conn.run(["sh", "-c", "kill -TERM $$"])
        killed = await conn.run(["sh", "-c", "kill -KILL $$"])
        fine = await conn.run(["sh", "-c", "exit 44"])
    assert term.exit == ExitStatus(None, signal=15, signal_name="TERM")
    assert term.returncode == 143
    assert killed.exit == ExitStatus(None, signal=9, signal_name="KILL")
    assert killed.returncode == 137
    assert fine.exit == ExitStatus(44)
    assert fine.returncode == 44


def test_cli_program_not_found_exits_127_with_one_line(agent: Agent, tether_cli: type[Cli]) -> None:
    r = texec(tether_cli, agent, "--", "no-such-program-for-tether")
    assert r.returncode == 127
    assert r.stdout == b""
    assert r.stderr == b"tether: no such program: no-such-program-for-tether\n"


async def test_api_program_not_found_is_a_remote_error(agent: Agent) -> None:
    async with connect(agent) as conn:
        with pytest.raises(RemoteError) as caught:
            await conn.run(["no-such-program-for-tether"])
        assert caught.value.code == "not_found"
        # Only that request failed: the connection goes on.
        assert (await conn.run(["echo", "ok"])).stdout == b"ok\n"


def test_cli_program_not_executable_exits_126(agent: Agent, tether_cli: type[Cli]) -> None:
    script = agent.root / "not-executable"
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o644)
    r = texec(tether_cli, agent, "--", "./not-executable")
    assert r.returncode == 126
    assert r.stdout == b""
    assert r.stderr.startswith(b"tether: permission denied")
    assert r.stderr.count(b"\n") == 1


def test_cli_timeout_ends_the_command_with_124(agent: Agent, tether_cli: type[Cli]) -> None:
    started = time.monotonic()
    r = texec(tether_cli, agent, "--timeout", "1", "--", "sleep", "30", timeout=40)
    elapsed = time.monotonic() - started
    assert r.returncode == 124
    assert b"timed out after 1s" in r.stderr
    assert elapsed < 15


async def test_api_timeout_sets_timed_out(agent: Agent) -> None:
    async with connect(agent) as conn:
        started = time.monotonic()
        result = await conn.run(["sleep", "30"], timeout=1)
        elapsed = time.monotonic() - started
        quick = await conn.run(["true"], timeout=30)
    assert result.timed_out
    assert result.exit.signal == signal.SIGTERM
    assert elapsed < 15
    assert not quick.timed_out
    assert quick.exit == ExitStatus(0)


async def test_a_timeout_after_the_exit_loses_no_output_held_back(agent: Agent) -> None:
    """B exits in time, its last line still in its pipe because flow control
    holds the connection's output back (A floods it, unread); then B's timeout
    runs out. B's output must arrive whole, with its own status: the timeout
    cut its pipes then and the line was lost."""
    async with connect(agent) as conn:
        b = await conn.exec(shell="sleep 1; echo hello from b; exit 3", timeout=1.5)
        a = await conn.exec(["head", "-c", "60000000", "/dev/zero"])
        await asyncio.sleep(3.0)  # nothing read: every buffer on the way fills
        got = 0
        async for chunk in a:
            got += len(chunk.data)
        assert got == 60_000_000
        out = b""
        async for chunk in b:
            out += chunk.data
    assert out == b"hello from b\n"
    assert b.exit_status == ExitStatus(3)


@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_cli_output_is_complete_on_a_non_blocking_stdout(agent: Agent, unbuffered: str) -> None:
    """A stdout left non-blocking by whoever started the CLI, read late: every
    byte still arrives. Under PYTHONUNBUFFERED (common in containers) all but
    the first 64 KiB were lost with exit 0; without it, exit 255."""
    data = random.randbytes(5_000_000)
    (agent.root / "out.bin").write_bytes(data)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    env = {**agent.env, "PYTHONUNBUFFERED": unbuffered}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tether", "exec", agent.host, "--", "cat", "out.bin"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.PIPE,
        )
        os.close(write_end)
        write_end = -1
        time.sleep(1.0)  # the pipe fills meanwhile: the CLI meets EAGAIN
        got = bytearray()
        with os.fdopen(read_end, "rb") as out:
            read_end = -1
            while chunk := out.read(1 << 20):
                got += chunk
        stderr = proc.stderr.read() if proc.stderr is not None else b""
        assert proc.wait(60) == 0, stderr
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
    assert len(got) == len(data)
    assert got == data


async def test_a_command_that_exited_in_time_is_not_timed_out(agent: Agent) -> None:
    """The timeout running out during the wait for output a background process
    holds open: the command exited by itself with 3, in time, so 3 it is, and
    that background process is not signalled (as without a timeout). It was
    reported timed out, and killed."""
    pids: list[int] = []
    try:
        async with connect(agent) as conn:
            result = await conn.run(shell="sleep 0.7; sleep 30 & echo $!; exit 3", timeout=1)
        pids.extend(int(line) for line in result.stdout.split())
        assert result.exit == ExitStatus(3)
        assert not result.timed_out
        assert len(pids) == 1 and running(pids[0])
    finally:
        kill_leftovers(pids)


# 7. --cwd, --env, --shell ------------------------------------------------------------------


def test_cli_cwd_is_relative_to_the_agent_root(agent: Agent, tether_cli: type[Cli]) -> None:
    (agent.root / "sub" / "dir").mkdir(parents=True)
    inside = texec(tether_cli, agent, "--cwd", "sub/dir", "--", "pwd")
    default = texec(tether_cli, agent, "--", "pwd")
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.decode().strip() == os.path.realpath(agent.root / "sub" / "dir")
    assert default.stdout.decode().strip() == os.path.realpath(agent.root)


def test_cli_missing_cwd_is_an_error(agent: Agent, tether_cli: type[Cli]) -> None:
    r = texec(tether_cli, agent, "--cwd", "does/not/exist", "--", "pwd")
    assert r.returncode != 0
    assert r.stdout == b""
    assert r.stderr == b"tether: no such directory: does/not/exist\n"


async def test_api_missing_cwd_is_a_remote_error(agent: Agent) -> None:
    async with connect(agent) as conn:
        with pytest.raises(RemoteError) as caught:
            await conn.run(["pwd"], cwd="does/not/exist")
    assert caught.value.code == "not_found"


def test_cli_env_is_visible_to_the_command(agent: Agent, tether_cli: type[Cli]) -> None:
    r = texec(
        tether_cli,
        agent,
        "--env",
        "FOO=bar",
        "--env",
        "EQ=a=b",
        "--env",
        "EMPTY=",
        "--",
        "sh",
        "-c",
        'printf "%s|%s|%s|%s" "$FOO" "$EQ" "$EMPTY" "${EMPTY+set}"',
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"bar|a=b||set"


async def test_api_env_is_visible_to_the_command(agent: Agent) -> None:
    async with connect(agent) as conn:
        result = await conn.run(["sh", "-c", 'echo "$GREETING"'], env={"GREETING": "你好"})
    assert result.stdout == "你好\n".encode()


async def test_commands_get_the_agents_environment_with_the_requested_variables_over_it(
    agent: Agent,
) -> None:
    # The agent started with this process's environment (tests/conftest.py).
    home = os.environ["HOME"]
    script = 'printf "%s|%s" "$HOME" "${GREETING-unset}"'
    async with connect(agent) as conn:
        plain = await conn.run(["sh", "-c", script])
        added = await conn.run(["sh", "-c", script], env={"GREETING": "hi"})
        replaced = await conn.run(["sh", "-c", script], env={"HOME": "/elsewhere"})
    assert plain.stdout == f"{home}|unset".encode()
    assert added.stdout == f"{home}|hi".encode()
    assert replaced.stdout == b"/elsewhere|unset"


def test_cli_shell_runs_a_command_line(agent: Agent, tether_cli: type[Cli]) -> None:
    r = texec(tether_cli, agent, "--shell", "echo a | tr a b")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"b\n"


def test_cli_command_and_shell_together_is_a_usage_error(
    agent: Agent, tether_cli: type[Cli]
) -> None:
    both = texec(tether_cli, agent, "--shell", "touch by-shell", "--", "touch", "by-argv")
    neither = texec(tether_cli, agent)
    assert both.returncode == 2
    assert b"not both" in both.stderr
    assert neither.returncode == 2
    assert not (agent.root / "by-shell").exists()
    assert not (agent.root / "by-argv").exists()


# 8. Nothing left running ---------------------------------------------------------------


def test_cli_timeout_leaves_nothing_running(agent: Agent, tether_cli: type[Cli]) -> None:
    pids: list[int] = []
    try:
        r = texec(tether_cli, agent, "--timeout", "1", "--shell", PIDS_SH, timeout=40)
        pids.extend(int(line) for line in r.stdout.split())
        assert r.returncode == 124, r.stderr
        assert len(pids) == 2
        assert survivors(pids) == []
    finally:
        kill_leftovers(pids)


def test_cli_timeout_kills_a_command_that_ignores_term(agent: Agent, tether_cli: type[Cli]) -> None:
    pids: list[int] = []
    try:
        r = texec(tether_cli, agent, "--timeout", "1", "--shell", DEAF_PIDS_SH, timeout=40)
        pids.extend(int(line) for line in r.stdout.split())
        assert r.returncode == 124, r.stderr
        assert len(pids) == 2
        assert survivors(pids) == []
    finally:
        kill_leftovers(pids)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_cli_client_killed_or_interrupted_leaves_nothing_running(agent: Agent, how: str) -> None:
    pids: list[int] = []
    try:
        with reaped(spawn_exec(agent, "--shell", PIDS_SH)) as cli:
            reader = LineReader(cli.stdout)
            for _ in range(2):
                pids.append(int(reader.readline()))
            assert all(running(pid) for pid in pids)
            cli.send_signal(getattr(signal, how))
            code = cli.wait(15)
            assert cli.stderr is not None
            err = cli.stderr.read()
        if how == "SIGINT":
            assert code == 130, err  # Ctrl-C: like a shell, and quietly
            assert b"Traceback" not in err
        else:
            assert code == -signal.SIGKILL
        assert survivors(pids) == []
    finally:
        kill_leftovers(pids)


STDIN_FLOOD = 64 * 1024 * 1024  # more stdin than the agent buffers for a command


@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_cli_stopped_while_stdin_waits_unread_leaves_nothing_running(
    agent: Agent, tmp_path: Path, how: str
) -> None:
    """The command reads none of the 64 MiB on the CLI's stdin, so the agent
    stops reading the connection and what the CLI queued waits unsent. Then
    the CLI is stopped: it must be gone at once and so must the command. A
    SIGTERM or SIGHUP killed the CLI outright and the command ran on for
    minutes (the end of the stream queued behind the unread stdin, the agent
    never learnt the client was gone); Ctrl-C took 5 s to exit."""
    flood = tmp_path / "flood"
    with open(flood, "wb") as f:
        f.truncate(STDIN_FLOOD)
    pids: list[int] = []
    try:
        with (
            open(flood, "rb") as stdin,
            reaped(spawn_exec(agent, "--shell", PIDS_SH, stdin=stdin)) as cli,
        ):
            reader = LineReader(cli.stdout)
            for _ in range(2):
                pids.append(int(reader.readline()))
            time.sleep(1.5)  # the agent's buffer for the command's stdin fills up
            sent = time.monotonic()
            cli.send_signal(getattr(signal, how))
            code = cli.wait(15)
            took = time.monotonic() - sent
            assert cli.stderr is not None
            err = cli.stderr.read()
        assert b"Traceback" not in err
        assert code == (130 if how == "SIGINT" else -getattr(signal, how)), err
        assert took < 3.0
        assert survivors(pids) == []
    finally:
        kill_leftovers(pids)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_cli_signalled_while_its_output_is_blocked_ends_at_once(agent: Agent, how: str) -> None:
    """Whoever reads the CLI's stdout has stopped reading: SIGTERM or Ctrl-C
    must still end it at once (the loop, blocked writing, could not run the
    clean-up: it hung until the reader read again; a first Ctrl-C did
    nothing)."""
    read_end, write_end = os.pipe()
    try:
        with reaped(
            subprocess.Popen(
                [sys.executable, "-m", "tether", "exec", agent.host, "--", "yes"],
                env=agent.env,
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                stderr=subprocess.DEVNULL,
                preexec_fn=_default_sigint,
            )
        ) as proc:
            os.close(write_end)
            write_end = -1
            time.sleep(2.0)  # the pipe is full long before: the CLI is blocked writing
            sent = time.monotonic()
            proc.send_signal(getattr(signal, how))
            assert proc.wait(10) == (130 if how == "SIGINT" else -signal.SIGTERM)
            assert time.monotonic() - sent < 3.0
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)


def test_cli_sigterm_ends_it_even_when_its_clean_up_cannot(tmp_path: Path) -> None:
    """The agent is frozen (SIGSTOP): the clean-up after a SIGTERM cannot
    finish, and the CLI dies of the signal SIGNAL_CLEANUP (2 s) later. Its
    fallback raised in a thread instead and the CLI lived on."""
    frozen = start_agent(tmp_path, name="frozen")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tether", "exec", frozen.host, "--shell", "echo up; sleep 30"],
            env=frozen.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert LineReader(proc.stdout).readline() == b"up\n"
            # Out of its write of that line: a signal during a write of its
            # output ends it at once (the write might block), as it should.
            time.sleep(0.5)
            frozen.proc.send_signal(signal.SIGSTOP)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(15)
            took = time.monotonic() - sent
            assert proc.stderr is not None
            err = proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert code == -signal.SIGTERM, err
        assert b"Traceback" not in err and b"Exception" not in err, err
        assert 1.5 < took < 4.0, took
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
        frozen.stop()


def test_cli_sigterm_after_its_loop_ended_still_ends_it() -> None:
    """The CLI has failed (nothing listens) and is blocked writing its one
    line to a stderr nobody reads: a SIGTERM ends it (its handler, left in
    place after the loop had closed, raised and it hung on)."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"x" * 65536)  # the pipe is full before the CLI writes a byte
    try:
        os.set_blocking(write_end, True)
        with reaped(
            subprocess.Popen(
                [sys.executable, "-m", "tether", "echo", "127.0.0.1:1", "hi"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=write_end,
            )
        ) as proc:
            os.close(write_end)
            write_end = -1
            time.sleep(2.0)  # failed by now, stuck on its error message
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == -signal.SIGTERM
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)


def test_cli_under_nohup_keeps_going_on_sighup(agent: Agent) -> None:
    """SIGHUP ignored when the CLI starts (nohup) stays ignored: the copy or
    command goes on when the terminal closes."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether", "exec", agent.host, "--shell", "sleep 1; echo done"],
        env=agent.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    time.sleep(0.5)
    proc.send_signal(signal.SIGHUP)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == b"done\n"


async def test_api_close_with_stdin_waiting_unread_is_prompt(agent: Agent) -> None:
    """Closing a connection whose command reads none of the stdin sent to it
    cuts at once: the queued stdin can only be for that command, which the
    agent ends anyway. It waited CLOSE_TIMEOUT (5 s) first."""
    pids: list[int] = []
    try:
        conn = await connect(agent)
        proc = await conn.exec(shell=PIDS_SH, stdin=True)
        await read_pids(proc, 2, pids)
        block = bytes(1024 * 1024)
        for _ in range(STDIN_FLOOD // len(block)):
            try:
                await asyncio.wait_for(proc.write(block), 1.0)
            except TimeoutError:
                break  # the agent has stopped taking it
        else:
            pytest.fail("the agent took all of the stdin of a command that reads none")
        started = time.monotonic()
        await conn.close()
        assert time.monotonic() - started < 2.5
        assert await async_survivors(pids) == []
    finally:
        kill_leftovers(pids)


async def test_api_leaving_the_exec_block_early_kills_the_group(agent: Agent) -> None:
    pids: list[int] = []
    try:
        async with connect(agent) as conn:
            async with asyncio.timeout(30):
                async with await conn.exec(shell=PIDS_SH) as proc:
                    await read_pids(proc, 2, pids)
            assert proc.exit_status is not None
            assert proc.exit_status.signal == signal.SIGKILL
            assert await async_survivors(pids) == []
            # The connection is still good for more.
            assert (await conn.run(["echo", "ok"])).stdout == b"ok\n"
    finally:
        kill_leftovers(pids)


async def test_api_closing_the_connection_kills_the_group(agent: Agent) -> None:
    pids: list[int] = []
    try:
        conn = await connect(agent)
        proc = await conn.exec(shell=PIDS_SH)
        await read_pids(proc, 2, pids)
        await conn.close()
        assert await async_survivors(pids) == []
        with pytest.raises(ConnectionClosed):
            await proc.wait()
    finally:
        kill_leftovers(pids)


async def test_api_disconnect_kills_a_command_that_ignores_term(agent: Agent) -> None:
    pids: list[int] = []
    try:
        conn = await connect(agent)
        proc = await conn.exec(shell=DEAF_PIDS_SH)
        await read_pids(proc, 2, pids)
        await conn.close()
        # TERM is ignored: KILL must follow after the agent's grace period.
        assert await async_survivors(pids, GONE_TIMEOUT + 5) == []
    finally:
        kill_leftovers(pids)


# 9. A background child holding stdout ------------------------------------------------------


def test_cli_background_child_holding_stdout_does_not_hang(
    agent: Agent, tether_cli: type[Cli]
) -> None:
    pids: list[int] = []
    try:
        started = time.monotonic()
        r = texec(tether_cli, agent, "--shell", "sleep 60 & echo $! >&2; echo started", timeout=70)
        elapsed = time.monotonic() - started
        pids.extend(int(word) for word in r.stderr.split()[:1])
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"started\n"
        assert elapsed < 8  # a short grace after the shell exits, not the 60 s of sleep
    finally:
        kill_leftovers(pids)  # it outlives the call by design; this test started it


async def test_api_background_child_holding_stdout_does_not_hang(agent: Agent) -> None:
    pids: list[int] = []
    try:
        async with connect(agent) as conn:
            started = time.monotonic()
            async with asyncio.timeout(30):
                result = await conn.run(shell="sleep 60 & echo $! >&2; echo started")
            elapsed = time.monotonic() - started
        pids.extend(int(word) for word in result.stderr.split()[:1])
        assert result.stdout == b"started\n"
        assert result.exit == ExitStatus(0)
        assert elapsed < 8
    finally:
        kill_leftovers(pids)


# 10. Signals through the API ------------------------------------------------------------------


async def test_api_send_signal_int(agent: Agent) -> None:
    async with connect(agent) as conn:
        proc = await conn.exec(shell="echo ready; exec sleep 30")
        async with asyncio.timeout(20):
            assert await read_stdout(proc, lines=1) == b"ready\n"
            started = time.monotonic()
            await proc.send_signal("INT")
            status = await proc.wait()
        elapsed = time.monotonic() - started
    assert status == ExitStatus(None, signal=2, signal_name="INT")
    assert status.returncode == 130
    assert elapsed < 10


# 11. Many requests at once on one connection ------------------------------------------------


async def test_api_many_concurrent_execs_on_one_connection(agent: Agent) -> None:
    count, lines = 30, 2000
    async with connect(agent) as conn:
        started = time.monotonic()
        async with asyncio.timeout(60):
            results = await asyncio.gather(
                *(conn.run(shell=f"sleep 1; yes {i} | head -n {lines}") for i in range(count))
            )
        elapsed = time.monotonic() - started
    for i, result in enumerate(results):
        assert result.exit == ExitStatus(0), (i, result.stderr)
        assert result.stdout == f"{i}\n".encode() * lines, i
        assert result.stderr == b""
    assert elapsed < 20  # they ran side by side: one after another takes 30 s or more


# 12. An agent that refuses exec ---------------------------------------------------------------


async def test_no_exec_agent_refuses_exec_through_the_api(tmp_path: Path) -> None:
    refusing = start_agent(tmp_path, "--no-exec", name="noexec")
    try:
        async with tether.connect(refusing.host, token=refusing.token) as conn:
            with pytest.raises(RemoteError) as caught:
                await conn.run(["touch", "made"])
            assert caught.value.code == "forbidden"
            assert await conn.echo("still here") == "still here"
        assert not (refusing.root / "made").exists()
    finally:
        refusing.stop()
        check_clean_log(refusing)


def test_no_exec_agent_refuses_exec_through_the_cli(tmp_path: Path, tether_cli: type[Cli]) -> None:
    refusing = start_agent(tmp_path, "--no-exec", name="noexec")
    try:
        r = texec(tether_cli, refusing, "--", "touch", "made")
        assert r.returncode == 255
        assert r.stdout == b""
        assert r.stderr == b"tether: exec is disabled on this agent\n"
        assert not (refusing.root / "made").exists()
    finally:
        refusing.stop()
        check_clean_log(refusing)


# 13. Graceful stop ----------------------------------------------------------------------------


async def test_sigterm_lets_a_running_command_finish_and_refuses_new_work(agent: Agent) -> None:
    async with connect(agent) as conn:
        proc = await conn.exec(shell="echo started; sleep 3; echo done")
        async with asyncio.timeout(30):
            assert await read_stdout(proc, lines=1) == b"started\n"
            agent.proc.send_signal(signal.SIGTERM)
            # Once the agent is stopping, new requests are refused (the
            # connection itself stays up: the command is still running).
            deadline = time.monotonic() + 10
            while True:
                try:
                    await conn.echo("anyone?")
                except RemoteError as exc:
                    assert exc.code == "shutting_down"
                    break
                assert time.monotonic() < deadline, "the agent never started stopping"
                await asyncio.sleep(0.05)
            # ... and so are new connections.
            with pytest.raises(ConnectError):
                async with tether.connect(agent.host, token=agent.token, connect_timeout=5):
                    pass
            rest = [out async for out in proc]
    assert b"".join(out.data for out in rest) == b"done\n"
    assert proc.exit_status == ExitStatus(0)
    assert await wait_exit(agent.proc, 20) == 0
    assert "tether: stopped" in agent.log()


@pytest.mark.parametrize(
    ("grace", "signals"), [("1", 1), ("60", 2)], ids=["short-grace", "second-sigterm"]
)
async def test_sigterm_ends_what_is_left_after_the_grace(
    tmp_path: Path, grace: str, signals: int
) -> None:
    """Running commands get --grace, then end; a second SIGTERM (`kill`
    twice, as with most daemons) ends them at once, not after the rest of a
    60 s grace. Nothing of them is left either way."""
    short = start_agent(tmp_path, "--grace", grace, name="grace")
    pids: list[int] = []
    try:
        async with tether.connect(short.host, token=short.token) as conn:
            proc = await conn.exec(shell="echo $$; exec sleep 300")
            await read_pids(proc, 1, pids)
            for _ in range(signals):
                started = time.monotonic()
                short.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
            with pytest.raises(RemoteError) as caught:
                async with asyncio.timeout(20):
                    await proc.wait()
            assert caught.value.code == "shutting_down"
        assert await wait_exit(short.proc, 20) == 0
        assert time.monotonic() - started < 10
        assert await async_survivors(pids) == []
    finally:
        short.stop()
        check_clean_log(short)
        kill_leftovers(pids)


async def test_a_command_ended_by_the_shutdown_is_audited_as_shutting_down(
    tmp_path: Path,
) -> None:
    """The client is told shutting_down; the audit record says the same. It
    said "ended", as for a client that went away."""
    audit = tmp_path / "audit.jsonl"
    short = start_agent(tmp_path, "--grace", "0.5", "--audit-log", str(audit), name="audited")
    pids: list[int] = []
    try:
        async with tether.connect(short.host, token=short.token) as conn:
            proc = await conn.exec(shell="echo $$; exec sleep 300")
            await read_pids(proc, 1, pids)
            short.proc.send_signal(signal.SIGTERM)
            with pytest.raises(RemoteError):
                async with asyncio.timeout(20):
                    await proc.wait()
        assert await wait_exit(short.proc, 20) == 0
    finally:
        short.stop()
        kill_leftovers(pids)
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    requests = [r for r in records if r["event"] == "request" and r.get("op") == "exec"]
    assert [r["outcome"] for r in requests] == ["shutting_down"], requests


async def test_error_messages_quote_the_clients_text_cut_short(agent: Agent) -> None:
    """A program or directory name of thousands of characters comes back in
    the error cut to 64 characters (§3.3), as an unknown op or signal does."""
    long_name = "p" * 5000
    async with connect(agent) as conn:
        for argv, cwd in (([long_name], None), (["true"], "d" * 5000)):
            with pytest.raises(RemoteError) as caught:
                await conn.run(argv, cwd=cwd)
            assert len(caught.value.message) < 120, caught.value.message
            assert "p" * 64 + "..." in caught.value.message or "d" * 64 + "..." in (
                caught.value.message
            )


async def test_sigterm_with_short_grace_kills_a_group_that_ignores_term(tmp_path: Path) -> None:
    short = start_agent(tmp_path, "--grace", "1", name="grace")
    pids: list[int] = []
    try:
        async with tether.connect(short.host, token=short.token) as conn:
            proc = await conn.exec(shell=DEAF_PIDS_SH)
            await read_pids(proc, 2, pids)
            short.proc.send_signal(signal.SIGTERM)
            with pytest.raises(RemoteError) as caught:
                async with asyncio.timeout(30):
                    await proc.wait()
            assert caught.value.code == "shutting_down"
        assert await wait_exit(short.proc, 30) == 0
        # "then kill what is left": the agent may not exit leaving these behind.
        assert await async_survivors(pids) == []
    finally:
        short.stop()
        check_clean_log(short)
        kill_leftovers(pids)

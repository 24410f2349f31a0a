"""The client API when requests end badly, are cancelled, or are never read:
nothing hangs, nothing leaks, and errors say what happened.

A real agent (``tether serve`` child process) and the public API, as in
test_exec.py. Every wait is bounded.
"""

from __future__ import annotations

import array
import asyncio
import socket
from pathlib import Path

import pytest

import tether
from conftest import Agent, check_clean_log, start_agent
from tether.known_hosts import add_known_host, lookup_known_host
from tether.limits import Limits

BOUND = 10.0  # seconds any single wait below may take at the most


def connect(agent: Agent) -> tether.Connecting:
    return tether.connect(agent.host, token=agent.token, insecure_plaintext=not agent.tls)


async def test_waiting_again_on_an_ended_command_does_not_hang(agent: Agent) -> None:
    """Once a command has failed to start, or was abandoned, every later wait()
    or iteration raises again: it waited for a frame that would never come."""
    async with connect(agent) as conn:
        failed = await conn.exec(["no-such-program-for-tether"])
        for _ in range(2):
            with pytest.raises(tether.RemoteError) as info:
                await asyncio.wait_for(failed.wait(), BOUND)
            assert info.value.code == "not_found"

        running = await conn.exec(["sleep", "30"])
        running.abandon()
        for _ in range(2):
            with pytest.raises(tether.RemoteError) as info:
                await asyncio.wait_for(running.wait(), BOUND)
            assert info.value.code == "cancelled"
        assert (await conn.run(["echo", "still fine"])).stdout == b"still fine\n"


async def test_async_with_a_command_keeps_the_exception_of_its_block(tmp_path: Path) -> None:
    """A block around a running command that fails after the connection broke:
    its own exception comes out, not the ConnectionClosed of ending the command
    on the way out (which replaced it)."""
    agent = start_agent(tmp_path)
    async with connect(agent) as conn:
        with pytest.raises(ValueError, match="the block's own"):
            async with await conn.exec(["sleep", "30"]):
                agent.proc.kill()  # the client has not seen the connection end yet
                agent.proc.wait(BOUND)
                raise ValueError("the block's own")


async def test_durations_that_json_cannot_carry_are_refused(agent: Agent) -> None:
    """A timeout of inf or nan is a UsageError saying so, not "cannot encode
    frame header"; an agent is not configured with one (it failed every
    connection with it)."""
    async with connect(agent) as conn:
        for value in (float("inf"), float("nan"), 0.0):
            with pytest.raises(tether.UsageError, match="finite number of seconds > 0"):
                await conn.exec(["true"], timeout=value)
        assert (await conn.run(["true"], timeout=5)).returncode == 0
    for name in ("idle_timeout", "hello_timeout", "grace"):
        with pytest.raises(tether.UsageError, match=f"{name} must be a finite number"):
            tether.ServerConfig(token="x", **{name: float("inf")})


async def test_an_exec_cancelled_before_it_returns_is_ended(agent: Agent) -> None:
    """exec() waits for room to send its request; cancelled there, the command
    must not run on with nobody to read its output (which would stall the
    connection once 8 MiB were unread)."""
    async with connect(agent) as conn:
        wire = conn._wire
        wire.pause_writing()  # what the transport does when its buffer is full
        starting = asyncio.ensure_future(conn.exec(["yes"]))
        await asyncio.sleep(0.1)
        assert not starting.done()
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        wire.resume_writing()
        assert wire.queues == {}  # nothing left registered for it
        # The agent was told: the connection carries no flood of "yes" output.
        for _ in range(3):
            assert await asyncio.wait_for(conn.echo("ok"), BOUND) == "ok"
            await asyncio.sleep(0.2)
        assert wire._unread == 0


async def test_close_does_not_hang_on_input_the_agent_does_not_read(agent: Agent) -> None:
    """A command that never reads its stdin, and more stdin queued than the
    socket takes: close() cuts the connection (at once: what waits can only be
    for the command left running) instead of waiting forever for the queue to
    drain. The agent, which may have stopped reading that connection, sees it
    gone and ends the command, which would otherwise have run on for nobody."""
    async with connect(agent) as conn:
        proc = await conn.exec(["sleep", "61.25"], stdin=True)
        chunk = b"x" * (1024 * 1024)
        for _ in range(64):  # 64 MiB: far more than the socket buffers hold
            conn._wire.send(tether.messages.Stdin(proc.id, body=chunk))
        await asyncio.wait_for(conn.close(), BOUND)
        assert conn._wire.lost.done()
        with pytest.raises(tether.ConnectionClosed):
            await conn.echo("x")
    async with connect(agent) as check:
        for _ in range(100):
            found = await check.run(["pgrep", "-f", "^sleep 61.25$"])
            if found.returncode != 0:
                break
            await asyncio.sleep(0.2)
        assert found.returncode != 0, "the command still runs after its client went away"


async def test_a_request_too_large_to_send_leaves_nothing_registered(agent: Agent) -> None:
    """An exec whose header is over the limit is refused before it is sent,
    and leaves no request behind (its queue stayed registered for ever)."""
    async with connect(agent) as conn:
        for _ in range(3):
            with pytest.raises(tether.TetherError):
                await conn.run(["echo", "a" * 70_000])
        assert conn._wire.queues == {}
        assert (await conn.run(["echo", "ok"])).stdout == b"ok\n"


async def test_keepalive_goes_on_while_output_waits_unread(tmp_path: Path) -> None:
    """More than 8 MiB of output unread stops the client reading; its
    keepalive must still reach the agent, which would otherwise close the
    connection as idle (§4.8) and the output would be lost."""
    agent = start_agent(tmp_path, "--idle-timeout", "2")
    try:
        async with connect(agent) as conn:
            proc = await conn.exec(["head", "-c", str(12 * 1024 * 1024), "/dev/zero"])
            await asyncio.sleep(6)  # three idle timeouts, nothing read
            received = 0
            async for chunk in proc:
                received += len(chunk.data)
            assert (received, proc.exit_status) == (12 * 1024 * 1024, tether.ExitStatus(0))
            assert await asyncio.wait_for(conn.echo("after"), BOUND) == "after"
    finally:
        agent.stop()
    check_clean_log(agent)


async def test_a_connect_cancelled_from_outside_closes_its_socket() -> None:
    """A listener that accepts and never answers the hello: cancelling connect()
    from outside closes the socket at once, not when the garbage collector
    finds it."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        connecting = tether.connect(
            f"127.0.0.1:{port}", token="t", connect_timeout=60, insecure_plaintext=True
        )
        attempt = asyncio.ensure_future(connecting.__aenter__())
        accepted, _ = await asyncio.to_thread(listener.accept)
        with accepted:
            await asyncio.sleep(0.2)
            attempt.cancel()
            with pytest.raises(asyncio.CancelledError):
                await attempt
            accepted.settimeout(BOUND)
            while await asyncio.to_thread(accepted.recv, 65536):
                pass  # the client's hello, then end of file


async def test_after_close_requests_say_the_connection_was_closed_here(agent: Agent) -> None:
    async with connect(agent) as conn:
        await conn.close()
        with pytest.raises(tether.ConnectionClosed) as info:
            await conn.echo("x")
        assert str(info.value) == "the connection was closed"


async def test_stdin_of_any_item_size_is_sent_as_its_bytes(agent: Agent) -> None:
    """A memoryview of 8-byte items (array, numpy) was cut in items, not bytes:
    frames eight times too large."""
    data = array.array("q", range(3_000_000))  # 24 MB in 3 million items: two frames
    async with connect(agent) as conn:
        result = await conn.run(["cat"], input=memoryview(data))  # type: ignore[arg-type]
    assert result.stdout == data.tobytes()


def test_a_pin_added_to_a_file_without_a_final_newline_starts_its_own_line(
    tmp_path: Path,
) -> None:
    known = tmp_path / "known_hosts"
    known.write_bytes(b"web1:7447 SHA256:one")  # edited by hand, no final newline
    add_known_host(known, "web2:7447", "SHA256:two")
    assert known.read_text() == "web1:7447 SHA256:one\nweb2:7447 SHA256:two\n"
    assert lookup_known_host(known, "web1:7447").fingerprint == "SHA256:one"  # type: ignore[union-attr]
    add_known_host(known, "web3:7447", "SHA256:three")
    assert known.read_text().splitlines()[-1] == "web3:7447 SHA256:three"


async def test_an_unreadable_known_hosts_file_is_named(agent: Agent, tmp_path: Path) -> None:
    directory = tmp_path / "known_hosts"
    directory.mkdir()  # a directory where the file should be
    if not agent.tls:
        pytest.skip("pins are for TLS agents")
    with pytest.raises(tether.UsageError) as info:
        async with tether.connect(agent.host, token=agent.token, known_hosts=directory):
            pass
    assert str(info.value) == f"known hosts file {directory}: Is a directory"


# Several tasks on one command: nothing hangs, and nothing takes output another
# task is reading.

COUNTING = ["sh", "-c", "for i in 1 2 3 4 5; do echo $i; sleep 0.05; done"]


async def read_all(proc: tether.RemoteProcess) -> bytes:
    return b"".join([out.data async for out in proc])


async def test_wait_beside_a_reader_leaves_it_the_output(agent: Agent) -> None:
    """wait() was itself a reader: beside an `async for` in another task it
    took part of the output, and whichever of the two missed the exit frame
    waited for ever."""
    async with connect(agent) as conn, asyncio.timeout(BOUND):
        proc = await conn.exec(COUNTING)
        reader = asyncio.ensure_future(read_all(proc))
        await asyncio.sleep(0)  # the reader is iterating before wait() starts
        assert await proc.wait() == tether.ExitStatus(0)
        assert await reader == b"1\n2\n3\n4\n5\n"


async def test_a_reader_that_starts_while_wait_discards_gets_what_comes_next(
    agent: Agent,
) -> None:
    async with connect(agent) as conn, asyncio.timeout(BOUND):
        proc = await conn.exec(["sh", "-c", "sleep 0.5; echo late"])
        waiting = asyncio.ensure_future(proc.wait())
        await asyncio.sleep(0.1)  # wait() is waiting for a frame to discard
        assert await read_all(proc) == b"late\n"
        assert await waiting == tether.ExitStatus(0)


async def test_wait_after_a_loop_that_broke_out_gets_the_end(agent: Agent) -> None:
    """`async for ...: break`, then wait() in another task (asyncio.wait_for
    makes one): the task that broke out reads no more, so wait() must not
    wait for it to. It waited for ever."""
    async with connect(agent) as conn, asyncio.timeout(BOUND):
        proc = await conn.exec(["sh", "-c", "echo ready; sleep 0.3; exit 3"])
        async for _ in proc:
            break
        assert await asyncio.wait_for(proc.wait(), BOUND) == tether.ExitStatus(3)


async def test_a_write_to_a_command_that_ended_returns(agent: Agent) -> None:
    """More than the stdin window written to a command that has exited,
    its output not read yet: the agent drops the input, and the exit frame
    ends the window. write() waited for credit for ever."""
    async with connect(agent) as conn, asyncio.timeout(BOUND):
        proc = await conn.exec(["true"], stdin=True)
        await asyncio.sleep(0.3)
        await proc.write(bytes(conn.stdin_window + 1))
        assert await proc.wait() == tether.ExitStatus(0)
        proc = await conn.exec(["head", "-c", "100"], stdin=True)
        await proc.write(bytes(3 * conn.stdin_window))
        assert await proc.wait() == tether.ExitStatus(0)


async def test_close_stdin_during_a_write_comes_after_all_of_it(agent: Agent) -> None:
    """close_stdin() from another task while write() waits for credit: the
    end-of-file went at once, the rest of the data after it was dropped by
    the agent, and write() returned as if all was sent."""
    async with connect(agent) as conn, asyncio.timeout(BOUND):
        proc = await conn.exec(["sh", "-c", "sleep 0.5; wc -c"], stdin=True)
        size = 2 * conn.stdin_window
        writing = asyncio.ensure_future(proc.write(bytes(size)))
        await asyncio.sleep(0.2)  # the write waits for credit
        reading = asyncio.ensure_future(read_all(proc))
        await proc.close_stdin()
        await writing
        assert int(await reading) == size


async def test_two_readers_of_one_command_both_see_the_end(agent: Agent) -> None:
    """Two `async for` loops over one command: the one that missed the exit
    frame waited for ever. Between them they get all of it, each in order;
    a reader that comes after the end gets nothing."""
    async with connect(agent) as conn, asyncio.timeout(BOUND):
        proc = await conn.exec(COUNTING)
        first, second = await asyncio.gather(read_all(proc), read_all(proc))
        assert sorted((first + second).splitlines()) == [b"1", b"2", b"3", b"4", b"5"]
        assert proc.exit_status == tether.ExitStatus(0)
        assert await read_all(proc) == b""

        proc = await conn.exec(["sleep", "30"])
        readers = [asyncio.ensure_future(read_all(proc)) for _ in range(2)]
        waiting = asyncio.ensure_future(proc.wait())
        await asyncio.sleep(0.1)
        proc.abandon()
        for task in (*readers, waiting):
            with pytest.raises(tether.RemoteError) as info:
                await task
            assert info.value.code == "cancelled"


# run()'s input ---------------------------------------------------------------------


async def test_run_refuses_text_input_and_ends_when_its_feeder_fails(agent: Agent) -> None:
    """A str input failed the task feeding stdin, unseen: the command waited for
    its stdin for ever. Text is refused before the command starts; any other
    failure of the feeder ends the run with that failure."""
    async with connect(agent) as conn, asyncio.timeout(BOUND):
        with pytest.raises(tether.UsageError, match="input must be bytes-like"):
            await conn.run(["cat"], input="text")  # type: ignore[arg-type]
        assert conn._wire.queues == {}  # nothing was started

        view = memoryview(bytearray(b"some input"))
        # Runs once run() has checked the input and started the command, before
        # its feeder reads the input (in the same task: no wait_for here).
        asyncio.get_running_loop().call_soon(view.release)
        with pytest.raises(ValueError, match="released memoryview"):
            await conn.run(["cat"], input=view)
        assert conn._wire.queues == {}
        assert (await conn.run(["cat"], input=b"still fine")).stdout == b"still fine"


# Sending to a command ----------------------------------------------------------------


async def test_sending_to_a_command_after_its_connection_failed_raises(tmp_path: Path) -> None:
    """write(), close_stdin() and send_signal() returned as if done once the
    connection had failed; to a command that simply ended they still return
    quietly."""
    agent = start_agent(tmp_path)
    async with connect(agent) as conn, asyncio.timeout(BOUND):
        ended = await conn.exec(["true"], stdin=True)
        assert await ended.wait() == tether.ExitStatus(0)
        running = await conn.exec(["sleep", "30"], stdin=True)
        agent.proc.kill()
        agent.proc.wait(BOUND)
        with pytest.raises(tether.ConnectionClosed):
            await running.wait()
        with pytest.raises(tether.ConnectionClosed):
            await running.write(b"x")
        with pytest.raises(tether.ConnectionClosed):
            await running.close_stdin()
        with pytest.raises(tether.ConnectionClosed):
            await running.send_signal("TERM")
        await ended.write(b"x")
        await ended.close_stdin()
        await ended.send_signal("TERM")


async def test_write_to_a_command_started_without_stdin_is_refused(agent: Agent) -> None:
    async with connect(agent) as conn, asyncio.timeout(BOUND):
        proc = await conn.exec(["cat"])
        with pytest.raises(tether.UsageError, match="without stdin=True"):
            await proc.write(b"dropped")
        assert (await proc.wait()).returncode == 0


# Bad arguments are UsageErrors, not builtin exceptions -------------------------------


async def test_bad_arguments_are_usage_errors(agent: Agent) -> None:
    async with connect(agent) as conn, asyncio.timeout(BOUND):
        proc = await conn.exec(["sleep", "30"])
        for bad in (12345, None, 1.5, True):
            with pytest.raises(tether.UsageError):
                await proc.send_signal(bad)  # type: ignore[arg-type]
        await proc.send_signal(9)  # a number is this machine's signal
        assert (await proc.wait()).signal == 9

        with pytest.raises(tether.UsageError, match="cannot be sent as UTF-8"):
            await conn.echo("\ud800")
        with pytest.raises(tether.UsageError, match="bytes-like"):
            await conn.echo(5)  # type: ignore[arg-type]
        assert await conn.echo("\udcff") == "\udcff"  # surrogateescape: a byte that is not UTF-8
        assert await conn.echo(bytearray(b"ab")) == b"ab"
        for timeout in ("1", True):
            with pytest.raises(tether.UsageError, match="finite number of seconds > 0"):
                await conn.run(["true"], timeout=timeout)  # type: ignore[arg-type]
        assert conn._wire.queues == {}


# A connection outlives its event loop ------------------------------------------------


def test_a_connection_whose_event_loop_ended_refuses_requests(agent: Agent) -> None:
    """Made in one asyncio.run() and used in another, a request was written
    through the ended loop's transport (the command ran on the agent) and then
    hung, or raised a RuntimeError."""

    async def open_connection() -> tether.Connection:
        return await connect(agent)

    conn = asyncio.run(open_connection())
    marker = agent.root / "ran"

    async def use() -> None:
        async with asyncio.timeout(BOUND):
            with pytest.raises(tether.ConnectionClosed, match="event loop that has ended"):
                await conn.run(["touch", str(marker)])
            with pytest.raises(tether.ConnectionClosed, match="event loop that has ended"):
                await conn.echo("x")
            await conn.close()
            with pytest.raises(tether.ConnectionClosed, match="the connection was closed"):
                await conn.echo("x")

    asyncio.run(use())
    assert not marker.exists()


def test_a_command_whose_event_loop_ended_raises_instead_of_waiting(agent: Agent) -> None:
    """A command started in one asyncio.run(), read or waited for in
    another: nothing can come any more, so it is ConnectionClosed, not a
    wait for ever."""

    async def start() -> tuple[tether.Connection, tether.RemoteProcess]:
        conn = await connect(agent)
        return conn, await conn.exec(["sleep", "30"])

    conn, proc = asyncio.run(start())

    async def use() -> None:
        async with asyncio.timeout(BOUND):
            with pytest.raises(tether.ConnectionClosed, match="event loop that has ended"):
                async for _ in proc:
                    pass
            with pytest.raises(tether.ConnectionClosed, match="event loop that has ended"):
                await proc.wait()
            await conn.close()

    asyncio.run(use())


@pytest.mark.parametrize("window", [1000, 65536])
def test_a_stdin_window_smaller_than_a_pipe_buffer_still_flows(tmp_path: Path, window: int) -> None:
    """An agent (the public Server) with a stdin window of 64 KiB or less:
    stdin that left the pipe's buffer without the buffer ever passing its
    high-water mark was never credited, and the writer waited for ever."""

    async def main() -> None:
        config = tether.ServerConfig(
            token="t", port=0, udp=False, root=tmp_path, limits=Limits(stdin_window=window)
        )
        server = tether.Server(config)
        await server.start()
        port = server.addresses[0].rsplit(":", 1)[1]
        try:
            async with (
                tether.connect(f"127.0.0.1:{port}", token="t", insecure_plaintext=True) as conn,
                asyncio.timeout(BOUND * 3),
            ):
                result = await conn.run(["cat"], input=b"q" * 5_000_000)
                assert result.stdout == b"q" * 5_000_000
        finally:
            await server.close()

    tether.run(main())


def test_a_unix_socket_that_answers_no_hello_gives_no_tls_hint(tmp_path: Path) -> None:
    """Something on a Unix socket that closes at once: the error must not
    tell to drop --insecure-plaintext, which was never given (Unix sockets
    are always plaintext). It did."""
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)

        async def main() -> None:
            with pytest.raises(tether.TetherError) as info:
                async with asyncio.timeout(BOUND):
                    await asyncio.gather(
                        tether.connect(f"unix:{path}", token="t"),
                        asyncio.to_thread(lambda: listener.accept()[0].close()),
                    )
            assert "insecure-plaintext" not in str(info.value)

        asyncio.run(main())

"""A raw frame client for the tests: a blocking socket speaking bytes to the agent.

It sends whatever it is given (well-formed frames, hand-written headers, bare
bytes) and decodes what the agent sends back, so tests can drive the agent's
frame decoder and handshake directly.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any

from conftest import Agent
from tether.frames import Frame, FrameDecoder, encode_frame
from tether.limits import PROTOCOL_VERSION

IO_TIMEOUT = 5.0  # seconds a raw socket waits for the agent to answer or close


def tcp_address(a: Agent) -> tuple[str, int]:
    host, port = a.host.rsplit(":", 1)
    return host.strip("[]"), int(port)


def hello_bytes(token: Any, version: int = PROTOCOL_VERSION, ident: int = 0) -> bytes:
    return encode_frame({"op": "hello", "id": ident, "version": version, "token": token})


def unverified_tls_context() -> ssl.SSLContext:
    """TLS to a test agent without checking its certificate (pins are tested elsewhere)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class RawClient:
    """A plain blocking socket speaking bytes to the agent, with a frame decoder.

    ``address`` is a Unix socket path or a TCP ``(host, port)``; TCP is wrapped
    in TLS (no pin checked) unless ``tls=False``. ``source`` binds the local end
    to that address first; ``rcvbuf`` shrinks the receive buffer (set before
    connecting, so the TCP window is small from the start): a client that reads
    nothing then stops the agent's writes quickly.
    """

    def __init__(
        self,
        address: str | tuple[str, int],
        timeout: float = IO_TIMEOUT,
        *,
        tls: bool = True,
        source: str | None = None,
        rcvbuf: int | None = None,
    ) -> None:
        sock: socket.socket
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(timeout)
            if source is not None:
                sock.bind((source, 0))
            sock.connect(address)
            if tls and not isinstance(address, str):
                # The agent's TCP is TLS by default: the bad bytes sent must reach
                # the frame decoder behind it, so speak TLS first (no pin needed).
                sock = unverified_tls_context().wrap_socket(sock)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.timeout = timeout
        self.decoder = FrameDecoder()
        self._pending: list[Frame] = []

    @property
    def name(self) -> str:
        """This end's address as the agent's log writes its peer (IPv4)."""
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, header: dict[str, Any], body: bytes = b"") -> None:
        self.sock.sendall(encode_frame(header, body))

    def send_raw_header(self, raw: bytes) -> None:
        """A header written by hand (JSON that ``json.dumps`` would never produce)."""
        self.sock.sendall(struct.pack(">I", len(raw)) + raw)

    def shutdown_write(self) -> None:
        """End this side's input to the agent and go on reading its answer.

        Over TLS that is a close_notify alert: sent by a non-blocking unwrap,
        which stops at waiting for the agent's close_notify and leaves the TLS
        layer in place for the reads that follow (the agent's own close_notify
        then reads as end-of-file).
        """
        if not isinstance(self.sock, ssl.SSLSocket):
            self.sock.shutdown(socket.SHUT_WR)
            return
        self.sock.setblocking(False)
        try:
            self.sock.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify sent; the agent's one is read below
        else:
            raise AssertionError("the agent closed TLS before this side did")
        finally:
            self.sock.settimeout(self.timeout)

    def _receive(self, timeout: float) -> bytes:
        try:
            return self.sock.recv(65536)
        except ssl.SSLZeroReturnError:
            return b""  # the agent's close_notify after ours (see shutdown_write)
        except (ssl.SSLEOFError, ConnectionResetError):
            return b""  # closed without a TLS close_notify: still closed
        except TimeoutError:
            raise AssertionError(
                f"the agent neither answered nor closed within {timeout}s"
            ) from None

    def read_frame(self, timeout: float | None = None) -> Frame:
        """The next frame within ``timeout`` seconds; fails if the agent closes first."""
        if timeout is None:
            timeout = self.timeout
        deadline = time.monotonic() + timeout
        try:
            while not self._pending:
                left = deadline - time.monotonic()
                assert left > 0, f"no frame from the agent within {timeout}s"
                self.sock.settimeout(left)
                chunk = self._receive(timeout)
                assert chunk, "the agent closed the connection before sending a frame"
                self.decoder.receive_data(chunk)
                self._pending.extend(self.decoder.frames())
        finally:
            self.sock.settimeout(self.timeout)
        return self._pending.pop(0)

    def read_until(self, done: Callable[[list[Frame]], bool], timeout: float) -> list[Frame]:
        """Frames until ``done(frames so far)``; fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        frames: list[Frame] = []
        while not done(frames):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"not done within {timeout}s; got {[f.header for f in frames][-5:]}"
                )
            frames.append(self.read_frame(left))
        return frames

    def read_to_eof(self) -> list[Frame]:
        """Every frame the agent sends until it closes (recv returns b"")."""
        deadline = time.monotonic() + self.timeout
        while chunk := self._receive(self.timeout):
            self.decoder.receive_data(chunk)
            assert time.monotonic() < deadline, "the agent kept the connection open"
        frames = self._pending + list(self.decoder.frames())
        self._pending = []
        assert self.decoder.buffered == 0, "the agent sent a partial frame before closing"
        return frames

    def hello(self, token: str) -> Frame:
        self.send(hello_bytes(token))
        reply = self.read_frame()
        assert (reply.op, reply.id) == ("hello", 0), reply.header
        assert reply.header["version"] == PROTOCOL_VERSION
        return reply

    def echo(self, ident: int, body: bytes, timeout: float) -> None:
        """An echo on this connection is answered (other frames may come first)."""
        self.send_frame({"op": "echo", "id": ident}, body)
        frames = self.read_until(lambda fs: bool(fs) and fs[-1].id == ident, timeout)
        assert (frames[-1].op, frames[-1].body) == ("ok", body), frames[-1].header

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Writing what a sans-I/O protocol has queued to an asyncio transport, and
cutting a connection that will not take it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from ..protocol import ClientProtocol, ServerProtocol

__all__ = ["flush", "reset"]


def flush(protocol: ServerProtocol | ClientProtocol, transport: asyncio.Transport | None) -> None:
    """Write the protocol's queued buffers, unless the transport is gone or closing.

    One buffer (a small frame, the common case) goes through ``write``, which
    uvloop handles with less work than a one-item ``writelines``.
    """
    data = protocol.data_to_send()
    if not data or transport is None or transport.is_closing():
        return
    if len(data) == 1:
        transport.write(data[0])
    else:
        transport.writelines(data)


def reset(transport: asyncio.Transport) -> None:
    """Cut the connection with a reset. A plain close, or an abort, would
    leave the kernel sending what is queued, then the end of the stream, to
    a peer that reads none of it: that peer would never learn that we are
    gone, and the kernel would hold the socket and its buffers for minutes."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()

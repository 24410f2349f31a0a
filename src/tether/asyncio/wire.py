"""Writing what a sans-I/O protocol has queued to an asyncio transport."""

from __future__ import annotations

import asyncio

from ..protocol import ClientProtocol, ServerProtocol

__all__ = ["flush"]


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

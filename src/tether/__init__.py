"""tether: run commands and move files on machines you control.

The public API is what this module exports::

    import tether

    async with tether.connect("host:7447", token_file="token") as conn:
        result = await conn.run(["uname", "-a"])
        print(result.stdout_text, result.returncode)
"""

from __future__ import annotations

from .addresses import Address, RemotePath, parse_address, parse_remote_path
from .asyncio.client import (
    CommandResult,
    Connection,
    ExitStatus,
    Output,
    RemoteProcess,
    connect,
)
from .asyncio.loop import run
from .asyncio.server import Server, ServerConfig
from .asyncio.transfer import Progress, RemoteStat, TransferResult
from .asyncio.udp import PingReply, ping
from .exceptions import (
    AuthenticationError,
    CertificateError,
    ConnectError,
    ConnectionClosed,
    FrameTooLarge,
    ProtocolError,
    RemoteError,
    TetherError,
    TimeoutError,
    TransferError,
    UsageError,
)
from .limits import DEFAULT_PORT, PROTOCOL_VERSION, Limits
from .tokens import create_token_file, default_state_dir, find_client_token

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PORT",
    "PROTOCOL_VERSION",
    "Address",
    "AuthenticationError",
    "CertificateError",
    "CommandResult",
    "ConnectError",
    "Connection",
    "ConnectionClosed",
    "ExitStatus",
    "FrameTooLarge",
    "Limits",
    "Output",
    "PingReply",
    "Progress",
    "ProtocolError",
    "RemoteError",
    "RemotePath",
    "RemoteProcess",
    "RemoteStat",
    "Server",
    "ServerConfig",
    "TetherError",
    "TimeoutError",
    "TransferError",
    "TransferResult",
    "UsageError",
    "__version__",
    "connect",
    "create_token_file",
    "default_state_dir",
    "find_client_token",
    "parse_address",
    "parse_remote_path",
    "ping",
    "run",
]

"""tether: run commands and move files on machines you control.

The public API is what this module exports::

    import tether

    async with tether.connect("host:7447", token_file="token") as conn:
        result = await conn.run(["uname", "-a"])
        print(result.stdout_text, result.returncode)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .addresses import Address, RemotePath, parse_address, parse_remote_path
    from .asyncio.client import CommandResult, Connection, ExitStatus, Output, RemoteProcess
    from .asyncio.connecting import connect
    from .asyncio.loop import run
    from .asyncio.server import Server, ServerConfig
    from .asyncio.transfer import Progress, RemoteStat, Skipped, TransferResult
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
        TreeCopyError,
        UsageError,
    )
    from .limits import DEFAULT_PORT, PROTOCOL_VERSION, Limits
    from .tokens import create_token_file, default_state_dir, find_client_token

# Where each public name lives. They are imported on first use (PEP 562), so
# ``tether exec`` starts without loading the agent, the transfer code or TLS
# certificate generation: a fresh command should start faster than ssh.
_EXPORTS = {
    "Address": "addresses",
    "RemotePath": "addresses",
    "parse_address": "addresses",
    "parse_remote_path": "addresses",
    "CommandResult": "asyncio.client",
    "Connection": "asyncio.client",
    "ExitStatus": "asyncio.client",
    "Output": "asyncio.client",
    "RemoteProcess": "asyncio.client",
    "connect": "asyncio.connecting",
    "run": "asyncio.loop",
    "Server": "asyncio.server",
    "ServerConfig": "asyncio.server",
    "Progress": "asyncio.transfer",
    "RemoteStat": "asyncio.transfer",
    "Skipped": "asyncio.transfer",
    "TransferResult": "asyncio.transfer",
    "PingReply": "asyncio.udp",
    "ping": "asyncio.udp",
    "AuthenticationError": "exceptions",
    "CertificateError": "exceptions",
    "ConnectError": "exceptions",
    "ConnectionClosed": "exceptions",
    "FrameTooLarge": "exceptions",
    "ProtocolError": "exceptions",
    "RemoteError": "exceptions",
    "TetherError": "exceptions",
    "TimeoutError": "exceptions",
    "TransferError": "exceptions",
    "TreeCopyError": "exceptions",
    "UsageError": "exceptions",
    "DEFAULT_PORT": "limits",
    "PROTOCOL_VERSION": "limits",
    "Limits": "limits",
    "create_token_file": "tokens",
    "default_state_dir": "tokens",
    "find_client_token": "tokens",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tether' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


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
    "Skipped",
    "TetherError",
    "TimeoutError",
    "TransferError",
    "TransferResult",
    "TreeCopyError",
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

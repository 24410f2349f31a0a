"""What OpenSSL itself holds per idle server-side TLS session, without any event loop.

Run by hand (``.venv/bin/python bench/probe_tls_memory.py``); not a test. It
makes the agent's own TLS contexts (``tether.asyncio.tls``, a throwaway
certificate in a temporary directory), then ``--count`` sessions between an
``ssl.SSLObject`` client and server over memory BIOs: the handshake, one
64-byte message each way (as a hello and its answer), then the client's end is
dropped and the server's end kept, as an idle agent keeps it. It prints the
bytes glibc's ``malloc`` reports in use (``mallinfo2``: exact, unlike resident
memory, which moves with fragmentation) per kept session, and what that comes
to for 10,000 connections: the floor under bench_idle.py's TLS figure that no
code of tether's can go below.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import ssl
import tempfile
from pathlib import Path

from tether.asyncio import tls


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def malloc_in_use() -> int:
    """Bytes allocated through malloc and not freed: small blocks plus mmap'd ones."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def _pump(pairs: list[tuple[ssl.MemoryBIO, ssl.MemoryBIO]]) -> None:
    for source, dest in pairs:
        data = source.read()
        if data:
            dest.write(data)


def server_session(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> object:
    """A server-side session after a handshake and a 64-byte exchange; what it keeps."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    wires = [(c_out, s_in), (s_out, c_in)]
    for _ in range(8):  # TLS 1.3 needs two round trips; bounded all the same
        for end in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
        _pump(wires)
    client.write(b"h" * 64)
    _pump(wires)
    if server.read(1024) != b"h" * 64:
        raise RuntimeError("the hello did not arrive")
    server.write(b"o" * 64)
    _pump(wires)
    if client.read(1024) != b"o" * 64:
        raise RuntimeError("the answer did not arrive")
    return (server, s_in, s_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="sessions to keep")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cert, key, _ = tls.ensure_certificate(Path(tmp))
        server_ctx = tls.server_context(cert, key)
    client_ctx = tls.client_context(None)
    kept = [server_session(server_ctx, client_ctx) for _ in range(10)]  # warm-up
    gc.collect()
    before = malloc_in_use()
    kept += [server_session(server_ctx, client_ctx) for _ in range(args.count)]
    gc.collect()
    per_session = (malloc_in_use() - before) / args.count
    print(f"{ssl.OPENSSL_VERSION}, TLS 1.3, {args.count} idle server-side sessions kept")
    print(f"malloc in use per session: {per_session / 1024:.1f} KiB")
    print(f"for 10,000 connections: {per_session * 10_000 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()

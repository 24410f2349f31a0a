"""Self-test of ``bench/sshpeers.py``: every SSH-side measurement once, numbers printed.

Run by hand (``.venv/bin/python bench/sshpeers_selftest.py [--size MiB]``); it is
not a test and checks nothing beyond what each measurement checks (sizes equal,
exit status 0). It writes one random file of ``--size`` MiB in a temporary
directory, starts a throwaway sshd (``sshpeers.LocalSshd``) and runs, once each:
scp and sftp put and get with the default cipher and with aes128-gcm, asyncssh
and paramiko SFTP put and get, ``--exec-count`` asyncssh ``conn.run("true")``
calls one at a time and up to 200 at once, and three fresh ``ssh HOST true``
processes. Each figure is what the runner would time in one round (see
``sshpeers``). Peers that are not installed are listed as n/a and skipped.
Loopback only; sshd is stopped and the temporary files removed at the end.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

# Run as ``python bench/sshpeers_selftest.py``: ``bench/`` is on sys.path.
import common
import sshpeers
from common import MiB
from sshpeers import LocalSshd


def print_rate(name: str, size: int, seconds: float) -> None:
    print(f"  {name:34} {seconds:8.3f} s {size / seconds / 1e6:8.0f} MB/s", flush=True)


async def selftest_asyncssh(sshd: LocalSshd, source: Path, tmp: Path, exec_count: int) -> None:
    """asyncssh SFTP put and get on one connection, then its exec rates (if ``exec_count``)."""
    size = source.stat().st_size
    async with sshpeers.asyncssh_connection(sshd) as conn, conn.start_sftp_client() as sftp:
        block, requests = sshpeers.asyncssh_transfer_parameters(sftp)
        # A private attribute, read for this description only.
        cipher = getattr(conn, "_enc_alg_cs", b"?").decode()
        print(f"  asyncssh: cipher {cipher}, {block} B blocks, {requests} requests in flight")
        for name, measure in (("put", sshpeers.asyncssh_put), ("get", sshpeers.asyncssh_get)):
            dest = tmp / f"asyncssh-{name}.bin"
            print_rate(f"asyncssh {name}", size, await measure(sftp, source, dest))
            common.remove(dest)
        for concurrency in (1, min(200, exec_count)) if exec_count else ():
            per_second = await sshpeers.asyncssh_exec_rate(conn, exec_count, concurrency)
            label = f"asyncssh run('true'), {concurrency} at once"
            print(f"  {label:34} {exec_count:6} calls {per_second:8.0f} /s", flush=True)


def selftest_paramiko(sshd: LocalSshd, source: Path, tmp: Path) -> None:
    """paramiko SFTP put and get on one connection."""
    size = source.stat().st_size
    with sshpeers.paramiko_sftp(sshd) as sftp:
        channel = sftp.get_channel()
        assert channel is not None
        cipher = channel.get_transport().local_cipher
        print(f"  paramiko: cipher {cipher}, 32768 B requests")
        for name, measure in (("put", sshpeers.paramiko_put), ("get", sshpeers.paramiko_get)):
            dest = tmp / f"paramiko-{name}.bin"
            print_rate(f"paramiko {name}", size, measure(sftp, source, dest))
            common.remove(dest)


def selftest(args: argparse.Namespace) -> None:
    """Every measurement once, on a random file of ``--size`` MiB; prints the numbers."""
    size = args.size * MiB
    for peer in sshpeers.PEERS:
        if reason := sshpeers.missing(peer):
            print(f"  {peer}: n/a ({reason})")
    with (
        tempfile.TemporaryDirectory(prefix="tether-sshpeers-", dir=args.dir) as name,
        LocalSshd(args.sftp_server, shell_rc=args.shell_rc) as sshd,
    ):
        tmp = Path(name)
        source = tmp / "source.bin"
        common.write_random(source, size)
        rc = "sourced" if sshd.shell_rc else "skipped (SHLVL=1)"
        print(
            f"sshd on {sshpeers.HOST}:{sshd.port}, Subsystem sftp {sshd.sftp_server}, "
            f"~/.bashrc {rc}, {size // MiB} MiB file in {tmp}"
        )
        dest = tmp / "dest.bin"
        for cipher in (None, sshpeers.AES_GCM):
            label = cipher or "default cipher"
            for name, measure in (
                ("scp put", sshpeers.scp_put),
                ("scp get", sshpeers.scp_get),
                ("sftp put", sshpeers.sftp_put),
                ("sftp get", sshpeers.sftp_get),
            ):
                print_rate(f"{name} ({label})", size, measure(sshd, source, dest, cipher))
                common.remove(dest)
        exec_count = 0 if args.no_exec else args.exec_count
        if sshpeers.available("asyncssh"):
            common.run_loop(selftest_asyncssh(sshd, source, tmp, exec_count))
        if sshpeers.available("paramiko"):
            selftest_paramiko(sshd, source, tmp)
        if exec_count:
            seconds = [sshpeers.ssh_true_seconds(sshd) for _ in range(3)]
            print(f"  fresh ssh true, 3 runs: {', '.join(f'{s * 1000:.0f} ms' for s in seconds)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="file size in MiB (default 64)")
    parser.add_argument("--exec-count", type=int, default=200, help="exec calls per rate run")
    parser.add_argument("--no-exec", action="store_true", help="transfers only")
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary files go")
    parser.add_argument(
        "--sftp-server",
        default=sshpeers.SFTP_SERVER,
        help="sshd's Subsystem sftp (or internal-sftp)",
    )
    parser.add_argument(
        "--shell-rc", action="store_true", help="let sshd's bash source ~/.bashrc per command"
    )
    args = parser.parse_args()
    if args.size < 1 or args.exec_count < 1:
        parser.error("--size and --exec-count must be at least 1")
    selftest(args)


if __name__ == "__main__":
    main()

"""Security of a real agent: TLS and pinning, authentication, the op table, the
exec policy, limits against hostile peers, the audit log, secrets.

Every agent is ``python -m tether serve`` on loopback (see ``conftest.py``).
Hostile peers are plain blocking sockets, raw TLS sockets that skip
verification (so their bytes reach the frame decoder), and an asyncio
man-in-the-middle proxy with its own certificate. Nothing is mocked, nothing
leaves 127.0.0.0/8, and every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import tether
from conftest import Agent, Cli, SmallDisk, check_clean_log, start_agent
from rawclient import RawClient, hello_bytes, tcp_address, unverified_tls_context
from tether.asyncio.tls import ensure_certificate, server_context
from tether.exceptions import CertificateError
from tether.frames import Frame, FrameDecoder, encode_frame
from tether.limits import PROTOCOL_VERSION

IO_TIMEOUT = 5.0  # seconds a raw socket waits for the agent to answer or close
WAIT = 5.0  # seconds to wait for something to show up in a log
FAST = 5.0  # seconds within which a refused connection must have failed

FINGERPRINT_RE = re.compile(r"certificate fingerprint (SHA256:\S+)")


# Agents ----------------------------------------------------------------------------------


@contextlib.contextmanager
def running(tmp: Path, *args: str, name: str = "agent", unix: bool = False) -> Iterator[Agent]:
    """An agent for the block; stopped after it, and its log checked for crashes."""
    a = start_agent(tmp, *args, name=name, unix=unix)
    try:
        yield a
    finally:
        a.stop()
        check_clean_log(a)


def printed_fingerprint(a: Agent) -> str:
    found = FINGERPRINT_RE.search(a.log())
    assert found, a.log()
    return found.group(1)


def cert_fingerprint(path: Path) -> str:
    """SHA-256 of the DER form of the PEM certificate in ``path``, ssh-style,
    computed here with ssl and hashlib, not with tether's code."""
    der = ssl.PEM_cert_to_DER_cert(path.read_text())
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def audit_events(path: Path) -> list[dict[str, Any]]:
    """Every line of an audit log, each one JSON object."""
    events = []
    for line in path.read_text().splitlines():
        event = json.loads(line)
        assert isinstance(event, dict), line
        events.append(event)
    return events


def wait_for_events(
    path: Path, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = WAIT
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        events = audit_events(path) if path.exists() else []
        if predicate(events):
            return events
        if time.monotonic() > deadline:
            raise AssertionError(f"audit log never matched; it holds:\n{events}")
        time.sleep(0.02)


def without_token_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TETHER_TOKEN"}
    env.update(extra)
    return env


def one_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    """The CLI's stderr, which must be exactly one line."""
    lines = proc.stderr.decode(errors="replace").strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


# Certificates made here, with cryptography -------------------------------------------


@dataclass
class Pem:
    cert: Path
    key: Path
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey


def make_cert(
    directory: Path,
    name: str,
    *,
    dns: tuple[str, ...] = ("localhost",),
    ips: tuple[str, ...] = ("127.0.0.1",),
    issuer: Pem | None = None,
    ca: bool = False,
) -> Pem:
    """A certificate (self-signed, or signed by ``issuer``) and its key, as PEM files."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    else:
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        if issuer is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.private_key.public_key()),
                critical=False,
            )
    certificate = builder.sign(issuer.private_key if issuer else key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return Pem(cert_path, key_path, certificate, key)


# Raw peers -------------------------------------------------------------------------------


def frame(header: dict[str, Any]) -> bytes:
    return encode_frame(header)


def assert_connection_error(frames: list[Frame], code: str) -> Frame:
    """Exactly one frame: ``error``, id 0, ``code``; then the connection closed."""
    assert [(f.op, f.id, f.header.get("code")) for f in frames] == [("error", 0, code)], frames
    assert "Traceback" not in frames[0].header.get("message", "")
    return frames[0]


def assert_not_created(marker: Path, settle: float = 0.3) -> None:
    """``marker`` does not exist, even a moment later (a command would be quick)."""
    time.sleep(settle)
    assert not marker.exists(), f"{marker} was created: a command ran"


# A module agent for tests that only need one ------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """An agent for bad input; many failed hellos here must not block the next test."""
    with running(tmp_path_factory.mktemp("shared"), "--max-auth-failures", "100000") as a:
        yield a


# 1. TLS on by default, pinning -------------------------------------------------------------


def test_tls_by_default_fingerprint_and_private_key(tmp_path: Path) -> None:
    with running(tmp_path) as a:
        assert a.tls and "tcp" not in a.addresses, a.addresses
        printed = printed_fingerprint(a)
        cert, key = a.state_dir / "cert.pem", a.state_dir / "key.pem"
        assert printed == cert_fingerprint(cert)
        assert mode(key) == 0o600
        assert mode(a.state_dir) & 0o077 == 0
        key_pem = key.read_text()
        assert "PRIVATE KEY" in key_pem
        body = "".join(key_pem.splitlines()[1:-1])
        assert body[:40] not in a.log()
        # What the agent presents on the wire is that certificate.
        with RawClient(tcp_address(a)) as raw:
            assert isinstance(raw.sock, ssl.SSLSocket)
            der = raw.sock.getpeercert(binary_form=True)
            assert der is not None
            assert der == ssl.PEM_cert_to_DER_cert(cert.read_text())
            assert raw.sock.version() == "TLSv1.3"
    # A restart keeps the certificate: pins survive restarts.
    with running(tmp_path) as again:
        assert printed_fingerprint(again) == printed


def test_an_empty_certificate_or_key_is_made_anew(tmp_path: Path) -> None:
    """A full disk once left key.pem written and cert.pem empty, and every
    later start failed ("PEM lib"): an empty file of the pair is as none."""
    cert, key, created = ensure_certificate(tmp_path)
    assert created is True
    for emptied in (cert, key):
        first = cert_fingerprint(cert)
        emptied.write_bytes(b"")
        assert ensure_certificate(tmp_path) == (cert, key, True)
        assert cert_fingerprint(cert) != first
        assert mode(key) == 0o600
        server_context(cert, key)  # the key is the certificate's
        assert sorted(os.listdir(tmp_path)) == ["cert.pem", "key.pem"]
    assert ensure_certificate(tmp_path) == (cert, key, False)


def test_tls_1_2_client_refused(tmp_path: Path) -> None:
    with running(tmp_path) as a:
        context = unverified_tls_context()
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        with (
            socket.create_connection(tcp_address(a), timeout=IO_TIMEOUT) as sock,
            pytest.raises((ssl.SSLError, ConnectionResetError)),
        ):
            context.wrap_socket(sock)


def test_certificate_error_is_public_api() -> None:
    # tether.CertificateError, as the other exceptions a caller catches.
    assert getattr(tether, "CertificateError", None) is CertificateError
    assert "CertificateError" in tether.__all__
    assert issubclass(CertificateError, tether.ConnectError)


async def test_pinned_to_another_fingerprint_is_refused_before_the_token(
    tmp_path: Path,
) -> None:
    audit = tmp_path / "audit.jsonl"
    with running(tmp_path, "--audit-log", str(audit)) as a:
        real = printed_fingerprint(a)
        other = "SHA256:" + base64.b64encode(hashlib.sha256(b"other").digest()).decode()
        started = time.monotonic()
        with pytest.raises(CertificateError) as info:
            await tether.connect(a.host, token=a.token, fingerprint=other)
        assert time.monotonic() - started < FAST
        message = str(info.value)
        assert real in message and other.rstrip("=") in message
        assert a.token not in message
        # The right fingerprint, in any accepted spelling, works and is audited.
        digest = base64.b64decode(real[7:] + "=")
        for spelling in (real, digest.hex(), ":".join(f"{b:02X}" for b in digest)):
            async with tether.connect(a.host, token=a.token, fingerprint=spelling) as conn:
                assert conn.fingerprint == real
                assert not conn.new_host
                assert await conn.echo("pinned") == "pinned"

        def settled(events: list[dict[str, Any]]) -> bool:
            kinds = [e["event"] for e in events]
            return kinds.count("auth") >= 3 and kinds.count("connect") == kinds.count("disconnect")

        events = await asyncio.to_thread(wait_for_events, audit, settled)
        # Three hellos, all from the pinned clients: the refused client never
        # sent its (right) token, or there would be a fourth successful auth.
        assert [e["ok"] for e in events if e["event"] == "auth"] == [True, True, True]


def test_cli_fingerprint_option(tmp_path: Path) -> None:
    with running(tmp_path) as a:
        real = printed_fingerprint(a)
        kh = tmp_path / "kh" / "known_hosts"
        common = ["--known-hosts", str(kh)]
        other = "SHA256:" + base64.b64encode(hashlib.sha256(b"x").digest()).decode()
        bad = Cli.run(["echo", a.host, "hi", "--fingerprint", other, *common], env=a.env)
        assert bad.returncode == 255
        line = one_line(bad)
        assert real in line and "token" in line
        assert bad.stdout == b""
        good = Cli.run(["echo", a.host, "hi", "--fingerprint", real, *common], env=a.env)
        assert good.returncode == 0, good.stderr
        assert good.stdout == b"hi\n"
        assert b"pinned" not in good.stderr
        junk = Cli.run(["echo", a.host, "hi", "--fingerprint", "SHA256:junk", *common], env=a.env)
        assert junk.returncode == 2
        assert not kh.exists()  # --fingerprint neither reads nor writes known_hosts


def test_trust_on_first_use_then_changed_certificate(tmp_path: Path) -> None:
    kh = tmp_path / "client" / "known_hosts"
    options = ["--known-hosts", str(kh)]
    audit = tmp_path / "audit2.jsonl"
    with running(tmp_path, name="first") as first:
        port = first.port
        real = printed_fingerprint(first)
        pinned = Cli.run(["echo", first.host, "hi", *options], env=first.env)
        assert pinned.returncode == 0, pinned.stderr
        assert pinned.stdout == b"hi\n"
        notice = pinned.stderr.decode()
        assert re.search(
            rf"pinned {re.escape(first.host)} to certificate {re.escape(real)}", notice
        )
        assert kh.read_text() == f"{first.host} {real}\n"
        assert mode(kh) == 0o600
        again = Cli.run(["echo", first.host, "hi", *options], env=first.env)
        assert again.returncode == 0 and b"pinned" not in again.stderr
        assert kh.read_text() == f"{first.host} {real}\n"
    # Lines before it, so the warning has to count them right.
    other = "SHA256:" + base64.b64encode(hashlib.sha256(b"o").digest()).decode().rstrip("=")
    kh.write_text(f"# my agents\nweb1:7447 {other}\n" + kh.read_text())
    before = kh.read_text()
    # A new agent, new certificate, same address.
    with running(tmp_path, "--port", str(port), "--audit-log", str(audit), name="second") as second:
        assert second.host == f"127.0.0.1:{port}"
        changed = printed_fingerprint(second)
        assert changed != real
        started = time.monotonic()
        refused = Cli.run(["echo", second.host, "hi", *options], env=second.env)
        assert time.monotonic() - started < FAST + 5
        assert refused.returncode == 255
        assert refused.stdout == b""
        warning = refused.stderr.decode()
        assert "WARNING" in warning and "CHANGED" in warning.upper()
        # Lines, as ssh prints its warning: not one line of "\x0a" escapes.
        lines = warning.splitlines()
        assert len(lines) == 5, warning
        assert lines[0].startswith("tether: WARNING: THE CERTIFICATE OF THE AGENT AT ")
        assert lines[-1].startswith("If the change is expected, remove line 3 of ")
        assert "\\x0a" not in warning
        assert str(kh) in warning
        assert re.search(r"\bline 3\b", warning), warning
        assert real in warning and changed in warning
        assert second.token not in warning
        assert kh.read_text() == before  # not silently re-pinned

        async def api() -> None:
            with pytest.raises(CertificateError, match="line 3"):
                await tether.connect(second.host, token=second.token, known_hosts=kh)
            # The agent works for a client that pins the new certificate.
            async with tether.connect(second.host, token=second.token, fingerprint=changed):
                pass

        asyncio.run(api())
        # Only that last client ever sent a hello: the refused ones, which
        # connected before it, did not.
        wait_for_events(audit, lambda ev: any(e["event"] == "auth" for e in ev))
        assert [e["ok"] for e in audit_events(audit) if e["event"] == "auth"] == [True]


def test_a_pin_is_found_in_any_form_and_whatever_the_case_of_the_name(tmp_path: Path) -> None:
    """A pin written padded, or in hex as openssl prints it, is the same pin (it
    raised a false "HAS CHANGED"); a host name has no case, so typing it
    otherwise neither dodges a pin that no longer matches (it re-pinned
    silently) nor pins it twice; a line that pins nothing is named."""
    kh = tmp_path / "known_hosts"
    options = ["--known-hosts", str(kh)]
    with running(tmp_path) as a:
        real = printed_fingerprint(a)
        raw = base64.b64decode(real.removeprefix("SHA256:") + "=")
        host = f"localhost:{a.port}"
        for pin in (real + "=", raw.hex(), ":".join(f"{b:02X}" for b in raw)):
            kh.write_text(f"{host} {pin}\n")
            ok = Cli.run(["echo", f"LocalHost:{a.port}", "hi", *options], env=a.env)
            assert ok.returncode == 0, (pin, ok.stderr)
            assert ok.stdout == b"hi\n" and b"pinned" not in ok.stderr
            assert kh.read_text() == f"{host} {pin}\n"
        other = "SHA256:" + base64.b64encode(hashlib.sha256(b"o").digest()).decode().rstrip("=")
        kh.write_text(f"# page one\f page two\n{host} {other}\n")
        for typed in (host, f"LOCALHOST:{a.port}"):
            refused = Cli.run(["echo", typed, "hi", *options], env=a.env)
            assert refused.returncode == 255
            assert b"HAS CHANGED" in refused.stderr
            assert b"remove line 2 of" in refused.stderr  # a form feed ends no line
        kh.write_text(f"{host} SHA256:not-a-fingerprint\n")
        refused = Cli.run(["echo", host, "hi", *options], env=a.env)
        assert refused.returncode == 255
        assert b"line 1 of" in refused.stderr and b"not a SHA-256 fingerprint" in refused.stderr
        # A first use under another case pins the name once, in lower case.
        kh.unlink()
        for typed in (f"LocalHost:{a.port}", host):
            assert Cli.run(["echo", typed, "hi", *options], env=a.env).returncode == 0
        assert kh.read_text() == f"{host} {real}\n"


async def test_trust_on_first_use_can_be_refused(tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    with running(tmp_path) as a:
        with pytest.raises(CertificateError) as info:
            await tether.connect(a.host, token=a.token, known_hosts=kh, trust_on_first_use=False)
        assert info.value.code == "unknown_host"
        assert not kh.exists()
        async with tether.connect(a.host, token=a.token, known_hosts=kh) as conn:
            assert conn.new_host
            assert conn.fingerprint == printed_fingerprint(a)
        assert kh.read_text() == f"{a.host} {printed_fingerprint(a)}\n"


def test_a_first_connection_that_fails_its_hello_pins_nothing(tmp_path: Path) -> None:
    """The pin is recorded by the first connection that succeeds, which says so:
    one refused for its token must not pin silently, or the user would never
    be shown the fingerprint to compare."""
    kh = tmp_path / "client" / "known_hosts"
    options = ["--known-hosts", str(kh)]
    with running(tmp_path) as a:
        refused = Cli.run(["echo", a.host, "hi", *options], env={**a.env, "TETHER_TOKEN": "wrong"})
        assert refused.returncode == 255
        assert b"pinned" not in refused.stderr
        assert not kh.exists() or kh.read_text() == ""
        pinned = Cli.run(["echo", a.host, "hi", *options], env=a.env)
        assert pinned.returncode == 0, pinned.stderr
        assert f"pinned {a.host} to certificate {printed_fingerprint(a)}" in pinned.stderr.decode()
        assert kh.read_text() == f"{a.host} {printed_fingerprint(a)}\n"


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """``directory`` on a read-only bind mount for the block: what a root
    client sees too (root ignores file modes, not a read-only mount)."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True, timeout=10)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True, timeout=10)
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True, timeout=10)


@pytest.mark.skipif(shutil.which("mount") is None or os.geteuid() != 0, reason="needs mount")
async def test_a_pin_that_cannot_be_written_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    """As ssh's "Failed to add the host to the list of known hosts": the
    first connection goes on, and says that it pinned nothing."""
    config = tmp_path / "config"
    kh = config / "known_hosts"
    with running(tmp_path) as a, read_only(config):
        real = printed_fingerprint(a)
        r = Cli.run(["exec", a.host, "--known-hosts", str(kh), "--", "echo", "hi"], env=a.env)
        assert (r.returncode, r.stdout) == (0, b"hi\n"), r.stderr
        assert r.stderr.decode() == (
            f"tether: failed to pin {a.host} to certificate {real} "
            f"(known hosts file {kh}: Read-only file system): trusted for this connection only\n"
        )
        async with tether.connect(a.host, token=a.token, known_hosts=kh) as conn:
            assert await conn.echo("hi") == "hi"
            assert not conn.new_host and conn.fingerprint == real
            assert conn.pin_error == f"known hosts file {kh}: Read-only file system"
        assert not kh.exists()


async def test_cacert(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    ca = make_cert(pki, "test-ca", ca=True)
    leaf = make_cert(pki, "agent", issuer=ca)
    wrong_ca = make_cert(pki, "other-ca", ca=True)
    kh = tmp_path / "known_hosts"
    audit = tmp_path / "audit.jsonl"
    args = ("--cert", str(leaf.cert), "--key", str(leaf.key), "--audit-log", str(audit))
    with running(tmp_path, *args) as a:
        real = printed_fingerprint(a)
        assert real == cert_fingerprint(leaf.cert)
        assert not (a.state_dir / "key.pem").exists()  # its own key was not needed
        port = a.port
        for host in (a.host, f"localhost:{port}"):
            async with tether.connect(host, token=a.token, cacert=ca.cert, known_hosts=kh) as conn:
                assert await conn.echo("ca") == "ca"
                assert conn.fingerprint == real
        assert not kh.exists()  # a CA is trusted instead of a pin
        with pytest.raises(CertificateError) as info:
            await tether.connect(a.host, token=a.token, cacert=wrong_ca.cert, known_hosts=kh)
        assert "--cacert" in str(info.value) and a.token not in str(info.value)
        # A pin holds even when a CA vouches for the certificate.
        other = "SHA256:" + base64.b64encode(hashlib.sha256(b"o").digest()).decode()
        with pytest.raises(CertificateError):
            await tether.connect(a.host, token=a.token, cacert=ca.cert, fingerprint=other)
        async with tether.connect(a.host, token=a.token, cacert=ca.cert, fingerprint=real):
            pass
        cli = await asyncio.to_thread(
            Cli.run, ["echo", a.host, "hi", "--cacert", str(ca.cert)], env=a.env
        )
        assert cli.returncode == 0 and cli.stdout == b"hi\n", cli.stderr
        cli = await asyncio.to_thread(
            Cli.run, ["echo", a.host, "hi", "--cacert", str(wrong_ca.cert)], env=a.env
        )
        assert cli.returncode == 255
        assert "--cacert" in one_line(cli)
        # A file with no certificate in it is the user's mistake, said as one.
        junk = tmp_path / "junk.pem"
        junk.write_text("not a certificate\n")
        cli = await asyncio.to_thread(
            Cli.run, ["echo", a.host, "hi", "--cacert", str(junk)], env=a.env
        )
        assert cli.returncode == 2
        assert "--cacert" in one_line(cli) and "no usable PEM certificate" in one_line(cli)

        # Four clients got through (two, one pinned as well, and the CLI): four
        # hellos. The refused ones never sent their token.
        def settled(events: list[dict[str, Any]]) -> bool:
            kinds = [e["event"] for e in events]
            return kinds.count("auth") >= 4 and kinds.count("connect") == kinds.count("disconnect")

        events = await asyncio.to_thread(wait_for_events, audit, settled)
        assert [e["ok"] for e in events if e["event"] == "auth"] == [True] * 4


async def test_cacert_checks_the_host_name(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    ca = make_cert(pki, "test-ca", ca=True)
    elsewhere = make_cert(pki, "elsewhere", dns=("elsewhere.example",), ips=(), issuer=ca)
    with (
        running(tmp_path, "--cert", str(elsewhere.cert), "--key", str(elsewhere.key)) as a,
        pytest.raises(CertificateError),
    ):
        await tether.connect(a.host, token=a.token, cacert=ca.cert)


# 2. Man in the middle ----------------------------------------------------------------------


@dataclass
class MitmProxy:
    """Terminates TLS with its own certificate and relays to the agent over TLS,
    recording what each client sent, decrypted."""

    upstream: tuple[str, int]
    pem: Pem
    sessions: list[bytearray] = field(default_factory=list)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _server: asyncio.Server | None = None

    async def start(self) -> str:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.pem.cert, self.pem.key)
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=context)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        seen = bytearray()
        self.sessions.append(seen)
        try:
            up_reader, up_writer = await asyncio.open_connection(
                *self.upstream, ssl=unverified_tls_context()
            )
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pipe(reader, up_writer, seen), self._pipe(up_reader, writer, None)
        )
        self._tasks.discard(task)

    @staticmethod
    async def _pipe(
        src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bytearray | None
    ) -> None:
        try:
            for _ in range(100_000):  # bounded: these tests send little
                data = await src.read(65536)
                if not data:
                    break
                if record is not None:
                    record += data
                dst.write(data)
                await dst.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            dst.close()

    def seen(self) -> bytes:
        return b"".join(self.sessions)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()


@pytest.mark.timeout(60)
async def test_man_in_the_middle_detected_and_token_never_sent(tmp_path: Path) -> None:
    with running(tmp_path) as a:
        real = printed_fingerprint(a)
        proxy = MitmProxy(tcp_address(a), make_cert(tmp_path / "mitm", "tether agent mitm"))
        through = await proxy.start()
        try:
            # Pinned by --fingerprint.
            with pytest.raises(CertificateError):
                await tether.connect(through, token=a.token, fingerprint=real)
            # Pinned in known_hosts (the user had connected to this address before).
            kh = tmp_path / "known_hosts"
            kh.write_text(f"{through} {real}\n")
            with pytest.raises(CertificateError, match="CHANGED") as info:
                await tether.connect(through, token=a.token, known_hosts=kh)
            assert str(kh) in str(info.value) and "line 1" in str(info.value)
            # The CLI, pinned by --fingerprint.
            cli = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "tether", "exec", through, "--fingerprint", real, "--", "true"),
                env=a.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            _, err = await asyncio.wait_for(cli.communicate(), 30)
            assert cli.returncode == 255, err
            assert real.encode() in err
            # The proxy did terminate TLS connections (a client that gives up
            # right after its handshake may leave the proxy's side unfinished)...
            assert proxy.sessions, "the proxy completed no handshake"
            # ...and received not one byte of the protocol, least of all the token.
            assert a.token.encode() not in proxy.seen()
            assert b"hello" not in proxy.seen()
            assert proxy.seen() == b""
            # Control: a client that trusts on first use through the proxy is
            # fooled, and the proxy then reads the token. The pin is what stops it.
            fresh = tmp_path / "fresh_known_hosts"
            async with tether.connect(through, token=a.token, known_hosts=fresh) as conn:
                assert conn.new_host and conn.fingerprint != real
                assert await conn.echo("relayed") == "relayed"
            assert a.token.encode() in proxy.sessions[-1]
        finally:
            await proxy.close()


# 3. Plaintext against TLS and TLS against plaintext -------------------------------------


def test_plaintext_client_against_tls_port(tmp_path: Path) -> None:
    with running(tmp_path) as a:
        started = time.monotonic()
        proc = Cli.run(["echo", a.host, "hi", "--insecure-plaintext"], env=a.env, timeout=30)
        assert time.monotonic() - started < FAST
        assert proc.returncode == 255
        line = one_line(proc)
        assert "TLS" in line or "--insecure-plaintext" in line, line
        assert a.token not in line

        async def api() -> None:
            begun = time.monotonic()
            with pytest.raises(tether.ConnectError, match=r"TLS|--insecure-plaintext"):
                await tether.connect(a.host, token=a.token, insecure_plaintext=True)
            assert time.monotonic() - begun < FAST

        asyncio.run(api())
        # A raw plaintext hello gets nothing back but a close, quickly.
        with RawClient(tcp_address(a), tls=False) as raw:
            raw.send(hello_bytes(a.token))
            assert raw.read_to_eof() == []
        good = Cli.run(["echo", a.host, "still here"], env=a.env)
        assert good.returncode == 0 and good.stdout == b"still here\n", good.stderr


def test_tls_client_against_plaintext_agent(tmp_path: Path) -> None:
    with running(tmp_path, "--insecure-plaintext") as a:
        assert "tcp" in a.addresses and not a.tls
        assert not FINGERPRINT_RE.search(a.log())
        kh = tmp_path / "known_hosts"
        started = time.monotonic()
        proc = Cli.run(["echo", a.host, "hi", "--known-hosts", str(kh)], env=a.env, timeout=30)
        assert time.monotonic() - started < FAST
        assert proc.returncode == 255
        line = one_line(proc)
        assert "--insecure-plaintext" in line and "TLS" in line, line
        assert not kh.exists()

        async def api() -> None:
            begun = time.monotonic()
            with pytest.raises(tether.ConnectError, match="--insecure-plaintext"):
                await tether.connect(a.host, token=a.token, known_hosts=kh)
            assert time.monotonic() - begun < FAST

        asyncio.run(api())
        good = Cli.run(["echo", a.host, "plain", "--insecure-plaintext"], env=a.env)
        assert good.returncode == 0 and good.stdout == b"plain\n", good.stderr


# 4. Nothing before hello, nothing after a failed one, nothing outside the op table ------


def exec_frame(marker: Path, op: str = "exec", ident: int = 1) -> bytes:
    return frame({"op": op, "id": ident, "argv": ["touch", str(marker)]})


PRE_HELLO_FRAMES: dict[str, dict[str, Any]] = {
    "exec": {"op": "exec", "id": 1, "argv": ["touch", "MARKER"]},
    "exec-id0": {"op": "exec", "id": 0, "argv": ["touch", "MARKER"]},
    "shell": {"op": "exec", "id": 1, "shell": "touch MARKER"},
    "echo": {"op": "echo", "id": 1},
    "put": {"op": "put", "id": 1, "path": "MARKER", "size": 0},
    "mkdir": {"op": "mkdir", "id": 1, "path": "MARKER"},
    "stat": {"op": "stat", "id": 1, "path": "."},
    "get": {"op": "get", "id": 1, "path": "x"},
    "symlink": {"op": "symlink", "id": 1, "path": "MARKER", "target": "/"},
    "stdin": {"op": "stdin", "id": 1},
    "cancel": {"op": "cancel", "id": 1},
    "__init__": {"op": "__init__", "id": 1},
    "HELLO": {"op": "HELLO", "id": 0, "version": PROTOCOL_VERSION, "token": "x"},
}


@pytest.mark.parametrize("name", sorted(PRE_HELLO_FRAMES))
def test_any_op_before_hello_is_unauthenticated(shared: Agent, name: str) -> None:
    marker = shared.root / "MARKER"
    header = dict(PRE_HELLO_FRAMES[name])
    if "argv" in header:
        header["argv"] = ["touch", str(marker)]
    with RawClient(tcp_address(shared)) as raw:
        raw.send(frame(header))
        assert_connection_error(raw.read_to_eof(), "unauthenticated")
    assert_not_created(marker)


@pytest.mark.parametrize(
    ("header", "code"),
    [
        ({"op": "hello", "id": 0, "version": PROTOCOL_VERSION, "token": "x"}, "bad_request"),
        ({"op": "echo", "id": 1}, "unauthenticated"),
    ],
)
def test_a_first_frame_declaring_a_body_is_refused_before_its_body(
    shared: Agent, header: dict[str, Any], code: str
) -> None:
    """A header of a few dozen bytes declaring 16 MiB, and nothing after it: the
    agent refuses it at once, from the header, instead of allocating 16 MiB for
    a client that has not authenticated and waiting for the body until its
    hello timeout (10 s here; IO_TIMEOUT is 5 s)."""
    raw_header = json.dumps({**header, "body_len": 16 * 1024 * 1024}).encode()
    with RawClient(tcp_address(shared)) as raw:
        raw.send_raw_header(raw_header)
        assert_connection_error(raw.read_to_eof(), code)


def test_hello_after_a_request_does_not_help(shared: Agent) -> None:
    marker = shared.root / "MARKER-late-hello"
    with RawClient(tcp_address(shared)) as raw:
        raw.send(exec_frame(marker) + hello_bytes(shared.token))
        assert_connection_error(raw.read_to_eof(), "unauthenticated")
    assert_not_created(marker)


def test_op_after_failed_hello_in_same_write(shared: Agent) -> None:
    marker = shared.root / "MARKER-same-write"
    with RawClient(tcp_address(shared)) as raw:
        raw.send(hello_bytes("wrong") + exec_frame(marker))
        error = assert_connection_error(raw.read_to_eof(), "auth_failed")
        assert "wrong" not in error.header["message"]
    assert_not_created(marker)


def test_op_after_failed_hello_before_the_answer(shared: Agent) -> None:
    marker = shared.root / "MARKER-before-answer"
    with RawClient(tcp_address(shared)) as raw:
        raw.send(hello_bytes("wrong"))
        raw.send(exec_frame(marker))  # while the agent waits to answer
        raw.send(hello_bytes(shared.token) + exec_frame(marker, ident=2))
        assert_connection_error(raw.read_to_eof(), "auth_failed")
    assert_not_created(marker)


def test_op_after_failed_hello_answered(shared: Agent) -> None:
    marker = shared.root / "MARKER-after-answer"
    with RawClient(tcp_address(shared)) as raw:
        started = time.monotonic()
        raw.send(hello_bytes("wrong"))
        error = raw.read_frame()
        # A refused hello is answered late, to slow guessing down.
        assert time.monotonic() - started >= 0.15
        assert (error.op, error.header.get("code")) == ("error", "auth_failed")
        with contextlib.suppress(OSError):
            raw.send(exec_frame(marker))
        assert raw.read_to_eof() == []
    assert_not_created(marker)


def test_second_hello_with_right_token_after_failed_one(shared: Agent) -> None:
    with RawClient(tcp_address(shared)) as raw:
        raw.send(hello_bytes("wrong") + hello_bytes(shared.token))
        assert_connection_error(raw.read_to_eof(), "auth_failed")


def test_good_hello_then_exec_runs(shared: Agent) -> None:
    """The control for the tests above: the same exec after a good hello runs."""
    marker = shared.root / "MARKER-control"
    with RawClient(tcp_address(shared)) as raw:
        raw.hello(shared.token)
        raw.send(exec_frame(marker))
        ops = []
        for _ in range(10):
            reply = raw.read_frame()
            ops.append(reply.op)
            if reply.op in ("exit", "error"):
                break
        assert ops[-1] == "exit", ops
    assert marker.exists()
    marker.unlink()


UNKNOWN_OPS = [
    "__init__",
    "_private",
    "exec ",
    " exec",
    "EXEC",
    "Exec",
    "ехес",  # Cyrillic look-alike
    "еxec",  # one Cyrillic letter
    "ｅｘｅｃ",  # fullwidth
    "exec\u200b",  # zero-width space
    "exec\u0000",
    "handle_exec",
    "HANDLERS",
    "__class__",
    "__getattribute__",
    "_start_request",
    "execute",
    "exe",
    "Op.EXEC",
    "eval",
]


@pytest.mark.parametrize("op", UNKNOWN_OPS, ids=repr)
def test_unknown_op_after_good_hello(shared: Agent, op: str) -> None:
    marker = shared.root / "MARKER-unknown"
    with RawClient(tcp_address(shared)) as raw:
        raw.hello(shared.token)
        raw.send(exec_frame(marker, op=op))
        assert_connection_error(raw.read_to_eof(), "unknown_op")
    assert_not_created(marker)


# 5. Guessing tokens ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_token_loop_gets_blocked_other_address_still_works(tmp_path: Path) -> None:
    with running(tmp_path, "--max-auth-failures", "5") as a:
        guesses = [f"guess-{i}-{os.urandom(8).hex()}" for i in range(6)]
        for guess in guesses:
            with RawClient(tcp_address(a), source="127.0.0.1") as raw:
                raw.send(hello_bytes(guess))
                error = assert_connection_error(raw.read_to_eof(), "auth_failed")
                assert guess not in error.header["message"]
        # The right token from the same address: refused.
        with RawClient(tcp_address(a), source="127.0.0.1") as raw:
            raw.send(hello_bytes(a.token))
            error = assert_connection_error(raw.read_to_eof(), "auth_failed")
            assert "too many failed attempts" in error.header["message"]
            assert a.token not in error.header["message"]
        cli = Cli.run(["echo", a.host, "hi"], env=a.env)
        assert cli.returncode == 255
        assert "too many failed attempts" in one_line(cli)
        # The right token from another address: works.
        with RawClient(tcp_address(a), source="127.0.0.2") as raw:
            reply = raw.hello(a.token)
            assert reply.header["version"] == PROTOCOL_VERSION
            raw.send(frame({"op": "echo", "id": 1}))
            assert raw.read_frame().op == "ok"
        log = a.log()
        for guess in guesses:
            assert guess not in log


@pytest.mark.timeout(60)
def test_failures_below_the_limit_do_not_block(tmp_path: Path) -> None:
    with running(tmp_path, "--max-auth-failures", "5") as a:
        for i in range(4):
            with RawClient(tcp_address(a)) as raw:
                raw.send(hello_bytes(f"guess-{i}"))
                assert_connection_error(raw.read_to_eof(), "auth_failed")
        with RawClient(tcp_address(a)) as raw:
            raw.hello(a.token)


def test_unix_socket_is_not_rate_limited(tmp_path: Path) -> None:
    with running(tmp_path, "--max-auth-failures", "2", unix=True) as a:
        path = a.addresses["unix"][0]
        for i in range(4):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(IO_TIMEOUT)
                sock.connect(path)
                sock.sendall(hello_bytes(f"guess-{i}"))
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
                assert b"auth_failed" in data
        cli = Cli.run(["echo", a.unix, "hi"], env=a.env)
        assert cli.returncode == 0 and cli.stdout == b"hi\n", cli.stderr


def _bad_hellos(token: str) -> list[tuple[str, bytes, str]]:
    base = {"op": "hello", "id": 0, "version": PROTOCOL_VERSION}
    return [
        ("missing", frame(base), "bad_request"),
        ("null", frame({**base, "token": None}), "bad_request"),
        ("number", frame({**base, "token": 123}), "bad_request"),
        ("list", frame({**base, "token": [token]}), "bad_request"),
        ("object", frame({**base, "token": {"token": token}}), "bad_request"),
        ("true", frame({**base, "token": True}), "bad_request"),
        ("empty", hello_bytes(""), "auth_failed"),
        ("space", hello_bytes(" "), "auth_failed"),
        ("prefix", hello_bytes(token[:-1]), "auth_failed"),
        ("extended", hello_bytes(token + "x"), "auth_failed"),
        ("newline", hello_bytes(token + "\n"), "auth_failed"),
        ("leading space", hello_bytes(" " + token), "auth_failed"),
        ("nul", hello_bytes(token + "\0"), "auth_failed"),
        ("upper", hello_bytes(token.upper()), "auth_failed"),
        ("lone surrogate", hello_bytes("\udc80"), "auth_failed"),
        ("surrogate inside", hello_bytes(token[:3] + "\ud800" + token[4:]), "auth_failed"),
        ("name", hello_bytes("default"), "auth_failed"),
    ]


def test_missing_empty_malformed_tokens_never_authenticate(shared: Agent) -> None:
    for name, data, code in _bad_hellos(shared.token):
        with RawClient(tcp_address(shared), source="127.0.0.3") as raw:
            raw.send(data)
            frames = raw.read_to_eof()
            assert [f.op for f in frames] == ["error"], (name, frames)
            assert frames[0].header["code"] == code, (name, frames)
    with RawClient(tcp_address(shared), source="127.0.0.3") as raw:
        raw.hello(shared.token)  # the limit (100000 here) was not what refused them


# 6. Named tokens -------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_named_tokens(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    with running(tmp_path, "--audit-log", str(audit)) as a:
        made = Cli.run(["token", "new", "alice", "--state-dir", str(a.state_dir)])
        assert made.returncode == 0, made.stderr
        alice = made.stdout.decode().strip()
        assert made.stdout.decode() == alice + "\n"
        assert re.fullmatch(r"[A-Za-z0-9_-]{40,}", alice), alice
        assert alice not in made.stderr.decode()
        tokens = a.state_dir / "tokens"
        assert mode(tokens) == 0o600
        assert tokens.read_text() == f"alice {alice}\n"
        again = Cli.run(["token", "new", "alice", "--state-dir", str(a.state_dir)])
        assert again.returncode != 0 and "alice" in again.stderr.decode()
        token_file = tmp_path / "alice.token"
        token_file.write_text(alice + "\n")
        token_file.chmod(0o600)
        # The running agent takes it, no restart.
        ran = Cli.run(
            ["exec", a.host, "--token-file", str(token_file), "--", "echo", "as-alice"],
            env=without_token_env(),
        )
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout == b"as-alice\n"
        default = Cli.run(["exec", a.host, "--", "echo", "as-default"], env=a.env)
        assert default.returncode == 0, default.stderr
        events = wait_for_events(audit, lambda ev: sum(e["event"] == "request" for e in ev) >= 2)
        requests = {tuple(e["argv"]): e["identity"] for e in events if e["event"] == "request"}
        assert requests == {("echo", "as-alice"): "alice", ("echo", "as-default"): "default"}
        auths = [e for e in events if e["event"] == "auth"]
        assert sorted(e["identity"] for e in auths) == ["alice", "default"]
        # Taking the line out of the file revokes it, again without a restart.
        time.sleep(0.02)  # a new mtime, even on a coarse clock
        tokens.write_text("")
        revoked = Cli.run(
            ["echo", a.host, "x", "--token-file", str(token_file)], env=without_token_env()
        )
        assert revoked.returncode == 255
        assert alice not in revoked.stderr.decode()
        for secret in (alice, a.token):
            assert secret not in audit.read_text()
            assert secret not in a.log()
        # A group-readable tokens file: the agent refuses to start.
        tokens.write_text(f"alice {alice}\n")
        tokens.chmod(0o640)
        refused = subprocess.run(
            [
                *(sys.executable, "-m", "tether", "serve", "--port", "0", "--no-udp"),
                *("--state-dir", str(a.state_dir), "--root", str(a.root)),
            ],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
        )
        assert refused.returncode not in (0, None)
        assert b"chmod" in refused.stderr
        assert alice.encode() not in refused.stderr
        assert b"listening" not in refused.stderr


def test_token_new_adds_no_token_it_could_not_print(tmp_path: Path) -> None:
    """The token was written to the tokens file first: when printing it then
    failed, a live token nobody had received stayed there (and a traceback
    was all the user saw)."""
    state = tmp_path / "state"
    args = ["token", "new", "alice", "--state-dir", str(state)]
    command = [sys.executable, "-m", "tether", *args]
    with open("/dev/full", "wb") as full:
        failed = subprocess.run(
            command, stdout=full, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=30
        )
    assert failed.returncode == 255
    said = "tether: token 'alice' not added: cannot print it: No space left on device"
    assert one_line(failed) == said
    assert not (state / "tokens").exists()
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone: EPIPE
    try:
        gone = subprocess.run(
            command, stdout=write_end, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=30
        )
    finally:
        os.close(write_end)
    assert (gone.returncode, gone.stderr) == (141, b"")  # quiet, as if killed by SIGPIPE
    assert not (state / "tokens").exists()
    made = Cli.run(args)
    assert made.returncode == 0, made.stderr
    assert (state / "tokens").read_text() == f"alice {made.stdout.decode().strip()}\n"
    # Printed and added, only the note on stderr lost: that went well (it exited 1).
    with open("/dev/full", "wb") as full:
        noted = subprocess.run(
            [*command[:-3], "bob", *command[-2:]],
            stdout=subprocess.PIPE,
            stderr=full,
            stdin=subprocess.DEVNULL,
            timeout=30,
        )
    assert noted.returncode == 0
    assert f"bob {noted.stdout.decode().strip()}\n" in (state / "tokens").read_text()


def test_a_tokens_file_made_safe_by_chmod_is_taken_at_once(tmp_path: Path) -> None:
    """A running agent refuses a tokens file others may read; once `chmod 600`
    fixes it, the next hello takes it. The agent looked at the mtime only,
    which chmod leaves alone: the file stayed refused until touched."""
    with running(tmp_path) as a:
        made = Cli.run(["token", "new", "bob", "--state-dir", str(a.state_dir)])
        assert made.returncode == 0, made.stderr
        bob = made.stdout.decode().strip()
        tokens = a.state_dir / "tokens"
        tokens.chmod(0o644)
        as_bob = {**without_token_env(), "TETHER_TOKEN": bob}
        refused = Cli.run(["echo", a.host, "hi"], env=as_bob)
        assert refused.returncode == 255
        a.wait_for_log("chmod")
        tokens.chmod(0o600)
        taken = Cli.run(["echo", a.host, "hi"], env=as_bob)
        assert taken.returncode == 0, taken.stderr
        assert taken.stdout == b"hi\n"


def test_serve_refuses_world_readable_tokens_file_option(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("bob sometokensometokensometoken\n")
    tokens.chmod(0o644)
    (tmp_path / "root").mkdir()
    refused = subprocess.run(
        [
            *(sys.executable, "-m", "tether", "serve", "--port", "0", "--no-udp"),
            *("--state-dir", str(tmp_path / "state"), "--root", str(tmp_path / "root")),
            *("--tokens-file", str(tokens)),
        ],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )
    assert refused.returncode != 0
    assert b"chmod" in refused.stderr and str(tokens).encode() in refused.stderr
    assert b"sometoken" not in refused.stderr


def serve_once(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``tether serve`` that is expected to refuse to start."""
    (tmp_path / "root").mkdir(exist_ok=True)
    return subprocess.run(
        [
            *(sys.executable, "-m", "tether", "serve", "--port", "0", "--no-udp"),
            *("--root", str(tmp_path / "root"), *args),
        ],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )


def test_serve_refuses_secrets_and_a_state_directory_others_can_reach(tmp_path: Path) -> None:
    """As ssh refuses a private key others may read: the agent's own token and
    key, and a state directory others may write in (they could swap the files
    in it), are refused at start, with the chmod that fixes each. They were
    used without a word."""
    with running(tmp_path, name="first") as a:  # makes token, cert and key
        state = a.state_dir
    for name, mode, fix in (
        ("token", 0o644, "chmod 600"),
        ("key.pem", 0o640, "chmod 600"),
        (".", 0o777, "chmod 700"),
    ):
        path = state / name
        before = stat.S_IMODE(os.stat(path).st_mode)
        path.chmod(mode)
        refused = serve_once(tmp_path, "--state-dir", str(state))
        assert refused.returncode != 0, (name, refused.stderr)
        assert fix.encode() in refused.stderr, (name, refused.stderr)
        assert b"listening" not in refused.stderr
        path.chmod(before)
    given = tmp_path / "given.token"
    given.write_text("a-token-of-my-own-making-long-enough\n")
    given.chmod(0o604)
    refused = serve_once(tmp_path, "--state-dir", str(state), "--token-file", str(given))
    assert refused.returncode != 0
    assert b"chmod 600" in refused.stderr and b"a-token-of-my-own" not in refused.stderr
    with running(tmp_path, name="first") as again:  # all put back: it starts
        assert again.state_dir == state


def test_serve_on_a_full_disk_leaves_no_half_made_state(
    small_disk: SmallDisk, tmp_path: Path
) -> None:
    """A full disk at first start left an empty token file, or a key without
    its certificate (cert.pem empty): every later start failed on them, even
    with room again. The error named no file either."""
    state = small_disk.path / "agent" / "state"  # where start_agent puts it
    small_disk.fill()
    refused = serve_once(tmp_path, "--state-dir", str(state))
    assert refused.returncode == 255
    assert one_line(refused) == f"tether: {state / 'token'}: No space left on device"
    assert os.listdir(state) == []
    small_disk.free()
    tether.create_token_file(state)
    small_disk.fill(leave=1)  # room for the key, not for its certificate
    refused = serve_once(tmp_path, "--state-dir", str(state))
    assert refused.returncode == 255
    assert refused.stderr.decode().endswith(
        f"cannot load the TLS certificate: {state / 'cert.pem'}: No space left on device\n"
    ), refused.stderr
    assert os.listdir(state) == ["token"]
    small_disk.free()
    with running(small_disk.path) as a:
        assert a.tls
        assert printed_fingerprint(a) == cert_fingerprint(state / "cert.pem")
        ran = Cli.run(["echo", a.host, "hi"], env=a.env)
        assert (ran.returncode, ran.stdout) == (0, b"hi\n"), ran.stderr


# 7. Exec policy --------------------------------------------------------------------------


async def test_no_exec(tmp_path: Path) -> None:
    with running(tmp_path, "--no-exec") as a:
        marker = tmp_path / "MARKER"
        async with tether.connect(a.host, token=a.token) as conn:
            for kwargs in (
                {"argv": ["touch", str(marker)]},
                {"shell": f"touch {marker}"},
                {"argv": ["true"]},
            ):
                with pytest.raises(tether.RemoteError) as info:
                    await conn.run(**kwargs)
                assert info.value.code == "forbidden"
                assert "disabled" in info.value.message
            # File transfer still works, and the connection too.
            local = tmp_path / "up.txt"
            local.write_bytes(b"data\n")
            await conn.put(local, "up.txt")
            assert (a.root / "up.txt").read_bytes() == b"data\n"
            await conn.get("up.txt", tmp_path / "down.txt")
            assert (tmp_path / "down.txt").read_bytes() == b"data\n"
            assert await conn.echo("alive") == "alive"
        assert_not_created(marker)
        cli = await asyncio.to_thread(Cli.run, ["exec", a.host, "--", "true"], env=a.env)
        assert cli.returncode == 255
        assert "disabled" in one_line(cli)
        cp = await asyncio.to_thread(
            Cli.run, ["cp", "-q", str(local), f"{a.host}:cli.txt"], env=a.env
        )
        assert cp.returncode == 0, cp.stderr
        assert (a.root / "cli.txt").read_bytes() == b"data\n"


def fake_program(directory: Path, name: str, marker: Path) -> Path:
    """An executable ``name`` in ``directory`` that creates ``marker``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(f"#!/bin/sh\ntouch {marker}\necho fake\n")
    path.chmod(0o755)
    return path


@pytest.mark.timeout(60)
async def test_allow_list(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    with running(tmp_path, "--allow", "echo") as a:
        async with tether.connect(a.host, token=a.token) as conn:
            result = await conn.run(["echo", "allowed"])
            assert (result.returncode, result.stdout) == (0, b"allowed\n")
            forbidden: list[dict[str, Any]] = [
                {"argv": ["cat", "/etc/hostname"]},
                {"argv": ["touch", str(marker)]},
                {"shell": f"touch {marker}"},
                {"shell": "echo via-shell"},
                {"argv": [shutil.which("echo") or "/bin/echo", "absolute"]},
                {"argv": ["./echo"]},
            ]
            fake_program(a.root, "echo", marker)  # what ./echo would run
            for kwargs in forbidden:
                with pytest.raises(tether.RemoteError) as info:
                    await conn.run(**kwargs)
                assert info.value.code == "forbidden", kwargs
                assert "not allowed" in info.value.message
            # A client's PATH does not choose what "echo" is, nor what an
            # allowed program runs in turn: under --allow it may not be set.
            fake_dir = tmp_path / "fakebin"
            fake_program(fake_dir, "echo", marker)
            with pytest.raises(tether.RemoteError) as info:
                await conn.run(["echo", "real"], env={"PATH": str(fake_dir)})
            assert info.value.code == "forbidden"
            assert "PATH may not be set" in info.value.message
            assert await conn.echo("alive") == "alive"
        assert_not_created(marker)
        cli = await asyncio.to_thread(
            Cli.run, ["exec", a.host, "--", "cat", "/dev/null"], env=a.env
        )
        assert cli.returncode == 255 and "not allowed" in one_line(cli)
    with running(tmp_path, "--allow", "echo", "--allow", "/bin/sh", name="shell") as a:
        async with tether.connect(a.host, token=a.token) as conn:
            result = await conn.run(shell="echo via-shell")
            assert (result.returncode, result.stdout) == (0, b"via-shell\n")
            with pytest.raises(tether.RemoteError, match="not allowed"):
                await conn.run(["cat", "/dev/null"])


@pytest.mark.timeout(60)
def test_allow_list_path_pattern(tmp_path: Path) -> None:
    echo = shutil.which("echo")
    assert echo is not None
    directory = os.path.dirname(os.path.abspath(echo))
    marker = tmp_path / "MARKER"
    with running(tmp_path, "--allow", f"{directory}/ech*") as a:
        ok = Cli.run(["exec", a.host, "--", "echo", "by-path"], env=a.env)
        assert ok.returncode == 0 and ok.stdout == b"by-path\n", ok.stderr
        fake_program(a.root, "echo", marker)
        bad = Cli.run(["exec", a.host, "--", "./echo"], env=a.env)
        assert bad.returncode == 255
        assert_not_created(marker)


@pytest.mark.timeout(60)
async def test_allow_list_not_bypassed_by_ld_preload(tmp_path: Path) -> None:
    """The environment is the client's: LD_PRELOAD would run any code inside an
    allowed program. Under an allow-list it must be refused or dropped."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build a preload library")
    marker = tmp_path / "MARKER-preload"
    source = tmp_path / "evil.c"
    source.write_text(
        "#include <fcntl.h>\n#include <unistd.h>\n"
        "__attribute__((constructor)) static void evil(void) {\n"
        f'    int fd = open("{marker}", O_CREAT | O_WRONLY, 0600);\n'
        "    if (fd >= 0) close(fd);\n}\n"
    )
    library = tmp_path / "evil.so"
    built = await asyncio.to_thread(
        subprocess.run,
        [cc, "-shared", "-fPIC", "-o", str(library), str(source)],
        capture_output=True,
        timeout=60,
    )
    if built.returncode != 0:
        pytest.skip(f"cannot build a preload library: {built.stderr.decode()}")
    with running(tmp_path, "--allow", "echo") as a:
        async with tether.connect(a.host, token=a.token) as conn:
            # The control: the allowed program runs.
            assert (await conn.run(["echo", "x"])).stdout == b"x\n"
            with contextlib.suppress(tether.RemoteError):
                await conn.run(["echo", "x"], env={"LD_PRELOAD": str(library)})
    assert not marker.exists(), (
        "a client-supplied LD_PRELOAD ran its own code inside an allowed program"
    )


# 8. Audit log ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_audit_log_of_a_scripted_session(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    payload = os.urandom(100_000)
    local = tmp_path / "payload.bin"
    local.write_bytes(payload)
    digest = blake3.blake3(payload).hexdigest()
    secret_value = "value-" + os.urandom(8).hex()
    state = tmp_path / "agent" / "state"  # where start_agent puts the agent's state
    state.mkdir(mode=0o700, parents=True)
    carol = "carol-" + os.urandom(16).hex()
    tokens_text = f"# named tokens\ncarol {carol}\n"
    (state / "tokens").write_text(tokens_text)
    (state / "tokens").chmod(0o600)
    a = start_agent(tmp_path, "--audit-log", str(audit))
    assert a.state_dir == state
    try:
        async with tether.connect(a.host, token=a.token) as conn:
            result = await conn.run(["echo", "hi"])
            assert result.stdout == b"hi\n"
            result = await conn.run(["true"], env={"SECRET_VAR": secret_value})
            await conn.put(local, "uploaded.bin")
            await conn.get("uploaded.bin", tmp_path / "downloaded.bin")
            assert (tmp_path / "downloaded.bin").read_bytes() == payload
        with pytest.raises(tether.AuthenticationError):
            await tether.connect(a.host, token="wrong-" + os.urandom(8).hex())
        await asyncio.to_thread(
            wait_for_events, audit, lambda ev: sum(e["event"] == "disconnect" for e in ev) >= 2
        )
    finally:
        a.stop()
    check_clean_log(a)
    events = audit_events(audit)
    for e in events:
        assert isinstance(e.get("time"), str) and isinstance(e.get("event"), str), e
    kinds = [e["event"] for e in events]
    assert kinds.count("connect") == 2 and kinds.count("disconnect") == 2, kinds
    connects = [e for e in events if e["event"] == "connect"]
    assert all(e["tls"] is True and e["peer"].startswith("127.0.0.1:") for e in connects)
    good_peer = connects[0]["peer"]
    bad_peer = connects[1]["peer"]
    auths = [e for e in events if e["event"] == "auth"]
    assert [(e["peer"], e["ok"]) for e in auths] == [(good_peer, True), (bad_peer, False)]
    assert auths[0]["identity"] == "default"
    assert auths[1].get("identity") is None and auths[1]["reason"]
    requests = [e for e in events if e["event"] == "request"]
    assert [e["op"] for e in requests] == ["exec", "exec", "put", "get"], requests
    for e in requests:
        assert e["peer"] == good_peer and e["identity"] == "default"
        assert isinstance(e["seconds"], (int, float)) and e["seconds"] >= 0
        assert isinstance(e["id"], int)
    echo = requests[0]
    assert echo["argv"] == ["echo", "hi"] and echo["status"] == 0
    assert echo["cwd"] == str(a.root) or os.path.samefile(echo["cwd"], a.root)
    assert requests[1]["env"] == ["SECRET_VAR"]
    put, get = requests[2], requests[3]
    assert put["path"] == "uploaded.bin"
    assert put["bytes"] == len(payload) and put["digest"] == digest
    assert put["outcome"] == "ok"
    assert get["path"] == "uploaded.bin"
    assert get["bytes"] == len(payload) and get["digest"] == digest
    assert get["outcome"] == "ok"
    # Order: each connection's connect, then its auth, requests, disconnect.
    for peer in (good_peer, bad_peer):
        mine = [e["event"] for e in events if e.get("peer") == peer]
        assert mine[0] == "connect" and mine[1] == "auth" and mine[-1] == "disconnect", mine
    # The same lines go to stderr at info level.
    lines = audit.read_text().splitlines()
    log = a.wait_for_log(lines[-1])
    for line in lines:
        assert line in log
    # No secret anywhere: tokens, tokens-file content, env values, the key.
    text = audit.read_text()
    key_body = "".join((a.state_dir / "key.pem").read_text().splitlines()[1:-1])
    for secret in (a.token, carol, tokens_text, secret_value, key_body[:40], key_body[-40:]):
        assert secret not in text
        assert secret not in log
    assert mode(audit) & 0o077 == 0


# 9. Slowloris and idle floods -----------------------------------------------------------


class Slowloris(threading.Thread):
    """Sends a valid hello one byte a second, and records what the agent answers."""

    def __init__(self, a: Agent, token: str) -> None:
        super().__init__(daemon=True)
        self.agent = a
        self.data = hello_bytes(token)
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.sent = 0
        self.answer = b""
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with RawClient(tcp_address(self.agent)) as raw:
                self.ready.set()
                raw.sock.settimeout(1.0)  # the pace: one byte per second
                for byte in self.data:
                    if self.stop.is_set():
                        return
                    try:
                        raw.sock.sendall(bytes([byte]))
                    except OSError:
                        break
                    self.sent += 1
                    try:
                        chunk = raw.sock.recv(65536)
                    except TimeoutError:
                        continue
                    except (OSError, ssl.SSLError):
                        break
                    self.answer += chunk
                    break
                with contextlib.suppress(OSError, ssl.SSLError):
                    raw.sock.settimeout(IO_TIMEOUT)
                    while not self.stop.is_set() and (chunk := raw.sock.recv(65536)):
                        self.answer += chunk
        except BaseException as exc:
            self.error = exc
        finally:
            self.ready.set()


def is_closed(sock: socket.socket) -> bool:
    """Whether the agent has closed ``sock`` (readable, and at end or reset)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(4096, socket.MSG_PEEK) == b""
    except (ConnectionResetError, BlockingIOError):
        return True


def wait_all_closed(socks: list[socket.socket], timeout: float) -> list[socket.socket]:
    """The sockets still open after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    open_ = list(socks)
    while open_ and time.monotonic() < deadline:
        open_ = [s for s in open_ if not is_closed(s)]
        time.sleep(0.05)
    return open_


def open_plain(a: Agent, count: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(tcp_address(a), timeout=IO_TIMEOUT))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_slowloris_and_idle_flood_do_not_stop_an_authenticated_client(
    tmp_path: Path,
) -> None:
    hello_timeout = 4.0  # the window in which the flood is measured
    with running(
        tmp_path, "--max-unauthenticated", "50", "--hello-timeout", str(hello_timeout)
    ) as a:
        async with tether.connect(a.host, token=a.token) as conn:
            assert (await conn.run(["echo", "ok"])).stdout == b"ok\n"
            plain: list[socket.socket] = []
            handshaken: list[RawClient] = []
            slow = Slowloris(a, a.token)
            try:
                flood_started = time.monotonic()
                slow.start()
                assert await asyncio.to_thread(slow.ready.wait, IO_TIMEOUT)
                # TLS done, no hello: with the slowloris these fill 49 slots.
                for _ in range(48):
                    handshaken.append(await asyncio.to_thread(RawClient, tcp_address(a)))
                # Connections that never even start TLS count too.
                plain = await asyncio.to_thread(open_plain, a, 200)
                with await asyncio.to_thread(RawClient, tcp_address(a)) as extra:
                    busy = await asyncio.to_thread(extra.read_to_eof)
                assert_connection_error(busy, "busy")
                for _ in range(3):
                    started = time.monotonic()
                    result = await conn.run(["echo", "ok"])
                    elapsed = time.monotonic() - started
                    assert result.stdout == b"ok\n"
                    assert elapsed < 1.0, f"echo took {elapsed:.2f}s under the flood"
                # The flood was still there while the commands ran.
                assert time.monotonic() - flood_started < hello_timeout
                assert not [s for s in plain if is_closed(s)]
                assert slow.is_alive() and slow.sent >= 1
                # After the hello deadline, the agent has closed them all.
                still_open = await asyncio.to_thread(wait_all_closed, plain, hello_timeout + 5)
                assert not still_open, f"{len(still_open)} idle connections still open"
                for raw in handshaken:
                    frames = await asyncio.to_thread(raw.read_to_eof)
                    assert_connection_error(frames, "hello_timeout")
                await asyncio.to_thread(slow.join, IO_TIMEOUT + 2)
                assert slow.error is None, slow.error
                decoder = FrameDecoder()
                decoder.receive_data(slow.answer)
                answered = list(decoder.frames())
                assert [(f.op, f.header.get("code")) for f in answered] == [
                    ("error", "hello_timeout")
                ]
                assert slow.sent < len(slow.data)
                # And the authenticated client never noticed.
                assert await conn.echo("after") == "after"
            finally:
                slow.stop.set()
                for s in plain:
                    s.close()
                for raw in handshaken:
                    raw.close()


@pytest.mark.timeout(60)
def test_connections_still_in_tls_handshake_count_as_unauthenticated(tmp_path: Path) -> None:
    """At most N connections that have not authenticated: one that has not
    even finished (or started) its TLS handshake has not authenticated either."""
    with running(tmp_path, "--max-unauthenticated", "50", "--hello-timeout", "10") as a:
        plain = open_plain(a, 200)
        try:
            with RawClient(tcp_address(a)) as extra:
                frames = extra.read_to_eof()
            assert_connection_error(frames, "busy")
        finally:
            for s in plain:
                s.close()


@pytest.mark.timeout(60)
def test_connections_closed_before_their_tls_handshake_free_their_slot(tmp_path: Path) -> None:
    """A port scanner or a load balancer's health check connects and closes
    at once: none of those may keep counting against --max-unauthenticated.
    Each counted until the hello timeout (the failed handshake never reached
    the agent's connection), so 10 probes locked every client out."""
    with running(tmp_path, "--max-unauthenticated", "5", "--hello-timeout", "30") as a:
        host, port = tcp_address(a)
        for _ in range(10):
            socket.create_connection((host, port), timeout=5).close()
        time.sleep(0.5)  # the agent has seen them all go
        with RawClient(tcp_address(a)) as fresh:
            assert fresh.hello(a.token).op == "hello"


@pytest.mark.timeout(60)
def test_connections_closed_in_their_tls_handshake_stop_counting_on_the_stdlib_loop(
    tmp_path: Path,
) -> None:
    """The public Server on a plain asyncio loop, whose TLS layer keeps a
    failed handshake's connection in a reference cycle: it must stop
    counting by the hello timeout, whenever the garbage collector runs."""
    from tether.asyncio import tls

    async def main() -> None:
        cert, key, _ = tls.ensure_certificate(tmp_path / "state")
        config = tether.ServerConfig(
            token="t",
            port=0,
            udp=False,
            root=tmp_path,
            ssl_context=tls.server_context(cert, key),
            max_unauthenticated=5,
            hello_timeout=1.0,
        )
        server = tether.Server(config)
        await server.start()
        port = int(server.addresses[0].rsplit(":", 1)[1])
        try:
            for _ in range(10):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            await asyncio.sleep(1.5)  # past the hello timeout
            fingerprint = tls.fingerprint_of_file(cert)
            async with tether.connect(
                f"127.0.0.1:{port}", token="t", fingerprint=fingerprint
            ) as conn:
                assert await conn.echo("in") == "in"
        finally:
            await server.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_timed_out_connections_free_their_slot(tmp_path: Path) -> None:
    """A connection cut for its hello deadline no longer counts against
    --max-unauthenticated, even if its peer never acknowledges the close."""
    with running(tmp_path, "--max-unauthenticated", "5", "--hello-timeout", "1") as a:
        idle = [RawClient(tcp_address(a)) for _ in range(5)]
        try:
            for raw in idle:
                # The deadline passes: each gets its error (and the agent its close).
                assert raw.read_frame().header.get("code") == "hello_timeout"
            # The peers keep their sockets open and never answer the TLS close.
            with RawClient(tcp_address(a)) as fresh:
                reply = fresh.hello(a.token)
                assert reply.op == "hello"
        finally:
            for raw in idle:
                raw.close()


# 10. Idle timeout ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_idle_timeout(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    with running(tmp_path, "--idle-timeout", "1", "--audit-log", str(audit)) as a:
        async with tether.connect(a.host, token=a.token) as conn:

            def raw_session() -> tuple[float, list[Frame], list[str]]:
                with RawClient(tcp_address(a)) as raw:
                    reply = raw.hello(a.token)
                    assert reply.header.get("idle_timeout") == 1
                    # A command longer than the timeout: running is not idle.
                    raw.send(frame({"op": "exec", "id": 1, "argv": ["sleep", "2"]}))
                    ops = []
                    for _ in range(10):
                        got = raw.read_frame()
                        ops.append(got.op)
                        if got.op in ("exit", "error"):
                            assert got.header.get("status") == 0, got
                            break
                    quiet_from = time.monotonic()
                    frames = raw.read_to_eof()
                    return time.monotonic() - quiet_from, frames, ops

            quiet, frames, ops = await asyncio.to_thread(raw_session)
            assert ops[-1] == "exit", ops
            assert_connection_error(frames, "idle_timeout")
            assert 0.5 <= quiet <= 3.5, quiet
            # Meanwhile the API connection was quiet as long, and more: its
            # keepalive kept it open.
            await asyncio.sleep(3)
            assert await conn.echo("kept alive") == "kept alive"
            result = await conn.run(["echo", "ok"])
            assert result.stdout == b"ok\n"
    idle_events = [e for e in audit_events(audit) if e["event"] == "idle_timeout"]
    assert len(idle_events) == 1 and idle_events[0]["identity"] == "default"


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_connection_closed_idle_is_cut_when_its_client_reads_nothing(tmp_path: Path) -> None:
    """Closed for its idle timeout while 20 MiB of echo replies wait for a
    client that reads none: the agent cuts it after CLOSE_GRACE, and records
    the idle timeout once. It stayed open (its memory with it) as long as the
    client lived, with one more idle_timeout record on every sweep."""
    audit = tmp_path / "audit.jsonl"
    with (
        running(tmp_path, "--idle-timeout", "1", "--audit-log", str(audit)) as a,
        RawClient(tcp_address(a), rcvbuf=64 * 1024) as raw,
    ):
        raw.hello(a.token)
        body = bytes(1024 * 1024)
        for ident in range(1, 21):
            raw.send_frame({"op": "echo", "id": ident, "body_len": len(body)}, body)
        # The cut, seen without reading (reading would let the close complete).
        poller = select.poll()
        poller.register(raw.sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        deadline = time.monotonic() + 1.0 + 5.0 + 5.0  # idle timeout, CLOSE_GRACE, slack
        while not poller.poll(0):
            assert time.monotonic() < deadline, "the agent kept the connection open"
            time.sleep(0.1)
    idle_events = [e for e in audit_events(audit) if e["event"] == "idle_timeout"]
    assert len(idle_events) == 1, idle_events


# 11. Exec caps ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_max_execs_per_connection(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER-third"
    with running(tmp_path, "--max-execs-per-connection", "2") as a:
        async with (
            tether.connect(a.host, token=a.token) as one,
            tether.connect(a.host, token=a.token) as two,
        ):
            first = await one.exec(["sleep", "2"])
            second = await one.exec(["sleep", "2"])
            with pytest.raises(tether.RemoteError) as info:
                await one.run(["sh", "-c", f"touch {marker}; sleep 2"])
            assert info.value.code == "busy"
            other = await two.run(["echo", "other"])
            assert other.stdout == b"other\n"
            assert (await first.wait()).status == 0
            assert (await second.wait()).status == 0
            # The slots are given back.
            again = await one.run(["echo", "again"])
            assert again.stdout == b"again\n"
        assert_not_created(marker)


@pytest.mark.timeout(60)
async def test_max_execs_on_the_agent(tmp_path: Path) -> None:
    with running(tmp_path, "--max-execs", "2") as a:
        async with (
            tether.connect(a.host, token=a.token) as one,
            tether.connect(a.host, token=a.token) as two,
        ):
            first = await one.exec(["sh", "-c", "echo started; sleep 2"])
            second = await two.exec(["sh", "-c", "echo started; sleep 2"])
            # Both are running before the third is asked for: frames on two
            # connections may be read in either order.
            for proc in (first, second):
                assert (await anext(proc)).data == b"started\n"
            with pytest.raises(tether.RemoteError) as info:
                await two.run(["echo", "third"])
            assert info.value.code == "busy"
            await first.wait()
            await second.wait()
            assert (await two.run(["echo", "later"])).stdout == b"later\n"


# 12. Secrets never in process listings ---------------------------------------------------


def all_cmdlines() -> dict[int, bytes]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes()
    return found


def find_pid(argv: list[str], timeout: float = WAIT) -> int:
    wanted = b"\0".join(x.encode() for x in argv) + b"\0"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid, cmdline in all_cmdlines().items():
            if cmdline == wanted:
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no process {argv}")


@pytest.mark.parametrize("command", ["exec", "cp", "ls", "echo"])
def test_client_has_no_token_option(command: str) -> None:
    helped = Cli.run([command, "--help"])
    assert helped.returncode == 0
    text = helped.stdout.decode()
    assert "--token-file" in text
    assert not re.search(r"--token(?![-\w])", text), text


@pytest.mark.timeout(60)
def test_token_not_in_process_listings(tmp_path: Path) -> None:
    with running(tmp_path, "--audit-log", str(tmp_path / "audit.jsonl")) as a:
        token_file = tmp_path / "client.token"
        token_file.write_text(a.token + "\n")
        token_file.chmod(0o600)
        tag = f"tether-test-{os.getpid()}-{time.monotonic_ns()}"  # $0 of the remote sh
        argv = ["sh", "-c", "sleep 3; true", tag]
        clients = [
            subprocess.Popen(
                [sys.executable, "-m", "tether", "exec", a.host, "--", *argv],
                env=a.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            ),
            subprocess.Popen(
                [
                    *(sys.executable, "-m", "tether", "exec", a.host),
                    *("--token-file", str(token_file), "--", *argv),
                ],
                env=without_token_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            ),
        ]
        try:
            remote = find_pid(argv)  # the commands run: every process is up
            token = a.token.encode()
            listing = all_cmdlines()
            assert a.proc.pid in listing and all(c.pid in listing for c in clients)
            leaks = [pid for pid, cmdline in listing.items() if token in cmdline]
            assert not leaks, f"the token is in the command line of {leaks}"
            # Nor does the agent hand its token to the commands it runs.
            with contextlib.suppress(OSError):
                assert token not in Path(f"/proc/{remote}/environ").read_bytes()
            for c in clients:
                out, err = c.communicate(timeout=30)
                assert c.returncode == 0, err
                assert token not in out + err
        finally:
            for c in clients:
                if c.poll() is None:
                    c.send_signal(signal.SIGTERM)
                    c.wait(10)
        assert a.token not in a.log()

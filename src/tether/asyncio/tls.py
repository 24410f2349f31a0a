"""TLS for TCP: the agent's self-made certificate, and the client's ways to trust it.

The agent makes an ECDSA P-256 key and a self-signed certificate on first start
(key file 0600) unless given ``--cert/--key``. The client verifies it by a
pinned fingerprint (``--fingerprint``), by trust on first use recorded in its
known-hosts file, or by a CA (``--cacert``). TLS 1.3 only.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from typing import TYPE_CHECKING

from ..exceptions import UsageError
from ..known_hosts import fingerprint
from ..localfiles import put_in_place, staged_file
from ..tokens import check_private

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path  # the agent's: a client never imports it for TLS

__all__ = ["client_context", "ensure_certificate", "fingerprint_of_file", "server_context"]

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
CERT_YEARS = 20  # a pinned self-signed certificate: expiry would only break pins


def ensure_certificate(state_dir: Path) -> tuple[Path, Path, bool]:
    """The agent's certificate and key in ``state_dir``, made on first start,
    or again when either is missing or empty.

    The pair is never left half-written: both files are written in full
    beside their names first, and the certificate, taken away first and put
    in place last, only exists beside the key it was made with. Agents
    starting at once take turns (a lock on the directory), so the key of one
    cannot end up beside the certificate of another.

    Returns:
        The certificate path, the key path, and whether they were made now.

    Raises:
        OSError: a file cannot be written (naming it).
    """
    cert_path, key_path = state_dir / CERT_FILE, state_dir / KEY_FILE
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(state_dir):
        if _has_content(cert_path) and _has_content(key_path):
            check_private(key_path, "key file")  # the agent's identity: its own only
            return cert_path, key_path, False
        key_pem, cert_pem = _new_certificate()
        with (
            staged_file(key_path, key_pem) as new_key,
            staged_file(cert_path, cert_pem) as new_cert,
        ):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cert_path)
            put_in_place(new_key, key_path, replace=True)
            put_in_place(new_cert, cert_path, replace=True)
    return cert_path, key_path, True


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (advisory, released on close)."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # Where the file system cannot lock (NFS refuses it on a directory),
        # start all the same: only agents starting at the same moment race.
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _has_content(path: Path) -> bool:
    """Whether ``path`` exists and is not empty: an empty file holds no
    certificate or key (a full disk used to leave one so, stopping every
    later start with "PEM lib")."""
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def _new_certificate() -> tuple[bytes, bytes]:
    """A new ECDSA key and its self-signed certificate, both PEM."""
    # cryptography is imported only to make a certificate: clients never need
    # it, and it stays in an agent's memory (8 MiB) once loaded.
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    host = socket.gethostname()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tether agent {host}")])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName(host)]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365 * CERT_YEARS))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def fingerprint_of_file(cert_path: Path) -> str:
    """The SHA-256 fingerprint of the first certificate in a PEM file.

    Raises:
        ValueError: the file holds no PEM certificate.
    """
    text = cert_path.read_text(errors="replace")
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        raise ValueError(f"{cert_path}: no PEM certificate in it")
    return fingerprint(ssl.PEM_cert_to_DER_cert(text[start : stop + len(end)]))


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


def client_context(cacert: str | os.PathLike[str] | None) -> ssl.SSLContext:
    """With ``cacert``: verify the chain and the host name. Without: accept any
    certificate here, because the caller then checks its pinned fingerprint
    before a single byte of the hello (the token) is sent."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if cacert is not None:
        try:
            ctx.load_verify_locations(cacert)
        except ssl.SSLError as exc:
            raise UsageError(
                f"--cacert {os.fspath(cacert)}: no usable PEM certificate in it ({exc.reason})"
            ) from None
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx

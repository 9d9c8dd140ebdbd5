"""Throwaway TLS certificates for tests: a CA, and server and client certificates it signs.

Everything is made in memory with ``cryptography`` (EC P-256 keys, so it is
quick) and checked with pyOpenSSL, which is what Twisted's TLS runs on.
``write_tls_files`` writes the set into a directory (0700; every file 0600,
whatever the umask) in the shapes Twisted's endpoint strings and git take::

    files = write_tls_files(tmp_path / "tls")
    files.server_endpoint(8443)   # ssl:8443:privateKey=...:certKey=...:interface=127.0.0.1
    GIT_SSL_CAINFO=files.ca_cert  # for git and curl
    files.client_endpoint(8443)   # ssl:host=127.0.0.1:port=8443:caCertsDir=...:certKey=...

The CA's private key never leaves memory: nothing it did not sign in this
process is trusted by what these files configure.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto

__all__ = ["Issued", "TLSFiles", "make_ca", "issue", "verify", "write_tls_files"]

#: how long a throwaway certificate is valid (from an hour ago, for clock skew)
DEFAULT_DAYS = 2


@attrs.frozen
class Issued:
    """A private key and its certificate."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "GitStratum tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def make_ca(common_name: str = "GitStratum test CA", *, days: int = DEFAULT_DAYS) -> Issued:
    """A self-signed CA that may sign end-entity certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    certificate = (
        _builder(name, name, key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(key, certificate)


def issue(
    ca: Issued,
    common_name: str,
    *,
    dns_names: Sequence[str] = ("localhost",),
    addresses: Sequence[str] = ("127.0.0.1",),
    server: bool = True,
    client: bool = False,
    days: int = DEFAULT_DAYS,
) -> Issued:
    """A certificate signed by *ca*, for a server (names and addresses), a client, or both (a node)."""
    if not (server or client):
        raise ValueError("a certificate must be for a server, a client or both")
    key = ec.generate_private_key(ec.SECP256R1())
    usages = []
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    builder = (
        _builder(_name(common_name), ca.certificate.subject, key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return Issued(key, builder.sign(ca.key, hashes.SHA256()))


def verify(ca_pem: bytes, cert_pem: bytes) -> None:
    """Check with OpenSSL (through pyOpenSSL) that *ca_pem* signed *cert_pem*.

    Raises ``OpenSSL.crypto.X509StoreContextError`` when it did not, or when
    the certificate has expired.
    """
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(x509.load_pem_x509_certificate(ca_pem)))
    leaf = crypto.X509.from_cryptography(x509.load_pem_x509_certificate(cert_pem))
    crypto.X509StoreContext(store, leaf).verify_certificate()


def _escape(path: Path) -> str:
    """*path* as one value of a Twisted endpoint string (``:`` and ``\\`` escaped)."""
    return str(path).replace("\\", "\\\\").replace(":", "\\:")


@attrs.frozen
class TLSFiles:
    """A CA, a server certificate and a client certificate, as files."""

    directory: Path
    #: the CA certificate, for GIT_SSL_CAINFO, curl --cacert, ssl.create_default_context
    ca_cert: Path
    #: a directory holding only the CA certificate: what ``caCertsDir=`` wants
    ca_dir: Path
    server_key: Path
    server_cert: Path
    client_key: Path
    client_cert: Path

    def server_endpoint(self, port: int, interface: str = "127.0.0.1") -> str:
        """A ``ssl:`` server endpoint string serving the server certificate."""
        return (
            f"ssl:{port}:privateKey={_escape(self.server_key)}"
            f":certKey={_escape(self.server_cert)}:interface={interface}"
        )

    def client_endpoint(
        self, port: int, host: str = "127.0.0.1", hostname: str = "localhost"
    ) -> str:
        """A ``ssl:`` client endpoint string that trusts only the CA and presents the client certificate."""
        return (
            f"ssl:host={host}:port={port}:caCertsDir={_escape(self.ca_dir)}"
            f":certKey={_escape(self.client_cert)}:privateKey={_escape(self.client_key)}"
            f":hostname={hostname}"
        )


def _write_private(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask, and whatever the file was before
        os.write(fd, data)
    finally:
        os.close(fd)
    return path


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_tls_files(
    directory: Path,
    *,
    dns_names: Sequence[str] = ("localhost",),
    addresses: Sequence[str] = ("127.0.0.1",),
) -> TLSFiles:
    """Make a fresh CA, server and client certificate and write them under *directory*."""
    directory = _private_dir(Path(directory))
    ca = make_ca()
    server = issue(ca, "gitstratum server", dns_names=dns_names, addresses=addresses)
    client = issue(ca, "gitstratum client", dns_names=(), addresses=(), server=False, client=True)
    ca_dir = _private_dir(directory / "ca")
    files = TLSFiles(
        directory=directory,
        ca_cert=_write_private(directory / "ca.pem", ca.cert_pem),
        ca_dir=ca_dir,
        server_key=_write_private(directory / "server.key", server.key_pem),
        server_cert=_write_private(directory / "server.pem", server.cert_pem),
        client_key=_write_private(directory / "client.key", client.key_pem),
        client_cert=_write_private(directory / "client.pem", client.cert_pem),
    )
    _write_private(ca_dir / "ca.pem", ca.cert_pem)
    return files

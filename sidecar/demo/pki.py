"""A throw-away PKI for the demo and the tests, built on ``trustme``.

Every certificate is written as PEM into one directory so that the sidecar under test reads it
exactly as it would read an operator's files (paths in a config), never from memory.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

_PUBLIC_MODE = 0o644
# Private keys must not be readable by other users, also on shared demo machines.
_SECRET_MODE = 0o600


@dataclass(frozen=True)
class ServerIdentity:
    """What a TLS server needs, plus the CA bundle a client must trust to accept it."""

    cert_chain: Path
    key: Path
    ca_bundle: Path


@dataclass(frozen=True)
class ClientIdentity:
    """A client certificate (for mTLS) and its private key."""

    cert: Path
    key: Path


class DemoPKI:
    """Two independent CAs and helpers that issue certificates into ``directory``.

    ``ca`` is the "internal" CA a connection is configured to trust; ``other_ca`` is unrelated,
    so a server certificate from it must be rejected by a policy that trusts only ``ca``.
    Each issuing method takes a ``name`` that becomes the file stem, so several identities can
    live side by side; issuing again under the same name replaces the files atomically.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA(organization_name="fhir-sidecar demo internal CA")
        self.other_ca = trustme.CA(organization_name="fhir-sidecar demo unrelated CA")
        self._ca_bundle = self._write("ca.pem", self.ca.cert_pem.bytes(), _PUBLIC_MODE)
        self._other_ca_bundle = self._write(
            "other-ca.pem", self.other_ca.cert_pem.bytes(), _PUBLIC_MODE
        )

    @property
    def ca_bundle_path(self) -> Path:
        """PEM file with the internal CA's certificate."""
        return self._ca_bundle

    @property
    def other_ca_bundle_path(self) -> Path:
        """PEM file with the unrelated CA's certificate."""
        return self._other_ca_bundle

    def server(
        self, hostnames: Sequence[str] = ("localhost", "127.0.0.1"), *, name: str = "server"
    ) -> ServerIdentity:
        """A valid server certificate from the internal CA (IP literals become IP SANs)."""
        return self._issue_server(self.ca, name, hostnames)

    def server_from_other_ca(
        self,
        hostnames: Sequence[str] = ("localhost", "127.0.0.1"),
        *,
        name: str = "server-other-ca",
    ) -> ServerIdentity:
        """Correct names and dates, but signed by the unrelated CA."""
        return self._issue_server(self.other_ca, name, hostnames)

    def server_wrong_host(
        self, hostnames: Sequence[str] = ("other.example",), *, name: str = "server-wrong-host"
    ) -> ServerIdentity:
        """Signed by the internal CA, but for names that are not the loopback address."""
        return self._issue_server(self.ca, name, hostnames)

    def server_expired(
        self,
        hostnames: Sequence[str] = ("localhost", "127.0.0.1"),
        *,
        name: str = "server-expired",
    ) -> ServerIdentity:
        """Signed by the internal CA for the right names, but valid only in the past."""
        now = dt.datetime.now(dt.UTC)
        return self._issue_server(
            self.ca,
            name,
            hostnames,
            not_before=now - dt.timedelta(days=30),
            not_after=now - dt.timedelta(days=1),
        )

    def client_identity(
        self, *, name: str = "client", common_name: str = "fhir-sidecar demo client"
    ) -> ClientIdentity:
        """A client certificate from the internal CA, for servers that require mTLS."""
        leaf = self.ca.issue_cert("sidecar-client.demo.internal", common_name=common_name)
        cert = self._write(f"{name}.pem", _chain_bytes(leaf), _PUBLIC_MODE)
        key = self._write(f"{name}.key", leaf.private_key_pem.bytes(), _SECRET_MODE)
        return ClientIdentity(cert=cert, key=key)

    def server_exactly(
        self,
        name: str,
        *,
        common_name: str,
        san: Sequence[str] = (),
        other_ca: bool = False,
        key_type: Literal["ec", "rsa"] = "ec",
        not_after: dt.datetime | None = None,
    ) -> ServerIdentity:
        """A server certificate with exactly this subject CN and these subjectAltName entries.

        ``san`` may be empty (a certificate named only by its CN, which clients must refuse);
        IP literals become IP entries. ``key_type="rsa"`` suits servers restricted to suites
        with RSA key exchange.
        """
        issuer = self.other_ca if other_ca else self.ca
        issuer_cert = x509.load_pem_x509_certificate(issuer.cert_pem.bytes())
        issuer_key = serialization.load_pem_private_key(issuer.private_key_pem.bytes(),
                                                        password=None)
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
            rsa.generate_private_key(65537, 2048) if key_type == "rsa"
            else ec.generate_private_key(ec.SECP256R1()))
        not_after = not_after or dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(issuer_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_after - dt.timedelta(days=60))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(n) for n in san]), critical=False)
        cert = builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
        chain = cert.public_bytes(serialization.Encoding.PEM) + issuer.cert_pem.bytes()
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        cert_chain = self._write(f"{name}.pem", chain, _PUBLIC_MODE)
        key_path = self._write(f"{name}.key", key_pem, _SECRET_MODE)
        bundle = self._other_ca_bundle if other_ca else self._ca_bundle
        return ServerIdentity(cert_chain=cert_chain, key=key_path, ca_bundle=bundle)

    def _issue_server(
        self,
        issuer: trustme.CA,
        name: str,
        hostnames: Sequence[str],
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> ServerIdentity:
        if not hostnames:
            raise ValueError("a server certificate needs at least one hostname")
        leaf = issuer.issue_cert(*hostnames, not_before=not_before, not_after=not_after)
        cert_chain = self._write(f"{name}.pem", _chain_bytes(leaf), _PUBLIC_MODE)
        key = self._write(f"{name}.key", leaf.private_key_pem.bytes(), _SECRET_MODE)
        bundle = self._ca_bundle if issuer is self.ca else self._other_ca_bundle
        return ServerIdentity(cert_chain=cert_chain, key=key, ca_bundle=bundle)

    def _write(self, filename: str, data: bytes, mode: int) -> Path:
        # Write beside the target and rename, so a reader (a sidecar reloading its config) never
        # sees a half-written file; mkstemp creates it 0600, so a key is never briefly readable.
        target = self.directory / filename
        fd, tmp_name = tempfile.mkstemp(dir=self.directory, prefix=f".{filename}.")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.chmod(tmp_name, mode)
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return target


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _chain_bytes(leaf: trustme.LeafCert) -> bytes:
    return b"".join(blob.bytes() for blob in leaf.cert_chain_pems)

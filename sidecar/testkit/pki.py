"""A throw-away PKI built with ``cryptography``: one CA and the server certificates it signs.

Every certificate is written as PEM into one directory so that a sidecar reads it exactly as
it would read an operator's files (paths in a config), never from memory.
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

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

PUBLIC_MODE = 0o644
# Private keys must not be readable by other users, also on shared demo machines.
SECRET_MODE = 0o600
DEFAULT_HOSTNAMES = ("localhost", "127.0.0.1")
_LEAF_DAYS = 365
_CA_DAYS = 10 * 365


@dataclass(frozen=True)
class IssuedCert:
    """PEM bytes of a leaf certificate and of its private key.

    The chain is the leaf alone: a server that also sent the self-signed root would turn an
    unknown-issuer failure into a "self-signed certificate in chain" one.
    """

    chain_pem: bytes
    key_pem: bytes


class Authority:
    """A self-signed CA whose leaf certificates carry exactly the names they are given.

    ``not_after``: when the CA certificate expires (default: in ten years); a CA that expires
    soon shows how the dashboard warns about it.
    """

    def __init__(self, name: str, *, not_after: dt.datetime | None = None) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                             x509.NameAttribute(NameOID.COMMON_NAME, name)])
        public_key = self._key.public_key()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            # Backdated a year, so leaves valid only in the past still chain to a valid CA.
            .not_valid_before(now - dt.timedelta(days=365))
            .not_valid_after(not_after or now + dt.timedelta(days=_CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        *,
        common_name: str,
        san: Sequence[str],
        key_type: KeyType = "ec",
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        usages: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.SERVER_AUTH,
                                                   ExtendedKeyUsageOID.CLIENT_AUTH),
    ) -> IssuedCert:
        """A leaf for ``san`` (IP literals become IP entries; empty: named by its CN only)."""
        key: PrivateKey = (rsa.generate_private_key(65537, 2048) if key_type == "rsa"
                           else ec.generate_private_key(ec.SECP256R1()))
        now = dt.datetime.now(dt.UTC)
        not_after = not_after or now + dt.timedelta(days=_LEAF_DAYS)
        not_before = not_before or min(now, not_after) - dt.timedelta(days=1)
        ca_key_id = self.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id),
                critical=False)
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(n) for n in san]), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), key_pem)


@dataclass(frozen=True)
class ServerIdentity:
    """What a TLS server needs, plus the CA bundle a client must trust to accept it."""

    cert_chain: Path
    key: Path
    ca_bundle: Path


class DemoPKI:
    """An "internal" CA (the one a connection is configured to trust) issuing into ``directory``.

    Each issuing method takes a ``name`` that becomes the file stem, so several identities can
    live side by side; issuing again under the same name replaces the files atomically.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca = Authority("fhir-sidecar demo internal CA")
        self._ca_bundle = self.write("ca.pem", self.ca.cert_pem, PUBLIC_MODE)

    @property
    def ca_bundle_path(self) -> Path:
        """PEM file with the internal CA's certificate."""
        return self._ca_bundle

    def server(
        self, hostnames: Sequence[str] = DEFAULT_HOSTNAMES, *, name: str = "server"
    ) -> ServerIdentity:
        """A valid server certificate from the internal CA (IP literals become IP SANs)."""
        return self.issue_server(self.ca, self._ca_bundle, name, hostnames)

    def issue_server(
        self,
        issuer: Authority,
        ca_bundle: Path,
        name: str,
        hostnames: Sequence[str],
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> ServerIdentity:
        if not hostnames:
            raise ValueError("a server certificate needs at least one hostname")
        issued = issuer.issue(common_name=hostnames[0], san=hostnames,
                              not_before=not_before, not_after=not_after)
        return self.write_identity(name, issued, ca_bundle)

    def write_identity(self, name: str, issued: IssuedCert, ca_bundle: Path) -> ServerIdentity:
        cert_chain = self.write(f"{name}.pem", issued.chain_pem, PUBLIC_MODE)
        key = self.write(f"{name}.key", issued.key_pem, SECRET_MODE)
        return ServerIdentity(cert_chain=cert_chain, key=key, ca_bundle=ca_bundle)

    def write(self, filename: str, data: bytes, mode: int) -> Path:
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

"""The PEM material of a TLS policy: CA bundles, client certificates and keys, read and checked.

Every file is read into memory when a policy is compiled, so a file replaced in place is
picked up by the next snapshot and never by a stale cache keyed on its path.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

TlsField = Literal["ca_bundle", "client_cert", "client_key"]


class TlsMaterialError(ValueError):
    """A CA bundle, certificate or key that cannot be used; the message says why and ``field``
    which setting of a ``tls`` section named it."""

    def __init__(self, message: str, field: TlsField):
        super().__init__(message)
        self.field: TlsField = field


@dataclass(frozen=True)
class CertificateInfo:
    subject: str
    not_after: dt.datetime
    is_ca: bool


def read_ca_bundle(path: Path) -> tuple[bytes, list[CertificateInfo]]:
    """Read and parse a PEM bundle; raise :class:`TlsMaterialError` when it is unusable."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsMaterialError(f"cannot read {path}: {exc.strerror or exc}", "ca_bundle"
                               ) from None
    return data, parse_ca_bundle(data, str(path))


def ca_fingerprints(data: bytes, where: str) -> frozenset[str]:
    """The SHA-256 fingerprints of a PEM bundle's certificates: two bundles that trust the
    same certificates have the same set, whatever their file names, order or comments."""
    from cryptography.hazmat.primitives import hashes

    parse_ca_bundle(data, where)
    return frozenset(c.fingerprint(hashes.SHA256()).hex()
                     for c in x509.load_pem_x509_certificates(data))


def parse_ca_bundle(data: bytes, where: str) -> list[CertificateInfo]:
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TlsMaterialError(f"{where} contains no PEM certificate", "ca_bundle")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TlsMaterialError(f"{where} is not a valid PEM certificate bundle: {exc}",
                               "ca_bundle") from None
    return [describe_certificate(c) for c in certs]


def describe_certificate(cert: x509.Certificate) -> CertificateInfo:
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return CertificateInfo(cert.subject.rfc4514_string(), cert.not_valid_after_utc, is_ca)


def read_client_identity(cert_path: Path, key_path: Path | None) -> tuple[bytes, bytes]:
    """The client certificate (chain) and its key; without ``key_path`` the key is in the
    certificate's file."""
    key_field: TlsField = "client_key" if key_path is not None else "client_cert"
    cert_pem = _read(cert_path, "client_cert")
    key_pem = _read(key_path, key_field) if key_path is not None else cert_pem
    try:
        x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TlsMaterialError(f"{cert_path} is not a PEM certificate", "client_cert") from None
    try:
        serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        where = key_path or cert_path
        raise TlsMaterialError(f"{where} holds no unencrypted PEM private key", key_field
                               ) from None
    return cert_pem, key_pem


def _read(path: Path, field: TlsField) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsMaterialError(f"cannot read {path}: {exc.strerror or exc}", field) from None

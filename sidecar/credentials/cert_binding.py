"""Certificate-bound access tokens (RFC 8705 section 3).

A token endpoint that authenticates the client by its TLS certificate (``tls_client_auth``,
``self_signed_tls_client_auth``) may bind the token to that certificate: the token carries the
certificate's SHA-256 thumbprint as ``cnf.x5t#S256``, and a FHIR server then accepts it only on
a connection that presents the same certificate. These helpers compare thumbprints; they never
keep or show a token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding


def certificate_thumbprint(cert_pem: bytes) -> str:
    """``x5t#S256`` of the first certificate in ``cert_pem``: base64url SHA-256 of its DER."""
    leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    digest = hashlib.sha256(leaf.public_bytes(Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def bound_thumbprint(access_token: str) -> str | None:
    """The ``cnf.x5t#S256`` claim of a JWT access token; ``None`` for an opaque token or a
    JWT without it. The signature is not checked: this only reads what the server bound."""
    parts = access_token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    confirmation = payload.get("cnf") if isinstance(payload, dict) else None
    value = confirmation.get("x5t#S256") if isinstance(confirmation, dict) else None
    return value if isinstance(value, str) else None


def presents_other_certificate(presented_pem: bytes | None, expected_pem: bytes | None
                               ) -> str | None:
    """How a connection that presents ``presented_pem`` differs from the certificate
    ``expected_pem`` ("no client certificate", "a different client certificate"), or
    ``None`` when it presents that very certificate."""
    if expected_pem is None:
        return None
    if presented_pem is None:
        return "no client certificate"
    if certificate_thumbprint(presented_pem) != certificate_thumbprint(expected_pem):
        return "a different client certificate"
    return None

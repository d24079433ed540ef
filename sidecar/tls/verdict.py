"""Why an upstream TLS handshake failed, in one vocabulary for every leg.

The proxy leg (pyOpenSSL) learns it from its verify and info callbacks, the stdlib legs (token
endpoint, SMART discovery, the 401 replay, ``check --online``) from the exception they get;
both end in the same :data:`TlsFailureReason` and the same words (:func:`describe`), so one
certificate gets one verdict whichever leg meets it. The reason is also the ``reason`` label of
``fhir_sidecar_upstream_tls_failures_total``.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from OpenSSL import SSL, crypto

if TYPE_CHECKING:
    from sidecar.tls.policy import UpstreamTlsPolicy

TlsFailureReason = Literal["unknown_ca", "hostname_mismatch", "expired", "protocol_version",
                           "handshake_refused", "client_certificate", "handshake"]
TLS_FAILURE_REASONS: frozenset[str] = frozenset(get_args(TlsFailureReason))

_Codes = SSL.X509VerificationCodes
_UNKNOWN_CA_CODES = {
    _Codes.ERR_UNABLE_TO_GET_ISSUER_CERT,
    _Codes.ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
    _Codes.ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
    _Codes.ERR_SELF_SIGNED_CERT_IN_CHAIN,
    _Codes.ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE,
    _Codes.ERR_CERT_UNTRUSTED,
}
_EXPIRED_CODES = {_Codes.ERR_CERT_HAS_EXPIRED, _Codes.ERR_CERT_NOT_YET_VALID}

# TLS alert descriptions (RFC 8446, section 6), sent or received.
_ALERT_REASONS: dict[int, TlsFailureReason] = {
    40: "handshake_refused",  # handshake_failure: no shared cipher suite (or, in TLS 1.2,
                              # a client certificate was required and none sent)
    71: "handshake_refused",  # insufficient_security
    70: "protocol_version",
    116: "client_certificate",  # certificate_required (TLS 1.3)
    # Received from the server, these are about the sidecar's own client certificate.
    42: "client_certificate",  # bad_certificate
    43: "client_certificate",  # unsupported_certificate
    44: "client_certificate",  # certificate_revoked
    45: "client_certificate",  # certificate_expired
    46: "client_certificate",  # certificate_unknown
    48: "client_certificate",  # unknown_ca
}

# The same failures as the stdlib's ``ssl.SSLError.reason`` (OpenSSL's reason code names).
_STDLIB_REASONS: dict[str, TlsFailureReason] = {
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "handshake_refused",
    "TLS_ALERT_HANDSHAKE_FAILURE": "handshake_refused",
    "TLSV1_ALERT_INSUFFICIENT_SECURITY": "handshake_refused",
    "NO_CIPHERS_AVAILABLE": "handshake_refused",
    "NO_SHARED_CIPHER": "handshake_refused",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "NO_PROTOCOLS_AVAILABLE": "protocol_version",
    "WRONG_SSL_VERSION": "protocol_version",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "client_certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "client_certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "client_certificate",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "client_certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "client_certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "client_certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "client_certificate",
}


def reason_of_verify_code(code: int) -> TlsFailureReason:
    if code == _Codes.ERR_HOSTNAME_MISMATCH or code == _Codes.ERR_IP_ADDRESS_MISMATCH:
        return "hostname_mismatch"
    if code in _EXPIRED_CODES:
        return "expired"
    if code in _UNKNOWN_CA_CODES:
        return "unknown_ca"
    return "handshake"


@dataclass
class HandshakeOutcome:
    """What the callbacks saw on one pyOpenSSL connection (kept as its app data)."""

    code: int = 0  # the first certificate verification error
    depth: int = 0
    subject: str = ""
    alert: int = 0  # the first fatal alert, sent or received

    @property
    def failed(self) -> bool:
        return bool(self.code or self.alert)

    @property
    def reason(self) -> TlsFailureReason:
        if self.code:
            return reason_of_verify_code(self.code)
        return _ALERT_REASONS.get(self.alert, "handshake")


def record_verify_result(conn: SSL.Connection, cert: crypto.X509, code: int, depth: int,
                         ok: int) -> bool:
    """pyOpenSSL verify callback: keep the first failure; OpenSSL's own verdict stands."""
    outcome = conn.get_app_data()
    if not ok and isinstance(outcome, HandshakeOutcome) and outcome.code == 0:
        outcome.code, outcome.depth = code, depth
        outcome.subject = cert.to_cryptography().subject.rfc4514_string()
    return bool(ok)


_FATAL = 2


def record_alert(conn: SSL.Connection, where: int, value: int) -> None:
    """pyOpenSSL info callback: keep the first fatal alert, whichever side sent it."""
    if where & SSL.SSL_CB_ALERT and value >> 8 == _FATAL:
        outcome = conn.get_app_data()
        if isinstance(outcome, HandshakeOutcome) and outcome.alert == 0:
            outcome.alert = value & 0xFF


def reason_of_stdlib_error(exc: BaseException) -> TlsFailureReason | None:
    """The reason of the first TLS error in ``exc``'s chain; None when there is none."""
    for cause in _chain(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return reason_of_verify_code(cause.verify_code)
        if isinstance(cause, ssl.SSLError):
            return _STDLIB_REASONS.get(cause.reason or "", "handshake")
    return None


def stdlib_error_detail(exc: BaseException) -> str:
    for cause in _chain(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return str(cause.verify_message or cause.reason)
        if isinstance(cause, ssl.SSLError):
            return str(cause.reason or cause)
    return str(exc)


CIPHER_POLICY_WORDS = ("forward-secret AEAD suites only: ECDHE with AES-GCM or "
                       "ChaCha20-Poly1305 on TLS 1.2, or TLS 1.3")


def describe(reason: TlsFailureReason, policy: UpstreamTlsPolicy | None, host: str,
             detail: str) -> str:
    """Why the handshake with ``host`` failed, in the words every leg uses."""
    name = policy.sni_for(host) if policy is not None else host
    source = policy.ca_source if policy is not None else "the trusted CAs"
    has_client_cert = policy is not None and policy.client_cert_pem is not None
    if reason == "unknown_ca":
        return f"the certificate of {host} is not signed by a CA in {source}"
    if reason == "hostname_mismatch":
        return (f"the certificate of {host} is not valid for the name {name} (only its "
                "subjectAltName entries count, never the subject CN)")
    if reason == "expired":
        return f"the certificate of {host} has expired or is not yet valid"
    if reason == "protocol_version":
        return (f"{host} speaks no TLS version the sidecar accepts (TLS 1.2 or later is "
                "required)")
    if reason == "handshake_refused":
        words = (f"{host} refused the handshake: it accepts none of the sidecar's cipher "
                 f"suites ({CIPHER_POLICY_WORDS})")
        if not has_client_cert:
            words += ", or it requires a client certificate and none is configured"
        return words
    if reason == "client_certificate":
        if has_client_cert:
            return f"{host} did not accept the sidecar's client certificate"
        return f"{host} requires a client certificate and none is configured (client_cert)"
    return f"TLS handshake with {host} failed: {detail}"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__

"""Errors the sidecar itself answers with: FHIR OperationOutcome bodies.

Every error names the connection and the cause in plain words, carries
``Content-Type: application/fhir+json`` and an ``X-Sidecar-Error`` header naming its kind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum

FHIR_JSON = "application/fhir+json"
ERROR_HEADER = "X-Sidecar-Error"


class ErrorKind(StrEnum):
    BAD_REQUEST = "bad-request"
    NO_ROUTE = "no-route"
    TOKEN_UNAVAILABLE = "token-unavailable"
    UPSTREAM_TLS = "upstream-tls"
    UPSTREAM_UNREACHABLE = "upstream-unreachable"
    UPSTREAM_TIMEOUT = "upstream-timeout"
    HEADER_TOO_LARGE = "header-too-large"
    INTERNAL = "internal-error"
    # The caller's fault, not the connection's (docs/callers.md).
    MISDIRECTED = "misdirected"
    ORIGIN_NOT_ALLOWED = "origin-not-allowed"
    CALLER_UNAUTHENTICATED = "caller-unauthenticated"
    CALLER_FORBIDDEN = "caller-forbidden"
    # audit.required and the request's record cannot be kept (docs/audit.md).
    AUDIT_UNAVAILABLE = "audit-unavailable"

    @property
    def status(self) -> int:
        return _STATUS[self]

    @property
    def issue_code(self) -> str:
        """The FHIR ``IssueType`` that best describes this kind."""
        return _ISSUE_CODE[self]


_STATUS = {
    ErrorKind.BAD_REQUEST: 400,
    ErrorKind.NO_ROUTE: 403,
    ErrorKind.TOKEN_UNAVAILABLE: 503,
    ErrorKind.UPSTREAM_TLS: 502,
    ErrorKind.UPSTREAM_UNREACHABLE: 502,
    ErrorKind.UPSTREAM_TIMEOUT: 504,
    ErrorKind.HEADER_TOO_LARGE: 431,
    ErrorKind.INTERNAL: 500,
    ErrorKind.MISDIRECTED: 421,
    ErrorKind.ORIGIN_NOT_ALLOWED: 403,
    ErrorKind.CALLER_UNAUTHENTICATED: 401,
    ErrorKind.CALLER_FORBIDDEN: 403,
    ErrorKind.AUDIT_UNAVAILABLE: 503,
}
_ISSUE_CODE = {
    ErrorKind.BAD_REQUEST: "invalid",
    ErrorKind.NO_ROUTE: "forbidden",
    ErrorKind.TOKEN_UNAVAILABLE: "security",
    ErrorKind.UPSTREAM_TLS: "security",
    ErrorKind.UPSTREAM_UNREACHABLE: "transient",
    ErrorKind.UPSTREAM_TIMEOUT: "timeout",
    ErrorKind.HEADER_TOO_LARGE: "too-long",
    ErrorKind.INTERNAL: "exception",
    ErrorKind.MISDIRECTED: "invalid",
    ErrorKind.ORIGIN_NOT_ALLOWED: "forbidden",
    ErrorKind.CALLER_UNAUTHENTICATED: "login",
    ErrorKind.CALLER_FORBIDDEN: "forbidden",
    ErrorKind.AUDIT_UNAVAILABLE: "transient",
}
# Refusals that are the caller's fault: counted on their own
# (fhir_sidecar_caller_rejections_total), never against a connection's health.
CALLER_REJECTIONS: dict[ErrorKind, str] = {
    ErrorKind.MISDIRECTED: "misdirected",
    ErrorKind.ORIGIN_NOT_ALLOWED: "origin",
    ErrorKind.CALLER_UNAUTHENTICATED: "unauthenticated",
    ErrorKind.CALLER_FORBIDDEN: "forbidden",
}


@dataclass(frozen=True)
class SidecarError:
    kind: ErrorKind
    diagnostics: str
    # Only for answers whose status someone else chose (mitmproxy's own protocol errors).
    status_code: int | None = None

    @property
    def status(self) -> int:
        return self.status_code or self.kind.status

    def body(self) -> bytes:
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [{
                "severity": "error",
                "code": self.kind.issue_code,
                "diagnostics": self.diagnostics,
            }],
        }
        return json.dumps(outcome, ensure_ascii=False).encode("utf-8")

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": FHIR_JSON, ERROR_HEADER: self.kind.value}
        if self.kind is ErrorKind.CALLER_UNAUTHENTICATED:  # RFC 6750 §3
            headers["WWW-Authenticate"] = 'Bearer realm="fhir-sidecar"'
        return headers

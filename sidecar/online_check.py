"""``check --online``: a real TLS handshake with every upstream, summarised as a table."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

from cryptography import x509

from sidecar.snapshot import CompiledConnection, Snapshot

HANDSHAKE_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class HandshakeResult:
    connection: str
    url: str
    tls_mode: str
    ok: bool
    result: str
    subject: str = ""
    not_after: str = ""


def handshake(conn: CompiledConnection, timeout: float = HANDSHAKE_TIMEOUT_SECONDS
              ) -> HandshakeResult:
    upstream = conn.upstream
    base = dict(connection=conn.name, url=conn.settings.url,
                tls_mode=conn.tls.verify if conn.tls else "none (http)")
    if conn.tls is None:
        return HandshakeResult(**base, ok=True, result="plain http, no TLS")
    context = conn.tls.stdlib_context()
    try:
        with socket.create_connection((upstream.host, upstream.port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=conn.tls.sni_for(upstream.host)) as tls:
            der = tls.getpeercert(binary_form=True)
            version = tls.version() or "TLS"
    except ssl.SSLCertVerificationError as exc:
        return HandshakeResult(**base, ok=False, result=f"certificate rejected: "
                               f"{exc.verify_message or exc.reason}")
    except (OSError, ssl.SSLError) as exc:
        return HandshakeResult(**base, ok=False, result=f"failed: {exc.strerror or exc}")
    subject = not_after = ""
    if der:
        cert = x509.load_der_x509_certificate(der)
        subject = cert.subject.rfc4514_string()
        not_after = cert.not_valid_after_utc.strftime("%Y-%m-%d")
    return HandshakeResult(**base, ok=True, result=f"ok ({version})", subject=subject,
                           not_after=not_after)


def check_connections(snapshot: Snapshot) -> list[HandshakeResult]:
    return [handshake(conn) for conn in snapshot.connections.values()]


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def handshake_table(results: list[HandshakeResult]) -> str:
    return format_table(
        ["CONNECTION", "URL", "TLS", "RESULT", "SUBJECT", "EXPIRES"],
        [[r.connection, r.url, r.tls_mode, r.result, r.subject, r.not_after] for r in results])

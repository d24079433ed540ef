"""``check --online``: a real TLS handshake with every upstream, summarised as a table.

The connect and TLS steps are those of a connection test (``sidecar.check.probe``: the Test button,
``fhir-sidecar test``), made with the proxy leg's own TLS connection and told in its words
(``sidecar.tls.verdict``): a certificate that ``check`` accepts is one the proxy accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.check.probe.report import StepFailed
from sidecar.check.probe.transport import Target, connect
from sidecar.check.probe.transport import handshake as tls_handshake
from sidecar.runtime.snapshot import CompiledConnection, Snapshot

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
    reason: str = ""  # why it failed, as sidecar.tls.verdict.TlsFailureReason; "" when ok
    via: str = "-"  # the egress proxy the handshake tunnelled through


def handshake(conn: CompiledConnection, timeout: float = HANDSHAKE_TIMEOUT_SECONDS
              ) -> HandshakeResult:
    """Steps 1 and 2 of a connection test (:mod:`sidecar.check.probe.transport`, the code the
    Test button and ``fhir-sidecar test`` run), as a row of the table."""
    upstream = conn.upstream
    base = dict(connection=conn.name, url=conn.settings.url,
                tls_mode=conn.tls.verify if conn.tls else "none (http)",
                via=conn.via.name if conn.via else "-")
    if conn.tls is None:
        return HandshakeResult(**base, ok=True, result="plain http, no TLS")
    try:
        channel, _ = connect(Target(upstream.host, upstream.port, conn.via), timeout)
    except StepFailed as exc:
        return HandshakeResult(**base, ok=False, result=f"failed: {exc.detail}")
    try:
        _, version, cert = tls_handshake(channel, conn.tls, upstream.host, timeout)
    except StepFailed as exc:
        return HandshakeResult(**base, ok=False, result=f"failed: {exc.detail}",
                               reason=str(exc.facts.get("tls_failure", "")))
    finally:
        channel.close()
    return HandshakeResult(**base, ok=True, result=f"ok ({version})",
                           subject=cert.subject if cert else "",
                           not_after=cert.not_after[:10] if cert else "")


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
        ["CONNECTION", "URL", "VIA", "TLS", "RESULT", "SUBJECT", "EXPIRES"],
        [[r.connection, r.url, r.via, r.tls_mode, r.result, r.subject, r.not_after]
         for r in results])

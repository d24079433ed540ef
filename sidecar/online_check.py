"""``check --online``: a real TLS handshake with every upstream, summarised as a table.

The handshake uses the connection's policy as the stdlib legs do, and its failures are told in
the proxy leg's words (``sidecar.tls.verdict``): a certificate that ``check`` accepts is one the
proxy accepts.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from dataclasses import dataclass

from cryptography import x509

from sidecar.egress_connect import TunnelRefused, open_tunnel
from sidecar.snapshot import CompiledConnection, Snapshot
from sidecar.tls.verdict import describe, reason_of_stdlib_error, stdlib_error_detail

HANDSHAKE_TIMEOUT_SECONDS = 10.0
# How long a TLS 1.3 server may take to say whether it accepts the client (see _server_verdict).
POST_HANDSHAKE_WAIT_SECONDS = 3.0


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
    upstream = conn.upstream
    base = dict(connection=conn.name, url=conn.settings.url,
                tls_mode=conn.tls.verify if conn.tls else "none (http)",
                via=conn.via.name if conn.via else "-")
    if conn.tls is None:
        return HandshakeResult(**base, ok=True, result="plain http, no TLS")
    context = conn.tls.stdlib_context()
    try:
        with _connect(conn, timeout) as raw, \
                context.wrap_socket(raw, server_hostname=upstream.host) as tls:
            der = tls.getpeercert(binary_form=True)
            version = tls.version() or "TLS"
            if version == "TLSv1.3":
                _server_verdict(tls, min(timeout, POST_HANDSHAKE_WAIT_SECONDS))
    except ssl.SSLError as exc:
        reason = reason_of_stdlib_error(exc) or "handshake"
        words = describe(reason, conn.tls, upstream.host, stdlib_error_detail(exc))
        return HandshakeResult(**base, ok=False, result=f"failed: {words}", reason=reason)
    except TunnelRefused as exc:
        return HandshakeResult(**base, ok=False, result=f"failed: {exc}")
    except OSError as exc:
        return HandshakeResult(**base, ok=False, result=f"failed: {exc.strerror or exc}")
    subject = not_after = ""
    if der:
        cert = x509.load_der_x509_certificate(der)
        subject = cert.subject.rfc4514_string()
        not_after = cert.not_valid_after_utc.strftime("%Y-%m-%d")
    return HandshakeResult(**base, ok=True, result=f"ok ({version})", subject=subject,
                           not_after=not_after)


def _connect(conn: CompiledConnection, timeout: float) -> socket.socket:
    """A TCP connection to the upstream: direct, or tunnelled through its egress proxy."""
    upstream = conn.upstream
    if conn.via is not None:
        return open_tunnel(conn.via, upstream.host, upstream.port, timeout)
    return socket.create_connection((upstream.host, upstream.port), timeout=timeout)


def _server_verdict(tls: ssl.SSLSocket, wait: float) -> None:
    """Wait for the server's first flight after a TLS 1.3 handshake; raise if it is an alert.

    In TLS 1.3 the client's handshake is complete before the server has checked the client's
    certificate: a server that requires one and got none (or an untrusted one) says so in an
    alert right after, where a satisfied server sends its session tickets. The proxy leg sees
    that alert on its first read; ``check`` reads until a ticket has arrived, or ``wait`` has
    passed (servers that issue no tickets), without sending a request.
    """
    deadline = time.monotonic() + wait
    tls.setblocking(False)
    while True:
        try:
            tls.recv(1)
        except ssl.SSLWantReadError:
            pass
        else:
            return  # application data or a clean close: the server did not refuse us
        session = tls.session
        if session is not None and session.has_ticket:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        select.select([tls], [], [], remaining)


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

"""Turning what went wrong into the sidecar's error answers, in plain words
(docs/architecture.md#errors)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from OpenSSL import SSL

from sidecar.egress import EgressProxy
from sidecar.errors import ErrorKind, SidecarError
from sidecar.redaction import MAX_SHOWN_CHARS, Redactor
from sidecar.snapshot import CompiledConnection
from sidecar.tls.verdict import HandshakeOutcome, TlsFailureReason, describe

# The definition's name and token URL, then the endpoint's (already capped) words.
TOKEN_ERROR_CHARS = MAX_SHOWN_CHARS + 400


@dataclass(frozen=True)
class TlsFailure:
    reason: TlsFailureReason
    detail: str
    proxy: EgressProxy | None = None  # the handshake with this egress proxy itself failed

    @classmethod
    def from_conn(cls, ssl_conn: SSL.Connection, message: str,
                  proxy: EgressProxy | None = None) -> TlsFailure:
        outcome = ssl_conn.get_app_data()
        if isinstance(outcome, HandshakeOutcome) and outcome.failed:
            return cls(outcome.reason, message, proxy)
        return cls("handshake", message, proxy)

    @classmethod
    def after_handshake(cls, ssl_conn: SSL.Connection) -> TlsFailure | None:
        """The refusal a server sent after a completed handshake (a fatal alert), if any."""
        outcome = ssl_conn.get_app_data()
        if isinstance(outcome, HandshakeOutcome) and outcome.alert:
            return cls(outcome.reason, "")
        return None


def no_route(host: str, path: str) -> SidecarError:
    only_path = path.split("?", 1)[0]
    return SidecarError(
        ErrorKind.NO_ROUTE,
        f"no connection is configured for http://{host}{only_path}; the sidecar only forwards "
        "requests to the FHIR servers in its configuration",
    )


def bad_request(reason: str) -> SidecarError:
    return SidecarError(ErrorKind.BAD_REQUEST,
                        f"the request was refused and not forwarded: {reason}")


# What mitmproxy's own messages mean, by a word each contains; mitmproxy quotes the offending
# bytes (a request line with its query string, a header line with its value), so its text is
# never passed on.
_PROTOCOL_WORDS = (
    ("request line", "the request line is malformed (expected: METHOD /path HTTP/1.1)"),
    ("header line", "a header line is malformed (expected: Name: value)"),
    ("invalid headers", "a header line is malformed (expected: Name: value)"),
    ("header name", "a header name is not a valid HTTP token"),
    ("transfer-encoding", "the Transfer-Encoding header is invalid, repeated or combined "
                          "with Content-Length"),
    ("content-length", "the Content-Length header is invalid or repeated"),
    ("host header", "the request has no Host header, so its destination is unknown"),
    ("body_size_limit", "the request body is too large"),
    ("scheme", "the request's URL scheme is not http"),
)


def protocol_error(status: int, message: str) -> SidecarError:
    """An error mitmproxy answers by itself, before or without the sidecar's addon."""
    lowered = message.lower()
    if status >= 500:
        return SidecarError(ErrorKind.UPSTREAM_UNREACHABLE,
                            "the upstream connection failed before an answer arrived",
                            status_code=status)
    words = next((text for word, text in _PROTOCOL_WORDS if word in lowered),
                 "the request is not valid HTTP/1.1")
    return SidecarError(ErrorKind.BAD_REQUEST,
                        f"the request was refused and not forwarded: {words}",
                        status_code=status)


def connect_refused(host: str, known: bool) -> SidecarError:
    if known:
        text = (f"HTTPS tunnels (CONNECT) to {host} are not supported: configure the app with a "
                f"plain http:// base URL (http://{host}/...) and the sidecar adds TLS itself; "
                "or set proxy.intercept_https: true and make the app trust the sidecar's CA "
                "(proxy.ca_cert_export)")
    else:
        text = (f"no connection is configured for {host}; the sidecar only opens HTTPS "
                "tunnels (CONNECT) to the FHIR servers in its configuration")
    return SidecarError(ErrorKind.NO_ROUTE, text)


def token_unavailable(connection: str, exc: Exception, redactor: Redactor) -> SidecarError:
    # The reason quotes the token endpoint, which may have echoed the request's credentials.
    return SidecarError(ErrorKind.TOKEN_UNAVAILABLE,
                        f"connection '{connection}': no access token available: "
                        f"{redactor.scrub(str(exc), limit=TOKEN_ERROR_CHARS)}")


# mitmproxy's words when the egress proxy answers a CONNECT with anything but 2xx.
_CONNECT_REFUSED = re.compile(r"refused HTTP CONNECT request: (?P<answer>.*)$")


def failed_proxy(conn: CompiledConnection, message: str, *, timed_out: bool,
                 tls_failure: TlsFailure | None) -> EgressProxy | None:
    """The egress proxy to blame for an upstream failure, if it is the proxy's."""
    proxy = conn.via
    if proxy is None or timed_out:
        return None
    if tls_failure is not None:
        return tls_failure.proxy
    if _CONNECT_REFUSED.search(message):
        return proxy
    # Through a proxy, the only connection the sidecar opens itself is the one to the proxy.
    lowered = message.lower()
    if "TLS" in message or "certificate" in lowered:
        return None
    return proxy


def classify(conn: CompiledConnection, message: str, *, timed_out: bool,
             tls_failure: TlsFailure | None) -> SidecarError:
    upstream = conn.upstream
    where = f"connection '{conn.name}'"
    host = upstream.host_header
    if timed_out:
        through = f" (through {conn.via.describe()})" if conn.via is not None else ""
        return SidecarError(ErrorKind.UPSTREAM_TIMEOUT,
                            f"{where}: {host} did not answer within {conn.timeout_seconds:g} s"
                            f"{through}")
    proxy = failed_proxy(conn, message, timed_out=timed_out, tls_failure=tls_failure)
    if proxy is not None:
        return SidecarError(ErrorKind.UPSTREAM_UNREACHABLE,
                            f"{where}: {_proxy_words(conn, proxy, message, tls_failure)}")
    if tls_failure is not None or "TLS" in message or "certificate" in message.lower():
        return SidecarError(ErrorKind.UPSTREAM_TLS,
                            f"{where}: {_tls_words(conn, tls_failure, message)}")
    return SidecarError(ErrorKind.UPSTREAM_UNREACHABLE,
                        f"{where}: cannot reach {host}: {_connect_words(message)}")


def _proxy_words(conn: CompiledConnection, proxy: EgressProxy, message: str,
                 tls_failure: TlsFailure | None) -> str:
    target = f"{conn.upstream.host}:{conn.upstream.port}"
    if tls_failure is not None:
        return (f"cannot reach {proxy.describe()}: TLS to the proxy failed: "
                f"{describe(tls_failure.reason, proxy.tls, proxy.host, message)}")
    refused = _CONNECT_REFUSED.search(message)
    if refused is not None:
        # The proxy's status line, in printable characters only, and nothing of the request.
        answer = "".join(c for c in refused.group("answer") if c.isprintable())[:120]
        return f"{proxy.describe()} refused the tunnel to {target}: {answer}"
    return f"cannot reach {proxy.describe()}: {_connect_words(message)}"


def _tls_words(conn: CompiledConnection, failure: TlsFailure | None, message: str) -> str:
    return describe(failure.reason if failure else "handshake", conn.tls, conn.upstream.host,
                    message)


def _connect_words(message: str) -> str:
    lowered = message.lower()
    if "refused" in lowered or "connect call failed" in lowered:
        return "connection refused (is the server running and the port right?)"
    if "name or service not known" in lowered or "nodename nor servname" in lowered:
        return "the host name does not resolve"
    if "disconnected" in lowered or "closed" in lowered:
        return ("the server closed the connection without answering (servers that require a "
                "client certificate do this when none, or an untrusted one, is sent)")
    return message

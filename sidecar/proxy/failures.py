"""Turning what went wrong into the sidecar's error answers, in plain words
(docs/architecture.md#errors).

Failures are told apart by what they are (the ``OSError`` of a connect, the TLS verdict of a
handshake, the sidecar's own deadline), never by the text of a message; the one place that
reads mitmproxy's words is ``mitm_compat``, which turns them into the values defined here.
"""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass
from enum import Enum

from OpenSSL import SSL

from sidecar.egress.proxies import EgressProxy
from sidecar.report.redaction import MAX_SHOWN_CHARS, Redactor
from sidecar.request.errors import ErrorKind, SidecarError
from sidecar.runtime.snapshot import CompiledConnection
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


class RequestFault(Enum):
    """What is wrong with a request mitmproxy refused by itself."""

    REQUEST_LINE = "the request line is malformed (expected: METHOD /path HTTP/1.1)"
    HEADER_LINE = "a header line is malformed (expected: Name: value)"
    HEADER_NAME = "a header name is not a valid HTTP token"
    TRANSFER_ENCODING = ("the Transfer-Encoding header is invalid, repeated or combined "
                         "with Content-Length")
    CONTENT_LENGTH = "the Content-Length header is invalid or repeated"
    NO_HOST = "the request has no Host header, so its destination is unknown"
    BODY_TOO_LARGE = "the request body is too large"
    BODY_FRAMING = ("the chunked request body is malformed (an invalid chunk size, or a chunk "
                    "not followed by CRLF)")
    SCHEME = "the request's URL scheme is not http"
    OTHER = "the request is not valid HTTP/1.1"


def protocol_error(status: int, fault: RequestFault) -> SidecarError:
    """An error mitmproxy answers by itself, before or without the sidecar's addon.

    mitmproxy's own message quotes the offending bytes (a request line with its query
    string, a header line with its value), so only the fault read from it is passed on.
    """
    if status >= 500:
        return SidecarError(ErrorKind.UPSTREAM_UNREACHABLE,
                            "the upstream connection failed before an answer arrived",
                            status_code=status)
    return SidecarError(ErrorKind.BAD_REQUEST,
                        f"the request was refused and not forwarded: {fault.value}",
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


@dataclass(frozen=True)
class TunnelRefused:
    """The egress proxy answered the CONNECT with ``status_line`` instead of 2xx."""

    status_line: str


@dataclass(frozen=True)
class ClosedWithoutAnswer:
    """The upstream (or the tunnel to it) closed before a response arrived."""


@dataclass(frozen=True)
class OtherFailure:
    """A failure mitmproxy describes in words only."""

    text: str


FlowFailure = TunnelRefused | ClosedWithoutAnswer | OtherFailure


@dataclass(frozen=True)
class UpstreamFailure:
    """What is known about why a routed request got no answer, most telling first."""

    timed_out: bool = False  # the sidecar's own deadline (timeout_seconds) closed it
    tls: TlsFailure | None = None  # a handshake failed, or the server refused after one
    connect_error: OSError | None = None  # the TCP connection could not be opened
    reported: FlowFailure = OtherFailure("")  # how mitmproxy reported the failed flow


def failed_proxy(conn: CompiledConnection, failure: UpstreamFailure) -> EgressProxy | None:
    """The egress proxy to blame for an upstream failure, if it is the proxy's."""
    proxy = conn.via
    if proxy is None or failure.timed_out:
        return None
    if failure.tls is not None:
        return failure.tls.proxy
    # Through a proxy, the only connection the sidecar opens itself is the one to the proxy,
    # and a failure without a TLS verdict happened before TLS to the FHIR server began.
    return proxy


# Our own words plus at most one quoted outside text of MAX_SHOWN_CHARS.
DIAGNOSTICS_CHARS = 1000


def classify(conn: CompiledConnection, failure: UpstreamFailure,
             redactor: Redactor) -> SidecarError:
    """The error an app gets for ``failure``; its words pass ``redactor`` because they quote
    the upstream (or mitmproxy quoting the upstream's first bytes), which can echo the
    credentials the request carried."""
    problem = _classify(conn, failure)
    return dataclasses.replace(
        problem, diagnostics=redactor.scrub(problem.diagnostics, limit=DIAGNOSTICS_CHARS))


def _classify(conn: CompiledConnection, failure: UpstreamFailure) -> SidecarError:
    upstream = conn.upstream
    where = f"connection '{conn.name}'"
    host = upstream.host_header
    if failure.timed_out:
        through = f" (through {conn.via.describe()})" if conn.via is not None else ""
        return SidecarError(ErrorKind.UPSTREAM_TIMEOUT,
                            f"{where}: {host} did not answer within {conn.timeout_seconds:g} s"
                            f"{through}")
    proxy = failed_proxy(conn, failure)
    if proxy is not None:
        return SidecarError(ErrorKind.UPSTREAM_UNREACHABLE,
                            f"{where}: {_proxy_words(conn, proxy, failure)}")
    if failure.tls is not None:
        words = describe(failure.tls.reason, conn.tls, upstream.host, failure.tls.detail)
        return SidecarError(ErrorKind.UPSTREAM_TLS, f"{where}: {words}")
    return SidecarError(ErrorKind.UPSTREAM_UNREACHABLE,
                        f"{where}: cannot reach {host}: {_unreachable_words(failure)}")


def _proxy_words(conn: CompiledConnection, proxy: EgressProxy,
                 failure: UpstreamFailure) -> str:
    target = f"{conn.upstream.host}:{conn.upstream.port}"
    if failure.tls is not None:
        return (f"cannot reach {proxy.describe()}: TLS to the proxy failed: "
                f"{describe(failure.tls.reason, proxy.tls, proxy.host, failure.tls.detail)}")
    if isinstance(failure.reported, TunnelRefused):
        # The proxy's status line, in printable characters only, and nothing of the request.
        answer = "".join(c for c in failure.reported.status_line if c.isprintable())[:120]
        return f"{proxy.describe()} refused the tunnel to {target}: {answer}"
    return f"cannot reach {proxy.describe()}: {_unreachable_words(failure)}"


_UNRESOLVED = {getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA", "EAI_FAIL")
               if hasattr(socket, name)}
_CLOSED_WORDS = ("the server closed the connection without answering (servers that require a "
                 "client certificate do this when none, or an untrusted one, is sent)")
_REFUSED_WORDS = "connection refused (is the server running and the port right?)"


def _unreachable_words(failure: UpstreamFailure) -> str:
    error = failure.connect_error
    if isinstance(error, ConnectionRefusedError):
        return _REFUSED_WORDS
    if isinstance(error, socket.gaierror) and error.errno in _UNRESOLVED:
        return "the host name does not resolve"
    if error is not None and error.errno is None:
        # asyncio tried every address of the host and each failed differently (one refused,
        # one unreachable, say); it keeps only their combined text.
        return f"no address of the host accepted the connection: {error}"
    if error is not None:
        return str(error)
    if isinstance(failure.reported, ClosedWithoutAnswer):
        return _CLOSED_WORDS
    if isinstance(failure.reported, OtherFailure):
        return failure.reported.text
    return str(failure.reported)

"""Turning a failed exchange with an OAuth endpoint into plain words that are safe to show.

Token endpoints and SMART discovery documents fail in the same few ways; both report an
:class:`EndpointFailure` whose ``result`` is a metric label (design §7) and whose ``reason`` quotes
what the endpoint said. Reasons end up in logs, ``/readyz?verbose=1`` and 503 diagnostics, so they
are scrubbed of anything that looks like a credential before they leave this module.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Literal
from urllib.parse import quote, quote_plus, urlsplit

import httpx

from sidecar.egress import EgressProxy
from sidecar.tls.policy import UpstreamTlsPolicy
from sidecar.tls.verdict import describe, reason_of_stdlib_error, stdlib_error_detail

FailureResult = Literal["http_error", "invalid_response", "network"]

_SNIPPET_CHARS = 200
# A JWS compact serialisation (a token, an assertion): base64url header starting with '{"'.
_JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


class EndpointFailure(Exception):
    """One failed attempt at an endpoint; ``reason`` is already redacted."""

    def __init__(self, result: FailureResult, reason: str):
        super().__init__(reason)
        self.result: FailureResult = result
        self.reason = reason


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Remove the given secrets (also as they look when URL-encoded) and anything JWT-shaped.

    An endpoint that echoes the request (some gateways do) would otherwise put the client secret
    or the signed assertion into a log line.
    """
    for secret in secrets:
        if not secret:
            continue
        for form in {secret, quote_plus(secret, safe=""), quote(secret, safe="")}:
            text = text.replace(form, "[redacted]")
    return _JWT_LIKE.sub("[redacted JWT]", text)


def describe_http_error(response: httpx.Response) -> str:
    """The endpoint's own answer first (RFC 6749 §5.2 ``error``/``error_description``)."""
    status = f"HTTP {response.status_code}"
    answer = _oauth_error(response)
    if answer is not None:
        return f"{answer} ({status})"
    snippet = _snippet(response)
    return f"{status}: {snippet}" if snippet else status


def _oauth_error(response: httpx.Response) -> str | None:
    try:
        body = json.loads(response.content)
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return None
    description = body.get("error_description")
    if isinstance(description, str) and description:
        return f"{body['error']}: {_printable(description)}"
    return _printable(body["error"])


def _snippet(response: httpx.Response) -> str:
    try:
        text = response.content[: _SNIPPET_CHARS * 4].decode("utf-8", "replace")
    except Exception:  # an undecodable body is described by its status alone
        return ""
    text = re.sub(r"<[^>]*>", " ", text)  # HTML error pages: keep the words, not the markup
    text = _printable(text)
    return text if len(text) <= _SNIPPET_CHARS else text[:_SNIPPET_CHARS] + "..."


def _printable(text: str) -> str:
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def describe_transport_error(exc: Exception, timeout: float,
                             tls: UpstreamTlsPolicy, url: str,
                             via: EgressProxy | None = None) -> str:
    """Why no HTTP answer arrived: refused, timed out, TLS verification, ...

    Through an egress proxy, the only connection the sidecar opens itself is the one to the
    proxy: failures to connect are the proxy's, and a refused tunnel quotes its answer.
    """
    if via is None:
        return _transport_words(exc, timeout, tls, url)
    if isinstance(exc, httpx.ProxyError):
        return f"{via.describe()} refused the tunnel: {_printable(str(exc))[:_SNIPPET_CHARS]}"
    words = _transport_words(exc, timeout, tls, url)
    if isinstance(exc, httpx.ConnectError) and reason_of_stdlib_error(exc) is None:
        return f"cannot reach {via.describe()}: {words}"
    return f"{words} (through {via.describe()})"


def _transport_words(exc: Exception, timeout: float, tls: UpstreamTlsPolicy, url: str) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return f"could not connect within {timeout:g} s"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {timeout:g} s"
    tls_reason = reason_of_stdlib_error(exc)
    if tls_reason is not None:  # the same words as the proxy leg's upstream-tls answers
        return describe(tls_reason, tls, urlsplit(url).hostname or url, stdlib_error_detail(exc))
    for cause in _chain(exc):
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, OSError) and cause.strerror:
            return f"cannot connect: {cause.strerror}"
    text = str(exc) or type(exc).__name__
    return f"connection failed: {text}"


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__

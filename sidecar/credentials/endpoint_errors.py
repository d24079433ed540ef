"""Turning a failed exchange with an OAuth endpoint into plain words that are safe to show.

Token endpoints and SMART discovery documents fail in the same few ways; both report an
:class:`EndpointFailure` whose ``result`` is a metric label (docs/metrics.md) and whose
``reason`` quotes what the endpoint said. Reasons end up in logs, ``/readyz?verbose=1``, the admin
API and 503 diagnostics, so the endpoint's words pass the caller's
:class:`~sidecar.report.redaction.Redactor` before they leave this module, whole (a cut made before
redacting could keep part of a secret).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

import httpx

from sidecar.egress.proxies import EgressProxy
from sidecar.report.observe import TokenFailureResult
from sidecar.report.redaction import Redactor
from sidecar.tls.policy import UpstreamTlsPolicy
from sidecar.tls.verdict import describe, reason_of_stdlib_error, stdlib_error_detail

# How much of an error body is read at all; the redactor caps what is shown far below this, so
# a secret cut at this boundary is never within what is shown.
_BODY_READ_BYTES = 16 * 1024


class EndpointFailure(Exception):
    """One failed attempt at an endpoint; ``reason`` is already redacted."""

    def __init__(self, result: TokenFailureResult, reason: str):
        super().__init__(reason)
        self.result: TokenFailureResult = result
        self.reason = reason


def describe_http_error(response: httpx.Response, redactor: Redactor) -> str:
    """The endpoint's own answer first (RFC 6749 §5.2 ``error``/``error_description``)."""
    status = f"HTTP {response.status_code}"
    answer = _oauth_error(response)
    if answer is not None:
        return f"{redactor.scrub(answer)} ({status})"
    snippet = _snippet(response, redactor)
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
        return f"{body['error']}: {description}"
    return str(body["error"])


def _snippet(response: httpx.Response, redactor: Redactor) -> str:
    text = response.content[:_BODY_READ_BYTES].decode("utf-8", "replace")
    # Redact before the markup goes: a secret with "<" in it would otherwise be cut apart.
    text = redactor.scrub(text, limit=len(text))
    text = re.sub(r"<[^>]*>", " ", text)  # HTML error pages: keep the words, not the markup
    return redactor.scrub(text)


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
        return f"{via.describe()} refused the tunnel: {exc}"
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

"""The checks a request passes before anything of it goes upstream (mitmproxy side).

Header bytes are judged by ``sidecar.request.headers``; message framing (Content-Length and
Transfer-Encoding) by mitmproxy's own validator, run here too so that the sidecar's answer,
not mitmproxy's page, tells the app what is wrong. An asterisk-form target (``OPTIONS *``,
the HTTP/2 preface ``PRI *``) asks about the sidecar itself, never about a FHIR resource: a
reverse listener would otherwise join ``*`` to the connection's base path and send it on.
"""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.net.http.validate import validate_headers

from sidecar.proxy import failures, mitm_compat
from sidecar.request.errors import SidecarError
from sidecar.request.headers import header_problem

ASTERISK_FORM = ("the request target is '*' (asterisk-form, as in OPTIONS * or the HTTP/2 "
                 "preface PRI *): it asks about the server itself, not about a FHIR resource")
PREFACE = "the method PRI belongs to the HTTP/2 connection preface, not to an HTTP/1.1 request"
_HTTP1_VERSIONS = frozenset({b"HTTP/1.0", b"HTTP/1.1"})


def refusal(request: http.Request, *, http2: bool = False) -> SidecarError | None:
    """Why ``request`` must not be forwarded, or ``None``. ``http2``: the app's connection
    negotiated HTTP/2 (ALPN ``h2``, only where the sidecar terminates the app's TLS)."""
    if request.data.method == b"PRI":
        return failures.bad_request(PREFACE)
    if request.data.path == b"*":
        return failures.bad_request(ASTERISK_FORM)
    version = request.data.http_version
    if version not in _HTTP1_VERSIONS and not (http2 and version == b"HTTP/2.0"):
        shown = version.decode("ascii", "replace")[:16]
        return failures.bad_request(f"the request line names {shown!r}; the sidecar speaks "
                                    "HTTP/1.1 (and HTTP/1.0) on its listeners")
    problem = header_problem(request.headers.fields)
    if problem is not None:
        return failures.bad_request(problem)
    try:
        validate_headers(request)
    except ValueError as exc:
        return failures.protocol_error(400, mitm_compat.read_request_fault(str(exc)))
    return None

"""The checks a request passes before anything of it goes upstream (mitmproxy side).

Header bytes are judged by ``sidecar.request_headers``; message framing (Content-Length and
Transfer-Encoding) by mitmproxy's own validator, run here too so that the sidecar's answer,
not mitmproxy's page, tells the app what is wrong.
"""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.net.http.validate import validate_headers

from sidecar.errors import SidecarError
from sidecar.proxy import failures, mitm_compat
from sidecar.request_headers import header_problem


def refusal(request: http.Request) -> SidecarError | None:
    """Why ``request`` must not be forwarded, or ``None``."""
    problem = header_problem(request.headers.fields)
    if problem is not None:
        return failures.bad_request(problem)
    try:
        validate_headers(request)
    except ValueError as exc:
        return failures.protocol_error(400, mitm_compat.read_request_fault(str(exc)))
    return None

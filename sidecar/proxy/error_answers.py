"""The one way the sidecar's error answers are rendered and handed to the app.

Every refusal and failure the sidecar answers itself becomes a FHIR OperationOutcome
(``sidecar.errors``) with ``X-Request-ID``; :func:`answer` delivers it, whether the flow is
still being handled (its response) or mitmproxy has already failed it (the page mitmproxy
writes for the failure, see ``mitm_compat.answer_failed_flow``).
"""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.net.http.http1 import assemble_response

from sidecar.errors import SidecarError
from sidecar.proxy import mitm_compat
from sidecar.proxy.flow_state import REQUEST_ID


def error_response(problem: SidecarError, request_id: str, *, close: bool) -> http.Response:
    headers = {**problem.headers(), REQUEST_ID: request_id}
    if close:  # mitmproxy closes the client connection after its own error pages
        headers["Connection"] = "close"
    return http.Response.make(problem.status, problem.body(), headers)


def error_bytes(problem: SidecarError, request_id: str) -> bytes:
    """The answer as bytes on the wire, for refusals written before mitmproxy has a flow."""
    return bytes(assemble_response(error_response(problem, request_id, close=True)))


def answer(flow: http.HTTPFlow, problem: SidecarError, request_id: str, *,
           close: bool = False) -> http.Response:
    response = error_response(problem, request_id, close=close)
    deliver(flow, response)
    return response


def deliver(flow: http.HTTPFlow, response: http.Response) -> None:
    if flow.error is not None:
        # mitmproxy writes its own page for a failed flow, whatever response is set.
        mitm_compat.answer_failed_flow(flow, response)
    else:
        flow.response = response


def answered_status(flow: http.HTTPFlow) -> int | None:
    """The status the app gets for the flow: the sidecar's answer to a failure, or the
    response's."""
    failed = mitm_compat.failed_flow_answer(flow)
    if failed is not None:
        return failed.status_code
    return flow.response.status_code if flow.response is not None else None

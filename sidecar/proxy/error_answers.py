"""The one way the sidecar's error answers are rendered and handed to the app, and the addon
that answers what failed (``ErrorAnswers``).

Every refusal and failure the sidecar answers itself becomes a FHIR OperationOutcome
(``sidecar.request.errors``) with ``X-Request-ID``; :func:`answer` delivers it, whether the flow is
still being handled (its response) or mitmproxy has already failed it (the page mitmproxy
writes for the failure, see ``mitm_compat.answer_failed_flow``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from mitmproxy import connection, http
from mitmproxy.addonmanager import Loader
from mitmproxy.net.http.http1 import assemble_response
from mitmproxy.proxy import server_hooks

from sidecar.proxy import failures, mitm_compat
from sidecar.proxy.flow_state import REQUEST_ID, FlowState, new_request_id, state_of
from sidecar.proxy.upstream_tls import UpstreamTls
from sidecar.report.observe import ProxyObserver
from sidecar.request.errors import ErrorKind, SidecarError

if TYPE_CHECKING:
    from sidecar.proxy.request_log import RequestLog


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


def refuse(flow: http.HTTPFlow, state: FlowState, problem: SidecarError, *,
           close: bool = False) -> None:
    """Answer the request with ``problem`` instead of sending it upstream."""
    state.error = problem.kind.value
    answer(flow, with_trace(problem, state), state.request_id, close=close)


def with_trace(problem: SidecarError, state: FlowState) -> SidecarError:
    """The diagnostics name the trace, when the request is traced (docs/tracing.md)."""
    if state.trace_id is None:
        return problem
    return replace(problem, diagnostics=f"{problem.diagnostics} (trace {state.trace_id})")


def refuse_after_failure(flow: http.HTTPFlow, state: FlowState, doing: str) -> None:
    """Refuse the request after the sidecar's own code failed: never pass it on as it is."""
    logging.getLogger(__name__).exception("fhir-sidecar failed while %s", doing)
    flow.request.headers.pop("Authorization", None)
    flow.request.headers.pop("Proxy-Authorization", None)
    problem = SidecarError(ErrorKind.INTERNAL,
                           f"The sidecar failed while {doing}; nothing was sent upstream.")
    # A request refused midway may have framed its body in a way the sidecar cannot trust.
    refuse(flow, state, problem, close=True)


class ErrorAnswers:
    """The addon that answers what failed: upstream failures, and what mitmproxy refuses by
    itself before the sidecar sees a flow."""

    def __init__(self, upstream_tls: UpstreamTls, observer: ProxyObserver,
                 request_log: RequestLog) -> None:
        self._upstream_tls = upstream_tls
        self.observer = observer
        self._request_log = request_log
        # Why a client's latest upstream connection could not be opened.
        self._connect_errors: dict[str, OSError] = {}

    def load(self, loader: Loader) -> None:
        mitm_compat.install_error_pages(self._protocol_error_page)
        mitm_compat.answer_malformed_request_bodies()

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        error = mitm_compat.connect_exception()
        if error is not None:
            self._connect_errors[data.client.id] = error

    def error(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if state is None or flow.error is None:
            return
        # An app that went away (mitmproxy treats even a half-close so) is no upstream failure.
        app_left = not flow.client_conn.connected
        if mitm_compat.request_body_malformed(flow) and flow.response is None:
            # The app's chunked body could not be framed: its fault, answered before the
            # connection closes (docs/errors.md); an upstream it was streaming to is dropped.
            refuse(flow, state, failures.protocol_error(400, failures.RequestFault.BODY_FRAMING),
                   close=True)
        elif state.error == ErrorKind.BAD_REQUEST and flow.response is not None:
            # mitmproxy refused the request as well, and writes its own page instead of ours.
            deliver(flow, flow.response)
        elif state.connection is not None and flow.response is None and not app_left:
            failure = failures.UpstreamFailure(
                timed_out=state.timed_out,
                tls=self._upstream_tls.pop_failure(flow.client_conn, flow.server_conn),
                connect_error=self._connect_errors.pop(flow.client_conn.id, None),
                reported=mitm_compat.read_flow_failure(flow.error.msg))
            problem = failures.classify(state.connection, failure, state.snapshot.redactor)
            proxy = failures.failed_proxy(state.connection, failure)
            if proxy is not None:
                self.observer.egress_proxy_failure(proxy.name)
            elif problem.kind is ErrorKind.UPSTREAM_TLS and failure.tls is not None:
                self.observer.upstream_tls_failure(state.connection.name, failure.tls.reason)
            refuse(flow, state, problem, close=True)
        else:
            # An error already decided (a stalled upstream body) outranks how it surfaced.
            state.error = state.error or (
                "client-disconnected" if flow.response is None else "stream-aborted")

    def client_disconnected(self, client: connection.Client) -> None:
        self._connect_errors.pop(client.id, None)

    def _protocol_error_page(self, status: int, message: str) -> http.Response:
        """The answer to what mitmproxy refuses by itself, before the addon sees a flow."""
        problem = failures.protocol_error(status, mitm_compat.read_request_fault(message))
        request_id = new_request_id()
        if problem.kind is ErrorKind.BAD_REQUEST:
            self._request_log.refused_before_flow(request_id, problem)
        return error_response(problem, request_id, close=True)

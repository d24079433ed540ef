"""The addon that finishes every request exactly once: one JSON log line and the metrics.

It keeps the one count of requests in flight, per app connection: a request counts from the
moment it is routed (:meth:`RequestLog.started`, called by the routing addon) until it is
finished, whatever way its connection ends. Placed after the addons that change a response
(credentials, links, error answers), so it logs what the app got.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mitmproxy import connection, http

from sidecar.audit.interactions import redacted_path
from sidecar.proxy.error_answers import answered_status
from sidecar.proxy.flow_state import REQUEST_ID, FlowState, byte_counter, state_of
from sidecar.report.logs import log_request
from sidecar.report.observe import NO_CONNECTION, ProxyObserver
from sidecar.request.errors import SidecarError


class RequestLog:
    def __init__(self, observer: ProxyObserver) -> None:
        self.observer = observer
        # Called with every request as it is finished (the audit trail's records).
        self.on_finished: list[Callable[[http.HTTPFlow, FlowState, int | None], None]] = []
        # Requests started and not yet finished: app connection id -> flow id -> flow.
        self._in_flight: dict[str, dict[str, http.HTTPFlow]] = {}

    # -- the one count ------------------------------------------------------------------------

    def started(self, flow: http.HTTPFlow, state: FlowState) -> None:
        if flow.client_conn.state is connection.ConnectionState.CLOSED:
            # mitmproxy answered this request itself (a malformed Content-Length, say) and
            # closed the connection; that answer was logged and counted as it was written.
            return
        self._in_flight.setdefault(flow.client_conn.id, {})[flow.id] = flow
        self.observer.request_started(_name(state))

    def in_flight_on(self, client: connection.Client) -> bool:
        """Whether a request of the app connection ``client`` is started and not finished."""
        return client.id in self._in_flight

    def _finish(self, flow: http.HTTPFlow, state: FlowState) -> None:
        open_flows = self._in_flight.get(flow.client_conn.id)
        if open_flows is None or open_flows.pop(flow.id, None) is None:
            return  # never started, or finished already
        if not open_flows:
            del self._in_flight[flow.client_conn.id]
        response = flow.response
        upstream_status = None
        if response is not None and state.error is None:
            upstream_status = response.status_code
        status = answered_status(flow)
        for callback in self.on_finished:
            callback(flow, state, status)
        duration = time.monotonic() - state.started
        self.observer.request_finished(_name(state), flow.request.method, status, duration,
                                       state.error, state.upstream_status)
        log_request(
            request_id=state.request_id,
            connection=_name(state),
            method=flow.request.method,
            path=_logged_path(state, flow.request.path.split("?", 1)[0]),
            status=status,
            upstream_status=upstream_status,
            duration_ms=round(duration * 1000, 2),
            bytes_in=state.bytes_in, bytes_out=state.bytes_out, error=state.error,
            caller=state.caller, trace_id=state.trace_id,
        )

    def refused_before_flow(self, request_id: str, problem: SidecarError) -> None:
        """Count and log a request mitmproxy refused before there was a flow for it."""
        self.observer.request_started(NO_CONNECTION)
        self.observer.request_finished(NO_CONNECTION, "", problem.status, 0.0,
                                       problem.kind.value)
        log_request(request_id=request_id, connection=NO_CONNECTION, status=problem.status,
                    error=problem.kind.value)

    # -- hooks --------------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if (state is not None and state.connection is not None and flow.response is None
                and flow.request.stream is True):
            flow.request.stream = byte_counter(state, "bytes_in")

    def request(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if (state is not None and state.connection is not None and flow.response is None
                and flow.request.raw_content is not None):
            state.bytes_in = len(flow.request.raw_content)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if state is not None and flow.response is not None:
            if state.error is None:
                # The FHIR server's response. mitmproxy passes the sidecar's own answers
                # through this hook too (it emulates it for a response an addon set); every
                # one of them was made by error_answers.refuse, which names its error first.
                state.upstream_status = flow.response.status_code
            flow.response.headers[REQUEST_ID] = state.request_id

    def response(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if state is None or flow.response is None:
            return
        if flow.response.raw_content is not None:
            state.bytes_out = len(flow.response.raw_content)
        self._finish(flow, state)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        # A refused CONNECT never reaches ``response``.
        state = state_of(flow)
        if state is not None:
            self._finish(flow, state)

    def error(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if state is not None and flow.error is not None:
            self._finish(flow, state)

    def client_disconnected(self, client: connection.Client) -> None:
        # The one place every connection passes at its end, also after mitmproxy failed to
        # finish a request (which then never reaches ``response`` or ``error``).
        for flow in list(self._in_flight.get(client.id, {}).values()):
            state = state_of(flow)
            if state is not None:
                state.error = state.error or "client-disconnected"
                self._finish(flow, state)
        self._in_flight.pop(client.id, None)


def _logged_path(state: FlowState, path: str) -> str:
    if state.snapshot.config.logging.request_paths == "redacted":
        return redacted_path(path)  # the audit trail keeps the ids; the ordinary log does not
    return path


def _name(state: FlowState) -> str:
    return state.connection.name if state.connection else NO_CONNECTION

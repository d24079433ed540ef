"""The addon that traces a request (docs/tracing.md): its server span, joined to the app's
trace by ``traceparent``, and the client span of the upstream call, whose id the upstream
gets as its parent. Token fetches and the 401 retry add their spans where they happen
(``credential_injection.py``, ``bearer_retry.py``); the request log's finish ends the rest.

Without tracing, or for a request that is not sampled, nothing here runs beyond one check,
and the app's ``traceparent`` and ``tracestate`` pass through unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mitmproxy import http

from sidecar.proxy.flow_state import TRACE_KEY, FlowState, end_span, state_of
from sidecar.proxy.request_log import RequestLog
from sidecar.tracing.context import clean_tracestate, parse_traceparent
from sidecar.tracing.setup import Tracing
from sidecar.tracing.spans import CLIENT, SERVER


class TraceStart:
    """Before routing: the request's server span starts, so that even a refusal names its
    trace (``FlowState`` takes it from ``flow.metadata``, see ``flow_state.trace_of``)."""

    def __init__(self, tracing: Callable[[], Tracing | None]) -> None:
        self._tracing = tracing

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        tracing = self._tracing()
        tracer = tracing.tracer if tracing is not None else None
        if tracer is None:
            return
        headers = flow.request.headers
        parent = parse_traceparent(headers.get("traceparent"))
        if not tracer.sampled(parent):
            return
        server = tracer.start(flow.request.method, SERVER, parent=parent,
                              trace_state=clean_tracestate(headers.get("tracestate")))
        server.attributes["http.request.method"] = flow.request.method
        flow.metadata[TRACE_KEY] = (tracer, server)


class RequestSpans:
    """After routing: the server span gets the connection's name, and the upstream call its
    client span, whose id the upstream receives as its parent."""

    def __init__(self, request_log: RequestLog) -> None:
        request_log.on_finished.append(self._finished)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if state is None or state.span is None or state.tracer is None:
            return
        server, tracer = state.span, state.tracer
        conn = state.connection
        name = conn.name if conn is not None else "-"
        server.name = f"{flow.request.method} {name}"
        server.attributes["fhir.connection"] = name
        if flow.response is not None or conn is None:
            return  # refused: nothing goes upstream
        headers = flow.request.headers
        trace_state = server.trace_state
        upstream = tracer.start(f"upstream {name}", CLIENT, parent_span=server)
        upstream.attributes.update({"server.address": conn.upstream.host,
                                    "server.port": conn.upstream.port})
        state.upstream_span = upstream
        headers["traceparent"] = upstream.traceparent()
        if trace_state is not None:
            headers["tracestate"] = trace_state

    def request(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if state is not None and state.upstream_span is not None and flow.response is None:
            state.upstream_span.start_ns = time.time_ns()  # the call starts now, not earlier

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if state is None or state.upstream_span is None or flow.response is None:
            return
        span = state.upstream_span
        span.attributes["http.response.status_code"] = flow.response.status_code
        tls_version = getattr(flow.server_conn, "tls_version", None)
        if tls_version:
            span.attributes["tls.protocol.version"] = str(tls_version)
        end_span(state, span)

    def _finished(self, flow: http.HTTPFlow, state: FlowState, status: int | None) -> None:
        if state.span is None:
            return
        if state.upstream_span is not None:
            end_span(state, state.upstream_span, state.error)
        span = state.span
        from sidecar.audit.interactions import classify

        conn = state.connection
        path = flow.request.path.split("?", 1)[0]
        if conn is not None and path.startswith(conn.upstream.base_path):
            path = path[len(conn.upstream.base_path):]
        found = classify(flow.request.method, path)
        span.attributes.update({"http.response.status_code": status,
                                "fhir.interaction": found.interaction,
                                "fhir.resource_type": found.resource_type,
                                "url.path": _span_path(state, flow.request.path)})
        end_span(state, span, state.error)


def _span_path(state: FlowState, path: str) -> str:
    from sidecar.audit.interactions import redacted_path

    path = path.split("?", 1)[0]  # never the query string
    if state.snapshot.config.logging.request_paths == "redacted":
        return redacted_path(path)
    return path

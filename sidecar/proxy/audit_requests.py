"""The addon that writes one audit record per request (docs/audit.md).

The record is made where the request log finishes the request (``RequestLog.on_finished``),
so every way a request can end has exactly one. With ``audit.required``, a request whose
record could not be kept is refused before it goes upstream (``503 audit-unavailable``), and
a response is sent only once its record is on disk.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from mitmproxy import http

from sidecar.audit.interactions import classify
from sidecar.audit.records import request_record
from sidecar.audit.trail import AuditTrail
from sidecar.proxy import error_answers
from sidecar.proxy.flow_state import FlowState, state_of
from sidecar.proxy.request_log import RequestLog
from sidecar.request.errors import ErrorKind, SidecarError

_BODY_PEEK = 4096  # enough to tell a batch Bundle from a transaction


class AuditRequests:
    def __init__(self, trail: Callable[[], AuditTrail | None], request_log: RequestLog) -> None:
        self._trail = trail
        request_log.on_finished.append(self._finished)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        trail = self._trail()
        state = state_of(flow)
        if (trail is None or not trail.required or state is None or state.connection is None
                or flow.response is not None):
            return
        if not trail.accepting():
            error_answers.refuse(flow, state, SidecarError(ErrorKind.AUDIT_UNAVAILABLE, (
                f"connection '{state.connection.name}': the audit trail is required "
                "(audit.required) and cannot keep this request's record now (its queue is "
                "full or its disk failed); nothing was sent upstream. See the sidecar's log.")))

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        trail = self._trail()
        if trail is None or not trail.required:
            return None
        # The record was written as the request log finished the request (earlier in this
        # hook's chain); the app gets its answer once the record is on disk.
        return trail.durable()

    def _finished(self, flow: http.HTTPFlow, state: FlowState, status: int | None) -> None:
        trail = self._trail()
        if trail is None or not trail.enabled:
            return
        conn = state.connection
        request = flow.request
        path = request.path.split("?", 1)[0]
        if conn is not None and path.startswith(conn.upstream.base_path):
            path = path[len(conn.upstream.base_path):]  # relative to the FHIR base
        body = request.raw_content[:_BODY_PEEK] if request.raw_content else b""
        interaction = classify(request.method, path, request.path.partition("?")[2], body)
        client = flow.client_conn.peername[0] if flow.client_conn.peername else None
        credential = None
        if conn is not None:
            credential = conn.settings.auth.basic or conn.settings.auth.oauth
        trail.record(request_record(
            request_id=state.request_id, caller=state.caller, client=client,
            connection=conn.name if conn is not None else None, credential=credential,
            interaction=interaction, status=status, error=state.error,
            bytes_in=state.bytes_in, bytes_out=state.bytes_out, trace_id=state.trace_id))

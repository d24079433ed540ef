"""The addon that puts the routed connection's credentials on each request.

HTTP Basic, or an OAuth2 bearer token from the definition's token source: a cached token is set
at once, otherwise the request waits for a fetch. An upstream ``401`` to a bearer token is
retried once with a new token (``bearer_retry.py``), so such a response is kept whole.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING

from mitmproxy import http

from sidecar.proxy import error_answers, failures
from sidecar.proxy.bearer_retry import may_retry, retried_response
from sidecar.proxy.flow_state import FlowState, child_span, end_span, state_of
from sidecar.report.observe import ProxyObserver
from sidecar.tracing.spans import CLIENT

if TYPE_CHECKING:
    from sidecar.credentials.oauth import TokenSource


class Credentials:
    def __init__(self, observer: ProxyObserver) -> None:
        self.observer = observer

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        state = state_of(flow)
        if state is None or state.connection is None or flow.response is not None:
            return None
        conn = state.connection
        if conn.basic is not None:
            flow.request.headers["Authorization"] = conn.basic.header()
        elif conn.oauth is not None:
            source = state.snapshot.token_sources[conn.oauth]
            token = source.cached_token()
            if state.span is not None:
                state.span.attributes["fhir_sidecar.token.cached"] = token is not None
            if token is None:
                return self._add_fetched_bearer(flow, state, source)
            _set_bearer(flow, state, token)
        return None

    async def _add_fetched_bearer(self, flow: http.HTTPFlow, state: FlowState,
                                  source: TokenSource) -> None:
        from sidecar.credentials.oauth import TokenUnavailable

        assert state.connection is not None
        span = child_span(state, f"token {state.connection.oauth}", CLIENT)
        if span is not None:
            span.attributes["fhir_sidecar.oauth.definition"] = state.connection.oauth
        try:
            # Waits for the next fetch no longer than the request itself may take.
            token = await source.token(wait_limit=state.connection.timeout_seconds)
        except TokenUnavailable as exc:
            end_span(state, span, "token-unavailable")
            error_answers.refuse(flow, state, failures.token_unavailable(
                state.connection.name, exc, state.snapshot.redactor))
            return
        except Exception:
            end_span(state, span, "internal-error")
            error_answers.refuse_after_failure(flow, state, "fetching an access token")
            return
        if span is not None:
            span.attributes["fhir_sidecar.token.result"] = "success"
        end_span(state, span)
        _set_bearer(flow, state, token)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if state is not None and may_retry(flow, state):
            assert flow.response is not None
            flow.response.stream = False  # keep the 401 so it can be replaced by the retry

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        state = state_of(flow)
        if state is None or not may_retry(flow, state):
            return None
        return self._retry_with_new_token(flow, state)

    async def _retry_with_new_token(self, flow: http.HTTPFlow, state: FlowState) -> None:
        assert state.connection is not None
        response = await retried_response(flow, state)
        if response is not None:
            self.observer.auth_retry(state.connection.name)
            flow.response = response


def _set_bearer(flow: http.HTTPFlow, state: FlowState, token: str) -> None:
    flow.request.headers["Authorization"] = f"Bearer {token}"
    state.bearer = token

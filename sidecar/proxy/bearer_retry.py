"""The one retry after an upstream ``401`` to a bearer token
(docs/architecture.md#credentials)."""

from __future__ import annotations

import time

from mitmproxy import http

from sidecar.proxy.flow_state import REQUEST_ID, FlowState, child_span, end_span
from sidecar.tracing.spans import INTERNAL


def may_retry(flow: http.HTTPFlow, state: FlowState) -> bool:
    """An upstream 401 to a bearer token, for a request whose body can be sent again."""
    return (state.bearer is not None and flow.response is not None
            and flow.response.status_code == 401 and not flow.request.stream
            and flow.request.raw_content is not None)


async def retried_response(flow: http.HTTPFlow, state: FlowState) -> http.Response | None:
    """Drop the rejected token, get a new one and send the request once more.

    ``None`` when no new token can be had or the retry fails: the upstream's 401 then stands.
    So it does, without dropping the token, once the definition's budget of token requests is
    spent: a server that refuses every token cannot drive the sidecar into a storm of token
    requests.
    """
    # Imported here: only OAuth connections get here, and a Basic-only sidecar never loads
    # httpx (megabytes of RSS at ready, with authlib).
    import httpx

    from sidecar.credentials.oauth import TokenUnavailable
    from sidecar.proxy.upstream_replay import replay

    conn = state.connection
    assert conn is not None and conn.oauth is not None and state.bearer is not None
    source = state.snapshot.token_sources[conn.oauth]
    if source.budget_spent():
        return None
    source.invalidate(state.bearer)  # only if it is still the current token
    state.bearer = None  # once only
    span = child_span(state, "retry after 401", INTERNAL)
    try:
        token = await source.token(wait_limit=conn.timeout_seconds)
    except TokenUnavailable:
        end_span(state, span, "token-unavailable")
        return None
    headers = [(k, v) for k, v in flow.request.headers.items(multi=True)
               if k.lower() != "authorization"]
    headers.append(("Authorization", f"Bearer {token}"))
    try:
        again = await replay(conn, flow.request.method, flow.request.path, headers,
                             flow.request.raw_content or b"")
    except httpx.HTTPError:
        end_span(state, span, "upstream-unreachable")
        return None
    if span is not None:
        span.attributes["http.response.status_code"] = again.status
    end_span(state, span)
    state.upstream_status = again.status  # the FHIR server's answer to the retry
    now = time.time()
    # The body exactly as received (raw: any content-encoding is not applied twice).
    response = http.Response(
        http_version=b"HTTP/1.1", status_code=again.status,
        reason=again.reason.encode("latin-1"),
        headers=http.Headers([(k.encode("latin-1"), v.encode("latin-1"))
                              for k, v in again.headers]),
        content=again.raw_body, trailers=None, timestamp_start=now, timestamp_end=now)
    response.headers[REQUEST_ID] = state.request_id
    return response

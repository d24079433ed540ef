"""The addon that points the upstream's FHIR links back at the sidecar (``response_links.py``).

The routing addon decides whether a request's links are rewritten and to which base URL
(``FlowState.links``); this one rewrites ``Link``/``Location`` headers when the response head
arrives, sets up streaming of a large body (rewriting on the way), and rewrites a buffered
body when it is complete.
"""

from __future__ import annotations

from mitmproxy import http

from sidecar.proxy.bearer_retry import may_retry
from sidecar.proxy.flow_state import state_of
from sidecar.proxy.response_links import rewrite_link_headers, rewrite_links, stream_body


class LinkRewriting:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if state is None or flow.response is None:
            return
        rewrite_link_headers(flow.response, state)
        if not may_retry(flow, state):  # a 401 to be retried is kept whole, never streamed
            stream_body(flow, state)  # counts bytes out; rewrites links of large bodies

    def response(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if state is not None and flow.response is not None:
            rewrite_links(flow.response, state)

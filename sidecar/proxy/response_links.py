"""Applying :mod:`sidecar.links` to mitmproxy responses: headers always, buffered bodies only
(bodies over ``stream_large_bodies`` stream through untouched)."""

from __future__ import annotations

from mitmproxy import http

from sidecar.links import REWRITTEN_HEADERS
from sidecar.proxy.flow_state import FlowState


def rewrite_link_headers(response: http.Response, state: FlowState) -> None:
    links = state.links
    if links is None or state.links_done_for is response:
        return
    state.links_done_for = response
    for name in REWRITTEN_HEADERS:
        values = response.headers.get_all(name)
        if values:
            response.headers.set_all(name, [links.header(v) for v in values])


def rewrite_links(response: http.Response, state: FlowState) -> None:
    """Headers (again, if the response was replaced) and a buffered body."""
    links = state.links
    if links is None:
        return
    rewrite_link_headers(response, state)
    if response.stream or not response.raw_content:
        return
    try:
        body = response.get_content(strict=True)
    except ValueError:
        return  # a content encoding we cannot undo: leave the body as it is
    if body is None:
        return
    rewritten = links.body(body, response.headers.get("content-type"))
    if rewritten is not body:
        response.content = rewritten

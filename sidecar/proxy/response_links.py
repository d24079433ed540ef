"""Applying :mod:`sidecar.fhir.links` to mitmproxy responses: headers always; bodies buffered
(up to ``stream_large_bodies``) or, above it, while they stream (:mod:`sidecar.fhir.links_stream`).

A streamed body whose links are rewritten changes length, and the response head leaves before
the body is read, so its ``Content-Length`` cannot be corrected: it is removed and the body is
sent chunked (HTTP/1.1) or delimited by closing the connection (HTTP/1.0); HTTP/2 frames it
anyway.
"""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import ctx, http
from mitmproxy.net import encoding
from mitmproxy.utils import human

from sidecar.fhir.links import REWRITTEN_HEADERS, BodyKind, LinkRewriter, body_kind
from sidecar.fhir.links_stream import STREAMABLE_CODINGS, StreamingBody
from sidecar.proxy.flow_state import FlowState, byte_counter

StreamCallable = Callable[[bytes], bytes]
_REWRITTEN_RAW = frozenset(name.lower().encode() for name in REWRITTEN_HEADERS)


def rewrite_link_headers(response: http.Response, state: FlowState) -> None:
    links = state.links
    if links is None or state.links_done_for is response:
        return
    state.links_done_for = response
    # One pass over the raw fields: most responses have neither header, and asking the
    # header multidict for each name costs more than looking.
    if not any(name.lower() in _REWRITTEN_RAW for name, _ in response.headers.fields):
        return
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
    assert body is not None  # there is raw content (above)
    rewritten = links.body(body, response.headers.get("content-type"))
    if rewritten is not body:
        response.content = rewritten


def stream_body(flow: http.HTTPFlow, state: FlowState) -> None:
    """At ``responseheaders``: how the body will stream, if it does.

    A sized body over the threshold streams (mitmproxy decided already): its links are
    rewritten on the way. A chunked one has no size yet: when its links may need rewriting it
    is collected here up to the threshold (then rewritten whole, like a buffered body) and
    streamed with rewriting beyond it; mitmproxy would otherwise switch it to plain streaming.
    """
    response = flow.response
    assert response is not None
    counted = response.stream is True
    if not counted and "content-length" in response.headers:
        return  # sized and small enough for mitmproxy to buffer: the usual response
    links = state.links
    kind = _streamable_kind(flow, response) if links is not None else None
    if links is not None and kind is not None:
        if response.stream is True:
            _unsized(flow.request, response)
            rewriter = StreamingBody(links, kind, response.headers.get("content-encoding", ""))
            response.stream = byte_counter(state, "bytes_out", _callable(rewriter))
            return
        threshold = _threshold()
        if threshold is not None:  # chunked (or close-delimited): no size yet
            response.stream = byte_counter(
                state, "bytes_out", _CollectThenStream(links, kind, response, threshold))
            return
    if counted:
        response.stream = byte_counter(state, "bytes_out")


def _streamable_kind(flow: http.HTTPFlow, response: http.Response) -> BodyKind | None:
    if flow.request.method == "HEAD" or response.status_code in (204, 304):
        return None
    coding = response.headers.get("content-encoding", "").strip().lower()
    if coding not in STREAMABLE_CODINGS:
        return None  # a coding we cannot undo (or a stack of them): passes unchanged
    content_type = response.headers.get("content-type")
    return body_kind(content_type) if content_type else None


def _unsized(request: http.Request, response: http.Response) -> None:
    response.headers.pop("content-length", None)
    if request.http_version == "HTTP/1.1":
        response.headers["transfer-encoding"] = "chunked"


def _threshold() -> int | None:
    return human.parse_size(ctx.options.stream_large_bodies)


def _callable(body: StreamingBody) -> StreamCallable:
    def rewrite(chunk: bytes) -> bytes:
        # mitmproxy calls with b"" once the body is complete.
        return body.feed(chunk) if chunk else body.finish()
    return rewrite


class _CollectThenStream:
    """A chunked body: buffered while small, streamed with rewriting once it is not."""

    def __init__(self, links: LinkRewriter, kind: BodyKind, response: http.Response,
                 threshold: int) -> None:
        self._links = links
        self._kind = kind
        self._coding = response.headers.get("content-encoding", "")
        self._content_type = response.headers.get("content-type")
        self._threshold = threshold
        self._collected: bytearray | None = bytearray()
        self._streaming: StreamingBody | None = None

    def __call__(self, chunk: bytes) -> bytes:
        if self._streaming is not None:
            return self._streaming.feed(chunk) if chunk else self._streaming.finish()
        assert self._collected is not None
        if chunk:
            self._collected += chunk
            if len(self._collected) <= self._threshold:
                return b""
            self._streaming = StreamingBody(self._links, self._kind, self._coding)
            collected, self._collected = bytes(self._collected), None
            return self._streaming.feed(collected)
        return self._whole(bytes(self._collected))

    def _whole(self, raw: bytes) -> bytes:
        try:
            body = encoding.decode(raw, self._coding) if self._coding else raw
        except ValueError:
            return raw
        assert isinstance(body, bytes)  # what each of STREAMABLE_CODINGS decodes to
        rewritten = self._links.body(body, self._content_type)
        if rewritten is body:
            return raw
        return encoding.encode(rewritten, self._coding) if self._coding else rewritten

"""What the sidecar remembers about one request while it is in flight (``flow.metadata``)."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mitmproxy import http

from sidecar.fhir.links import LinkRewriter
from sidecar.runtime.snapshot import CompiledConnection, Snapshot
from sidecar.tracing.spans import Span, Tracer

FLOW_KEY = "fhir_sidecar"
TRACE_KEY = "fhir_sidecar_trace"  # (tracer, server span) of a traced request, until routed
REQUEST_ID = "X-Request-ID"


@dataclass
class FlowState:
    snapshot: Snapshot
    connection: CompiledConnection | None
    request_id: str
    started: float = field(default_factory=time.monotonic)
    timer: asyncio.TimerHandle | None = None
    timed_out: bool = False
    bytes_in: int = 0
    bytes_out: int = 0
    error: str | None = None
    # The status the FHIR server itself answered (set where its response headers arrive, and
    # by the retry after a 401); None while it has not answered. The sidecar's own answers
    # never set it.
    upstream_status: int | None = None
    bearer: str | None = field(default=None, repr=False)
    caller: str | None = None  # the workload token's <definition>:<subject>, when checked
    # Tracing (docs/tracing.md): set only for a request that is traced.
    tracer: Tracer | None = field(default=None, repr=False)
    span: Span | None = field(default=None, repr=False)  # the request's server span
    upstream_span: Span | None = field(default=None, repr=False)
    trace_id: str | None = None
    links: LinkRewriter | None = None  # when the upstream's URLs must point back at us
    links_done_for: http.Response | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.trace_id is None and self.span is not None:
            self.trace_id = self.span.trace_id

    def __deepcopy__(self, memo: dict[int, object]) -> dict[str, str | None]:
        # mitmproxy deep-copies flow.metadata whenever it saves or copies a flow (-w, replay,
        # the web UI). The state holds the snapshot (secrets, TLS contexts, token sources) and
        # the bearer token: what leaves the flow is its name and request ID, nothing else.
        return {"connection": self.connection.name if self.connection is not None else None,
                "request_id": self.request_id}


REQUEST_ID_MAX_CHARS = 128
# Visible ASCII only: the ID is copied into upstream requests and every log line.
_VISIBLE_ASCII = re.compile(rf"[\x21-\x7e]{{1,{REQUEST_ID_MAX_CHARS}}}")


def new_request_id() -> str:
    """128 random bits, hex: as unique as a UUID4 without building one per request."""
    return os.urandom(16).hex()


def request_id_from(given: str | None) -> str:
    """The app's ``X-Request-ID`` if it is 1-128 visible ASCII characters, else a new one."""
    if given is not None and _VISIBLE_ASCII.fullmatch(given):
        return given
    return new_request_id()


def trace_of(flow: http.HTTPFlow) -> tuple[Tracer | None, Span | None]:
    """The tracer and server span ``TraceStart`` gave the request (both None if untraced)."""
    found = flow.metadata.pop(TRACE_KEY, None)
    return found if isinstance(found, tuple) else (None, None)


def child_span(state: FlowState, name: str, kind: int) -> Span | None:
    """A span under the request's own, if the request is traced."""
    if state.tracer is None or state.span is None:
        return None
    return state.tracer.start(name, kind, parent_span=state.span)


def end_span(state: FlowState, span: Span | None, error: str | None = None) -> None:
    if span is not None and state.tracer is not None:
        state.tracer.end(span, error=error)


def state_of(flow: http.HTTPFlow) -> FlowState | None:
    state = flow.metadata.get(FLOW_KEY)
    return state if isinstance(state, FlowState) else None


def upstream_owner(flow: http.HTTPFlow) -> CompiledConnection | None:
    """What an upstream connection carrying ``flow`` must have been opened for.

    A compiled connection stands for one snapshot's TLS policy, client certificate and
    credentials of one named connection: a reload compiles new ones, so requests after a
    reload never ride an upstream connection opened under the old TLS or credentials.
    """
    state = state_of(flow)
    return state.connection if state is not None else None


def byte_counter(state: FlowState, attr: str,
                 inner: Callable[[bytes], bytes] | None = None
                 ) -> Callable[[bytes], bytes | list[bytes]]:
    """A mitmproxy stream callable that counts what passes into ``state.<attr>``; with
    ``inner``, what ``inner`` makes of each chunk is passed (and counted) instead."""
    if inner is None:
        def count(chunk: bytes) -> bytes | list[bytes]:
            setattr(state, attr, getattr(state, attr) + len(chunk))
            return chunk
        return count

    def count_inner(chunk: bytes) -> bytes | list[bytes]:
        out = inner(chunk)
        setattr(state, attr, getattr(state, attr) + len(out))
        # Nothing to send yet is no chunk at all: an empty one would end a chunked body.
        return out if out else []
    return count_inner

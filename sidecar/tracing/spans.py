"""Spans and the tracer: which requests are traced, and what each span holds.

A span's attributes are configured names, methods, statuses, fixed words and addresses only:
never a query string, a header value, a token or a secret.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sidecar.tracing.context import TraceParent, new_span_id, new_trace_id

Attribute = str | int | float | bool | None
INTERNAL, SERVER, CLIENT = 1, 2, 3  # OTLP SpanKind
STATUS_OK, STATUS_ERROR = 1, 2  # OTLP StatusCode


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: int
    start_ns: int
    trace_state: str | None = None
    end_ns: int | None = None
    attributes: dict[str, Attribute] = field(default_factory=dict)
    status_code: int = 0
    status_message: str | None = None

    def traceparent(self) -> str:
        """The ``traceparent`` that makes this span the parent (sampled)."""
        return TraceParent(self.trace_id, self.span_id, 1).header()


class Tracer:
    """Starts spans for sampled requests and hands finished ones to ``export``."""

    def __init__(self, sample_ratio: float, export: Callable[[Span], None],
                 clock_ns: Callable[[], int] = time.time_ns,
                 rng: Callable[[], float] = random.random) -> None:
        self.sample_ratio = sample_ratio
        self._export = export
        self._clock_ns = clock_ns
        self._rng = rng

    def sampled(self, parent: TraceParent | None) -> bool:
        """The parent's sampled flag decides; without a parent, ``sample_ratio`` does."""
        if parent is not None:
            return parent.sampled
        return self.sample_ratio >= 1.0 or self._rng() < self.sample_ratio

    def start(self, name: str, kind: int, *, parent: TraceParent | None = None,
              parent_span: Span | None = None, trace_state: str | None = None) -> Span:
        if parent_span is not None:
            trace_id, parent_id = parent_span.trace_id, parent_span.span_id
            trace_state = trace_state or parent_span.trace_state
        elif parent is not None:
            trace_id, parent_id = parent.trace_id, parent.span_id
        else:
            trace_id, parent_id = new_trace_id(), None
        return Span(trace_id, new_span_id(), parent_id, name, kind, self._clock_ns(),
                    trace_state)

    def end(self, span: Span, *, error: str | None = None) -> None:
        if span.end_ns is not None:
            return  # ended already
        span.end_ns = self._clock_ns()
        if error is not None:
            span.status_code, span.status_message = STATUS_ERROR, error
            span.attributes["error.type"] = error
        self._export(span)

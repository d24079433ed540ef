"""The tracer of work no request started (a background token refresh): a root span of its
own. The runner installs the process's tracing here; nothing is traced until it does."""

from __future__ import annotations

from collections.abc import Callable

from sidecar.tracing.spans import CLIENT, Span, Tracer

_tracer: Callable[[], Tracer | None] = lambda: None  # noqa: E731 (replaced by install)


def install(tracer: Callable[[], Tracer | None]) -> None:
    global _tracer
    _tracer = tracer


def start(name: str, **attributes: str) -> tuple[Tracer, Span] | None:
    """A new root span, sampled by the tracer's ratio; None when not traced."""
    tracer = _tracer()
    if tracer is None or not tracer.sampled(None):
        return None
    span = tracer.start(name, CLIENT)
    span.attributes.update(attributes)
    return tracer, span


def end(started: tuple[Tracer, Span] | None, error: str | None = None) -> None:
    if started is not None:
        tracer, span = started
        tracer.end(span, error=error)

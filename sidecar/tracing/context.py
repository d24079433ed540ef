"""W3C Trace Context (https://www.w3.org/TR/trace-context/): the ``traceparent`` an app sends
is continued, and the upstream gets one whose parent is the sidecar's span."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_INVALID_TRACE = "0" * 32
_INVALID_SPAN = "0" * 16
MAX_TRACESTATE_CHARS = 512
SAMPLED = 0x01


@dataclass(frozen=True)
class TraceParent:
    trace_id: str  # 32 lower-case hex digits
    span_id: str  # 16 lower-case hex digits: the caller's span
    flags: int

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def header(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"


def parse_traceparent(value: str | None) -> TraceParent | None:
    """The caller's context, or None for a missing or invalid header (a new trace starts)."""
    if value is None:
        return None
    found = _TRACEPARENT.fullmatch(value.strip())
    if found is None:
        # A future version may append fields after the flags; the first four still count.
        found = _TRACEPARENT.match(value.strip())
        if found is None or found.group(1) in ("00", "ff") or value.strip()[55:56] != "-":
            return None
    version, trace_id, span_id, flags = found.groups()
    if version == "ff" or trace_id == _INVALID_TRACE or span_id == _INVALID_SPAN:
        return None
    return TraceParent(trace_id, span_id, int(flags, 16))


def clean_tracestate(value: str | None) -> str | None:
    """``tracestate`` passed on as it came, if it is within the size browsers and SDKs keep."""
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > MAX_TRACESTATE_CHARS or any(
            not " " <= c <= "~" for c in value):
        return None
    return value


def new_trace_id() -> str:
    while True:
        found = os.urandom(16).hex()
        if found != _INVALID_TRACE:
            return found


def new_span_id() -> str:
    while True:
        found = os.urandom(8).hex()
        if found != _INVALID_SPAN:
            return found

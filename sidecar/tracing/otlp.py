"""Spans as an OTLP/HTTP request body: ``opentelemetry.proto.collector.trace.v1.
ExportTraceServiceRequest`` in protobuf's wire format, written by hand.

The sidecar sends a handful of messages with a handful of fields; encoding them here keeps a
protobuf runtime out of the process. ``tests/test_tracing.py`` decodes what this writes with
the real ``opentelemetry-proto`` classes, so a wrong field number cannot pass.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

from sidecar.tracing.spans import Attribute, Span

# Field numbers from opentelemetry/proto/trace/v1/trace.proto and common/v1/common.proto.
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 as two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _bytes(field: int, value: bytes) -> bytes:
    return _key(field, _LEN) + _varint(len(value)) + value


def _string(field: int, value: str) -> bytes:
    return _bytes(field, value.encode("utf-8")) if value else b""


def _any_value(value: Attribute) -> bytes:
    if isinstance(value, bool):
        return _key(2, _VARINT) + _varint(int(value))
    if isinstance(value, int):
        return _key(3, _VARINT) + _varint(value)
    if isinstance(value, float):
        return _key(4, _FIXED64) + struct.pack("<d", value)
    return _string(1, value or "")


def _attributes(field: int, attributes: Mapping[str, Attribute]) -> bytes:
    return b"".join(
        _bytes(field, _string(1, key) + _bytes(2, _any_value(value)))
        for key, value in attributes.items() if value is not None)


def _span(span: Span) -> bytes:
    body = (_bytes(1, bytes.fromhex(span.trace_id)) + _bytes(2, bytes.fromhex(span.span_id))
            + _string(3, span.trace_state or ""))
    if span.parent_span_id:
        body += _bytes(4, bytes.fromhex(span.parent_span_id))
    body += _string(5, span.name) + _key(6, _VARINT) + _varint(span.kind)
    body += _key(7, _FIXED64) + struct.pack("<Q", span.start_ns)
    body += _key(8, _FIXED64) + struct.pack("<Q", span.end_ns or span.start_ns)
    body += _attributes(9, span.attributes)
    if span.status_code:
        status = _string(2, span.status_message or "") + _key(3, _VARINT) + _varint(
            span.status_code)
        body += _bytes(15, status)
    return body


def export_request(spans: Iterable[Span], resource: Mapping[str, Attribute],
                   scope: str, version: str) -> bytes:
    """One ``ExportTraceServiceRequest`` with one resource and one instrumentation scope."""
    scope_message = _string(1, scope) + _string(2, version)
    scope_spans = _bytes(1, scope_message) + b"".join(_bytes(2, _span(s)) for s in spans)
    resource_spans = _bytes(1, _attributes(1, resource)) + _bytes(2, scope_spans)
    return _bytes(1, resource_spans)

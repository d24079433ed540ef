"""Traces: each request and each token fetch as OpenTelemetry spans (docs/tracing.md).

- ``context``: W3C trace context (``traceparent``, ``tracestate``), read and written;
- ``spans``: the spans and the tracer that samples and finishes them;
- ``otlp``: spans as OTLP/HTTP protobuf (``ExportTraceServiceRequest``), encoded by hand
  (a few messages, no protobuf runtime in the sidecar);
- ``export``: the batch exporter: a bounded queue, a thread, never in a request's way.

Plain modules, no mitmproxy. Off unless ``tracing.endpoint`` (or ``OTEL_EXPORTER_OTLP_*``)
is set; then nothing of it runs for a request that is not sampled, but its context is passed.
"""

"""The batch exporter: spans queue in memory (bounded) and a thread sends them as OTLP/HTTP.

Exporting never blocks or fails a request: ``add`` only appends to a bounded queue, and a
span that finds it full is dropped and counted. The thread sends every second, or as soon
as a batch is full, with a short timeout; a send that fails is counted and its spans are
dropped (a collector that is down must not make the sidecar's memory grow).
"""

from __future__ import annotations

import collections
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Protocol

from sidecar import __version__
from sidecar.report.logs import log_event
from sidecar.tracing.otlp import export_request
from sidecar.tracing.spans import Attribute, Span

MAX_QUEUE = 4096
BATCH = 512
INTERVAL_SECONDS = 1.0
TIMEOUT_SECONDS = 5.0


class ExportObserver(Protocol):
    def trace_exports(self, result: str, spans: int) -> None: ...


class BatchExporter:
    def __init__(self, url: str, resource: Mapping[str, Attribute],
                 headers: Mapping[str, str] | None = None,
                 observer: ExportObserver | None = None,
                 opener: Callable[..., object] = urllib.request.urlopen) -> None:
        self.url = url
        self._resource = dict(resource)
        self._headers = {"Content-Type": "application/x-protobuf", **(headers or {})}
        self._observer = observer
        self._open = opener
        self._queue: collections.deque[Span] = collections.deque()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otlp-exporter", daemon=True)
        self._thread.start()
        self._failed_logged = False

    def add(self, span: Span) -> None:
        if len(self._queue) >= MAX_QUEUE:
            self._count("dropped", 1)
            return
        self._queue.append(span)
        if len(self._queue) >= BATCH:
            self._wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(INTERVAL_SECONDS)
            self._wake.clear()
            self._flush()
        self._flush()

    def _flush(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
            body = export_request(batch, self._resource, "fhir-sidecar", __version__)
            request = urllib.request.Request(self.url, data=body, headers=self._headers,
                                             method="POST")
            try:
                with self._open(request, timeout=TIMEOUT_SECONDS) as answer:  # type: ignore[attr-defined]
                    answer.read()
            except (OSError, urllib.error.URLError, ValueError) as exc:
                self._count("failed", len(batch))
                if not self._failed_logged:  # once, not once a second while it is down
                    self._failed_logged = True
                    log_event("trace_export_failed", logging.WARNING,
                              f"spans could not be sent to {self.url}: {type(exc).__name__}")
                return
            self._failed_logged = False
            self._count("exported", len(batch))

    def _count(self, result: str, spans: int) -> None:
        if self._observer is not None:
            self._observer.trace_exports(result, spans)

    def close(self, timeout: float = TIMEOUT_SECONDS) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)

"""Whether tracing is on, and where spans go: the config file's ``tracing`` section, filled in
by the standard ``OTEL_*`` variables (docs/tracing.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from sidecar.config.models import TracingSettings
from sidecar.tracing.export import BatchExporter, ExportObserver
from sidecar.tracing.spans import Tracer

DEFAULT_SERVICE = "fhir-sidecar"


@dataclass(frozen=True)
class TracingPlan:
    url: str
    sample_ratio: float
    service_name: str
    headers: tuple[tuple[str, str], ...] = ()


def plan(settings: TracingSettings, env: Mapping[str, str] | None = None) -> TracingPlan | None:
    """What the settings and the environment ask for; None when tracing is off."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    if settings.endpoint is not None:
        url = f"{settings.endpoint}/v1/traces"
    elif env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        url = env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    elif env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        url = env["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + "/v1/traces"
    else:
        return None
    ratio = settings.sample_ratio
    if ratio is None:
        try:
            ratio = min(1.0, max(0.0, float(env.get("OTEL_TRACES_SAMPLER_ARG", "1"))))
        except ValueError:
            ratio = 1.0
    service = settings.service_name or env.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE
    return TracingPlan(url, ratio, service, _headers(env.get("OTEL_EXPORTER_OTLP_HEADERS", "")))


def _headers(value: str) -> tuple[tuple[str, str], ...]:
    found = []
    for item in value.split(","):
        key, sep, val = item.partition("=")
        if sep and key.strip():
            found.append((key.strip(), unquote(val.strip())))
    return tuple(found)


class Tracing:
    """The process's tracer, following the config: rebuilt when its plan changes."""

    def __init__(self, observer: ExportObserver | None = None) -> None:
        self._observer = observer
        self.plan: TracingPlan | None = None
        self.tracer: Tracer | None = None
        self._exporter: BatchExporter | None = None

    def configure(self, settings: TracingSettings) -> None:
        wanted = plan(settings)
        if wanted == self.plan:
            return
        self.close()
        self.plan = wanted
        if wanted is not None:
            self._exporter = BatchExporter(wanted.url, {"service.name": wanted.service_name},
                                           dict(wanted.headers), self._observer)
            self.tracer = Tracer(wanted.sample_ratio, self._exporter.add)

    def close(self) -> None:
        if self._exporter is not None:
            self._exporter.close()
        self._exporter, self.tracer = None, None

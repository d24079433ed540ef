"""Where audit records go (docs/audit.md): the file, the FHIR repository's queue, or both.

One :class:`AuditTrail` per process. It follows the live config (``configure`` at start and
after every reload), counts every record per sink and result, and answers the one question a
request asks when ``audit.required`` is on: can my record be kept?
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sidecar.audit.file_sink import AuditFile, AuditUnavailable
from sidecar.audit.records import Record
from sidecar.report.logs import log_event

if TYPE_CHECKING:
    from sidecar.config.models import AuditFhirSink, AuditSettings
    from sidecar.runtime.snapshot import Snapshot


class AuditSink(Protocol):
    # The sink label of fhir_sidecar_audit_records_total: "file" | "fhir".
    @property
    def name(self) -> str: ...

    def write(self, record: Record) -> None:
        """Keep ``record`` (on disk, at least buffered); AuditUnavailable when it cannot."""

    def accepting(self) -> bool:
        """Whether a record written now would be kept (a full queue says no)."""
        return True

    async def durable(self) -> None:
        """Return once every record written so far is on disk."""

    async def aclose(self) -> None: ...


class AuditObserver(Protocol):
    def audit_record(self, sink: str, result: str) -> None: ...


# Builds the FHIR sink (sidecar/audit/fhir_queue.py:fhir_sink) from its settings, the live
# snapshot (read at every send: the destination's credentials, TLS and egress), the state
# directory and the observer. Imported only when configured, so processes that send no
# AuditEvents never load it (nor httpx).
FhirSinkFactory = Callable[["AuditFhirSink", Callable[[], "Snapshot | None"], Path,
                            "AuditObserver | None"], AuditSink]


class AuditTrail:
    def __init__(self, state_dir: Path, current: Callable[[], Snapshot | None],
                 observer: AuditObserver | None = None,
                 fhir_factory: FhirSinkFactory | None = None) -> None:
        self.state_dir = state_dir
        self._current = current
        self.observer = observer
        self._fhir_factory = fhir_factory
        self.settings: AuditSettings | None = None
        self.sinks: list[AuditSink] = []
        self._retired: list[AuditSink] = []

    @property
    def enabled(self) -> bool:
        return bool(self.sinks)

    @property
    def required(self) -> bool:
        return self.settings is not None and self.settings.required

    def configure(self, snapshot: Snapshot) -> None:
        """Follow the config: a sink whose settings changed is replaced (the old one is closed
        by :meth:`close_retired`); an unchanged one keeps running. The FHIR sink reads the
        destination's credentials from the live snapshot at every send, so a changed secret
        needs no new sink."""
        settings = snapshot.config.audit
        if settings == self.settings:
            return
        old = {sink.name: sink for sink in self.sinks}
        before = self.settings
        sinks: list[AuditSink] = []
        if settings is not None:
            if settings.file is not None:
                same_file = before is not None and (
                    (before.file, before.max_file_bytes, before.keep)
                    == (settings.file, settings.max_file_bytes, settings.keep))
                sinks.append(old["file"] if same_file and "file" in old else AuditFile(
                    self.state_dir / settings.file, settings.max_file_bytes, settings.keep))
            if settings.fhir is not None:
                same_fhir = before is not None and before.fhir == settings.fhir
                sinks.append(old["fhir"] if same_fhir and "fhir" in old
                             else self._make_fhir_sink(settings.fhir))
        self._retired += [sink for sink in self.sinks if sink not in sinks]
        self.sinks, self.settings = sinks, settings

    def _make_fhir_sink(self, settings: AuditFhirSink) -> AuditSink:
        if self._fhir_factory is None:
            from sidecar.audit.fhir_queue import fhir_sink

            self._fhir_factory = fhir_sink
        return self._fhir_factory(settings, self._current, self.state_dir, self.observer)

    def accepting(self) -> bool:
        return all(sink.accepting() for sink in self.sinks)

    def record(self, record: Record) -> bool:
        """Hand ``record`` to every sink; False when any could not keep it (counted and
        logged, never silently dropped)."""
        kept = True
        for sink in self.sinks:
            try:
                sink.write(record)
            except AuditUnavailable as exc:
                kept = False
                self._count(sink.name, exc.result)  # "failed", or "full" (the FHIR queue)
                log_event("audit_record_lost", logging.ERROR,
                          f"audit record {record.get('audit_id')} ({record.get('kind')}) not "
                          f"kept by the {sink.name} sink: {exc}")
            else:
                self._count(sink.name, "written")
        return kept

    async def durable(self) -> None:
        for sink in self.sinks:
            await sink.durable()

    async def close_retired(self) -> None:
        retired, self._retired = self._retired, []
        for sink in retired:
            await sink.aclose()

    async def aclose(self) -> None:
        await self.close_retired()
        for sink in self.sinks:
            await sink.aclose()

    def _count(self, sink: str, result: str) -> None:
        if self.observer is not None:
            self.observer.audit_record(sink, result)

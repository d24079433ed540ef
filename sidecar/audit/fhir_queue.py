"""The FHIR sink: an on-disk queue of audit records, sent as AuditEvents (docs/audit.md).

Placeholder until the queue lands: records are refused, so a configured ``audit.fhir`` is
never silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.audit.file_sink import AuditUnavailable
from sidecar.audit.records import Record

if TYPE_CHECKING:
    from sidecar.audit.trail import AuditObserver, AuditSink
    from sidecar.config.models import AuditFhirSink
    from sidecar.snapshot import Snapshot


class _NotYet:
    name = "fhir"

    def write(self, record: Record) -> None:
        raise AuditUnavailable("the FHIR audit sink is not built yet")

    def accepting(self) -> bool:
        return False

    async def durable(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def fhir_sink(settings: AuditFhirSink, current: Callable[[], Snapshot | None], state_dir: Path,
              observer: AuditObserver | None) -> AuditSink:
    return _NotYet()

"""What the dashboard and the ``/api`` handlers share (they are mounted by :mod:`.mount`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sidecar.admin.auth import AdminAuth
from sidecar.admin.config_store import ConfigStore
from sidecar.admin.probe_gate import ProbeGate
from sidecar.admin.readiness import StatusSources
from sidecar.admin.views import Views
from sidecar.audit.records import Kind, admin_record
from sidecar.callers.hosts import is_loopback_listen


@dataclass(frozen=True)
class Console:
    """Everything the dashboard and API handlers use."""

    sources: StatusSources
    store: ConfigStore
    views: Views
    auth: AdminAuth
    # Off loopback, other machines (other pods) can reach the listener: then reading the
    # configuration needs the admin token too.
    reads_need_token: bool
    # Who is being tested now, and when each was last tested (the Test button's limits).
    probes: ProbeGate = field(default_factory=ProbeGate)

    @classmethod
    def create(cls, sources: StatusSources, secrets_dir: Path, listen_host: str) -> Console:
        store = ConfigStore(sources.live, secrets_dir)
        return cls(sources, store, Views(sources, store),
                   AdminAuth(lambda: sources.live.current.config.admin.token_file),
                   not is_loopback_listen(listen_host))

    def read_only_reason(self) -> str | None:
        return self.store.read_only_reason()

    def audit(self, kind: Kind, *, result: str, client: str | None, via: str | None = None,
              **fields: str | None) -> None:
        """An admin action's audit record (docs/audit.md#admin-actions); never a secret:
        only names, the client address and how it was authenticated."""
        trail = self.sources.audit
        if trail is None or not trail.enabled:
            return
        trail.record(admin_record(kind, result="success" if result == "success" else "failure",
                                  client=client, via=via,
                                  object_=fields.get("object"), action=fields.get("action"),
                                  connection=fields.get("connection"),
                                  error=fields.get("error")))

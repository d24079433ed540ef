"""The one shape of an audit record (docs/audit.md#records): a flat JSON object.

Keys: ``ts``, ``kind`` (``request`` | ``login`` | ``change`` | ``reload`` | ``test``),
``audit_id``, ``request_id``, ``trace_id``, ``caller``, ``connection``, ``credential``,
``interaction``, ``resource_type``, ``resource_id``, ``patient``, ``status``, ``error``,
``bytes_in``, ``bytes_out``; admin records add ``result``, ``client``, ``object``, ``action``,
``via`` and ``config_sha256``. A record never holds a credential, a token, a header value, a
body or a query string: every value is a configured name, a number, a fixed word, an address
or an id the sidecar derived.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from sidecar.audit.interactions import Interaction

Kind = Literal["request", "login", "change", "reload", "test"]
Record = dict[str, Any]


def new_audit_id() -> str:
    """A FHIR id ([A-Za-z0-9-.]{1,64}) made by the sidecar: the AuditEvent's id, so a resend
    overwrites instead of duplicating (an app's request id never decides it)."""
    return str(uuid.uuid4())


def timestamp(now: float | None = None) -> str:
    now = time.time() if now is None else now
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def request_record(*, request_id: str, caller: str | None, client: str | None,
                   connection: str | None, credential: str | None, interaction: Interaction,
                   status: int | None, error: str | None, bytes_in: int, bytes_out: int,
                   trace_id: str | None = None, now: float | None = None) -> Record:
    """One proxied request. ``caller``: the workload token's subject where ``allowed_callers``
    is configured; otherwise the app's address stands for it."""
    return {
        "ts": timestamp(now), "kind": "request", "audit_id": new_audit_id(),
        "request_id": request_id, "trace_id": trace_id,
        "caller": caller or client,
        "connection": connection, "credential": credential,
        "interaction": interaction.interaction,
        "resource_type": interaction.resource_type, "resource_id": interaction.resource_id,
        "patient": interaction.patient,
        "status": status, "error": error, "bytes_in": bytes_in, "bytes_out": bytes_out,
    }


def admin_record(kind: Kind, *, result: Literal["success", "failure"],
                 client: str | None = None, via: str | None = None,
                 object_: str | None = None, action: str | None = None,
                 config_sha256: str | None = None, connection: str | None = None,
                 request_id: str | None = None, status: int | None = None,
                 error: str | None = None, now: float | None = None) -> Record:
    """A login, a change, a reload or a connection test. ``via``: how the admin was known
    (``token`` or ``session``), ``object_``: what changed (``basic-auth/NAME``), ``action``:
    ``created`` | ``replaced`` | ``deleted``."""
    record: Record = {"ts": timestamp(now), "kind": kind, "audit_id": new_audit_id(),
                      "result": result}
    optional = {"client": client, "via": via, "object": object_, "action": action,
                "config_sha256": config_sha256, "connection": connection,
                "request_id": request_id, "status": status, "error": error}
    record.update({k: v for k, v in optional.items() if v is not None})
    return record

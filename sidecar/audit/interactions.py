"""What a FHIR request does, read off its method, path and query.

Only what is derived is kept: the interaction (as ``http://hl7.org/fhir/restful-interaction``
names it), the resource type and id, and the patient the request names. The query itself is
never kept: it can carry patient data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# The first bytes of a Bundle sent to [base]: whether it is a batch (else a transaction).
_BATCH = re.compile(rb'"type"\s*:\s*"batch"|<type\s+value="batch"')


@dataclass(frozen=True)
class Interaction:
    interaction: str | None  # read, vread, update, patch, delete, history-instance, ...
    resource_type: str | None = None
    resource_id: str | None = None
    patient: str | None = None  # "Patient/<id>"

    @property
    def action(self) -> str:
        """BALP's (and AuditEvent's) C/R/U/D/E."""
        return _ACTIONS.get(self.interaction or "", "E")


_ACTIONS = {"create": "C", "read": "R", "vread": "R", "search-type": "R",
            "search-system": "R", "history-instance": "R", "history-type": "R",
            "history-system": "R", "capabilities": "R", "update": "U", "patch": "U",
            "delete": "D"}


def classify(method: str, path: str, query: str = "", body_start: bytes = b"") -> Interaction:
    """``path``: relative to the connection's FHIR base (``/Patient/123``); ``body_start``:
    the first bytes of a request body, only to tell a batch from a transaction."""
    method = method.upper()
    segments = [unquote(s) for s in path.split("/") if s]
    params = parse_qsl(query, keep_blank_values=True)
    found = _classify(method, segments, body_start)
    patient = _patient(found, segments, params)
    return Interaction(found.interaction, found.resource_type, found.resource_id, patient)


def _classify(method: str, segs: list[str], body_start: bytes) -> Interaction:
    if any(s.startswith("$") for s in segs):
        kind = segs[0] if segs and _TYPE.fullmatch(segs[0]) else None
        ident = segs[1] if kind and len(segs) > 2 and _ID.fullmatch(segs[1]) else None
        return Interaction("operation", kind, ident)
    if not segs:
        if method == "POST":
            batch = _BATCH.search(body_start[:4096]) is not None
            return Interaction("batch" if batch else "transaction")
        return Interaction("search-system" if method == "GET" else None)
    head = segs[0]
    if head == "metadata" and len(segs) == 1:
        return Interaction("capabilities")
    if head == "_history":
        return Interaction("history-system")
    if head == "_search":
        return Interaction("search-system")
    if not _TYPE.fullmatch(head):
        return Interaction(None)
    if len(segs) == 1:
        return Interaction({"GET": "search-type", "POST": "create", "PUT": "update",
                            "PATCH": "patch", "DELETE": "delete"}.get(method), head)
    second = segs[1]
    if second == "_search":
        return Interaction("search-type", head)
    if second == "_history":
        return Interaction("history-type", head)
    if not _ID.fullmatch(second):
        return Interaction(None, head)
    if len(segs) == 2:
        return Interaction({"GET": "read", "HEAD": "read", "PUT": "update", "PATCH": "patch",
                            "DELETE": "delete"}.get(method), head, second)
    if segs[2] == "_history":
        if len(segs) == 4 and _ID.fullmatch(segs[3]):
            return Interaction("vread", head, second)
        return Interaction("history-instance", head, second)
    if _TYPE.fullmatch(segs[2]):  # a compartment search: Patient/123/Observation
        return Interaction("search-type", segs[2])
    return Interaction(None, head, second)


def _patient(found: Interaction, segs: list[str], params: list[tuple[str, str]]
             ) -> str | None:
    if len(segs) >= 2 and segs[0] == "Patient" and _ID.fullmatch(segs[1]):
        return f"Patient/{segs[1]}"
    for name, value in params:
        base = name.split(":", 1)[0]
        if base == "patient" or (base == "subject" and value.startswith("Patient/")):
            ref = value.removeprefix("Patient/")
            if _ID.fullmatch(ref):
                return f"Patient/{ref}"
        elif base == "_id" and found.resource_type == "Patient" and _ID.fullmatch(value):
            return f"Patient/{value}"
    return None


def redacted_path(path: str) -> str:
    """``path`` with resource ids replaced by ``:id`` (``logging.request_paths: redacted``)."""
    segs = path.split("/")
    out = []
    for index, seg in enumerate(segs):
        previous = segs[index - 1] if index else ""
        is_id = (_ID.fullmatch(seg) is not None and not _TYPE.fullmatch(seg)
                 and (_TYPE.fullmatch(previous) is not None or previous == "_history")
                 and not seg.startswith(("$", "_")))
        out.append(":id" if is_id else seg)
    return "/".join(out)

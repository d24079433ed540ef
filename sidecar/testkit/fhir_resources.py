"""FHIR R4 JSON shapes the kit's FHIR server answers with, and its in-memory Patient store.

Only what the sidecar's behaviour depends on: resource types, ids, absolute URLs in
``Location`` / ``Bundle.link`` / ``Bundle.entry.fullUrl`` (link rewriting), and
OperationOutcome errors.
"""

from __future__ import annotations

import copy
import datetime as dt
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any
from xml.sax.saxutils import escape as xml_escape

FhirJson = dict[str, Any]

FHIR_VERSION = "4.0.1"

_ISSUE_CODE_BY_STATUS = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    409: "conflict",
    410: "deleted",
    413: "too-costly",
    422: "processing",
    429: "throttled",
    500: "exception",
    501: "not-supported",
    502: "transient",
    503: "transient",
    504: "timeout",
}

SEED_PATIENTS: tuple[FhirJson, ...] = (
    {
        "resourceType": "Patient",
        "id": "example",
        "active": True,
        "name": [{"use": "official", "family": "Chalmers", "given": ["Peter", "James"]}],
        "gender": "male",
        "birthDate": "1974-12-25",
    },
    {
        "resourceType": "Patient",
        "id": "pat-002",
        "active": True,
        "name": [{"use": "official", "family": "Müller", "given": ["Anna"]}],
        "gender": "female",
        "birthDate": "1988-03-14",
    },
    {
        "resourceType": "Patient",
        "id": "pat-003",
        "active": False,
        "name": [{"use": "official", "family": "Chalmers", "given": ["Jane"]}],
        "gender": "female",
        "birthDate": "1951-07-02",
    },
)


def now_instant() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def issue_code_for_status(status: int) -> str:
    if status in _ISSUE_CODE_BY_STATUS:
        return _ISSUE_CODE_BY_STATUS[status]
    return "exception" if status >= 500 else "processing"


def operation_outcome(diagnostics: str, *, code: str, severity: str = "error") -> FhirJson:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


def capability_statement(base_url: str) -> FhirJson:
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": now_instant(),
        "kind": "instance",
        "software": {"name": "fhir-sidecar demo FHIR server"},
        "implementation": {"description": "fhir-sidecar demo upstream", "url": base_url},
        "fhirVersion": FHIR_VERSION,
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "resource": [
                    {
                        "type": "Patient",
                        "interaction": [
                            {"code": "read"},
                            {"code": "search-type"},
                            {"code": "create"},
                        ],
                        "searchParam": [{"name": "name", "type": "string"}],
                    },
                    {"type": "Binary", "interaction": [{"code": "read"}]},
                ],
            }
        ],
    }


def searchset(
    base_url: str,
    matches: Sequence[FhirJson],
    *,
    total: int,
    self_url: str,
    next_url: str | None,
) -> FhirJson:
    links = [{"relation": "self", "url": self_url}]
    if next_url is not None:
        links.append({"relation": "next", "url": next_url})
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": [
            {
                "fullUrl": f"{base_url}/{resource['resourceType']}/{resource['id']}",
                "resource": resource,
                "search": {"mode": "match"},
            }
            for resource in matches
        ],
    }


def to_xml(resource: Mapping[str, Any]) -> bytes:
    """FHIR XML for a JSON resource (the subset these shapes use: no primitive extensions).

    Objects become elements, arrays repeat their element, primitives are ``value``
    attributes, and a contained resource (``entry.resource``) is wrapped in its type.
    """
    out = [f'<?xml version="1.0" encoding="UTF-8"?>\n<{resource["resourceType"]} '
           'xmlns="http://hl7.org/fhir">']
    _xml_children(resource, out)
    out.append(f"</{resource['resourceType']}>")
    return "".join(out).encode()


def _xml_children(node: Mapping[str, Any], out: list[str]) -> None:
    for key, value in node.items():
        if key == "resourceType":
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, Mapping) and "resourceType" in item:
                out.append(f"<{key}><{item['resourceType']}>")
                _xml_children(item, out)
                out.append(f"</{item['resourceType']}></{key}>")
            elif isinstance(item, Mapping):
                out.append(f"<{key}>")
                _xml_children(item, out)
                out.append(f"</{key}>")
            else:
                text = str(item).lower() if isinstance(item, bool) else str(item)
                out.append(f'<{key} value="{xml_escape(text, {chr(34): "&quot;"})}"/>')


def _name_parts(patient: Mapping[str, Any]) -> list[str]:
    parts: list[str] = []
    for name in patient.get("name", []):
        parts.extend(str(part) for part in [name.get("family"), name.get("text")] if part)
        parts.extend(str(given) for given in name.get("given", []))
    return parts


class PatientStore:
    """Thread-safe in-memory Patients: the seeds plus whatever clients create."""

    def __init__(self, seeds: Sequence[FhirJson] = SEED_PATIENTS) -> None:
        self._lock = threading.Lock()
        self._patients: dict[str, FhirJson] = {}
        for seed in seeds:
            patient = copy.deepcopy(seed)
            patient["meta"] = {"versionId": "1", "lastUpdated": now_instant()}
            self._patients[patient["id"]] = patient

    def read(self, patient_id: str) -> FhirJson | None:
        with self._lock:
            found = self._patients.get(patient_id)
            return copy.deepcopy(found) if found is not None else None

    def search_by_name(self, name: str | None) -> list[FhirJson]:
        """FHIR string search: case-insensitive "starts with" on any name part."""
        wanted = name.casefold() if name is not None else None
        with self._lock:
            return [
                copy.deepcopy(patient)
                for patient in self._patients.values()
                if wanted is None
                or any(part.casefold().startswith(wanted) for part in _name_parts(patient))
            ]

    def create(self, resource: Mapping[str, Any]) -> FhirJson:
        """Store a copy under a new server-assigned id (any client id is ignored, as in FHIR)."""
        patient = copy.deepcopy(dict(resource))
        patient["id"] = str(uuid.uuid4())
        patient["meta"] = {"versionId": "1", "lastUpdated": now_instant()}
        with self._lock:
            self._patients[patient["id"]] = patient
        return copy.deepcopy(patient)

"""What the kit's FHIR server answers: request in, reply out, no sockets.

Kept apart from the transport (``fhir_server``) so the FHIR behaviour is easy to read and the
transport can stay generic: it frames bodies, records requests and writes replies. The demo's
routes live here; tests add theirs by overriding ``route`` (tests/support/fhir_routes.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode

from sidecar.testkit.auth_checks import AuthCheck
from sidecar.testkit.fhir_resources import (
    PatientStore,
    capability_statement,
    issue_code_for_status,
    operation_outcome,
    searchset,
    to_xml,
)
from sidecar.testkit.http_io import RequestBody, is_decimal

FHIR_JSON = "application/fhir+json"
FHIR_XML = "application/fhir+xml"
MAX_JSON_BODY = 1024 * 1024
DEFAULT_PAGE_SIZE = 50
DEFAULT_CHALLENGE = 'Basic realm="fhir", charset="UTF-8"'


@dataclass(frozen=True)
class IncomingRequest:
    method: str
    target: str  # the request target as received: path and query
    headers: Mapping[str, str]
    body: RequestBody


@dataclass
class Reply:
    """A response: either ``body`` or a ``stream`` of ``length`` bytes (``None``: chunked)."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    stream: Iterable[bytes] | None = None
    length: int | None = None
    delay_seconds: float = 0.0  # wait before sending anything (timeout tests)


def fhir_reply(status: int, resource: Mapping[str, Any], **headers: str) -> Reply:
    body = json.dumps(resource, ensure_ascii=False, separators=(",", ":")).encode()
    return Reply(status, {"Content-Type": FHIR_JSON, **headers}, body)


def error_reply(status: int, diagnostics: str, **headers: str) -> Reply:
    outcome = operation_outcome(diagnostics, code=issue_code_for_status(status))
    return fhir_reply(status, outcome, **headers)


class BadParameter(ValueError):
    """A query parameter out of range: answered 400 with this message."""


class FhirApp:
    """Routes requests under ``base_path``; every route needs ``auth`` to pass, when given."""

    def __init__(
        self,
        *,
        base_url: str,
        base_path: str,
        auth: AuthCheck | None,
        www_authenticate: str = DEFAULT_CHALLENGE,
    ) -> None:
        self.base_url = base_url
        self.base_path = base_path
        self._auth = auth
        self._challenge = www_authenticate
        self.patients = PatientStore()

    def handle(self, request: IncomingRequest) -> Reply:
        if self._auth is not None:
            problem = self._auth(request.headers)
            if problem is not None:
                return error_reply(401, problem, **{"WWW-Authenticate": self._challenge})
        path, _, query_text = request.target.partition("?")
        segments = self._segments(path)
        if segments is None:
            return error_reply(404, f"not a path under {self.base_path or '/'}")
        query = parse_qs(query_text, keep_blank_values=True)
        try:
            return self.route(request, segments, query)
        except BadParameter as exc:
            return error_reply(400, str(exc))

    def _segments(self, path: str) -> list[str] | None:
        # A segment-boundary prefix check: "/fhir" owns "/fhir/Patient", not "/fhir-other".
        if path != self.base_path and not path.startswith(self.base_path + "/"):
            return None
        rest = path[len(self.base_path) :].strip("/")
        return [unquote(segment) for segment in rest.split("/")] if rest else []

    def route(
        self, request: IncomingRequest, segments: list[str], query: dict[str, list[str]]
    ) -> Reply:
        """The answer to an authorized request for ``segments`` under the base path."""
        method = request.method
        match segments:
            case ["metadata"] if method == "GET":
                return fhir_reply(200, capability_statement(self.base_url))
            case ["Patient", patient_id] if method == "GET":
                return self._read_patient(patient_id)
            case ["Patient"] if method == "GET":
                return self._search_patients(query, wants_xml(request, query))
            case ["Patient"] if method == "POST":
                return self._create_patient(request)
            case ["metadata"] | ["Patient", *_]:
                return error_reply(405, f"{method} is not supported here", Allow="GET, POST")
            case _:
                return error_reply(404, "unknown resource type or operation")

    def _read_patient(self, patient_id: str) -> Reply:
        patient = self.patients.read(patient_id)
        if patient is None:
            return error_reply(404, f"Patient/{patient_id} is not known")
        return fhir_reply(200, patient, ETag=f'W/"{patient["meta"]["versionId"]}"')

    def _search_patients(self, query: dict[str, list[str]], xml: bool = False) -> Reply:
        name = single_param(query, "name")
        count = int_param(query, "_count", DEFAULT_PAGE_SIZE, 1, 1000)
        offset = int_param(query, "_offset", 0, 0, 1_000_000)
        matches = self.patients.search_by_name(name)
        page = matches[offset : offset + count]
        params = {"name": name} if name is not None else {}
        if "_format" in query:
            params["_format"] = single_param(query, "_format") or ""
        url = f"{self.base_url}/Patient?"
        self_url = url + urlencode({**params, "_count": count, "_offset": offset})
        next_url = None
        if offset + count < len(matches):
            next_url = url + urlencode({**params, "_count": count, "_offset": offset + count})
        bundle = searchset(
            self.base_url, page, total=len(matches), self_url=self_url, next_url=next_url
        )
        if xml:
            return Reply(200, {"Content-Type": FHIR_XML}, to_xml(bundle))
        return fhir_reply(200, bundle)

    def _create_patient(self, request: IncomingRequest) -> Reply:
        try:
            raw = request.body.read_all(MAX_JSON_BODY)
        except ValueError:
            return error_reply(413, f"a Patient may be at most {MAX_JSON_BODY} bytes")
        try:
            resource = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return error_reply(400, "the request body is not JSON")
        if not isinstance(resource, dict) or resource.get("resourceType") != "Patient":
            return error_reply(400, 'expected a resource with "resourceType": "Patient"')
        created = self.patients.create(resource)
        location = f"{self.base_url}/Patient/{created['id']}/_history/1"
        return fhir_reply(201, created, Location=location, ETag='W/"1"',
                          **{"Content-Location": location})

def wants_xml(request: IncomingRequest, query: dict[str, list[str]]) -> bool:
    """``_format=xml`` (or an XML media type), else an Accept asking for XML before JSON."""
    fmt = (single_param(query, "_format") or "").lower()
    if fmt:
        return fmt == "xml" or fmt.endswith("xml")
    accept = request.headers.get("accept", "").lower()
    return "xml" in accept and "json" not in accept


def flag_param(query: dict[str, list[str]], name: str) -> bool:
    return (single_param(query, name) or "").lower() in {"1", "true", "yes"}


def single_param(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def int_param(
    query: dict[str, list[str]], name: str, default: int, minimum: int, maximum: int
) -> int:
    text = single_param(query, name)
    if text is None:
        return default
    if not is_decimal(text) or not minimum <= int(text) <= maximum:
        raise BadParameter(f"{name} must be an integer from {minimum} to {maximum}")
    return int(text)

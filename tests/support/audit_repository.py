"""An Audit Record Repository for tests: a real TLS FHIR server (the kit's transport) that
stores the AuditEvents it receives.

It accepts batch Bundles of ``PUT AuditEvent/{id}`` at its base and single ``PUT
AuditEvent/{id}``, validates each AuditEvent with ``fhir.resources``' R4B model as a real
server would (400 when invalid), stores it by id and answers a batch-response. Tests can take
it down (503, or the port closed: connection refused), refuse chosen ids with 400 (per entry,
or the whole Bundle) and see every stored AuditEvent, every id in arrival order and every
request's headers.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

from fhir.resources.R4B.auditevent import AuditEvent
from pydantic import ValidationError

from sidecar.testkit.auth_checks import AuthCheck
from sidecar.testkit.fhir_app import FhirApp, IncomingRequest, Reply, error_reply, fhir_reply
from sidecar.testkit.fhir_resources import operation_outcome
from sidecar.testkit.fhir_server import FhirTestServer
from sidecar.testkit.pki import ServerIdentity
from sidecar.testkit.ports import free_port

MAX_BODY = 16 * 1024 * 1024


@dataclass
class RepositoryState:
    """What the repository holds and how it behaves; shared by every start of its server."""

    stored: dict[str, dict[str, Any]] = field(default_factory=dict)
    arrivals: list[str] = field(default_factory=list)  # every stored id, in arrival order
    bodies: list[bytes] = field(default_factory=list)  # every request body received
    authorizations: list[str | None] = field(default_factory=list)
    status: int | None = None  # answer every request with this (e.g. 503) when set
    refuse_ids: set[str] = field(default_factory=set)  # answered 400
    # "entry": a refused id gets a 400 entry in the batch-response; "bundle": the whole Bundle
    # is refused 400 (the sender then tries the entries one by one).
    refuse_as: Literal["entry", "bundle"] = "entry"
    lock: threading.Lock = field(default_factory=threading.Lock)


class AuditRepositoryApp(FhirApp):
    state: RepositoryState  # set on the per-repository subclass

    def route(self, request: IncomingRequest, segments: list[str],
              query: dict[str, list[str]]) -> Reply:
        state = self.state
        raw = request.body.read_all(MAX_BODY)
        with state.lock:
            state.bodies.append(raw)
            state.authorizations.append(request.headers.get("authorization"))
            forced = state.status
        if forced is not None:
            return error_reply(forced, "the repository is down for a test")
        match segments:
            case [] if request.method == "POST":
                return self._batch(raw)
            case ["AuditEvent", audit_id] if request.method == "PUT":
                status, outcome = self._put(audit_id, _json(raw))
                if outcome is not None:
                    return fhir_reply(status, outcome)
                return Reply(status, {"Location": f"AuditEvent/{audit_id}/_history/1"})
            case _:
                return error_reply(404, "this repository stores AuditEvents only")

    def _batch(self, raw: bytes) -> Reply:
        bundle = _json(raw)
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" \
                or bundle.get("type") != "batch":
            return error_reply(400, "expected a batch Bundle")
        entries = bundle.get("entry") or []
        if self.state.refuse_as == "bundle" and any(
                _entry_id(entry) in self.state.refuse_ids for entry in entries):
            return error_reply(400, "the Bundle holds an AuditEvent this repository refuses")
        answers = []
        for entry in entries:
            request = entry.get("request") or {}
            url = str(request.get("url", ""))
            if request.get("method") != "PUT" or not url.startswith("AuditEvent/"):
                answers.append({"response": {"status": "400 Bad Request", "outcome": _outcome(
                    "only PUT AuditEvent/{id}")}})
                continue
            status, outcome = self._put(url.removeprefix("AuditEvent/"), entry.get("resource"))
            response: dict[str, Any] = {"status": f"{status} {_REASONS[status]}"}
            if outcome is not None:
                response["outcome"] = outcome
            else:
                response["location"] = f"{url}/_history/1"
            answers.append({"response": response})
        return fhir_reply(200, {"resourceType": "Bundle", "type": "batch-response",
                                "entry": answers})

    def _put(self, audit_id: str, resource: Any) -> tuple[int, dict[str, Any] | None]:
        state = self.state
        if audit_id in state.refuse_ids:
            return 400, _outcome(f"AuditEvent/{audit_id} is refused by this test")
        if not isinstance(resource, dict) or resource.get("id") != audit_id:
            return 400, _outcome("the AuditEvent's id is not the one in the URL")
        try:
            AuditEvent.model_validate(resource)
        except ValidationError as exc:
            return 400, _outcome(f"not a valid AuditEvent: {exc}"[:2000])
        with state.lock:
            created = audit_id not in state.stored
            state.stored[audit_id] = resource
            state.arrivals.append(audit_id)
        return (201 if created else 200), None


_REASONS = {200: "OK", 201: "Created", 400: "Bad Request"}


def _outcome(diagnostics: str) -> dict[str, Any]:
    return operation_outcome(diagnostics, code="invalid")


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def _entry_id(entry: dict[str, Any]) -> str:
    return str((entry.get("request") or {}).get("url", "")).removeprefix("AuditEvent/")


class AuditRepository:
    """The repository at ``https://localhost:PORT/fhir``; ``down()``/``up()`` close and reopen
    its port (connection refused meanwhile), ``state.status = 503`` makes it answer 503."""

    def __init__(self, identity: ServerIdentity, *, auth: AuthCheck | None = None) -> None:
        self.identity = identity
        self.auth = auth
        self.state = RepositoryState()
        self.port = free_port()
        self._app_class = type("BoundAuditRepositoryApp", (AuditRepositoryApp,),
                               {"state": self.state})
        self._server: FhirTestServer | None = None

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}/fhir"

    def up(self) -> AuditRepository:
        if self._server is None:
            self._server = FhirTestServer(self.identity, port=self.port, auth=self.auth,
                                          app_class=self._app_class).start()
        return self

    def down(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> AuditRepository:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    @property
    def stored(self) -> dict[str, dict[str, Any]]:
        with self.state.lock:
            return dict(self.state.stored)

    @property
    def arrivals(self) -> list[str]:
        with self.state.lock:
            return list(self.state.arrivals)

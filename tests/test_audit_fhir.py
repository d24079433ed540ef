"""The FHIR audit sink (issue 28 §3-4): records queued on disk and sent as BALP-shaped R4
AuditEvents to a real TLS Audit Record Repository that stores what it receives.

The sink is driven in-process with asyncio, against a ``Snapshot`` compiled from a real config
file; every stored AuditEvent is validated with ``fhir.resources``' R4B model.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fhir.resources.R4B.auditevent import AuditEvent
from support.audit_repository import AuditRepository
from support.constants import UPSTREAM_PASSWORD, UPSTREAM_USER
from support.pki import TestPKI
from support.sidecar_process import free_port, wait_until
from support.sidecars import RunningSidecar, running_sidecar
from support.tinyproxy import Tinyproxy

from sidecar.audit import fhir_queue
from sidecar.audit.fhir_queue import AuditQueueFull, FhirQueue, fhir_sink
from sidecar.audit.interactions import classify
from sidecar.audit.records import Record, admin_record, request_record
from sidecar.audit.trail import AuditTrail
from sidecar.report.logs import JsonFormatter
from sidecar.runtime.live import load_snapshot
from sidecar.runtime.snapshot import Snapshot
from sidecar.testkit.auth_checks import basic_auth_check, bearer_token_check
from sidecar.testkit.fhir_server import FhirTestServer
from sidecar.testkit.token_server import TokenServer

WRITER = "audit-writer"
WRITER_PASSWORD = "wr1ter-Pässw0rd-Qx7"
CLIENT_SECRET = "idp-client-s3cret-Vb2"
PROXY_USER, PROXY_PASSWORD = "egress-user", "egress-pw-Lm4"
EHR_URL = "https://ehr.hospital.example/fhir"
QUERY_WORD = "Zebedee-Quux"  # a patient's name in a query string: never in an AuditEvent

AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
BALP_ENTITY = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
DICOM = "http://dicom.nema.org/resources/ontology/DCM"

# method, path (relative to the FHIR base), query, body start, interaction, action, patient
INTERACTIONS: list[tuple[str, str, str, bytes, str, str, str | None]] = [
    ("GET", "/Patient/123", "", b"", "read", "R", "Patient/123"),
    ("GET", "/Patient/123/_history/2", "", b"", "vread", "R", "Patient/123"),
    ("PUT", "/Observation/o1", "", b"", "update", "U", None),
    ("PATCH", "/Observation/o1", "", b"", "patch", "U", None),
    ("DELETE", "/Observation/o1", "", b"", "delete", "D", None),
    ("GET", "/Patient/123/_history", "", b"", "history-instance", "R", "Patient/123"),
    ("GET", "/Observation/_history", "", b"", "history-type", "R", None),
    ("GET", "/_history", "", b"", "history-system", "R", None),
    ("POST", "/Observation", "", b"", "create", "C", None),
    ("GET", "/Observation", f"patient=Patient/77&name={QUERY_WORD}", b"", "search-type", "E",
     "Patient/77"),
    ("GET", "/", f"_type=Patient&name={QUERY_WORD}", b"", "search-system", "E", None),
    ("GET", "/metadata", "", b"", "capabilities", "R", None),
    ("POST", "/", "", b'{"resourceType":"Bundle","type":"transaction"}', "transaction", "E",
     None),
    ("POST", "/", "", b'{"resourceType":"Bundle","type":"batch"}', "batch", "E", None),
    ("POST", "/Patient/123/$everything", "", b"", "operation", "E", "Patient/123"),
]


class Observer:
    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.queue_bytes: list[int] = []

    def audit_record(self, sink: str, result: str) -> None:
        self.counts[(sink, result)] += 1

    def audit_queue(self, queued_bytes: int) -> None:
        self.queue_bytes.append(queued_bytes)


class Logs(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in map(json.loads, self.lines) if line.get("event") == name]


@pytest.fixture
def logs() -> Iterator[Logs]:
    handler = Logs()
    loggers = [logging.getLogger("fhir_sidecar"), logging.getLogger("sidecar")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    yield handler
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fhir_queue, "BACKOFF_FIRST_SECONDS", 0.05)
    monkeypatch.setattr(fhir_queue, "BACKOFF_MAX_SECONDS", 0.3)


@pytest.fixture
def repository(pki: TestPKI) -> Iterator[AuditRepository]:
    with AuditRepository(pki.server(name="audit-repository"),
                         auth=basic_auth_check(WRITER, WRITER_PASSWORD)) as repo:
        yield repo


def _snapshot(directory: Path, pki: TestPKI, repository_url: str, *,
              auth: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
              **sink: Any) -> Snapshot:
    (directory / "writer-password").write_text(WRITER_PASSWORD + "\n")
    config: dict[str, Any] = {
        "basic_auth": {"writer": {"username": WRITER, "password_file": "writer-password"},
                       "hosp": {"username": "svc", "password_file": "writer-password"}},
        "connections": {"ehr": {"url": EHR_URL, "listen": "127.0.0.1:18080",
                                "auth": {"basic": "hosp"}}},
        "audit": {"file": None, "fhir": {
            "url": repository_url, "auth": auth or {"basic": "writer"},
            "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)},
            "queue_dir": "audit-queue", "batch_size": 5, "flush_seconds": 0.2, **sink}},
        **(extra or {}),
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return load_snapshot(path)


def _sink(snapshot: Snapshot, state_dir: Path, observer: Observer | None = None) -> FhirQueue:
    assert snapshot.config.audit is not None and snapshot.config.audit.fhir is not None
    sink = fhir_sink(snapshot.config.audit.fhir, lambda: snapshot, state_dir, observer)
    assert isinstance(sink, FhirQueue) and sink.name == "fhir"
    return sink


def _request(index: int = 0, *, method: str = "GET", path: str = "/Patient/123",
             query: str = "", body: bytes = b"", status: int | None = 200,
             error: str | None = None) -> Record:
    return request_record(
        request_id=f"req-{index}", caller="ns/app:billing" if index % 2 else None,
        client="10.1.2.3", connection="ehr", credential="hosp",
        interaction=classify(method, path, query, body), status=status, error=error,
        bytes_in=10, bytes_out=20)


async def _until(condition: Callable[[], Any], timeout: float = 15.0,
                 message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        await asyncio.sleep(0.02)


def _run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(body())


def _validated(event: dict[str, Any]) -> dict[str, Any]:
    AuditEvent.model_validate(event)  # raises on anything R4(B) does not allow
    return event


def _entities(event: dict[str, Any], system: str, code: str) -> list[dict[str, Any]]:
    return [entity for entity in event.get("entity", [])
            for coding in [entity.get("type") or {}]
            if coding.get("system") == system and coding.get("code") == code]


def _first_arrivals(arrivals: list[str]) -> list[str]:
    return list(dict.fromkeys(arrivals))


# --- record shape ----------------------------------------------------------------------------


def test_every_interaction_kind_is_a_valid_balp_auditevent_in_the_repository(
        tmp_path: Path, pki: TestPKI, repository: AuditRepository) -> None:
    snapshot = _snapshot(tmp_path, pki, repository.url)
    records = [_request(index, method=method, path=path, query=query, body=body)
               for index, (method, path, query, body, *_) in enumerate(INTERACTIONS)]

    async def body() -> None:
        sink = _sink(snapshot, tmp_path)
        try:
            for record in records:
                sink.write(record)
            await _until(lambda: len(repository.stored) == len(records), message="all stored")
        finally:
            await sink.aclose()

    _run(body)
    stored = repository.stored
    assert repository.state.bodies, "sent in batch Bundles"
    for record, (_, _, _, _, interaction, action, patient) in zip(records, INTERACTIONS,
                                                                  strict=True):
        assert record["interaction"] == interaction
        event = _validated(stored[record["audit_id"]])
        assert event["id"] == record["audit_id"]
        assert event["type"] == {"system": AUDIT_EVENT_TYPE, "code": "rest",
                                 "display": "Restful Operation"}
        assert [(c["system"], c["code"]) for c in event["subtype"]] == [(RESTFUL, interaction)]
        assert event["action"] == action, interaction
        assert event["recorded"] == record["ts"]
        assert event["outcome"] == "0"
        assert event["source"]["observer"]["display"] == "fhir-sidecar"
        # The caller is the requestor; the FHIR server is the other agent, by URL and name.
        requestor, server = event["agent"]
        assert requestor["requestor"] is True
        assert requestor["who"]["identifier"]["value"] == record["caller"]
        assert server["requestor"] is False
        assert server["who"]["identifier"]["value"] == EHR_URL
        assert server["who"]["display"] == "ehr"
        # The request id, as BALP's XrequestId entity.
        [request_id] = _entities(event, BALP_ENTITY, "XrequestId")
        assert request_id["what"]["identifier"]["value"] == record["request_id"]
        # The patient (object-role 1) where the request names one.
        patients = [e for e in event["entity"]
                    if (e.get("role") or {}).get("code") == "1"
                    and e["role"]["system"] == OBJECT_ROLE]
        assert [e["what"]["reference"] for e in patients] == ([patient] if patient else [])
        # Never the query string.
        assert QUERY_WORD not in json.dumps(event)
    read = stored[records[0]["audit_id"]]
    assert {"reference": "Patient/123"} in [e.get("what") for e in read["entity"]]
    search = stored[records[9]["audit_id"]]
    [query] = [e for e in search["entity"] if e.get("role", {}).get("code") == "24"]
    assert query["description"] == "Observation" and "query" not in query


@pytest.mark.parametrize(("status", "error", "outcome"), [
    (200, None, "0"), (304, None, "0"), (404, None, "4"), (403, "caller-forbidden", "4"),
    (503, None, "8"), (502, "upstream-unreachable", "8"), (None, "upstream-timeout", "8"),
    (500, "internal-error", "12"), (503, "audit-unavailable", "12"),
])
def test_outcome_codes(tmp_path: Path, pki: TestPKI, repository: AuditRepository,
                       status: int | None, error: str | None, outcome: str) -> None:
    snapshot = _snapshot(tmp_path, pki, repository.url, flush_seconds=0.05)
    record = _request(1, status=status, error=error)

    async def body() -> None:
        sink = _sink(snapshot, tmp_path)
        try:
            sink.write(record)
            await _until(lambda: record["audit_id"] in repository.stored)
        finally:
            await sink.aclose()

    _run(body)
    event = _validated(repository.stored[record["audit_id"]])
    assert event["outcome"] == outcome
    if error is not None:
        assert event["outcomeDesc"].startswith(error)


def test_admin_records_are_valid_auditevents(tmp_path: Path, pki: TestPKI,
                                             repository: AuditRepository) -> None:
    snapshot = _snapshot(tmp_path, pki, repository.url)
    records = [
        admin_record("login", result="success", client="10.0.0.5", via="session"),
        admin_record("login", result="failure", client="10.0.0.6", via="token"),
        admin_record("change", result="success", client="::1", via="token",
                     object_="basic-auth/hosp", action="created"),
        admin_record("change", result="success", client="::1", via="session",
                     object_="connections/ehr", action="replaced"),
        admin_record("change", result="success", client="::1", via="token",
                     object_="oauth/idp", action="deleted"),
        admin_record("reload", result="success", config_sha256="ab" * 32),
        admin_record("reload", result="failure", config_sha256="cd" * 32),
        admin_record("test", result="failure", client="10.0.0.7", via="token",
                     object_="connections/ehr", error="token"),
    ]

    async def body() -> None:
        sink = _sink(snapshot, tmp_path)
        try:
            for record in records:
                sink.write(record)
            await _until(lambda: len(repository.stored) == len(records))
        finally:
            await sink.aclose()

    _run(body)
    events = [_validated(repository.stored[r["audit_id"]]) for r in records]
    login_ok, login_failed, created, replaced, deleted, reloaded, refused, tested = events
    assert (login_ok["type"]["system"], login_ok["type"]["code"]) == (DICOM, "110114")
    assert login_ok["subtype"][0]["code"] == "110122" and login_ok["action"] == "E"
    assert (login_ok["outcome"], login_failed["outcome"]) == ("0", "4")
    assert login_failed["agent"][0]["who"]["identifier"]["value"] == "10.0.0.6"
    assert login_failed["agent"][0]["network"] == {"address": "10.0.0.6", "type": "2"}
    assert [e["action"] for e in (created, replaced, deleted)] == ["C", "U", "D"]
    assert created["type"]["code"] == "110113"  # Security Alert / Security Configuration
    assert created["subtype"][0]["code"] == "110129"
    assert created["entity"][0]["what"]["identifier"]["value"] == "basic-auth/hosp"
    assert reloaded["entity"][0]["what"]["identifier"]["value"] == "ab" * 32
    assert (reloaded["outcome"], refused["outcome"]) == ("0", "4")
    assert tested["type"]["code"] == "rest" and tested["action"] == "E"
    assert tested["outcome"] == "8" and tested["outcomeDesc"] == "token"


# --- the queue -------------------------------------------------------------------------------


def test_batches_of_batch_size_go_at_once_and_a_lone_record_within_flush_seconds(
        tmp_path: Path, pki: TestPKI, repository: AuditRepository) -> None:
    snapshot = _snapshot(tmp_path, pki, repository.url, batch_size=5, flush_seconds=1.5)

    async def body() -> None:
        sink = _sink(snapshot, tmp_path)
        try:
            started = time.monotonic()
            for index in range(10):
                sink.write(_request(index))
            await _until(lambda: len(repository.stored) == 10)
            assert time.monotonic() - started < 1.2, "full batches do not wait for the flush"
            lone = _request(99)
            sink.write(lone)
            await asyncio.sleep(0.5)
            assert lone["audit_id"] not in repository.stored, "a lone record waits its turn"
            await _until(lambda: lone["audit_id"] in repository.stored, timeout=3)
        finally:
            await sink.aclose()

    _run(body)
    bundles = [json.loads(b) for b in repository.state.bodies]
    assert [len(b["entry"]) for b in bundles] == [5, 5, 1]
    for bundle in bundles:
        assert bundle["type"] == "batch"
        for entry in bundle["entry"]:
            assert entry["request"] == {"method": "PUT",
                                        "url": f"AuditEvent/{entry['resource']['id']}"}


def test_an_outage_then_recovery_delivers_everything_in_order(
        tmp_path: Path, pki: TestPKI, repository: AuditRepository, logs: Logs) -> None:
    snapshot = _snapshot(tmp_path, pki, repository.url, batch_size=5, flush_seconds=0.1)
    observer = Observer()
    records = [_request(index) for index in range(30)]

    async def body() -> None:
        sink = _sink(snapshot, tmp_path, observer)
        try:
            for record in records[:5]:
                sink.write(record)
            await _until(lambda: len(repository.stored) == 5)
            repository.down()  # connection refused
            for record in records[5:17]:
                sink.write(record)
            await _until(lambda: logs.events("audit_delivery_failed"), message="a failure")
            repository.state.status = 503
            repository.up()
            for record in records[17:]:
                sink.write(record)
            await _until(lambda: repository.state.bodies[5:], message="503 answers")
            assert len(repository.stored) == 5
            repository.state.status = None
            await _until(lambda: len(repository.stored) == len(records), message="all")
            await _until(lambda: observer.queue_bytes[-1] == 0, message="an empty queue")
        finally:
            await sink.aclose()

    _run(body)
    assert _first_arrivals(repository.arrivals) == [r["audit_id"] for r in records]
    assert observer.counts[("fhir", "sent")] == len(records)
    assert logs.events("audit_delivery_resumed")
    for event in repository.stored.values():
        _validated(event)


@pytest.mark.parametrize("refuse_as", ["entry", "bundle"])
def test_a_refused_record_is_moved_aside_and_never_blocks_the_rest(
        tmp_path: Path, pki: TestPKI, repository: AuditRepository, logs: Logs,
        refuse_as: str) -> None:
    snapshot = _snapshot(tmp_path, pki, repository.url, batch_size=5, flush_seconds=0.1)
    observer = Observer()
    records = [_request(index) for index in range(12)]
    refused = records[2]["audit_id"]
    repository.state.refuse_ids = {refused}
    repository.state.refuse_as = refuse_as  # type: ignore[assignment]
    rejected_dir = tmp_path / "audit-queue" / "rejected"

    async def body() -> None:
        sink = _sink(snapshot, tmp_path, observer)
        try:
            for record in records:
                sink.write(record)
            await _until(lambda: len(repository.stored) == len(records) - 1)
            await _until(lambda: observer.counts[("fhir", "rejected")] == 1)
        finally:
            await sink.aclose()

    _run(body)
    assert refused not in repository.stored
    [rejected_file] = rejected_dir.iterdir()
    assert rejected_file.stat().st_mode & 0o777 == 0o600
    [moved] = [json.loads(line) for line in rejected_file.read_text().splitlines()]
    assert moved["record"] == records[2] and moved["status"] == 400
    assert "refused by this test" in moved["reason"]
    assert moved["server"] == EHR_URL
    assert observer.counts[("fhir", "sent")] == len(records) - 1
    [line] = logs.events("audit_record_rejected")
    assert refused in line["message"] and "HTTP 400" in line["message"]
    assert _first_arrivals(repository.arrivals) == [r["audit_id"] for r in records
                                                    if r["audit_id"] != refused]


def test_the_queue_survives_a_graceful_stop_and_resumes_without_duplicates(
        tmp_path: Path, pki: TestPKI, repository: AuditRepository) -> None:
    snapshot = _snapshot(tmp_path, pki, repository.url, batch_size=5, flush_seconds=0.1)
    records = [_request(index) for index in range(40)]
    queue_dir = tmp_path / "audit-queue"
    observer = Observer()

    async def first_run() -> None:
        sink = _sink(snapshot, tmp_path, observer)
        try:
            for record in records[:20]:
                sink.write(record)
            # Confirmed (not only stored): a batch cut off mid-answer would be sent again.
            await _until(lambda: observer.counts[("fhir", "sent")] == 20)
            repository.down()
            for record in records[20:]:
                sink.write(record)
            await sink.durable()
        finally:
            await sink.aclose()

    async def second_run() -> None:
        sink = _sink(snapshot, tmp_path)  # a new sink on the same directory
        try:
            await _until(lambda: len(repository.stored) == len(records), message="resumed")
        finally:
            await sink.aclose()

    _run(first_run)
    assert len(repository.stored) == 20
    queued = b"".join(p.read_bytes() for p in sorted(queue_dir.glob("*.q")))
    assert all(r["audit_id"].encode() in queued for r in records[20:])
    assert (queue_dir.stat().st_mode & 0o777) == 0o700
    repository.up()
    _run(second_run)  # started without any new record: what is queued goes by itself
    arrivals = repository.arrivals
    assert sorted(arrivals) == sorted(r["audit_id"] for r in records), "each exactly once"
    assert arrivals == [r["audit_id"] for r in records]
    assert not list(queue_dir.glob("*.q")), "everything confirmed: no segment is left"


def test_a_graceful_stop_sends_what_is_queued(tmp_path: Path, pki: TestPKI,
                                              repository: AuditRepository) -> None:
    snapshot = _snapshot(tmp_path, pki, repository.url, batch_size=50, flush_seconds=60)
    records = [_request(index) for index in range(7)]

    async def body() -> None:
        sink = _sink(snapshot, tmp_path)
        for record in records:
            sink.write(record)
        await asyncio.sleep(0.3)
        assert repository.stored == {}  # not due yet
        await sink.aclose()

    _run(body)
    assert repository.arrivals == [r["audit_id"] for r in records]


def test_durable_returns_once_the_records_are_on_disk(tmp_path: Path, pki: TestPKI) -> None:
    snapshot = _snapshot(tmp_path, pki, "https://localhost:9/fhir")  # nobody listens

    async def body() -> None:
        sink = _sink(snapshot, tmp_path)
        try:
            for index in range(3):
                sink.write(_request(index))
            started = time.monotonic()
            await sink.durable()
            assert time.monotonic() - started < 1.0  # one group fsync: at most ~200 ms
            lines = b"".join(p.read_bytes() for p in (tmp_path / "audit-queue").glob("*.q"))
            assert lines.count(b"\n") == 3
            await sink.durable()  # nothing new: at once
        finally:
            await sink.aclose()

    _run(body)


def test_a_torn_last_line_from_a_crash_is_skipped(tmp_path: Path, pki: TestPKI,
                                                  repository: AuditRepository,
                                                  logs: Logs) -> None:
    snapshot = _snapshot(tmp_path, pki, repository.url, flush_seconds=0.05)
    queue_dir = tmp_path / "audit-queue"
    queue_dir.mkdir(mode=0o700)
    records = [_request(index) for index in range(2)]
    lines = b"".join(json.dumps({"record": r}).encode() + b"\n" for r in records)
    (queue_dir / "000000000001.q").write_bytes(lines + b'{"record": {"audit_id": "x')

    async def body() -> None:
        sink = _sink(snapshot, tmp_path)
        try:
            await _until(lambda: len(repository.stored) == 2)
        finally:
            await sink.aclose()

    _run(body)
    assert logs.events("audit_queue_torn")
    assert not list((queue_dir / "rejected").iterdir())


def test_a_full_queue_refuses_counts_and_logs_then_recovers(
        tmp_path: Path, pki: TestPKI, repository: AuditRepository, logs: Logs) -> None:
    snapshot = _snapshot(tmp_path, pki, repository.url, max_queue_bytes=65536,
                         flush_seconds=0.05)
    observer = Observer()
    trail = AuditTrail(tmp_path, lambda: snapshot, observer)

    async def body() -> None:
        repository.down()
        trail.configure(snapshot)
        try:
            kept = 0
            while trail.record(_request(kept)):
                kept += 1
                assert kept < 1000
            assert 65536 - 1000 < observer.queue_bytes[-1] <= 65536  # full up to a record
            assert not trail.accepting()
            with pytest.raises(AuditQueueFull):
                trail.sinks[0].write(_request(0))
            repository.up()
            await _until(lambda: len(repository.stored) == kept, message="the backlog")
            await _until(trail.accepting, message="room again")
            assert trail.record(_request(1))
        finally:
            await trail.aclose()

    _run(body)
    assert observer.counts[("fhir", "full")] == 1  # counted once per refused record
    assert observer.counts[("fhir", "failed")] == 0
    assert max(observer.queue_bytes) <= 65536
    [full] = logs.events("audit_queue_full")
    assert "max_queue_bytes 65536" in full["message"]


def test_a_reload_with_new_sink_settings_keeps_one_sink_per_directory(
        tmp_path: Path, pki: TestPKI, repository: AuditRepository) -> None:
    first = _snapshot(tmp_path, pki, repository.url, batch_size=5)
    second = _snapshot(tmp_path, pki, repository.url, batch_size=7)
    trail = AuditTrail(tmp_path, lambda: second, None)

    async def body() -> None:
        trail.configure(first)
        sink = trail.sinks[0]
        trail.configure(second)
        try:
            assert trail.sinks[0] is sink and isinstance(sink, FhirQueue)
            assert sink.settings.batch_size == 7
            await trail.close_retired()
            assert trail.record(_request(1))
            await _until(lambda: len(repository.stored) == 1)
        finally:
            await trail.aclose()

    _run(body)


# --- the leg to the repository: TLS, credentials, egress ------------------------------------


def test_the_repository_leg_uses_exactly_the_destinations_tls_policy(
        tmp_path: Path, pki: TestPKI, logs: Logs) -> None:
    with AuditRepository(pki.server_from_other_ca(name="audit-repository-other-ca")) as repo:
        snapshot = _snapshot(tmp_path, pki, repo.url, flush_seconds=0.05)

        async def body() -> None:
            sink = _sink(snapshot, tmp_path)
            try:
                sink.write(_request(1))
                await _until(lambda: logs.events("audit_delivery_failed"))
            finally:
                await sink.aclose()

        _run(body)
        assert repo.state.bodies == []
    assert "CERTIFICATE_VERIFY_FAILED" in logs.events("audit_delivery_failed")[0]["message"]
    assert list((tmp_path / "audit-queue").glob("*.q")), "the record stays queued"


def test_a_refused_bearer_token_is_dropped_and_the_batch_retried_once(
        tmp_path: Path, pki: TestPKI, logs: Logs) -> None:
    revoked: set[str] = set()
    (tmp_path / "client-secret").write_text(CLIENT_SECRET + "\n")
    with TokenServer(pki.server(name="audit-idp"), "sidecar-audit", CLIENT_SECRET) as idp, \
            AuditRepository(pki.server(name="audit-repository"), auth=bearer_token_check(
                lambda token: idp.is_valid(token) and token not in revoked)) as repo:
        oauth = {"oauth": {"idp": {
            "token_url": idp.token_url, "client_id": "sidecar-audit",
            "client_secret_file": "client-secret",
            "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}}}
        snapshot = _snapshot(tmp_path, pki, repo.url, auth={"oauth": "idp"}, extra=oauth,
                             flush_seconds=0.05)
        records = [_request(index) for index in range(6)]

        async def body() -> None:
            sink = _sink(snapshot, tmp_path)
            try:
                for record in records[:3]:
                    sink.write(record)
                await _until(lambda: len(repo.stored) == 3)
                assert idp.issued == 1
                revoked.update(a.removeprefix("Bearer ") for a in repo.state.authorizations
                               if a)
                for record in records[3:]:
                    sink.write(record)
                await _until(lambda: len(repo.stored) == 6)
            finally:
                await sink.aclose()
                for source in snapshot.token_sources.values():
                    await source.aclose()

        _run(body)
        assert idp.issued == 2  # one new token, one retry: no failure was logged
        assert logs.events("audit_delivery_failed") == []
        tokens = {a.removeprefix("Bearer ") for a in repo.state.authorizations if a}
        assert len(tokens) == 2
        _assert_nowhere(tmp_path, repo, logs, [CLIENT_SECRET, *tokens])


def test_no_secret_in_any_auditevent_queue_file_or_log(
        tmp_path: Path, pki: TestPKI, repository: AuditRepository, logs: Logs) -> None:
    snapshot = _snapshot(tmp_path, pki, repository.url, flush_seconds=0.05)
    records = [_request(index, method=m, path=p, query=q, body=b)
               for index, (m, p, q, b, *_) in enumerate(INTERACTIONS)]
    records.append(admin_record("login", result="failure", client="10.9.9.9", via="token"))
    repository.state.refuse_ids = {records[3]["audit_id"]}  # so rejected/ has content

    async def body() -> None:
        sink = _sink(snapshot, tmp_path)
        try:
            repository.down()
            for record in records:
                sink.write(record)
            await _until(lambda: logs.events("audit_delivery_failed"))
            repository.up()
            await _until(lambda: len(repository.stored) == len(records) - 1)
            await _until(lambda: list((tmp_path / "audit-queue" / "rejected").iterdir()))
        finally:
            await sink.aclose()

    _run(body)
    basic = base64.b64encode(f"{WRITER}:{WRITER_PASSWORD}".encode()).decode()
    # The repository did get the credentials: the check below is not vacuous.
    assert set(repository.state.authorizations) == {f"Basic {basic}"}
    _assert_nowhere(tmp_path, repository, logs, [WRITER_PASSWORD, basic, QUERY_WORD])


def test_the_repository_leg_tunnels_through_the_egress_proxy(
        tmp_path: Path, pki: TestPKI, repository: AuditRepository, logs: Logs) -> None:
    (tmp_path / "proxy-password").write_text(PROXY_PASSWORD + "\n")
    with Tinyproxy(tmp_path / "proxy", auth=(PROXY_USER, PROXY_PASSWORD)) as proxy:
        egress = {"egress_proxies": {"corp": {"url": proxy.url, "username": PROXY_USER,
                                              "password_file": "proxy-password"}}}
        snapshot = _snapshot(tmp_path, pki, repository.url, extra=egress, via="corp",
                             flush_seconds=0.05)

        async def body() -> None:
            sink = _sink(snapshot, tmp_path)
            try:
                sink.write(_request(1))
                await _until(lambda: len(repository.stored) == 1)
            finally:
                await sink.aclose()

        _run(body)
        assert f"localhost:{repository.port}" in proxy.connects()
    _assert_nowhere(tmp_path, repository, logs, [PROXY_PASSWORD])


def _assert_nowhere(state_dir: Path, repository: AuditRepository, logs: Logs,
                    secrets: list[str]) -> None:
    events = json.dumps(list(repository.stored.values()), ensure_ascii=False)
    files = {path: path.read_bytes().decode("utf-8", "replace")
             for path in (state_dir / "audit-queue").rglob("*") if path.is_file()}
    assert files and events != "[]"
    for secret in secrets:
        forms = {secret, base64.b64encode(secret.encode()).decode()}
        for form in forms:
            assert form not in events
            for path, text in files.items():
                assert form not in text, path
            assert all(form not in line for line in logs.lines)


# --- the real sidecar ------------------------------------------------------------------------


def test_nothing_lost_500_requests_across_an_outage_and_a_graceful_restart(
        tmp_path: Path, pki: TestPKI, repository: AuditRepository,
        upstream_good: FhirTestServer) -> None:
    """Issue 28 §4: the repository down for part of the run, the sidecar stopped with SIGTERM
    and started again in the middle; then exactly 500 AuditEvents and 500 file lines."""
    (tmp_path / "upstream-password").write_text(UPSTREAM_PASSWORD + "\n")
    (tmp_path / "writer-password").write_text(WRITER_PASSWORD + "\n")
    config: dict[str, Any] = {
        "admin": {"listen": None},
        "shutdown": {"drain_seconds": 0},
        "basic_auth": {
            "hosp": {"username": UPSTREAM_USER, "password_file": "upstream-password"},
            "writer": {"username": WRITER, "password_file": "writer-password"}},
        "connections": {"ehr": {
            "url": upstream_good.base_url, "listen": f"127.0.0.1:{free_port()}",
            "auth": {"basic": "hosp"},
            "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}},
        "audit": {"file": "audit/audit.jsonl", "fhir": {
            "url": repository.url, "auth": {"basic": "writer"},
            "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)},
            "batch_size": 50, "flush_seconds": 0.2}},
    }
    sent = 0

    def requests(sidecar: RunningSidecar, count: int) -> None:
        nonlocal sent
        with httpx.Client(trust_env=False, timeout=30) as app:
            for _ in range(count):
                response = app.get(f"{sidecar.base}/Patient/{sent % 7}",
                                   headers={"X-Request-ID": f"e2e-{sent}"})
                assert response.status_code in (200, 404)
                sent += 1

    with running_sidecar(tmp_path, config) as sidecar:
        requests(sidecar, 150)
        repository.down()
        requests(sidecar, 100)
        sidecar.stop()  # SIGTERM while the repository is unreachable; exits 0
    assert len(repository.stored) < 250
    with running_sidecar(tmp_path, config) as sidecar:
        requests(sidecar, 100)
        repository.up()
        requests(sidecar, 150)
        wait_until(lambda: len([e for e in repository.stored.values()
                                if e["type"]["code"] == "rest"]) >= 500,
                   timeout=30, message="500 AuditEvents")
        state_dir = sidecar.process.state_dir
    lines = (state_dir / "audit" / "audit.jsonl").read_text().splitlines()
    file_ids = {record["audit_id"] for record in map(json.loads, lines)
                if record["kind"] == "request"}
    stored_ids = {event_id for event_id, event in repository.stored.items()
                  if event["type"]["code"] == "rest"}
    assert len(file_ids) == 500 and stored_ids == file_ids
    request_ids = {entity["what"]["identifier"]["value"]
                   for event in repository.stored.values()
                   for entity in _entities(event, BALP_ENTITY, "XrequestId")}
    assert request_ids >= {f"e2e-{n}" for n in range(500)}

"""The audit trail's file (issue 28): one record per proxied request and per admin action,
in JSON lines in the state directory, with nothing a secret or a query string could hide in.

Real sidecars, a real TLS FHIR upstream and real clients; what was written to disk is read
back and searched.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.constants import UPSTREAM_PASSWORD, UPSTREAM_USER
from support.pki import TestPKI
from support.raw_client import get as raw_get
from support.sidecar_process import free_port, wait_until
from support.sidecars import RunningSidecar, StartSidecar

from sidecar.audit.file_sink import AuditFile
from sidecar.audit.interactions import classify
from sidecar.testkit.fhir_server import FhirTestServer

ADMIN_TOKEN = "audit-admin-token-Wm39"
PATIENT_NAME_IN_QUERY = "Zebedee-Quux"


def _config(upstream: FhirTestServer, pki: TestPKI, **audit: Any) -> dict[str, Any]:
    return {
        "admin": {"listen": f"127.0.0.1:{free_port()}", "token_file": "admin-token"},
        "basic_auth": {"hosp": {"username": UPSTREAM_USER, "password_file": "pw"}},
        "connections": {"ehr": {
            "url": upstream.base_url, "listen": f"127.0.0.1:{free_port()}",
            "auth": {"basic": "hosp"},
            "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}},
        "audit": {"file": "audit/audit.jsonl", **audit},
    }


def _start(tmp: Path, upstream: FhirTestServer, pki: TestPKI, start_sidecar: StartSidecar,
           **audit: Any) -> RunningSidecar:
    (tmp / "pw").write_text(UPSTREAM_PASSWORD + "\n")
    (tmp / "admin-token").write_text(ADMIN_TOKEN + "\n")
    return start_sidecar(_config(upstream, pki, **audit), directory=tmp)


def _audit_file(sidecar: RunningSidecar) -> Path:
    return sidecar.process.state_dir / "audit" / "audit.jsonl"


def _records(sidecar: RunningSidecar) -> list[dict[str, Any]]:
    path = _audit_file(sidecar)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _requests(sidecar: RunningSidecar) -> list[dict[str, Any]]:
    return [r for r in _records(sidecar) if r["kind"] == "request"]


def test_every_request_is_one_record_with_interaction_patient_and_outcome(
        tmp_path: Path, pki: TestPKI, upstream_good: FhirTestServer,
        start_sidecar: StartSidecar) -> None:
    sidecar = _start(tmp_path, upstream_good, pki, start_sidecar)
    base = sidecar.base
    calls = [
        ("GET", "/Patient/123", {}, "read", "Patient", "123", "Patient/123"),
        ("GET", "/Observation", {"patient": "Patient/77", "name": PATIENT_NAME_IN_QUERY},
         "search-type", "Observation", None, "Patient/77"),
        ("GET", "/Patient", {"_id": "9", "family": PATIENT_NAME_IN_QUERY},
         "search-type", "Patient", None, "Patient/9"),
        ("GET", "/metadata", {}, "capabilities", None, None, None),
        ("GET", "/Patient/123/_history/2", {}, "vread", "Patient", "123", "Patient/123"),
    ]
    with httpx.Client(trust_env=False, timeout=30) as app:
        for method, path, params, *_ in calls:
            app.request(method, base + path, params=params,
                        headers={"X-Request-ID": f"req-{path.count('/')}-{len(params)}"})
    wait_until(lambda: len(_requests(sidecar)) == len(calls), message="one record each")
    records = _requests(sidecar)
    for record, (_, _, _, interaction, rtype, rid, patient) in zip(records, calls, strict=True):
        assert record["interaction"] == interaction
        assert record["resource_type"] == rtype and record["resource_id"] == rid
        assert record["patient"] == patient
        assert record["connection"] == "ehr" and record["credential"] == "hosp"
        assert record["caller"] == "127.0.0.1"
        assert isinstance(record["status"], int)
        assert re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", record["audit_id"])
    assert len({r["audit_id"] for r in records}) == len(records)
    assert records[0]["request_id"] == "req-2-0"
    # The file is the sidecar's own: 0600, in the state directory.
    assert stat.S_IMODE(os.stat(_audit_file(sidecar)).st_mode) == 0o600
    text = _audit_file(sidecar).read_text()
    # Never the query string (it can carry patient data), the password or the header.
    basic = base64.b64encode(f"{UPSTREAM_USER}:{UPSTREAM_PASSWORD}".encode()).decode()
    for secret in (PATIENT_NAME_IN_QUERY, UPSTREAM_PASSWORD, basic, "Authorization"):
        assert secret not in text


def test_refusals_are_recorded_with_the_error_kind(
        tmp_path: Path, pki: TestPKI, upstream_good: FhirTestServer,
        start_sidecar: StartSidecar) -> None:
    sidecar = _start(tmp_path, upstream_good, pki, start_sidecar)
    assert raw_get(sidecar.port, "/Patient/1", Host="attacker.example").status == 421
    assert raw_get(sidecar.port, "/fhir/../../etc/passwd", Host="localhost").status == 400
    wait_until(lambda: len(_requests(sidecar)) == 2, message="two records")
    errors = {r["error"] for r in _requests(sidecar)}
    assert errors == {"misdirected", "bad-request"}


def test_admin_actions_logins_changes_tests_and_reloads_are_recorded(
        tmp_path: Path, pki: TestPKI, upstream_good: FhirTestServer,
        start_sidecar: StartSidecar) -> None:
    sidecar = _start(tmp_path, upstream_good, pki, start_sidecar)
    admin = sidecar.admin_url
    new_secret = "made-in-the-api-Qx81"
    with httpx.Client(base_url=admin, trust_env=False, timeout=30) as client:
        assert client.post("/login", data={"token": "wrong"}).status_code == 401
        # After a wrong token, the next attempt is considered after a short wait (429).
        wait_until(lambda: client.post("/login", data={"token": ADMIN_TOKEN}).status_code
                   in (200, 303), 10, interval=0.2, message="the login after the wait")
        bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        assert client.put("/api/basic-auth/new", json={"username": "u", "password": new_secret},
                          headers=bearer).status_code == 201
        assert client.put("/api/basic-auth/new", json={"username": "u2"},
                          headers=bearer).status_code == 200
        assert client.delete("/api/basic-auth/new", headers=bearer).status_code == 204
        assert client.get("/api/connections", headers={
            "Authorization": "Bearer wrong-token"}).status_code in (200, 401)
        assert client.post("/api/connections/ehr/test", headers=bearer).status_code == 200
    # Each API change was a reload; SIGHUP is one more.
    changed = len([r for r in _records(sidecar) if r["kind"] == "reload"])
    assert changed >= 3
    sidecar.process.signal(signal.SIGHUP)
    wait_until(lambda: len([r for r in _records(sidecar) if r["kind"] == "reload"]) > changed,
               message="the reload record")
    records = _records(sidecar)
    logins = [r for r in records if r["kind"] == "login"]
    assert {"result": "failure", "client": "127.0.0.1", "via": "session"}.items() <= \
        logins[0].items()
    assert logins[1]["result"] == "success"
    changes = [(r["object"], r["action"], r["via"]) for r in records if r["kind"] == "change"]
    assert changes == [("basic-auth/new", "created", "token"),
                       ("basic-auth/new", "replaced", "token"),
                       ("basic-auth/new", "deleted", "token")]
    tests = [r for r in records if r["kind"] == "test"]
    assert tests and tests[0]["object"] == "connections/ehr" and tests[0]["result"] == "success"
    reload = [r for r in records if r["kind"] == "reload"][-1]
    config_bytes = sidecar.config_path.read_bytes()
    assert reload["config_sha256"] == hashlib.sha256(config_bytes).hexdigest()
    assert reload["result"] == "success"
    text = _audit_file(sidecar).read_text()
    for secret in (new_secret, ADMIN_TOKEN, UPSTREAM_PASSWORD,
                   base64.b64encode(new_secret.encode()).decode()):
        assert secret not in text


def test_a_rejected_reload_is_recorded_with_the_files_hash(
        tmp_path: Path, pki: TestPKI, upstream_good: FhirTestServer,
        start_sidecar: StartSidecar) -> None:
    sidecar = _start(tmp_path, upstream_good, pki, start_sidecar)
    bad = sidecar.config_path.read_text() + "\nunknown_key: 1\n"
    sidecar.config_path.write_text(bad)
    wait_until(lambda: any(r["kind"] == "reload" for r in _records(sidecar)), 10,
               message="the rejected reload's record")
    [reload] = [r for r in _records(sidecar) if r["kind"] == "reload"]
    assert reload == {**reload, "result": "failure",
                      "config_sha256": hashlib.sha256(bad.encode()).hexdigest()}


def test_redacted_request_paths_leave_ids_only_in_the_audit_trail(
        tmp_path: Path, pki: TestPKI, upstream_good: FhirTestServer,
        start_sidecar: StartSidecar) -> None:
    (tmp_path / "pw").write_text(UPSTREAM_PASSWORD + "\n")
    (tmp_path / "admin-token").write_text(ADMIN_TOKEN + "\n")
    config = _config(upstream_good, pki)
    config["logging"] = {"request_paths": "redacted"}
    sidecar = start_sidecar(config, directory=tmp_path)
    httpx.get(f"{sidecar.base}/Patient/secret-id-4711", trust_env=False, timeout=30)
    line = sidecar.process.wait_for_event("request")
    assert line["path"] == "/fhir/Patient/:id"
    assert "secret-id-4711" not in sidecar.process.output
    wait_until(lambda: _requests(sidecar), message="the record")
    assert _requests(sidecar)[0]["resource_id"] == "secret-id-4711"


def test_required_audit_answers_after_the_record_is_on_disk_and_refuses_without_it(
        tmp_path: Path, pki: TestPKI, upstream_good: FhirTestServer,
        start_sidecar: StartSidecar) -> None:
    sidecar = _start(tmp_path, upstream_good, pki, start_sidecar, required=True)
    response = httpx.get(f"{sidecar.base}/Patient/example", trust_env=False, timeout=30)
    assert response.status_code == 200
    # On disk by the time the app has its answer: no waiting needed.
    assert [r["resource_id"] for r in _requests(sidecar)] == ["example"]


def test_required_audit_refuses_when_the_record_cannot_be_kept(
        tmp_path: Path, pki: TestPKI, upstream_good: FhirTestServer,
        start_sidecar: StartSidecar) -> None:
    # A file where the audit directory should be: no record can be written.
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "audit").write_text("not a directory")
    sidecar = _start(tmp_path, upstream_good, pki, start_sidecar, required=True)
    seen = len(upstream_good.requests_seen)
    response = httpx.get(f"{sidecar.base}/Patient/example", trust_env=False, timeout=30)
    assert response.status_code == 503
    assert response.headers["X-Sidecar-Error"] == "audit-unavailable"
    assert len(upstream_good.requests_seen) == seen  # nothing went upstream
    # Once the disk is usable again, requests go through (and are recorded).
    (tmp_path / "state" / "audit").unlink()
    wait_until(lambda: httpx.get(f"{sidecar.base}/Patient/example", trust_env=False,
                                 timeout=30).status_code == 200, 10, interval=0.2,
               message="requests after the disk came back")
    assert any(r.get("resource_id") == "example" for r in _requests(sidecar))
    failed = [line for line in httpx.get(f"{sidecar.admin_url}/metrics", trust_env=False,
                                         timeout=10).text.splitlines()
              if line.startswith('fhir_sidecar_audit_records_total{result="failed",sink="file"}')
              or line.startswith('fhir_sidecar_audit_records_total{sink="file",result="failed"}')]
    assert failed and float(failed[0].rsplit(" ", 1)[1]) >= 1


def test_the_file_rotates_by_size_and_keeps_every_record(tmp_path: Path) -> None:
    sink = AuditFile(tmp_path / "a" / "audit.jsonl", max_bytes=4096, keep=0)
    for index in range(200):
        sink.write({"kind": "request", "n": index, "pad": "x" * 40})
    sink.sync()
    files = sorted((tmp_path / "a").iterdir())
    assert len(files) > 3
    numbers = sorted(json.loads(line)["n"] for f in files
                     for line in f.read_text().splitlines())
    assert numbers == list(range(200))  # keep: 0 deletes nothing
    assert all(f.stat().st_size <= 4096 for f in files)
    kept = AuditFile(tmp_path / "b" / "audit.jsonl", max_bytes=4096, keep=2)
    for index in range(200):
        kept.write({"kind": "request", "n": index, "pad": "x" * 40})
    assert len(list((tmp_path / "b").iterdir())) == 3  # the file and two rotated ones


@pytest.mark.parametrize(("method", "path", "query", "body", "expected"), [
    ("GET", "/Patient/1", "", b"", "read"),
    ("GET", "/Patient/1/_history/3", "", b"", "vread"),
    ("PUT", "/Patient/1", "", b"", "update"),
    ("PATCH", "/Patient/1", "", b"", "patch"),
    ("DELETE", "/Patient/1", "", b"", "delete"),
    ("GET", "/Patient/1/_history", "", b"", "history-instance"),
    ("GET", "/Patient/_history", "", b"", "history-type"),
    ("GET", "/_history", "", b"", "history-system"),
    ("POST", "/Patient", "", b"{}", "create"),
    ("GET", "/Patient", "name=x", b"", "search-type"),
    ("POST", "/Patient/_search", "", b"name=x", "search-type"),
    ("GET", "/", "_type=Patient", b"", "search-system"),
    ("GET", "/metadata", "", b"", "capabilities"),
    ("POST", "/", "", b'{"resourceType":"Bundle","type":"transaction"}', "transaction"),
    ("POST", "/", "", b'{"resourceType": "Bundle", "type": "batch"}', "batch"),
    ("POST", "/Patient/1/$everything", "", b"", "operation"),
    ("GET", "/$export", "", b"", "operation"),
])
def test_every_interaction_kind_is_told_apart(method: str, path: str, query: str, body: bytes,
                                              expected: str) -> None:
    assert classify(method, path, query, body).interaction == expected


def test_without_an_audit_section_nothing_is_written(
        tmp_path: Path, pki: TestPKI, upstream_good: FhirTestServer,
        start_sidecar: StartSidecar) -> None:
    (tmp_path / "pw").write_text(UPSTREAM_PASSWORD + "\n")
    (tmp_path / "admin-token").write_text(ADMIN_TOKEN + "\n")
    config = _config(upstream_good, pki)
    del config["audit"]
    sidecar = start_sidecar(config, directory=tmp_path)
    assert httpx.get(f"{sidecar.base}/Patient/example", trust_env=False,
                     timeout=30).status_code == 200
    sidecar.stop()
    assert not (sidecar.process.state_dir / "audit").exists()


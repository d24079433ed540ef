"""The test upstreams are real servers: TLS, Basic auth, FHIR answers, streaming, shutdown."""

from __future__ import annotations

import hashlib
import http.client
import json
import ssl
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from support.constants import EXPECTED_BASIC, UPSTREAM_PASSWORD, UPSTREAM_USER
from support.fhir_bodies import expected_sha256, large_body_chunks
from support.fhir_routes import fhir_upstream
from support.pki import ClientIdentity, TestPKI
from support.tls import (
    CERT_EXPIRED,
    HOSTNAME_MISMATCH,
    UNKNOWN_ISSUER,
    client_context,
    verification_error,
)

from sidecar.testkit.fhir_server import FhirTestServer

FHIR_JSON = "application/fhir+json"
GOOD_AUTH = httpx.BasicAuth(UPSTREAM_USER, UPSTREAM_PASSWORD)


def client(
    ca_bundle: Path | None,
    *,
    auth: httpx.Auth | None = GOOD_AUTH,
    identity: ClientIdentity | None = None,
) -> httpx.Client:
    return client_with(client_context(ca_bundle, identity=identity), auth=auth)


def client_with(context: ssl.SSLContext, *, auth: httpx.Auth | None = GOOD_AUTH) -> httpx.Client:
    # trust_env=False: neither proxy nor CA variables of this machine may take part.
    return httpx.Client(verify=context, trust_env=False, auth=auth, timeout=5.0)


def test_good_upstream_answers_with_the_right_credentials(
    upstream_good: FhirTestServer, pki: TestPKI
) -> None:
    with client(pki.ca_bundle_path) as http:
        response = http.get(f"{upstream_good.base_url}/metadata")

    assert response.status_code == 200
    assert response.headers["content-type"] == FHIR_JSON
    assert response.json()["resourceType"] == "CapabilityStatement"
    [seen] = upstream_good.requests_seen
    assert (seen.method, seen.path, seen.body_length) == ("GET", "/fhir/metadata", 0)
    assert seen.headers["Authorization"] == EXPECTED_BASIC


@pytest.mark.parametrize(
    "auth",
    [
        None,
        httpx.BasicAuth(UPSTREAM_USER, "wrong"),
        # The right password, but Latin-1 encoded: must be refused, Basic here is UTF-8.
        httpx.BasicAuth(UPSTREAM_USER.encode(), UPSTREAM_PASSWORD.encode("latin-1")),
    ],
    ids=["none", "wrong-password", "latin-1"],
)
def test_missing_or_wrong_credentials_get_401_operation_outcome(
    upstream_good: FhirTestServer, pki: TestPKI, auth: httpx.Auth | None
) -> None:
    with client(pki.ca_bundle_path, auth=auth) as http:
        response = http.get(f"{upstream_good.base_url}/Patient/example")

    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Basic ")
    assert response.headers["content-type"] == FHIR_JSON
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "login"
    assert "wrong" not in response.text


@pytest.mark.parametrize(
    ("upstream", "verify_code", "tls_that_accepts_it"),
    [
        ("upstream_other_ca", UNKNOWN_ISSUER, lambda pki: client_context(pki.other_ca_bundle_path)),
        (
            "upstream_wrong_host",
            HOSTNAME_MISMATCH,
            lambda pki: client_context(pki.ca_bundle_path, check_hostname=False),
        ),
        ("upstream_expired", CERT_EXPIRED, lambda pki: client_context(None, verify=False)),
    ],
)
def test_bad_certificates_fail_verification_for_their_one_reason(
    request: pytest.FixtureRequest,
    pki: TestPKI,
    upstream: str,
    verify_code: int,
    tls_that_accepts_it: Callable[[TestPKI], ssl.SSLContext],
) -> None:
    server: FhirTestServer = request.getfixturevalue(upstream)

    with client(pki.ca_bundle_path) as http, pytest.raises(httpx.ConnectError) as caught:
        http.get(f"{server.base_url}/metadata")
    error = verification_error(caught.value)
    assert error is not None, caught.value
    assert error.verify_code == verify_code, error.verify_message
    assert server.requests_seen == []

    # Relaxing exactly the broken aspect makes the same server answer: nothing else is wrong.
    with client_with(tls_that_accepts_it(pki)) as http:
        assert http.get(f"{server.base_url}/metadata").status_code == 200


def test_mtls_upstream_refuses_a_client_without_certificate(
    upstream_mtls: FhirTestServer, pki: TestPKI
) -> None:
    # With TLS 1.3 the client learns of the refusal only when it reads, so any transport
    # error (handshake, read or disconnect) is the expected outcome.
    with client(pki.ca_bundle_path) as http, pytest.raises(httpx.TransportError):
        http.get(f"{upstream_mtls.base_url}/metadata")
    assert upstream_mtls.requests_seen == []


def test_mtls_upstream_accepts_the_client_identity(
    upstream_mtls: FhirTestServer, pki: TestPKI
) -> None:
    with client(pki.ca_bundle_path, identity=pki.client_identity()) as http:
        response = http.get(f"{upstream_mtls.base_url}/Patient/example")
    assert response.status_code == 200
    assert response.json()["id"] == "example"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_large_download_streams_the_deterministic_pattern(
    upstream_good: FhirTestServer, pki: TestPKI, chunked: bool
) -> None:
    size = 5 * 1024 * 1024 + 123  # not a multiple of the chunk size
    url = f"{upstream_good.base_url}/Binary/large?size={size}" + ("&chunked=1" if chunked else "")
    digest = hashlib.sha256()
    received = 0
    with client(pki.ca_bundle_path) as http, http.stream("GET", url) as response:
        assert response.status_code == 200
        if chunked:
            assert response.headers["transfer-encoding"] == "chunked"
            assert "content-length" not in response.headers
        else:
            assert response.headers["content-length"] == str(size)
        for piece in response.iter_bytes():
            digest.update(piece)
            received += len(piece)
    assert received == size
    assert digest.hexdigest() == expected_sha256(size)


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_digest_endpoint_reads_the_whole_upload(
    upstream_good: FhirTestServer, pki: TestPKI, chunked: bool
) -> None:
    payload = b"".join(large_body_chunks(300_007))
    # httpx frames an iterator with Transfer-Encoding: chunked, bytes with Content-Length.
    content = _pieces(payload, 10_000) if chunked else payload
    with client(pki.ca_bundle_path) as http:
        response = http.post(f"{upstream_good.base_url}/Binary/digest", content=content)

    assert response.status_code == 200
    assert response.json() == {
        "length": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    [seen] = upstream_good.requests_seen
    assert seen.body_length == len(payload)
    assert ("transfer-encoding" in seen.headers) is chunked


def test_patients_can_be_created_read_and_searched(
    upstream_good: FhirTestServer, pki: TestPKI
) -> None:
    base = upstream_good.base_url
    # The upstream lives for the whole session: a name no other run of this test has used,
    # so a rerun (or another test's patient) cannot add a second match.
    family = f"Zyxwort{uuid.uuid4().hex}"
    new = {"resourceType": "Patient", "name": [{"family": family, "given": ["Ada"]}]}
    with client(pki.ca_bundle_path) as http:
        created = http.post(f"{base}/Patient", json=new)
        patient_id = created.json()["id"]
        read = http.get(f"{base}/Patient/{patient_id}")
        found = http.get(f"{base}/Patient", params={"name": family[:-8].lower()})
        missing = http.get(f"{base}/Patient/does-not-exist")

    assert created.status_code == 201
    assert created.headers["location"] == f"{base}/Patient/{patient_id}/_history/1"
    assert read.status_code == 200
    assert read.json()["name"] == new["name"]
    bundle = found.json()
    assert (bundle["resourceType"], bundle["total"]) == ("Bundle", 1)
    assert bundle["entry"][0]["fullUrl"] == f"{base}/Patient/{patient_id}"
    assert bundle["link"][0]["url"].startswith(f"{base}/Patient?")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == FHIR_JSON
    assert missing.json()["issue"][0]["code"] == "not-found"


def test_status_endpoint_and_paths_outside_the_base(
    upstream_good: FhirTestServer, pki: TestPKI
) -> None:
    base = upstream_good.base_url
    with client(pki.ca_bundle_path) as http:
        teapot = http.get(f"{base}/status/418")
        empty = http.get(f"{base}/status/204")
        outside = http.get(base.replace("/fhir", "/fhir-other") + "/metadata")

    assert teapot.status_code == 418
    assert teapot.json()["resourceType"] == "OperationOutcome"
    assert (empty.status_code, empty.content) == (204, b"")
    assert outside.status_code == 404


def test_keep_alive_survives_a_request_body_the_route_ignores(
    upstream_good: FhirTestServer, pki: TestPKI
) -> None:
    connection = http.client.HTTPSConnection(
        "localhost", upstream_good.port, context=client_context(pki.ca_bundle_path), timeout=5
    )
    headers = {"Authorization": EXPECTED_BASIC, "Content-Type": FHIR_JSON}
    try:
        # The status route never reads the body; the server must drain it all the same.
        connection.request("POST", "/fhir/status/200", body=b"{}" * 50_000, headers=headers)
        first = connection.getresponse()
        first.read()
        socket_after_first = connection.sock
        connection.request("GET", "/fhir/Patient/example", headers=headers)
        second = connection.getresponse()
        body = json.loads(second.read())
        # http.client silently reconnects when the server closed: the same socket proves reuse.
        socket_after_second = connection.sock
    finally:
        connection.close()

    assert (first.status, second.status, body["id"]) == (200, 200, "example")
    assert socket_after_first is not None
    assert socket_after_second is socket_after_first
    assert [r.body_length for r in upstream_good.requests_seen] == [100_000, 0]


def test_ambiguous_body_framing_is_refused(upstream_good: FhirTestServer, pki: TestPKI) -> None:
    connection = http.client.HTTPSConnection(
        "localhost", upstream_good.port, context=client_context(pki.ca_bundle_path), timeout=5
    )
    headers = {
        "Authorization": EXPECTED_BASIC,
        "Content-Length": "5",
        "Transfer-Encoding": "chunked",
    }
    try:
        connection.request("POST", "/fhir/Binary/digest", body=b"0\r\n\r\n", headers=headers)
        response = connection.getresponse()
        outcome = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 400
    assert response.getheader("connection") == "close"
    assert outcome["resourceType"] == "OperationOutcome"


def test_slow_endpoint_holds_back_the_headers(upstream_good: FhirTestServer, pki: TestPKI) -> None:
    with client(pki.ca_bundle_path) as http:
        http.timeout = httpx.Timeout(5.0, read=0.3)
        with pytest.raises(httpx.ReadTimeout):
            http.get(f"{upstream_good.base_url}/slow", params={"seconds": "5"})
    assert upstream_good.requests_seen[0].path == "/fhir/slow?seconds=5"


def _connection_threads(of: object | None = None) -> set[threading.Thread]:
    """Connection threads of socketserver servers in this process; with ``of``, only those of
    that server (other tests' servers in the same process may take connections meanwhile)."""
    found = {t for t in threading.enumerate() if "process_request_thread" in t.name}
    if of is None:
        return found
    # The thread's target is the server's bound process_request_thread (threading keeps it
    # until the thread ends).
    return {t for t in found if getattr(getattr(t, "_target", None), "__self__", None) is of}


def test_stop_is_prompt_with_idle_and_waiting_connections(pki: TestPKI) -> None:
    server = fhir_upstream(pki.server(name="server-stop")).start()
    failures: list[BaseException] = []

    def wait_for_slow_answer() -> None:
        try:
            with client(pki.ca_bundle_path, auth=None) as http:
                http.timeout = httpx.Timeout(60.0)
                http.get(f"{server.base_url}/slow", params={"seconds": "30"})
        except httpx.TransportError as exc:
            failures.append(exc)

    idle = client(pki.ca_bundle_path, auth=None)
    waiting = threading.Thread(target=wait_for_slow_answer)
    try:
        assert idle.get(f"{server.base_url}/metadata").status_code == 200  # stays keep-alive
        waiting.start()
        server.wait_for_requests(2, timeout=5.0)
        inner = server._server  # the socketserver whose connection threads must end
        mine = _connection_threads(inner)
        assert len(mine) == 2  # the two connections have their threads

        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 2.0
        waiting.join(timeout=5.0)
        assert not waiting.is_alive()
        assert len(failures) == 1  # the slow request was cut off, not answered
        assert not any(thread.is_alive() for thread in mine)
        assert _connection_threads(inner) == set()
        with pytest.raises(httpx.TransportError):
            idle.get(f"{server.base_url}/metadata")  # the port is closed now
    finally:
        idle.close()
        server.stop()


def test_private_keys_are_readable_by_the_owner_only(pki: TestPKI) -> None:
    server_identity = pki.server(name="server-modes")
    client_identity = pki.client_identity(name="client-modes")
    for key in (server_identity.key, client_identity.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(server_identity.cert_chain.stat().st_mode) == 0o644
    assert server_identity.ca_bundle == pki.ca_bundle_path

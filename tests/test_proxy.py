"""The core sidecar end to end: real TLS upstreams, the real ``fhir-sidecar run`` process and
real clients (httpx, requests, fhirpy) on its listening ports, forward and reverse."""

from __future__ import annotations

import base64
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from fhirpy import SyncFHIRClient
from support.constants import EXPECTED_BASIC, UPSTREAM_PASSWORD, UPSTREAM_USER
from support.pki import TestPKI
from support.sidecar_process import SidecarProcess, free_port
from support.sidecars import StartSidecar
from support.upstreams import UpstreamKind, Upstreams

from sidecar.testkit.fhir_server import FhirTestServer


@dataclass
class Running:
    sidecar: SidecarProcess
    ports: dict[str, int]
    proxy_port: int
    servers: dict[str, FhirTestServer]
    ca_bundle: Path

    def base(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def client(self) -> httpx.Client:
        return httpx.Client(timeout=30, trust_env=False)

    def forward_client(self) -> httpx.Client:
        return httpx.Client(timeout=30, trust_env=False,
                            proxy=f"http://127.0.0.1:{self.proxy_port}")


def _closed_port() -> int:
    port = free_port()
    with socket.socket() as probe:  # nothing listens there: connecting must be refused
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    return port


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI, upstreams: Upstreams,
            start_module_sidecar: StartSidecar) -> Running:
    tmp = Path(tmp_path_factory.mktemp("sidecar"))
    (tmp / "secrets").mkdir()
    (tmp / "secrets" / "upstream-password").write_text(UPSTREAM_PASSWORD + "\n")
    (tmp / "secrets" / "wrong-password").write_text("not-the-password\n")
    client = pki.client_identity()
    custom = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}

    def url(name: UpstreamKind, host: str = "localhost") -> str:
        return f"https://{host}:{upstreams.get(name).port}/fhir"

    connections: dict[str, dict[str, Any]] = {
        "good": {"url": url("good"), "tls": custom},
        "good-skip": {"url": url("good", "127.0.0.1"), "tls": {"verify": "skip"}},
        "good-default": {"url": url("good") + "-default", "tls": {"verify": "default"}},
        "wrong-password": {"url": url("good") + "-wrong", "tls": custom,
                           "auth": {"basic": "wrong"}},
        "other-ca": {"url": url("other_ca"), "tls": custom},
        "other-ca-skip": {"url": url("other_ca", "127.0.0.1"), "tls": {"verify": "skip"}},
        "wrong-host": {"url": url("wrong_host"), "tls": custom},
        "wrong-host-sni": {"url": url("wrong_host", "127.0.0.1"),
                           "tls": {**custom, "server_name": "other.example"}},
        "expired": {"url": url("expired"), "tls": custom},
        "mtls": {"url": url("mtls"), "tls": {**custom, "client_cert": str(client.cert),
                                             "client_key": str(client.key)}},
        "mtls-no-cert": {"url": url("mtls", "127.0.0.1"), "tls": custom},
        "unreachable": {"url": f"https://localhost:{_closed_port()}/fhir", "tls": custom},
        "slow": {"url": url("good", "127.0.0.1"), "tls": custom,
                 "timeout_seconds": 1},
    }
    ports = {}
    for name, conn in connections.items():
        ports[name] = free_port()
        conn["listen"] = f"127.0.0.1:{ports[name]}"
        conn.setdefault("auth", {"basic": "upstream"})
    proxy_port = free_port()
    config = {
        "proxy": {"listen": f"127.0.0.1:{proxy_port}"},
        "admin": {"listen": None},
        "basic_auth": {
            "upstream": {"username": UPSTREAM_USER, "password_file": "secrets/upstream-password"},
            "wrong": {"username": UPSTREAM_USER, "password_file": "secrets/wrong-password"},
        },
        "connections": connections,
    }
    # The default mode must use certifi's bundle only, even when the environment names ours.
    env = {"SSL_CERT_FILE": str(pki.ca_bundle_path), "REQUESTS_CA_BUNDLE": str(pki.ca_bundle_path),
           "CURL_CA_BUNDLE": str(pki.ca_bundle_path)}
    sidecar = start_module_sidecar(config, directory=tmp, env=env)
    servers = {k: upstreams.get(k) for k in ("good", "other_ca", "mtls")}
    return Running(sidecar.process, ports, proxy_port, servers, pki.ca_bundle_path)


def _last_auth(running: Running, name: str = "good") -> str | None:
    seen = running.servers[name].requests_seen
    return seen[-1].headers.get("authorization") if seen else None


def assert_sidecar_error(response: httpx.Response | requests.Response, status: int, kind: str,
                         *words: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/fhir+json"
    assert response.headers["X-Sidecar-Error"] == kind
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    diagnostics: str = body["issue"][0]["diagnostics"]
    for word in words:
        assert word in diagnostics, diagnostics
    return diagnostics


# -- credentials and routing -------------------------------------------------------------------

def test_reverse_read_injects_basic_and_drops_app_credentials(running: Running) -> None:
    with running.client() as client:
        response = client.get(f"{running.base('good')}/Patient/example",
                              headers={"Authorization": "Bearer app-token",
                                       "Proxy-Authorization": "Basic eDp5"})
    assert response.status_code == 200
    assert response.json()["id"] == "example"
    record = running.servers["good"].requests_seen[-1]
    assert record.headers["authorization"] == EXPECTED_BASIC
    assert "proxy-authorization" not in record.headers
    assert record.path == "/fhir/Patient/example"


def test_forward_proxy_with_requests(running: Running) -> None:
    port = running.servers["good"].port
    proxies = {"http": f"http://127.0.0.1:{running.proxy_port}"}
    with requests.Session() as session:
        session.trust_env = False
        response = session.get(f"http://localhost:{port}/fhir/Patient",
                               params={"name": "chalmers"}, proxies=proxies, timeout=30)
    assert response.status_code == 200
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    assert _last_auth(running) == EXPECTED_BASIC


def test_forward_proxy_refuses_unconfigured_hosts_and_paths(running: Running) -> None:
    port = running.servers["good"].port
    before = len(running.servers["good"].requests_seen)
    with running.forward_client() as client:
        other_host = client.get("http://fhir.elsewhere.example/fhir/Patient")
        other_path = client.get(f"http://localhost:{port}/fhirish/Patient")
    assert_sidecar_error(other_host, 403, "no-route", "fhir.elsewhere.example")
    assert_sidecar_error(other_path, 403, "no-route")
    assert len(running.servers["good"].requests_seen) == before
    assert "Basic" not in other_host.text


def test_https_tunnel_is_refused_with_advice(running: Running) -> None:
    port = running.servers["good"].port
    with httpx.Client(trust_env=False, proxy=f"http://127.0.0.1:{running.proxy_port}",
                      verify=False) as client, pytest.raises(httpx.ProxyError) as info:
        client.get(f"https://localhost:{port}/fhir/metadata")
    assert "403" in str(info.value)


def test_fhirpy_read_search_create(running: Running) -> None:
    client = SyncFHIRClient(running.base("good"))
    patient = client.reference("Patient", "example").to_resource()
    assert patient["id"] == "example"
    found = client.resources("Patient").search(name="chalmers").fetch()
    assert len(found) >= 1
    created = client.resource("Patient", name=[{"family": "Sidecar", "given": ["Test"]}])
    created.save()
    assert created.id
    assert _last_auth(running) == EXPECTED_BASIC


def test_post_body_reaches_upstream(running: Running) -> None:
    payload = {"resourceType": "Patient", "name": [{"family": "Posted"}]}
    with running.client() as client:
        response = client.post(f"{running.base('good')}/Patient", json=payload)
    assert response.status_code == 201
    assert response.json()["name"] == payload["name"]
    assert "/Patient/" in response.headers["Location"]


def test_upstream_401_passes_through(running: Running) -> None:
    with running.client() as client:
        response = client.get(f"{running.base('wrong-password')}/Patient/example")
    assert response.status_code == 401
    assert response.json()["resourceType"] == "OperationOutcome"
    assert "X-Sidecar-Error" not in response.headers


def test_request_id_is_kept_or_generated(running: Running) -> None:
    with running.client() as client:
        given = client.get(f"{running.base('good')}/metadata", headers={"X-Request-ID": "abc-1"})
        generated = client.get(f"{running.base('good')}/metadata")
    assert given.headers["X-Request-ID"] == "abc-1"
    assert running.servers["good"].requests_seen[-2].headers["x-request-id"] == "abc-1"
    assert len(generated.headers["X-Request-ID"]) >= 16


# -- TLS modes -----------------------------------------------------------------------------

def test_new_client_connections_resume_the_upstream_tls_session(running: Running) -> None:
    server = running.servers["good"]
    before = len(server.requests_seen)
    for _ in range(4):
        with running.client() as client:  # a new client connection, so a new upstream one
            response = client.get(f"{running.base('good')}/metadata")
        assert response.status_code == 200, response.text
    seen = server.requests_seen[before:]
    assert len(seen) == 4
    # The first may already resume a session left by an earlier test; every later one must.
    assert all(r.tls_resumed for r in seen[1:]), [r.tls_resumed for r in seen]


def test_skip_accepts_any_certificate(running: Running) -> None:
    with running.client() as client:
        assert client.get(f"{running.base('other-ca-skip')}/metadata").status_code == 200
        assert client.get(f"{running.base('good-skip')}/metadata").status_code == 200


def test_custom_rejects_unknown_ca(running: Running) -> None:
    running.servers["other_ca"].clear()
    with running.client() as client:
        response = client.get(f"{running.base('other-ca')}/metadata")
    assert_sidecar_error(response, 502, "upstream-tls", "'other-ca'", "not signed by a CA in",
                         str(running.ca_bundle))
    assert running.servers["other_ca"].requests_seen == []


def test_custom_rejects_wrong_host_unless_server_name_matches(running: Running) -> None:
    with running.client() as client:
        wrong = client.get(f"{running.base('wrong-host')}/metadata")
        with_sni = client.get(f"{running.base('wrong-host-sni')}/metadata")
    assert_sidecar_error(wrong, 502, "upstream-tls", "'wrong-host'", "not valid for the name")
    assert with_sni.status_code == 200


def test_custom_rejects_expired(running: Running) -> None:
    with running.client() as client:
        response = client.get(f"{running.base('expired')}/metadata")
    assert_sidecar_error(response, 502, "upstream-tls", "'expired'", "expired")


def test_default_uses_certifi_only(running: Running) -> None:
    # The sidecar runs with SSL_CERT_FILE & co. naming the private CA that signed this server.
    with running.client() as client:
        response = client.get(f"{running.base('good-default')}/metadata")
    assert_sidecar_error(response, 502, "upstream-tls", "default public CA bundle")


def test_mutual_tls(running: Running) -> None:
    with running.client() as client:
        ok = client.get(f"{running.base('mtls')}/metadata")
        refused = client.get(f"{running.base('mtls-no-cert')}/metadata")
    assert ok.status_code == 200
    assert refused.status_code == 502
    assert refused.headers["X-Sidecar-Error"] in ("upstream-tls", "upstream-unreachable")
    assert running.servers["mtls"].requests_seen[-1].path == "/fhir/metadata"


# -- failures ------------------------------------------------------------------------------

def test_unreachable_upstream(running: Running) -> None:
    with running.client() as client:
        response = client.get(f"{running.base('unreachable')}/metadata")
    assert_sidecar_error(response, 502, "upstream-unreachable", "'unreachable'",
                         "connection refused")


def test_slow_upstream_times_out(running: Running) -> None:
    with running.client() as client:
        response = client.get(f"{running.base('slow')}/slow?seconds=8")
    assert_sidecar_error(response, 504, "upstream-timeout", "'slow'", "within 1 s")
    assert response.elapsed.total_seconds() < 6


# -- logs ------------------------------------------------------------------------------------

def test_log_lines_carry_no_secret_and_no_query(running: Running) -> None:
    # Self-contained: every secret looked for below is sent or used by this test itself.
    app_credentials = {"Authorization": "Bearer app-token", "Proxy-Authorization": "Basic eDp5"}
    with running.client() as client:
        found = client.get(f"{running.base('good')}/Patient",
                           params={"name": "findme-query-value"}, headers=app_credentials)
        refused = client.get(f"{running.base('wrong-password')}/Patient",
                             params={"name": "findme-query-value"}, headers=app_credentials)
    assert found.status_code == 200 and refused.status_code == 401
    record = running.sidecar.wait_for_event(
        "request", lambda r: r.get("path") == "/fhir/Patient" and r.get("status") == 200)
    assert record["connection"] == "good" and record["method"] == "GET"
    assert {"ts", "level", "request_id", "duration_ms", "bytes_in", "bytes_out"} <= set(record)
    running.sidecar.wait_for_event(
        "request", lambda r: r.get("connection") == "wrong-password" and r.get("status") == 401)
    output = running.sidecar.output
    wrong_basic = base64.b64encode(f"{UPSTREAM_USER}:not-the-password".encode()).decode()
    for secret in (UPSTREAM_PASSWORD, EXPECTED_BASIC.split()[1], "findme-query-value",
                   "not-the-password", wrong_basic, "app-token", "eDp5"):
        assert secret not in output

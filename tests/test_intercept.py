"""Apps with an ``https://`` base URL behind ``HTTPS_PROXY``: refused with advice by default;
with ``proxy.intercept_https`` the sidecar terminates their TLS with its own CA (exported for
them to trust) and injects credentials, Basic or OAuth -- for configured connections only."""

from __future__ import annotations

import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from support.bearer import BearerValidator
from support.constants import EXPECTED_BASIC, UPSTREAM_PASSWORD, UPSTREAM_USER
from support.fhir_routes import fhir_upstream
from support.oauth_provider import OAuthTestProvider
from support.pki import TestPKI
from support.sidecar_process import SidecarProcess, free_port, wait_until
from support.sidecars import StartSidecar
from support.upstreams import Upstreams

from sidecar.testkit.fhir_server import FhirTestServer


@dataclass
class Proxy:
    sidecar: SidecarProcess
    port: int
    server: FhirTestServer
    ca_export: Path

    @property
    def upstream_base(self) -> str:
        return f"https://localhost:{self.server.port}/fhir"

    def client(self, verify: ssl.SSLContext | bool) -> httpx.Client:
        return httpx.Client(timeout=30, trust_env=False, verify=verify,
                            proxy=f"http://127.0.0.1:{self.port}")


def _start(start: StartSidecar, pki: TestPKI, server: FhirTestServer, intercept: bool) -> Proxy:
    proxy: dict[str, object] = {"listen": f"127.0.0.1:{free_port()}"}
    if intercept:
        proxy.update(intercept_https=True, ca_cert_export="exported/sidecar-ca.pem")
    sidecar = start({
        "proxy": proxy,
        "admin": {"listen": None},
        "basic_auth": {"b": {"username": UPSTREAM_USER, "password": UPSTREAM_PASSWORD}},
        "connections": {"secure": {
            "url": f"https://localhost:{server.port}/fhir", "auth": {"basic": "b"},
            "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}},
    })
    assert sidecar.proxy_port is not None
    return Proxy(sidecar.process, sidecar.proxy_port, server,
                 sidecar.directory / "exported" / "sidecar-ca.pem")


@pytest.fixture(scope="module")
def intercepting(start_module_sidecar: StartSidecar, pki: TestPKI,
                 upstreams: Upstreams) -> Proxy:
    return _start(start_module_sidecar, pki, upstreams.get("good"), intercept=True)


@pytest.fixture(scope="module")
def refusing(start_module_sidecar: StartSidecar, pki: TestPKI, upstreams: Upstreams) -> Proxy:
    return _start(start_module_sidecar, pki, upstreams.get("good"), intercept=False)


def _trusting(ca: Path) -> ssl.SSLContext:
    # Only ``ca``: with a cafile, the platform's default CAs are not loaded.
    return ssl.create_default_context(cafile=str(ca))


def _connect(port: int, target: str) -> tuple[str, dict[str, str], bytes]:
    """Send a raw CONNECT and read the proxy's answer (status line, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            assert piece, data
            data += piece
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            piece = sock.recv(65536)
            assert piece, body
            body += piece
    return lines[0], headers, body


def test_ca_certificate_is_exported_without_its_key(intercepting: Proxy) -> None:
    pem = wait_until(lambda: intercepting.ca_export.exists() and intercepting.ca_export.read_text(),
                     message="the exported CA certificate")
    assert pem.startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE KEY" not in pem


def test_https_client_trusting_the_exported_ca_gets_credentials(intercepting: Proxy) -> None:
    intercepting.server.clear()
    wait_until(intercepting.ca_export.exists, message="the exported CA certificate")
    with intercepting.client(_trusting(intercepting.ca_export)) as client:
        response = client.get(f"{intercepting.upstream_base}/Patient/example",
                              headers={"Authorization": "Bearer the-apps-own"})
        search = client.get(f"{intercepting.upstream_base}/Patient", params={"_count": 1})
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "example"
    seen = intercepting.server.requests_seen
    assert [r.path.split("?")[0] for r in seen] == ["/fhir/Patient/example", "/fhir/Patient"]
    assert all(r.headers["authorization"] == EXPECTED_BASIC for r in seen)
    # The app already uses the upstream's base URL: its links are left as they are.
    assert search.json()["link"][0]["url"].startswith(intercepting.upstream_base + "/Patient?")


def test_client_not_trusting_the_sidecar_ca_fails_its_handshake(intercepting: Proxy,
                                                                 pki: TestPKI) -> None:
    # Trusting only the upstream's real CA: the sidecar's certificate is rejected by the app.
    with intercepting.client(_trusting(pki.ca_bundle_path)) as client, \
            pytest.raises(httpx.ConnectError):
        client.get(f"{intercepting.upstream_base}/metadata")


def test_unconfigured_hosts_are_still_refused(intercepting: Proxy) -> None:
    intercepting.server.clear()
    # 127.0.0.1 is the same server, but no connection is configured under that name.
    status, headers, body = _connect(intercepting.port, f"127.0.0.1:{intercepting.server.port}")
    assert " 403 " in status
    assert headers["x-sidecar-error"] == "no-route"
    assert "no connection is configured for 127.0.0.1" in body.decode()
    with intercepting.client(False) as client, pytest.raises(httpx.ProxyError):
        client.get("https://fhir.elsewhere.example/fhir/metadata")
    assert intercepting.server.requests_seen == []


def test_without_opt_in_the_refusal_explains_what_to_do(refusing: Proxy) -> None:
    refusing.server.clear()
    status, headers, body = _connect(refusing.port, f"localhost:{refusing.server.port}")
    assert " 403 " in status
    assert headers["x-sidecar-error"] == "no-route"
    assert headers["content-type"] == "application/fhir+json"
    diagnostics = json.loads(body)["issue"][0]["diagnostics"]
    assert "plain http:// base URL (http://localhost/...)" in diagnostics
    assert "proxy.intercept_https" in diagnostics
    assert not refusing.ca_export.exists()
    with refusing.client(False) as client, pytest.raises(httpx.ProxyError):
        client.get(f"{refusing.upstream_base}/metadata")
    assert refusing.server.requests_seen == []


def test_intercepted_https_gets_an_oauth_token(tmp_path: Path, pki: TestPKI,
                                               oauth_provider: OAuthTestProvider,
                                               bearer_validator: BearerValidator,
                                               start_sidecar: StartSidecar) -> None:
    client = oauth_provider.clients["basic"]
    (tmp_path / "client-secret").write_text(str(client.secret) + "\n")
    port = free_port()
    with fhir_upstream(pki.server(name="intercept-oauth"), auth=bearer_validator) as server:
        sidecar = start_sidecar({
            "proxy": {"listen": f"127.0.0.1:{port}", "intercept_https": True,
                      "ca_cert_export": "sidecar-ca.pem"},
            "admin": {"listen": None},
            "oauth": {"smart": {
                "token_url": oauth_provider.token_url, "client_id": client.client_id,
                "client_secret_file": "client-secret", "scopes": list(oauth_provider.scopes),
                "tls": {"verify": "custom", "ca_bundle": str(oauth_provider.ca_bundle)}}},
            "connections": {"ehr": {
                "url": server.base_url, "auth": {"oauth": "smart"},
                "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}},
        }, directory=tmp_path)
        ca_export = tmp_path / "sidecar-ca.pem"
        wait_until(ca_export.exists, message="the exported CA certificate")
        proxy = Proxy(sidecar.process, port, server, ca_export)
        with proxy.client(_trusting(ca_export)) as app:
            first = app.get(f"{server.base_url}/Patient/example",
                            headers={"Authorization": "Basic dGhlLWFwcDpvd24="})
            second = app.get(f"{server.base_url}/metadata")
        sidecar.stop()  # the whole log, to its last line, is read below
    assert first.status_code == 200, first.text
    assert second.status_code == 200, second.text
    seen = [r.headers["authorization"] for r in server.requests_seen]
    assert len(seen) == 2 and seen[0] == seen[1] and seen[0].startswith("Bearer ")
    assert bearer_validator.validate(seen[0].removeprefix("Bearer ")) is None
    # One token for both requests; the app's own credential never reached the upstream.
    assert sum(1 for r in oauth_provider.recent_requests()
               if r.get("client_id") == client.client_id) == 1
    assert "dGhlLWFwcDpvd24=" not in sidecar.process.output

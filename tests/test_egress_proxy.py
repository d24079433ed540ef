"""Upstream FHIR traffic through a corporate egress proxy (a real tinyproxy), end to end.

The proxy must see only a CONNECT to ``host:port``; TLS to the FHIR server stays end to end
under the connection's own policy; the proxy's credentials go to the proxy only; a proxy that
refuses or cannot be reached is a 502 that names it and never its password.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.constants import basic_header
from support.pki import TestPKI
from support.raw_upstream import RawRecordingUpstream
from support.sidecar_process import SidecarProcess, free_port, wait_until, write_config
from support.sidecars import StartSidecar
from support.tinyproxy import Tinyproxy

PROXY_USER = "svc-egress"
PROXY_PASSWORD = "pr0xy-Secret-7Qz"
WRONG_PASSWORD = "not-the-pr0xy-Secret"
FHIR_USER, FHIR_PASSWORD = "fhir-user", "fhir-Pw-9"
# Set in the sidecar's environment: a proxy is configuration, never ambient state.
DEAD_PORT = free_port()
AMBIENT_PROXY_ENV = {name: f"http://127.0.0.1:{DEAD_PORT}" for name in
                     ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                      "all_proxy")}
AMBIENT_PROXY_ENV.update(NO_PROXY="", no_proxy="")


class RefusingProxy:
    """A proxy that records each CONNECT request head and answers 407 (squid's answer to
    missing or wrong credentials; tinyproxy 1.11 answers a CONNECT with 401 instead)."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.heads: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with sock:
                sock.settimeout(10)
                head = b""
                try:
                    while b"\r\n\r\n" not in head:
                        chunk = sock.recv(4096)
                        if not chunk:
                            break
                        head += chunk
                    self.heads.append(head)
                    sock.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                                 b"Proxy-Authenticate: Basic realm=\"corp\"\r\n"
                                 b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    continue

    def close(self) -> None:
        self._listener.close()


@dataclass
class Setup:
    sidecar: SidecarProcess
    proxy: Tinyproxy
    upstream: RawRecordingUpstream
    untrusted: RawRecordingUpstream
    ports: dict[str, int]
    admin_port: int
    dead_proxy_port: int
    refusing: RefusingProxy

    def get(self, connection: str, path: str = "/fhir/Patient/1",
            headers: dict[str, str] | None = None) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.ports[connection]}{path}",
                         headers=headers or {}, timeout=30, trust_env=False)

    def failures_metric(self) -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=10,
                         trust_env=False).text
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            if family.name == "fhir_sidecar_egress_proxy_failures":
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        found[sample.labels["proxy"]] = sample.value
        return found


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI,
          start_module_sidecar: StartSidecar) -> Iterator[Setup]:
    tmp = Path(tmp_path_factory.mktemp("egress"))
    secrets = tmp / "secrets"
    secrets.mkdir()
    (secrets / "proxy-password").write_text(PROXY_PASSWORD + "\n")
    (secrets / "wrong-password").write_text(WRONG_PASSWORD + "\n")
    custom = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
    with Tinyproxy(tmp / "tinyproxy", auth=(PROXY_USER, PROXY_PASSWORD)) as proxy, \
            RawRecordingUpstream(pki.server(name="egress-upstream")) as upstream, \
            RawRecordingUpstream(pki.server_from_other_ca(name="egress-untrusted")) as untrusted:
        refusing = RefusingProxy()
        names = ("through", "untrusted", "wrongpw", "deadproxy", "direct", "refused")
        ports = {name: free_port() for name in names}
        admin_port, dead_proxy_port = free_port(), free_port()

        def connection(name: str, port: int, via: str | None) -> dict[str, object]:
            settings: dict[str, object] = {
                "url": f"https://localhost:{port}/fhir", "listen": f"127.0.0.1:{ports[name]}",
                "auth": {"basic": "fhir"}, "tls": custom, "timeout_seconds": 20}
            if via is not None:
                settings["via"] = via
            return settings

        sidecar = start_module_sidecar({
            "admin": {"listen": f"127.0.0.1:{admin_port}"},
            "basic_auth": {"fhir": {"username": FHIR_USER, "password": FHIR_PASSWORD}},
            "egress_proxies": {
                "corp": {"url": proxy.url, "username": PROXY_USER,
                         "password_file": "secrets/proxy-password"},
                "corp-wrong": {"url": proxy.url, "username": PROXY_USER,
                               "password_file": "secrets/wrong-password"},
                "nowhere": {"url": f"http://127.0.0.1:{dead_proxy_port}"},
                "strict": {"url": f"http://127.0.0.1:{refusing.port}", "username": PROXY_USER,
                           "password_file": "secrets/proxy-password"},
            },
            "connections": {
                "through": connection("through", upstream.port, "corp"),
                "untrusted": connection("untrusted", untrusted.port, "corp"),
                "wrongpw": connection("wrongpw", upstream.port, "corp-wrong"),
                "deadproxy": connection("deadproxy", upstream.port, "nowhere"),
                "direct": connection("direct", upstream.port, None),
                "refused": connection("refused", upstream.port, "strict"),
            },
        }, directory=tmp, env=AMBIENT_PROXY_ENV)
        yield Setup(sidecar.process, proxy, upstream, untrusted, ports, admin_port,
                    dead_proxy_port, refusing)
        sidecar.stop()  # before its proxies and upstreams go
        refusing.close()


@pytest.fixture
def egress(setup: Setup) -> Setup:
    """The module's sidecar, with what its servers recorded for earlier tests cleared (the
    --online check test also CONNECTs through the refusing proxy)."""
    setup.upstream.clear()
    setup.untrusted.clear()
    setup.refusing.heads.clear()
    return setup


def _forms_of(secret: str) -> list[bytes]:
    """A secret as it could leak: plain, and inside a Basic header."""
    return [secret.encode(), base64.b64encode(f"{PROXY_USER}:{secret}".encode())]


def _diagnostics(response: httpx.Response) -> str:
    return str(json.loads(response.content)["issue"][0]["diagnostics"])


def test_fhir_requests_tunnel_through_the_proxy_with_its_credentials(egress: Setup) -> None:
    before = len(egress.proxy.connects())
    response = egress.get("through", headers={
        # An app's own proxy credentials never leave the sidecar.
        "Proxy-Authorization": "Basic YXBwOmFwcC1wYXNzd29yZA==",
        "Authorization": "Bearer app-token"})
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "raw"
    # The proxy was asked for a tunnel to host:port, and nothing else.
    connects = wait_until(lambda: egress.proxy.connects()[before:], message="a CONNECT")
    assert connects == [f"localhost:{egress.upstream.port}"]
    # What reached the FHIR server: the connection's credentials, none of the proxy's.
    heads = egress.upstream.wait_for_heads(1)
    head = heads[0][1]
    assert head.startswith(b"GET /fhir/Patient/1 HTTP/1.1\r\n"), head
    assert f"Authorization: {basic_header(FHIR_USER, FHIR_PASSWORD)}".encode() in head
    raw = egress.upstream.all_bytes()
    assert b"proxy-authorization" not in raw.lower()
    assert b"app-token" not in raw and b"YXBwOmFwcC1wYXNzd29yZA" not in raw
    for form in _forms_of(PROXY_PASSWORD):
        assert form not in raw


def test_without_via_the_upstream_is_reached_directly(egress: Setup) -> None:
    before = len(egress.proxy.connects())
    response = egress.get("direct")
    assert response.status_code == 200, response.text
    egress.upstream.wait_for_heads(1)
    assert egress.proxy.connects()[before:] == []


def test_a_kept_alive_client_keeps_tunnelling(egress: Setup) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", egress.ports["through"], timeout=30)
    try:
        for _ in range(3):
            conn.request("GET", "/fhir/Patient/1")
            answer = conn.getresponse()
            assert answer.status == 200
            answer.read()
    finally:
        conn.close()
    heads = egress.upstream.wait_for_heads(3)
    assert all(h.startswith(b"GET /fhir/Patient/1 ") for _, h in heads)


def test_expect_continue_opens_the_tunnel_before_continuing(egress: Setup) -> None:
    # The upstream connection opened before "100 Continue" (issue 26 §4) goes through the
    # proxy like any other, and the request then uses it: one CONNECT, one request.
    before = len(egress.proxy.connects())
    port = egress.ports["through"]
    body = b'{"resourceType":"Patient"}'
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST /fhir/Patient HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            chunk = sock.recv(1)
            assert chunk, interim
            interim += chunk
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        # The tunnel is open before the app is told to continue (tinyproxy's log may lag).
        assert wait_until(lambda: egress.proxy.connects()[before:], message="a CONNECT") == [
            f"localhost:{egress.upstream.port}"]
        sock.sendall(body)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    [(_, head)] = egress.upstream.wait_for_heads(1)
    assert head.startswith(b"POST /fhir/Patient HTTP/1.1\r\n")
    assert egress.upstream.all_bytes().endswith(body)
    assert egress.proxy.connects()[before:] == [f"localhost:{egress.upstream.port}"]


def test_the_connections_tls_policy_still_judges_the_upstream_behind_the_proxy(
        egress: Setup) -> None:
    before = len(egress.proxy.connects())
    response = egress.get("untrusted")
    assert response.status_code == 502
    assert response.headers["X-Sidecar-Error"] == "upstream-tls"
    assert "not signed by a CA" in _diagnostics(response)
    # The tunnel was opened; the end-to-end handshake inside it refused the server.
    assert wait_until(lambda: egress.proxy.connects()[before:]) == [
        f"localhost:{egress.untrusted.port}"]
    assert egress.untrusted.all_bytes().find(b"GET /fhir") == -1


def test_a_refusing_proxy_is_a_502_naming_it_and_its_407(egress: Setup) -> None:
    response = egress.get("refused")
    assert response.status_code == 502
    assert response.headers["X-Sidecar-Error"] == "upstream-unreachable"
    text = _diagnostics(response)
    assert "connection 'refused'" in text
    assert f"egress proxy 'strict' (127.0.0.1:{egress.refusing.port})" in text
    assert "407 Proxy Authentication Required" in text
    # What the proxy was sent: a CONNECT to host:port with its credentials, nothing more.
    assert len(egress.refusing.heads) == 1
    lines = egress.refusing.heads[0].split(b"\r\n")
    assert lines[0] == f"CONNECT localhost:{egress.upstream.port} HTTP/1.1".encode()
    expected = basic_header(PROXY_USER, PROXY_PASSWORD).encode()
    assert b"Proxy-Authorization: " + expected in lines
    assert b"Authorization: " + basic_header(FHIR_USER, FHIR_PASSWORD).encode() not in lines
    assert b"/fhir" not in egress.refusing.heads[0]
    assert egress.upstream.all_bytes() == b""
    for form in _forms_of(PROXY_PASSWORD):
        assert form not in response.content


def test_a_wrong_proxy_password_is_a_502_naming_the_proxy_and_its_answer(egress: Setup
                                                                        ) -> None:
    assert egress.failures_metric().get("corp-wrong") is not None
    before = egress.failures_metric()["corp-wrong"]
    response = egress.get("wrongpw")
    assert response.status_code == 502
    assert response.headers["X-Sidecar-Error"] == "upstream-unreachable"
    text = _diagnostics(response)
    assert "connection 'wrongpw'" in text
    assert "egress proxy 'corp-wrong'" in text and f"127.0.0.1:{egress.proxy.port}" in text
    # tinyproxy 1.11 refuses a CONNECT with bad credentials as "401 Unauthorized".
    assert "401 Unauthorized" in text
    assert egress.upstream.all_bytes() == b""
    assert egress.failures_metric()["corp-wrong"] == before + 1
    everything = response.content + egress.sidecar.output.encode()
    for secret in (WRONG_PASSWORD, PROXY_PASSWORD):
        for form in _forms_of(secret):
            assert form not in everything


def test_an_unreachable_proxy_is_a_502_naming_the_proxy(egress: Setup) -> None:
    before = egress.failures_metric()["nowhere"]
    response = egress.get("deadproxy")
    assert response.status_code == 502
    assert response.headers["X-Sidecar-Error"] == "upstream-unreachable"
    text = _diagnostics(response)
    assert "egress proxy 'nowhere'" in text and f"127.0.0.1:{egress.dead_proxy_port}" in text
    assert egress.upstream.all_bytes() == b""
    assert egress.failures_metric()["nowhere"] == before + 1


def test_every_configured_proxy_is_exported(egress: Setup) -> None:
    assert set(egress.failures_metric()) == {"corp", "corp-wrong", "nowhere", "strict"}
    assert egress.failures_metric()["corp"] == 0


def test_check_online_tunnels_through_the_proxy(egress: Setup, tmp_path: Path,
                                                pki: TestPKI) -> None:
    (tmp_path / "proxy-password").write_text(PROXY_PASSWORD + "\n")
    custom = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
    config = write_config(tmp_path, {
        "admin": {"listen": None},
        "egress_proxies": {
            "corp": {"url": egress.proxy.url, "username": PROXY_USER,
                     "password_file": "proxy-password"},
            "strict": {"url": f"http://127.0.0.1:{egress.refusing.port}",
                       "username": PROXY_USER, "password_file": "proxy-password"}},
        "connections": {
            "through": {"url": f"https://localhost:{egress.upstream.port}/fhir",
                        "tls": custom, "via": "corp"},
            "refused": {"url": f"https://localhost:{egress.upstream.port}/fhir",
                        "tls": custom, "via": "strict"}},
    })
    before = len(egress.proxy.connects())
    result = subprocess.run([sys.executable, "-m", "sidecar", "check", "-c", str(config),
                             "--online"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **AMBIENT_PROXY_ENV})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line}
    assert " corp " in rows["through"] and "ok (TLS" in rows["through"], output
    assert "egress proxy 'strict'" in rows["refused"] and "407" in rows["refused"], output
    assert egress.proxy.connects()[before:] == [f"localhost:{egress.upstream.port}"]
    for form in _forms_of(PROXY_PASSWORD):
        assert form not in output.encode()

"""``check --online`` through an https:// egress proxy: TLS to the proxy (verified by its own
``tls``), CONNECT inside it, and the upstream's TLS inside that, end to end. The proxy is a real
tinyproxy behind a real TLS front (tests/support/tls_front.py); a proxy whose certificate the
configured CA did not sign fails with words that name the proxy."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import httpx
from support.pki import TestPKI
from support.raw_upstream import RawRecordingUpstream
from support.sidecar_process import free_port, write_config
from support.sidecars import StartSidecar
from support.tinyproxy import Tinyproxy
from support.tls_front import TlsFront

PROXY_USER = "svc-https-egress"
PROXY_PASSWORD = "https-pr0xy-Secret-4Wm"
ADMIN_TOKEN = "https-egress-admin-Pp30"


def test_check_online_tunnels_through_an_https_proxy(tmp_path: Path, pki: TestPKI) -> None:
    (tmp_path / "proxy-password").write_text(PROXY_PASSWORD + "\n")
    upstream_tls = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
    with Tinyproxy(tmp_path / "tinyproxy", auth=(PROXY_USER, PROXY_PASSWORD)) as proxy, \
            TlsFront(pki.server(name="https-proxy-front"), proxy.port) as front, \
            RawRecordingUpstream(pki.server(name="https-proxy-upstream")) as upstream:
        def definition(ca_bundle: Path) -> dict[str, object]:
            return {"url": front.url, "username": PROXY_USER, "password_file": "proxy-password",
                    "tls": {"verify": "custom", "ca_bundle": str(ca_bundle)}}

        upstream_url = f"https://localhost:{upstream.port}/fhir"
        config = write_config(tmp_path, {
            "admin": {"listen": None},
            "egress_proxies": {"tlscorp": definition(pki.ca_bundle_path),
                               "wrongca": definition(pki.other_ca_bundle_path)},
            "connections": {
                "through": {"url": upstream_url, "tls": upstream_tls, "via": "tlscorp"},
                "wrongca": {"url": upstream_url, "tls": upstream_tls, "via": "wrongca"}},
        })
        result = subprocess.run([sys.executable, "-m", "sidecar", "check", "-c", str(config),
                                 "--online"], capture_output=True, text=True, timeout=120,
                                env=os.environ.copy())
        output = result.stdout + result.stderr
        assert result.returncode == 1, output  # the wrong-CA row fails
        rows = {line.split()[0]: line for line in result.stdout.splitlines() if line}
        assert " tlscorp " in rows["through"] and "ok (TLS" in rows["through"], output
        # The upstream's certificate was seen through both TLS layers.
        assert "localhost" in rows["through"].split("ok (TLS", 1)[1], output
        assert proxy.connects() == [f"localhost:{upstream.port}"], proxy.log()
        assert front.handshakes >= 1
        failed = rows["wrongca"]
        assert "TLS to egress proxy 'wrongca'" in failed, output
        assert "failed" in failed and "certificate" in failed.lower(), output
    pair = f"{PROXY_USER}:{PROXY_PASSWORD}".encode()
    for form in (PROXY_PASSWORD.encode(), base64.b64encode(pair)):
        assert form not in output.encode()


def test_the_connection_test_tunnels_through_an_https_proxy(
        tmp_path: Path, pki: TestPKI, start_sidecar: StartSidecar) -> None:
    (tmp_path / "proxy-password").write_text(PROXY_PASSWORD + "\n")
    (tmp_path / "admin-token").write_text(ADMIN_TOKEN + "\n")
    admin = f"127.0.0.1:{free_port()}"
    upstream_tls = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
    with Tinyproxy(tmp_path / "tinyproxy", auth=(PROXY_USER, PROXY_PASSWORD)) as proxy, \
            TlsFront(pki.server(name="https-proxy-front-2"), proxy.port) as front, \
            RawRecordingUpstream(pki.server(name="https-proxy-upstream-2")) as upstream:
        running = start_sidecar({
            "admin": {"listen": admin, "token_file": "admin-token"},
            "egress_proxies": {"tlscorp": {
                "url": front.url, "username": PROXY_USER, "password_file": "proxy-password",
                "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}},
            "connections": {"through": {"url": f"https://localhost:{upstream.port}/fhir",
                                        "tls": upstream_tls, "via": "tlscorp"}},
        }, directory=tmp_path)
        answer = httpx.post(f"http://{admin}/api/connections/through/test", timeout=60,
                            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                            trust_env=False)
        assert answer.status_code == 200, answer.text
        steps = {s["step"]: s for s in answer.json()["steps"]}
        assert steps["connect"]["status"] == "ok", steps
        assert "egress proxy 'tlscorp'" in steps["connect"]["detail"]
        assert steps["tls"]["status"] == "ok", steps
        assert steps["tls"]["certificate"]["subject"] == "CN=localhost"
        assert f"localhost:{upstream.port}" in proxy.connects()
        pair = f"{PROXY_USER}:{PROXY_PASSWORD}".encode()
        for form in (PROXY_PASSWORD.encode(), base64.b64encode(pair)):
            assert form not in answer.content
        running.stop()
        for text in (PROXY_PASSWORD, base64.b64encode(pair).decode()):
            assert text not in running.process.output


def test_app_requests_tunnel_through_an_https_proxy(tmp_path: Path, pki: TestPKI,
                                                    start_sidecar: StartSidecar) -> None:
    """The request path itself (not only the checks): TLS to the proxy under the proxy's own
    ``tls``, CONNECT inside it, the upstream's TLS inside that; a proxy whose certificate the
    configured CA did not sign fails the request with words that name the proxy."""
    (tmp_path / "proxy-password").write_text(PROXY_PASSWORD + "\n")
    upstream_tls = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
    with Tinyproxy(tmp_path / "tinyproxy", auth=(PROXY_USER, PROXY_PASSWORD)) as proxy, \
            TlsFront(pki.server(name="https-proxy-front-3"), proxy.port) as front, \
            RawRecordingUpstream(pki.server(name="https-proxy-upstream-3")) as upstream:
        def definition(ca_bundle: Path) -> dict[str, object]:
            return {"url": front.url, "username": PROXY_USER, "password_file": "proxy-password",
                    "tls": {"verify": "custom", "ca_bundle": str(ca_bundle)}}

        upstream_url = f"https://localhost:{upstream.port}/fhir"
        sidecar = start_sidecar({
            "admin": {"listen": None},
            "egress_proxies": {"tlscorp": definition(pki.ca_bundle_path),
                               "wrongca": definition(pki.other_ca_bundle_path)},
            "connections": {
                "through": {"url": upstream_url, "tls": upstream_tls, "via": "tlscorp",
                            "listen": f"127.0.0.1:{free_port()}"},
                "wrongca": {"url": upstream_url, "tls": upstream_tls, "via": "wrongca",
                            "listen": f"127.0.0.1:{free_port()}"}},
        }, directory=tmp_path)
        through = f"http://127.0.0.1:{sidecar.ports['through']}"
        for _ in range(2):  # the second one may reuse the tunnel or open another
            answer = httpx.get(f"{through}/Patient/raw", timeout=60, trust_env=False)
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"resourceType": "Patient", "id": "raw"}
        assert f"localhost:{upstream.port}" in proxy.connects(), proxy.log()
        assert front.handshakes >= 1
        assert b"GET /fhir/Patient/raw HTTP/1.1" in upstream.all_bytes()
        before = len(upstream.all_bytes())
        failed = httpx.get(f"http://127.0.0.1:{sidecar.ports['wrongca']}/Patient/raw",
                           timeout=60, trust_env=False)
        assert failed.status_code == 502, failed.text
        assert "TLS to the proxy failed" in failed.text, failed.text
        assert "egress proxy 'wrongca'" in failed.text, failed.text
        assert len(upstream.all_bytes()) == before  # nothing reached the upstream
        pair = f"{PROXY_USER}:{PROXY_PASSWORD}".encode()
        for form in (PROXY_PASSWORD.encode(), base64.b64encode(pair)):
            assert form not in answer.content + failed.content
    sidecar.stop()
    for text in (PROXY_PASSWORD, base64.b64encode(pair).decode()):
        assert text not in sidecar.process.output

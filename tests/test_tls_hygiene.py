"""TLS hygiene: forward-secret AEAD suites only, and ``verify: skip`` never passes silently."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.pki import TestPKI
from support.sidecar_process import SidecarProcess, free_port, wait_until, write_config
from support.sidecars import StartSidecar
from support.tls_matrix import MatrixServer, server_context

from sidecar.config.models import TlsSettings
from sidecar.tls.policy import compile_tls_policy

LIVE_DEADLINE = 15.0


def tls12_server(pki: TestPKI, name: str, ciphers: str) -> Callable[[], MatrixServer]:
    def start() -> MatrixServer:
        identity = pki.server_exactly(name, common_name="localhost", san=["localhost"],
                                      key_type="rsa")

        def configure(context: ssl.SSLContext) -> None:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.set_ciphers(ciphers)

        return MatrixServer(server_context(str(identity.cert_chain), str(identity.key),
                                           configure=configure), "localhost")
    return start


@pytest.fixture(scope="module")
def cipher_servers(pki: TestPKI) -> Iterator[dict[str, MatrixServer]]:
    servers = {
        # Static RSA key exchange and CBC: neither forward secrecy nor AEAD.
        "aes128-sha": tls12_server(pki, "cipher-aes128-sha", "AES128-SHA")(),
        # Forward secret, but CBC with HMAC-SHA1 rather than AEAD.
        "ecdhe-cbc": tls12_server(pki, "cipher-ecdhe-cbc", "ECDHE-RSA-AES128-SHA")(),
        # What the policy asks for, on TLS 1.2.
        "ecdhe-gcm": tls12_server(pki, "cipher-ecdhe-gcm", "ECDHE-RSA-AES128-GCM-SHA256")(),
    }
    for server in servers.values():
        server.__enter__()
    yield servers
    for server in servers.values():
        server.__exit__(None, None, None)


def test_an_upstream_without_forward_secret_aead_suites_is_refused_saying_why(
        cipher_servers: dict[str, MatrixServer], pki: TestPKI, tmp_path: Path,
        start_sidecar: StartSidecar) -> None:
    ports = {name: free_port() for name in cipher_servers}
    connections = {
        name: {"url": server.url("/fhir"), "listen": f"127.0.0.1:{ports[name]}",
               "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}
        for name, server in cipher_servers.items()}
    start_sidecar({"admin": {"listen": None}, "connections": connections}, directory=tmp_path)
    with httpx.Client(trust_env=False, timeout=30) as client:
        answers = {name: client.get(f"http://127.0.0.1:{port}/Patient")
                   for name, port in ports.items()}
    assert answers["ecdhe-gcm"].status_code == 200
    assert cipher_servers["ecdhe-gcm"].paths == ["/fhir/Patient"]
    for name in ("aes128-sha", "ecdhe-cbc"):
        answer = answers[name]
        assert answer.status_code == 502, answer.text
        assert answer.headers["X-Sidecar-Error"] == "upstream-tls"
        diagnostics = answer.json()["issue"][0]["diagnostics"]
        assert f"connection '{name}'" in diagnostics
        assert "accepts none of the sidecar's cipher suites" in diagnostics
        assert "forward-secret AEAD suites only" in diagnostics
        assert cipher_servers[name].paths == []  # nothing reached the server


def test_both_legs_offer_forward_secret_aead_suites_only(pki: TestPKI) -> None:
    policy = compile_tls_policy(TlsSettings(verify="custom", ca_bundle=pki.ca_bundle_path))
    # The stdlib legs: every TLS 1.2 suite has ECDHE key exchange and AEAD encryption.
    stdlib = policy.stdlib_context().get_ciphers()
    tls12 = [c for c in stdlib if c["protocol"] == "TLSv1.2"]
    assert tls12
    for suite in tls12:
        assert suite["kea"] == "kx-ecdhe", suite["name"]
        assert suite["aead"] is True, suite["name"]
    # The proxy leg (pyOpenSSL, possibly another OpenSSL build) offers the same TLS 1.2
    # suites; the rest are TLS 1.3's, which are all AEAD.
    offered = policy.new_openssl_connection("localhost").get_cipher_list()
    assert {name for name in offered if not name.startswith("TLS_")} == {
        c["name"] for c in tls12}
    assert all(name in _TLS13_AEAD_SUITES for name in offered if name.startswith("TLS_"))


_TLS13_AEAD_SUITES = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                      "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_CCM_SHA256"}


def skip_settings(listen_port: int, base: str = "/fhir") -> dict[str, Any]:
    # Nothing listens on the upstream port: the warnings come from loading the config alone.
    return {
        "admin": {"listen": None},
        "connections": {"lab": {"url": f"https://localhost:9{base}",
                                "listen": f"127.0.0.1:{listen_port}",
                                "tls": {"verify": "skip"}}},
        "oauth": {"lab-token": {"token_url": "https://localhost:9/token",
                                "client_id": "lab", "client_secret_env": "LAB_SECRET",
                                "tls": {"verify": "skip"}}},
    }


def skip_config(tmp_path: Path, listen_port: int, base: str = "/fhir") -> Path:
    return write_config(tmp_path, skip_settings(listen_port, base))


def skip_warnings(sidecar: SidecarProcess) -> list[str]:
    return [r["message"] for r in sidecar.events("config_warning")
            if ".verify: skip" in r["message"]]


def test_verify_skip_is_logged_at_every_load(tmp_path: Path,
                                             start_sidecar: StartSidecar) -> None:
    listen_port = free_port()
    running = start_sidecar(skip_settings(listen_port), directory=tmp_path,
                            env={"LAB_SECRET": "s"})
    config, sidecar = running.config_path, running.process
    at_start = skip_warnings(sidecar)
    assert len(at_start) == 2, sidecar.output
    assert any("connections.lab.tls.verify: skip" in m for m in at_start)
    assert any("oauth.lab-token.tls.verify: skip" in m for m in at_start)
    assert all(str(config) in m and "not checked" in m for m in at_start)

    skip_config(tmp_path, listen_port, base="/r4")  # a reload that keeps verify: skip
    sidecar.signal(signal.SIGHUP)
    wait_until(lambda: len(skip_warnings(sidecar)) >= 4, LIVE_DEADLINE,
               message="the skip warnings of the reload")
    assert sidecar.events("config_reloaded")


def test_check_lists_every_verify_skip(tmp_path: Path) -> None:
    config = skip_config(tmp_path, free_port())
    result = subprocess.run([sys.executable, "-m", "sidecar", "check", "-c", str(config)],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "LAB_SECRET": "s"})
    assert result.returncode == 0, result.stdout + result.stderr
    warned = [line for line in result.stderr.splitlines() if ".verify: skip" in line]
    assert len(warned) == 2, result.stderr
    assert all(line.startswith("warning: ") for line in warned)

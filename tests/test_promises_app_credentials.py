"""README/docs promises about the app's own credentials and the sidecar's local state, checked
on the bytes that reach a real TLS upstream from the real ``fhir-sidecar run`` process.

The upstream is RawRecordingUpstream: it keeps every byte it received, so a header that the
FHIR test server would parse away (or accept whatever its value) still shows up here.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from support.pki import TestPKI
from support.raw_upstream import RawRecordingUpstream
from support.sidecar_process import SidecarProcess, free_port
from support.sidecars import StartSidecar

APP_SECRET = "app-own-secret-4f1c9e"
APP_PROXY_SECRET = "app-proxy-secret-77ab2d"
BASIC_USER, BASIC_PASSWORD = "sidecar-user", "sidecar-password-9d3"
EXPECTED_BASIC = base64.b64encode(f"{BASIC_USER}:{BASIC_PASSWORD}".encode()).decode()


@dataclass
class Setup:
    sidecar: SidecarProcess
    upstream: RawRecordingUpstream
    proxy_port: int
    listen_ports: dict[str, int]
    home: Path

    def send(self, connection: str, via: str) -> httpx.Response:
        """One GET with the app's own Authorization and Proxy-Authorization headers."""
        headers = {"Authorization": f"Bearer {APP_SECRET}",
                   "Proxy-Authorization": f"Basic {APP_PROXY_SECRET}"}
        if via == "listener":
            with httpx.Client(timeout=30, trust_env=False) as client:
                return client.get(
                    f"http://127.0.0.1:{self.listen_ports[connection]}/Patient/1",
                    headers=headers)
        # Forward proxy: the app calls the plain-http form of the connection URL. httpx would
        # turn Proxy-Authorization into proxy credentials, so the head goes out as given.
        with httpx.Client(timeout=30, trust_env=False,
                          proxy=f"http://127.0.0.1:{self.proxy_port}") as client:
            return client.get(
                f"http://localhost:{self.upstream.port}/{connection}/Patient/1",
                headers=headers)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI,
          start_module_sidecar: StartSidecar) -> Iterator[Setup]:
    tmp = Path(tmp_path_factory.mktemp("promises-credentials"))
    home = tmp / "home"
    home.mkdir()
    with RawRecordingUpstream(pki.server(name="raw-promises")) as upstream:
        custom = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
        base = f"https://localhost:{upstream.port}"
        proxy_port, admin_port = free_port(), free_port()
        listen_ports = {"open": free_port(), "basic": free_port()}
        sidecar = start_module_sidecar({
            "proxy": {"listen": f"127.0.0.1:{proxy_port}"},
            "admin": {"listen": f"127.0.0.1:{admin_port}"},
            "basic_auth": {"sidecar": {"username": BASIC_USER, "password": BASIC_PASSWORD}},
            "connections": {
                # No auth at all: the app's Authorization must still not pass.
                "open": {"url": f"{base}/open", "tls": custom,
                         "listen": f"127.0.0.1:{listen_ports['open']}"},
                "basic": {"url": f"{base}/basic", "tls": custom, "auth": {"basic": "sidecar"},
                          "listen": f"127.0.0.1:{listen_ports['basic']}"},
            },
        }, directory=tmp, env={"HOME": str(home)})
        yield Setup(sidecar.process, upstream, proxy_port, listen_ports, home)


@pytest.fixture
def fresh(setup: Setup) -> Setup:
    setup.upstream.clear()
    return setup


def _authorization_lines(head: bytes) -> list[bytes]:
    return [line for line in head.split(b"\r\n")
            if line.lower().startswith((b"authorization:", b"proxy-authorization:"))]


@pytest.mark.parametrize("via", ["forward", "listener"])
def test_the_apps_authorization_is_removed_on_a_connection_without_credentials(
        fresh: Setup, via: str) -> None:
    """Promise (docs/configuration.md): "The app's `Authorization` and
    `Proxy-Authorization` headers are always removed." Here on a connection with NO auth: a
    change that strips them only where the sidecar adds its own would fail."""
    response = fresh.send("open", via)
    assert response.status_code == 200, response.text
    (_, head), = fresh.upstream.wait_for_heads(1)
    assert head.startswith(b"GET /open/Patient/1 "), head
    assert _authorization_lines(head) == []
    received = fresh.upstream.all_bytes()
    for secret in (APP_SECRET, APP_PROXY_SECRET):
        assert secret.encode() not in received


@pytest.mark.parametrize("via", ["forward", "listener"])
def test_the_apps_authorization_is_replaced_on_a_connection_with_credentials(
        fresh: Setup, via: str) -> None:
    """Promise (docs/configuration.md): "The app's `Authorization` and
    `Proxy-Authorization` headers are always removed. A Basic definition sets
    `Authorization: Basic base64(user:password)`": exactly one header, the sidecar's."""
    response = fresh.send("basic", via)
    assert response.status_code == 200, response.text
    (_, head), = fresh.upstream.wait_for_heads(1)
    assert head.startswith(b"GET /basic/Patient/1 "), head
    assert _authorization_lines(head) == [f"Authorization: Basic {EXPECTED_BASIC}".encode()]
    received = fresh.upstream.all_bytes()
    for secret in (APP_SECRET, APP_PROXY_SECRET):
        assert secret.encode() not in received


def test_no_ca_store_is_created_in_the_home_directory(fresh: Setup) -> None:
    """Promise (docs/command-line.md): the state directory holds the sidecar's files "here,
    never in `~/.mitmproxy`". The process runs with HOME pointed at an empty directory and
    serves both ways; nothing appears under it."""
    for via in ("forward", "listener"):
        assert fresh.send("open", via).status_code == 200
    fresh.upstream.wait_for_heads(2)
    assert not (fresh.home / ".mitmproxy").exists()
    assert list(fresh.home.iterdir()) == []

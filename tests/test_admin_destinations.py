"""Credentials whose secret comes from the config file go only to upstreams they already go to.

The admin API never shows a secret, but without this rule it would hand one out anyway: a
token holder could create a connection to a server of their own with the hospital's Basic
Auth definition (or change an existing connection's URL) and read the password off the wire.
Definitions whose secret the API caller gave themselves are theirs to assign anywhere.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.constants import EXPECTED_BASIC, UPSTREAM_PASSWORD, UPSTREAM_USER
from support.pki import TestPKI
from support.raw_upstream import RawRecordingUpstream
from support.sidecar_process import SidecarProcess, free_port
from support.sidecars import StartSidecar

from sidecar.testkit.fhir_server import FhirTestServer

ADMIN_TOKEN = "destinations-admin-token-Qe83"
INLINE_SECRET = f"inline-{secrets.token_hex(8)}"


@dataclass
class Running:
    config: Path
    admin: str
    process: SidecarProcess
    upstream: FhirTestServer
    collector: RawRecordingUpstream
    ca_name: str = "internal"

    def put(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.put(f"http://{self.admin}{path}", json=body, trust_env=False, timeout=30,
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    def connection(self, url: str, auth: dict[str, str], port: int) -> dict[str, Any]:
        return {"url": url, "listen": f"127.0.0.1:{port}", "auth": auth,
                "tls": {"verify": "custom", "ca_bundle": self.ca_name}}


@pytest.fixture
def running(tmp_path: Path, pki: TestPKI, upstream_good: FhirTestServer,
            start_sidecar: StartSidecar) -> Iterator[Running]:
    (tmp_path / "admin-token").write_text(ADMIN_TOKEN + "\n")
    (tmp_path / "hospital-password").write_text(UPSTREAM_PASSWORD + "\n")
    admin = f"127.0.0.1:{free_port()}"
    # No file of the operator's in the connections themselves, so the API may edit them.
    tls = {"verify": "default"}
    config = {
        "admin": {"listen": admin, "token_file": "admin-token"},
        "basic_auth": {
            "hospital": {"username": UPSTREAM_USER, "password_file": "hospital-password"},
            "inline": {"username": UPSTREAM_USER, "password": INLINE_SECRET},
        },
        "connections": {
            "ehr": {"url": upstream_good.base_url, "listen": f"127.0.0.1:{free_port()}",
                    "auth": {"basic": "hospital"}, "tls": tls},
            "lab": {"url": upstream_good.base_url, "listen": f"127.0.0.1:{free_port()}",
                    "auth": {"basic": "inline"}, "tls": tls},
        },
    }
    with RawRecordingUpstream(pki.server(name="collector")) as collector:
        sidecar = start_sidecar(config, directory=tmp_path)
        r = Running(sidecar.config_path, admin, sidecar.process, upstream_good, collector)
        uploaded = httpx.put(f"http://{admin}/api/ca-bundles/{r.ca_name}",
                             content=pki.ca_bundle_path.read_bytes(), trust_env=False,
                             timeout=30, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert uploaded.status_code in (200, 201), uploaded.text
        yield r


@pytest.mark.parametrize("definition", ["hospital", "inline"])
def test_a_config_file_secret_cannot_be_pointed_at_another_server(
        running: Running, definition: str) -> None:
    before = running.config.read_bytes()
    port = free_port()
    collector = f"https://localhost:{running.collector.port}/collect"
    same_host_other_port = running.upstream.base_url.replace(
        f":{running.upstream.port}", f":{running.collector.port}")
    attempts = [
        ("/api/connections/evil", running.connection(collector, {"basic": definition}, port)),
        ("/api/connections/evil",
         running.connection(same_host_other_port, {"basic": definition}, port)),
        # An existing connection of that definition, moved to another server.
        (f"/api/connections/{'ehr' if definition == 'hospital' else 'lab'}",
         running.connection(collector, {"basic": definition}, port)),
    ]
    for path, body in attempts:
        answer = running.put(path, body)
        assert answer.status_code == 403, answer.text
        assert "edit the config file" in answer.json()["error"]
        assert running.config.read_bytes() == before, "the config file changed"
    # Nothing listens where the connection would have, and no byte reached the collector.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/Patient", trust_env=False, timeout=5)
    assert running.collector.all_bytes() == b""
    assert UPSTREAM_PASSWORD not in running.process.output
    assert INLINE_SECRET not in running.process.output


def test_a_config_file_secret_may_go_to_another_path_of_its_own_upstream(
        running: Running) -> None:
    port = free_port()
    url = running.upstream.base_url  # the same origin, as a second connection
    answer = running.put("/api/connections/ehr-second",
                         running.connection(url, {"basic": "hospital"}, port))
    assert answer.status_code == 201, answer.text
    running.upstream.clear()
    got = httpx.get(f"http://127.0.0.1:{port}/metadata", trust_env=False, timeout=30)
    assert got.status_code == 200, got.text
    [seen] = running.upstream.wait_for_requests(1)
    assert seen.headers["Authorization"] == EXPECTED_BASIC


def test_a_secret_the_caller_gave_goes_where_the_caller_says(running: Running) -> None:
    mine = running.put("/api/basic-auth/mine", {"username": "me", "password": "my-own-pw"})
    assert mine.status_code == 201, mine.text
    port = free_port()
    answer = running.put("/api/connections/mine", running.connection(
        f"https://localhost:{running.collector.port}/fhir", {"basic": "mine"}, port))
    assert answer.status_code == 201, answer.text
    got = httpx.get(f"http://127.0.0.1:{port}/Patient/1", trust_env=False, timeout=30)
    assert got.status_code == 200, got.text
    [(_, head)] = running.collector.wait_for_heads(1)
    assert b"Authorization: Basic bWU6bXktb3duLXB3" in head  # me:my-own-pw

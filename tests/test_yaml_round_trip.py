"""What the admin API writes into the config file reads back the same, and reaches the upstream.

Reading and writing must agree on the YAML version: read as YAML 1.1, a username ``no`` written
by the API would come back as ``False`` (422) and a client id ``12:30`` as the number 750. Every
string here goes through the real ``fhir-sidecar run`` process: written by ``PUT /api/...``, read
back by the reload that follows (and by a restart), and checked where it finally matters -- in
the ``Authorization`` header the upstream received, and at the token endpoint, which accepts only
the exact client id.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.fhir_routes import fhir_upstream
from support.pki import TestPKI
from support.sidecar_process import SidecarProcess, free_port, write_config
from support.token_stub import TokenStub

from sidecar.testkit.fhir_server import FhirTestServer

ADMIN_TOKEN = "yaml-admin-token-Hc42"
PASSWORD = "yaml-pw-Zt93"
CLIENT_SECRET = "yaml-cs-Qe18"
# YAML 1.1 booleans and nulls, sexagesimal and octal numbers, floats, comment and mapping
# indicators, alias and anchor indicators, and non-ASCII.
TRICKY = ["no", "on", "off", "yes", "y", "~", "null", "12:30", "0777", "1e3", ".inf", "#",
          ": ", "*alias", "&anchor", "Zürich 東京 ✓", "NO", "True", "0x1F", "2026-11-28",
          "- item", "a #b", "'quoted'", '"double"', " padded ", "|", "%percent", "@at", "!tag"]
# Texts any user may type: everything but lone surrogates (not Unicode text; JSON cannot carry
# them in UTF-8 either).
ANY_TEXT = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=24)


class Sidecar:
    def __init__(self, tmp: Path, pki: TestPKI, upstream: FhirTestServer):
        self.tmp, self.pki, self.upstream = tmp, pki, upstream
        self.admin = f"127.0.0.1:{free_port()}"
        (tmp / "secrets").mkdir()
        (tmp / "secrets" / "admin-token").write_text(ADMIN_TOKEN + "\n")
        self.path = write_config(tmp, {
            "admin": {"listen": self.admin, "token_file": "secrets/admin-token"}})
        self.process = SidecarProcess(self.path, tmp / "state")
        self.api = httpx.Client(base_url=f"http://{self.admin}", trust_env=False, timeout=30,
                                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        self.ports: dict[str, int] = {}

    def start(self) -> None:
        self.process.start()
        up = self.api.put("/api/ca-bundles/test-ca",
                          content=self.pki.ca_bundle_path.read_bytes())
        assert up.status_code in (200, 201), up.text

    def restart(self) -> None:
        assert self.process.stop() == 0
        self.process = SidecarProcess(self.path, self.tmp / "state")
        self.process.start()

    def put(self, path: str, body: dict[str, Any]) -> httpx.Response:
        response = self.api.put(path, json=body)
        assert response.status_code < 500, response.text
        return response

    def connection(self, name: str, auth: dict[str, str]) -> None:
        port = self.ports.setdefault(name, free_port())
        answer = self.put(f"/api/connections/{name}", {
            "url": self.upstream.base_url, "listen": f"127.0.0.1:{port}", "auth": auth,
            "tls": {"verify": "custom", "ca_bundle": "test-ca"}})
        assert answer.status_code in (200, 201), answer.text

    def authorization_sent(self, connection: str) -> str:
        before = len(self.upstream.requests_seen)
        response = httpx.get(f"http://127.0.0.1:{self.ports[connection]}/metadata",
                             timeout=30, trust_env=False)
        assert response.status_code == 200, response.text
        assert len(self.upstream.requests_seen) > before
        return str(self.upstream.requests_seen[-1].headers.get("authorization"))

    def close(self) -> None:
        self.api.close()
        assert self.process.stop() == 0


def basic_username(header: str) -> str:
    scheme, value = header.split(" ", 1)
    assert scheme == "Basic"
    username, password = base64.b64decode(value).decode("utf-8").split(":", 1)
    assert password == PASSWORD
    return username


@pytest.fixture(scope="module")
def upstream(pki: TestPKI) -> Iterator[FhirTestServer]:
    with fhir_upstream(pki.server(name="yaml-open")) as server:
        yield server


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI,
            upstream: FhirTestServer) -> Iterator[Sidecar]:
    s = Sidecar(tmp_path_factory.mktemp("yaml"), pki, upstream)
    s.start()
    assert s.put("/api/basic-auth/any", {"username": "first", "password": PASSWORD}
                 ).status_code == 201
    s.connection("any", {"basic": "any"})
    yield s
    s.close()


@pytest.mark.timeout(400)
def test_tricky_strings_survive_write_read_restart(tmp_path: Path, pki: TestPKI,
                                                   upstream: FhirTestServer) -> None:
    s = Sidecar(tmp_path, pki, upstream)
    tls = {"verify": "custom", "ca_bundle": "test-ca"}
    with contextlib.ExitStack() as running:
        stubs = [running.enter_context(TokenStub(value, CLIENT_SECRET)) for value in TRICKY]
        running.callback(s.close)
        s.start()
        usernames: dict[str, str] = {}
        for i, value in enumerate(TRICKY):
            answer = s.put(f"/api/basic-auth/b{i}", {"username": value, "password": PASSWORD})
            if ":" in value:  # HTTP Basic cannot carry it: refused in words
                assert answer.status_code == 422 and "':'" in answer.text
            else:
                assert answer.status_code == 201, (value, answer.text)
                usernames[f"b{i}"] = value
                s.connection("basic", {"basic": f"b{i}"})
                assert basic_username(s.authorization_sent("basic")) == value
            answer = s.put(f"/api/oauth/o{i}", {"token_url": stubs[i].token_url,
                                                "client_id": value,
                                                "client_secret": CLIENT_SECRET, "tls": tls})
            assert answer.status_code == 201, (value, answer.text)
            s.connection("oauth", {"oauth": f"o{i}"})
            # The stub issues tokens only for the exact client id and secret.
            assert s.authorization_sent("oauth").startswith("Bearer stub-"), value
            assert stubs[i].issued and stubs[i].refused == 0, value

        s.restart()  # read by a fresh process, not only by the reload after each write
        for name, value in usernames.items():
            assert s.api.get(f"/api/basic-auth/{name}").json()["username"] == value
        for i, value in enumerate(TRICKY):
            assert s.api.get(f"/api/oauth/o{i}").json()["client_id"] == value
        last = len(TRICKY) - 1
        assert basic_username(s.authorization_sent("basic")) == usernames[f"b{last}"]
        assert s.authorization_sent("oauth").startswith("Bearer stub-")
        assert stubs[last].refused == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(username=ANY_TEXT)
def test_any_username_the_api_accepts_reaches_the_upstream_unchanged(sidecar: Sidecar,
                                                                      username: str) -> None:
    answer = sidecar.put("/api/basic-auth/any", {"username": username, "password": PASSWORD})
    if answer.status_code >= 400:  # refused in words (a ':' cannot travel in HTTP Basic)
        assert answer.status_code in (400, 422), answer.text
        assert answer.json()["error"]
        return
    assert sidecar.api.get("/api/basic-auth/any").json()["username"] == username
    assert basic_username(sidecar.authorization_sent("any")) == username

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
from urllib.parse import unquote_plus

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.bearer import BearerValidator
from support.fhir_routes import fhir_upstream
from support.oauth_provider import OAuthTestProvider
from support.pki import TestPKI
from support.sidecar_process import SidecarProcess, free_port, write_config

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

    def through(self, connection: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.ports[connection]}/metadata",
                         timeout=30, trust_env=False)

    def authorization_sent(self, connection: str) -> str:
        return str(self.authorization_sent_headers(connection).get("authorization"))

    def authorization_sent_headers(self, connection: str) -> Any:
        """The headers the upstream received for one request through ``connection``."""
        before = len(self.upstream.requests_seen)
        response = self.through(connection)
        assert response.status_code == 200, response.text
        assert len(self.upstream.requests_seen) > before
        return self.upstream.requests_seen[-1].headers

    def close(self) -> None:
        self.api.close()
        assert self.process.stop() == 0


def is_vschar(client_id: str) -> bool:
    """RFC 6749 Appendix A: a client id is printable ASCII (VSCHAR, %x20-7E)."""
    return all(0x20 <= ord(c) <= 0x7E for c in client_id)


def issued_to(provider: OAuthTestProvider, client_id: str) -> bool:
    return any(r["client_id"] == client_id and r["status"] == 200
               for r in provider.recent_requests())


def assert_refused_only_non_ascii(provider: OAuthTestProvider) -> None:
    # Every definition keeps its token source, so a refused one is retried in the background.
    refused = {basic_client_id(r) for r in provider.recent_requests() if r["status"] != 200}
    assert refused == {v for v in TRICKY if not is_vschar(v)}


def basic_client_id(token_request: dict[str, Any]) -> str:
    """The client id in a token request's HTTP Basic header, form-urlencoding undone."""
    scheme, value = token_request["authorization"].split(" ", 1)
    assert scheme == "Basic"
    client_id, secret = base64.b64decode(value).decode("ascii").split(":", 1)
    assert unquote_plus(secret) == CLIENT_SECRET
    return unquote_plus(client_id)


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


@pytest.fixture
def sidecar(tmp_path: Path, pki: TestPKI, upstream: FhirTestServer) -> Iterator[Sidecar]:
    """The test's own (a property test: its examples share it, and each one sets what it
    reads back)."""
    s = Sidecar(tmp_path, pki, upstream)
    s.start()
    assert s.put("/api/basic-auth/any", {"username": "first", "password": PASSWORD}
                 ).status_code == 201
    s.connection("any", {"basic": "any"})
    yield s
    s.close()


@pytest.fixture(scope="module")
def tricky_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OAuthTestProvider]:
    """The real authorization server, with one client registered per tricky client id (it
    issues a token only for the exact id and secret)."""
    clients = [{"client_id": value, "client_secret": CLIENT_SECRET,
                "token_endpoint_auth_method": "client_secret_basic",
                "grant_types": ["client_credentials"], "response_types": [], "redirect_uris": []}
               for value in TRICKY]
    provider = OAuthTestProvider.start(tmp_path_factory.mktemp("tricky-provider"),
                                       extra_clients=clients)
    try:
        yield provider
    finally:
        provider.stop()


@pytest.mark.timeout(400)
def test_tricky_strings_survive_write_read_restart(
        tmp_path: Path, pki: TestPKI, upstream: FhirTestServer,
        tricky_provider: OAuthTestProvider) -> None:
    provider = tricky_provider
    provider.reset()
    bearer = BearerValidator(provider.jwks(), audience=provider.default_resource,
                             issuer=provider.issuer)
    s = Sidecar(tmp_path, pki, upstream)
    token_tls = {"verify": "custom", "ca_bundle": "token-ca"}
    with contextlib.ExitStack() as running:
        running.callback(s.close)
        s.start()
        up = s.api.put("/api/ca-bundles/token-ca", content=provider.ca_bundle.read_bytes())
        assert up.status_code == 201, up.text
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
            answer = s.put(f"/api/oauth/o{i}", {"token_url": provider.token_url,
                                                "client_id": value,
                                                "client_secret": CLIENT_SECRET,
                                                "tls": token_tls})
            assert answer.status_code == 201, (value, answer.text)
            s.connection("oauth", {"oauth": f"o{i}"})
            if is_vschar(value):
                # The provider issues tokens only for the exact client id and secret.
                assert bearer(s.authorization_sent_headers("oauth")) is None, value
                assert issued_to(provider, value), value
            else:
                # RFC 6749 allows only printable ASCII in a client id: the real server refuses
                # the request, but the exact id reached it (form-urlencoded, §2.3.1).
                refused = s.through("oauth")
                assert refused.status_code == 503, refused.text
                assert refused.headers["X-Sidecar-Error"] == "token-unavailable"
                assert value in {basic_client_id(r) for r in provider.recent_requests()}
        assert_refused_only_non_ascii(provider)

        s.restart()  # read by a fresh process, not only by the reload after each write
        for name, value in usernames.items():
            assert s.api.get(f"/api/basic-auth/{name}").json()["username"] == value
        for i, value in enumerate(TRICKY):
            assert s.api.get(f"/api/oauth/o{i}").json()["client_id"] == value
        last = len(TRICKY) - 1
        assert basic_username(s.authorization_sent("basic")) == usernames[f"b{last}"]
        assert bearer(s.authorization_sent_headers("oauth")) is None
        assert issued_to(provider, TRICKY[last])
        assert_refused_only_non_ascii(provider)


# The examples share the test's one sidecar on purpose (a process per example would take
# minutes); each example writes the username it then reads back.
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
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

"""Credentials whose secret comes from the config file go only to upstreams they already go to.

The admin API never shows a secret, but without this rule it would hand one out anyway: a
token holder could create a connection to a server of their own with the hospital's Basic
Auth definition (or change an existing connection's URL) and read the password off the wire.
Definitions whose secret the API caller gave themselves are theirs to assign anywhere.
"""

from __future__ import annotations

import json
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

from sidecar.admin.destinations import Destination, Trust, is_known, origin, trust_of
from sidecar.config.models import TlsSettings
from sidecar.testkit.fhir_server import FhirTestServer

ADMIN_TOKEN = "destinations-admin-token-Qe83"
INLINE_SECRET = f"inline-{secrets.token_hex(8)}"
CLIENT_SECRET = f"client-{secrets.token_hex(8)}"
ENV_SECRET = f"env-{secrets.token_hex(8)}"
ENV_VAR = "FHIR_SIDECAR_DESTINATIONS_TEST_PASSWORD"
CLIENT_ID = "portal-client"


@dataclass
class Running:
    config: Path
    admin: str
    process: SidecarProcess
    upstream: FhirTestServer
    collector: RawRecordingUpstream
    pki: TestPKI
    token_port: int  # the file's token endpoint (nothing listens there)
    portal_port: int  # the listener of the connection that uses the OAuth definition
    ca_name: str = "internal"

    def put(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.put(f"http://{self.admin}{path}", json=body, trust_env=False, timeout=30,
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    def get(self, path: str) -> dict[str, Any]:
        answer = httpx.get(f"http://{self.admin}{path}", trust_env=False, timeout=30)
        assert answer.status_code == 200, answer.text
        result: dict[str, Any] = answer.json()
        return result

    def connection(self, url: str, auth: dict[str, str], port: int) -> dict[str, Any]:
        return {"url": url, "listen": f"127.0.0.1:{port}", "auth": auth,
                "tls": {"verify": "custom", "ca_bundle": self.ca_name}}

    def oauth(self, **changes: Any) -> dict[str, Any]:
        """The OAuth definition as the file has it (no secret: a PUT keeps it), changed."""
        return {"token_url": f"https://localhost:{self.token_port}/token",
                "client_id": CLIENT_ID, "tls": {"verify": "custom", "ca_bundle": self.ca_name},
                **changes}

    @property
    def secrets(self) -> tuple[str, ...]:
        return INLINE_SECRET, CLIENT_SECRET, ENV_SECRET, UPSTREAM_PASSWORD

    def assert_refused_and_unchanged(self, answer: httpx.Response, before: bytes) -> None:
        assert answer.status_code == 403, answer.text
        assert "edit the config file" in answer.json()["error"]
        assert self.config.read_bytes() == before, "the config file changed"

    def assert_no_secret_left(self, *receivers: RawRecordingUpstream) -> None:
        """The OAuth connection is used once (its token fetch is what the attack waits for):
        only after that is it certain that nothing was sent."""
        got = httpx.get(f"http://127.0.0.1:{self.portal_port}/Patient", trust_env=False,
                        timeout=60)
        assert got.status_code == 503, got.text  # the file's token endpoint: nobody there
        for receiver in (self.collector, *receivers):
            assert receiver.all_bytes() == b"", receiver.all_bytes()[:300]
        for secret in self.secrets:
            assert secret not in self.process.output


@pytest.fixture
def running(tmp_path: Path, pki: TestPKI, upstream_good: FhirTestServer,
            start_sidecar: StartSidecar) -> Iterator[Running]:
    (tmp_path / "admin-token").write_text(ADMIN_TOKEN + "\n")
    (tmp_path / "hospital-password").write_text(UPSTREAM_PASSWORD + "\n")
    # The sidecar's own secrets directory already holds the bundle "internal": the OAuth
    # definition names it, and so is no read-only file reference (the API may edit it).
    managed = tmp_path / "state" / "secrets"
    managed.mkdir(parents=True, mode=0o700)
    (managed / "ca-internal.pem").write_bytes(pki.ca_bundle_path.read_bytes())
    (managed / "ca-internal.pem").chmod(0o600)
    admin = f"127.0.0.1:{free_port()}"
    token_port, portal_port = free_port(), free_port()
    # A host path from the config file: connections keep it editable (docs/admin-api.md).
    tls = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
    config = {
        "admin": {"listen": admin, "token_file": "admin-token"},
        "basic_auth": {
            "hospital": {"username": UPSTREAM_USER, "password_file": "hospital-password"},
            "inline": {"username": UPSTREAM_USER, "password": INLINE_SECRET},
            "from-env": {"username": UPSTREAM_USER, "password_env": ENV_VAR},
        },
        "oauth": {"portal": {"token_url": f"https://localhost:{token_port}/token",
                             "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                             "tls": {"verify": "custom",
                                     "ca_bundle": str(managed / "ca-internal.pem")}}},
        "egress_proxies": {"corp": {"url": f"http://127.0.0.1:{free_port()}"}},
        "connections": {
            "ehr": {"url": upstream_good.base_url, "listen": f"127.0.0.1:{free_port()}",
                    "auth": {"basic": "hospital"}, "tls": tls},
            "lab": {"url": upstream_good.base_url, "listen": f"127.0.0.1:{free_port()}",
                    "auth": {"basic": "inline"}, "tls": tls},
            "env": {"url": upstream_good.base_url, "listen": f"127.0.0.1:{free_port()}",
                    "auth": {"basic": "from-env"}, "tls": tls},
            "portal": {"url": upstream_good.base_url, "listen": f"127.0.0.1:{portal_port}",
                       "auth": {"oauth": "portal"}, "tls": tls},
        },
    }
    with RawRecordingUpstream(pki.server(name="collector")) as collector:
        sidecar = start_sidecar(config, directory=tmp_path, env={ENV_VAR: ENV_SECRET})
        yield Running(sidecar.config_path, admin, sidecar.process, upstream_good, collector,
                      pki, token_port, portal_port)


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
    for secret in running.secrets:
        assert secret not in running.process.output


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


# -- issue 26 §5: every place a config-file secret can travel to ----------------------------------

@pytest.mark.parametrize("change", ["token_url elsewhere", "token_url over http",
                                    "token endpoint TLS skipped",
                                    "token endpoint trusts another CA",
                                    "token requests through an egress proxy"])
def test_an_inline_client_secret_goes_to_no_other_token_endpoint(running: Running,
                                                                 change: str) -> None:
    # The hole the review found: PUT /api/oauth/portal with an attacker's token_url was 200,
    # and the next app request sent Authorization: Basic base64(client_id:secret) there.
    before = running.config.read_bytes()
    collector = f"https://localhost:{running.collector.port}/token"
    body = {
        "token_url elsewhere": running.oauth(token_url=collector),
        # Same host and port, another scheme: another origin (and no TLS at all).
        "token_url over http": running.oauth(token_url=f"http://localhost:{running.token_port}"
                                                       "/token"),
        "token endpoint TLS skipped": running.oauth(tls={"verify": "skip"}),
        "token endpoint trusts another CA": running.oauth(
            tls={"verify": "custom", "ca_bundle": upload_other_ca(running)}),
        "token requests through an egress proxy": running.oauth(via="corp"),
    }[change]
    running.assert_refused_and_unchanged(running.put("/api/oauth/portal", body), before)
    running.assert_no_secret_left()


def test_an_inline_client_secret_follows_no_other_discovery(running: Running,
                                                            pki: TestPKI) -> None:
    # discover_from names the server that says where the secret goes: one of the attacker's
    # answers every request, the discovery too, with a token_endpoint of its own.
    smart: dict[str, Any] = {"token_endpoint": ""}
    with RawRecordingUpstream(pki.server(name="discovery"), body=b"{}") as attacker:
        smart["token_endpoint"] = f"https://localhost:{attacker.port}/token"
        attacker.body = json.dumps(smart).encode()  # the document it serves
        before = running.config.read_bytes()
        body = running.oauth(token_url=None, discover_from=f"https://localhost:{attacker.port}")
        running.assert_refused_and_unchanged(running.put("/api/oauth/portal", body), before)
        running.assert_no_secret_left(attacker)


def test_the_oauth_definition_may_keep_its_own_token_endpoint(running: Running) -> None:
    # Everything but the destination may change: scopes, audience, the client_id.
    answer = running.put("/api/oauth/portal", running.oauth(scopes=["system/Patient.rs"]))
    assert answer.status_code == 200, answer.text
    assert running.get("/api/oauth/portal")["scopes"] == ["system/Patient.rs"]
    # With its own secret, the caller may send it wherever they like.
    mine = running.put("/api/oauth/portal", running.oauth(
        token_url=f"https://localhost:{running.collector.port}/token",
        client_secret="the-callers-own-secret"))
    assert mine.status_code == 200, mine.text


def upload_other_ca(running: Running) -> str:
    answer = httpx.put(f"http://{running.admin}/api/ca-bundles/other",
                       content=running.pki.other_ca_bundle_path.read_bytes(), trust_env=False,
                       timeout=30, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert answer.status_code in (200, 201), answer.text
    return "other"


@pytest.mark.parametrize("connection", ["ehr", "lab", "env"])  # file, inline, environment
@pytest.mark.parametrize("change", ["verify skip", "another CA bundle", "server_name",
                                    "http on the same host and port", "egress proxy"])
def test_a_config_file_secret_keeps_its_tls_trust_and_route(running: Running, connection: str,
                                                            change: str) -> None:
    before = running.config.read_bytes()
    base = running.get(f"/api/connections/{connection}")
    body = {"url": base["url"], "listen": base["listen"], "auth": base["auth"],
            "tls": {"verify": "custom", "ca_bundle": base["tls"]["ca_bundle"]}}
    if change == "verify skip":
        body["tls"] = {"verify": "skip"}
    elif change == "another CA bundle":
        body["tls"] = {"verify": "custom", "ca_bundle": upload_other_ca(running)}
    elif change == "server_name":
        body["tls"]["server_name"] = "attacker.example"
    elif change == "http on the same host and port":
        body["url"] = base["url"].replace("https://", "http://")
    else:
        body["via"] = "corp"
    running.assert_refused_and_unchanged(running.put(f"/api/connections/{connection}", body),
                                         before)
    # The same body with the file's own trust is fine (GET, PUT back: docs/admin-api.md).
    same = {"url": base["url"], "listen": base["listen"], "auth": base["auth"],
            "tls": {"verify": "custom", "ca_bundle": base["tls"]["ca_bundle"]},
            "rewrite_links": False}
    assert running.put(f"/api/connections/{connection}", same).status_code == 200


def test_the_bundle_a_config_file_secret_trusts_is_not_replaced(running: Running) -> None:
    # "ehr-second" trusts the uploaded bundle "internal": the same certificates as the file's
    # host path, so the same trust. New certificates in it would be a new trust.
    port = free_port()
    answer = running.put("/api/connections/ehr-second",
                         running.connection(running.upstream.base_url, {"basic": "hospital"},
                                            port))
    assert answer.status_code == 201, answer.text
    bundle = running.config.parent / "state" / "secrets" / "ca-internal.pem"
    kept = bundle.read_bytes()
    for pem in (running.pki.other_ca_bundle_path.read_bytes(),
                kept + running.pki.other_ca_bundle_path.read_bytes()):
        replaced = httpx.put(f"http://{running.admin}/api/ca-bundles/internal", content=pem,
                             trust_env=False, timeout=30,
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert replaced.status_code == 403, replaced.text
        assert "edit the config file" in replaced.json()["error"]
        assert bundle.read_bytes() == kept
    same = httpx.put(f"http://{running.admin}/api/ca-bundles/internal", content=kept,
                     trust_env=False, timeout=30,
                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert same.status_code == 200, same.text


# -- the rule itself, without a sidecar (sidecar/admin/destinations.py) ---------------------------

def test_an_origin_is_scheme_host_and_port() -> None:
    assert origin("https://FHIR.Example/api/R4") == "https://fhir.example:443"
    assert origin("http://fhir.example/api") == "http://fhir.example:80"
    assert origin("https://fhir.example:8443/x") != origin("http://fhir.example:8443/x")
    assert origin("ftp://fhir.example/") == "" and origin("not a url") == ""


def test_a_custom_trust_is_its_certificates_not_its_file(tmp_path: Path, pki: TestPKI) -> None:
    ca = pki.ca_bundle_path.read_bytes()
    other = pki.other_ca_bundle_path.read_bytes()
    files = {"same": b"# a comment\n" + ca, "other": other, "more": other + ca,
             "reordered": ca + b"\n" + other}
    for name, data in files.items():
        (tmp_path / f"{name}.pem").write_bytes(data)

    def trust(name: str, **tls: Any) -> Trust | None:
        settings = TlsSettings(verify="custom", ca_bundle=tmp_path / f"{name}.pem", **tls)
        return trust_of(settings, "https://fhir.example/")

    original = trust_of(TlsSettings(verify="custom", ca_bundle=pki.ca_bundle_path),
                        "https://fhir.example/")
    assert trust("same") == original
    assert trust("other") != original and trust("more") != original
    assert trust("more") == trust("reordered")
    assert trust("same", server_name="fhir.internal") != original
    assert trust_of(TlsSettings(verify="skip"), "http://fhir.example/") is None


def test_leaving_skip_is_no_new_destination() -> None:
    skip = Destination("https://h:443", None, Trust("skip"))
    default = Destination("https://h:443", None, Trust("default"))
    assert is_known(default, {skip})
    assert not is_known(skip, {default})
    assert not is_known(Destination("https://h:443", "http://proxy:3128", Trust("default")),
                        {skip})
    assert not is_known(Destination("http://h:443", None, None), {skip})

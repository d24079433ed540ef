"""Credentials made in the API and the dashboard can be assigned to a connection the config
file defines with a host CA bundle (issue 25): the file's own paths are kept, never changed.

A new user's path: the config file defines a connection with ``tls: {verify: custom,
ca_bundle: ca/ca.pem}``; in the dashboard or the API they create a Basic, then an OAuth
definition, and assign it. The next request carries the new credentials, the file still names
the same bundle as it spelt it, and that survives a restart. A changed path is refused.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support.bearer import BearerValidator
from support.fhir_routes import fhir_upstream
from support.oauth_provider import OAuthTestProvider
from support.pki import TestPKI
from support.sidecar_process import free_port, wait_until
from support.sidecars import RunningSidecar, StartSidecar

from sidecar.testkit.fhir_server import FhirTestServer

ADMIN_TOKEN = "file-paths-admin-token-Vb27"
NEW_PASSWORD = "dashboard-made-pw-Tc90"


def _start(tmp: Path, pki: TestPKI, upstream: FhirTestServer,
           start_sidecar: StartSidecar) -> RunningSidecar:
    (tmp / "ca").mkdir()
    shutil.copy(pki.ca_bundle_path, tmp / "ca" / "ca.pem")
    (tmp / "admin-token").write_text(ADMIN_TOKEN + "\n")
    return start_sidecar({
        "admin": {"listen": f"127.0.0.1:{free_port()}", "token_file": "admin-token"},
        "connections": {"ehr": {
            "url": upstream.base_url, "listen": f"127.0.0.1:{free_port()}",
            "tls": {"verify": "custom", "ca_bundle": "ca/ca.pem"}}},
    }, directory=tmp)


def _api(sidecar: RunningSidecar) -> httpx.Client:
    return httpx.Client(base_url=sidecar.admin_url, trust_env=False, timeout=30,
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})


def _file_tls(sidecar: RunningSidecar) -> dict[str, Any]:
    tls: dict[str, Any] = yaml.safe_load(sidecar.config_path.read_text())["connections"][
        "ehr"]["tls"]
    return tls


def _upstream_auth_after_get(sidecar: RunningSidecar, upstream: FhirTestServer) -> str | None:
    response = httpx.get(f"{sidecar.base}/metadata", trust_env=False, timeout=30)
    assert response.status_code == 200, response.text
    return upstream.requests_seen[-1].headers.get("authorization")


@pytest.fixture
def open_upstream(pki: TestPKI) -> Any:
    with fhir_upstream(pki.server(name="file-paths")) as server:
        yield server


def test_basic_then_oauth_assigned_to_a_connection_with_a_host_ca_bundle(
        tmp_path: Path, pki: TestPKI, open_upstream: FhirTestServer,
        oauth_provider: OAuthTestProvider, bearer_validator: BearerValidator,
        start_sidecar: StartSidecar) -> None:
    sidecar = _start(tmp_path, pki, open_upstream, start_sidecar)
    with _api(sidecar) as api:
        shown = api.get("/api/connections/ehr").json()
        resolved = str(tmp_path / "ca" / "ca.pem")
        assert shown["tls"]["ca_bundle"] == resolved
        assert shown["from_config_file"] == {"tls.ca_bundle": "ca/ca.pem"}
        assert shown["read_only"] is None

        made = api.put("/api/basic-auth/made-here", json={"username": "dash-user",
                                                          "password": NEW_PASSWORD})
        assert made.status_code == 201, made.text
        # The connection as GET shows it, with the new credentials: the resolved path.
        body = {"url": shown["url"], "listen": shown["listen"],
                "auth": {"basic": "made-here"},
                "tls": {"verify": "custom", "ca_bundle": resolved}}
        assigned = api.put("/api/connections/ehr", json=body)
        assert assigned.status_code == 200, assigned.text
        auth = _upstream_auth_after_get(sidecar, open_upstream)
        assert auth is not None and auth.startswith("Basic ")
        assert _file_tls(sidecar) == {"verify": "custom", "ca_bundle": "ca/ca.pem"}

        # OAuth next, this time repeating the file's literal text.
        uploaded = api.put("/api/ca-bundles/idp", content=oauth_provider.ca_bundle.read_bytes())
        assert uploaded.status_code in (200, 201), uploaded.text
        client = oauth_provider.clients["basic"]
        made = api.put("/api/oauth/idp-made", json={
            "token_url": oauth_provider.token_url, "client_id": client.client_id,
            "client_secret": client.secret, "scopes": list(oauth_provider.scopes),
            "resource": oauth_provider.default_resource,
            "tls": {"verify": "custom", "ca_bundle": "idp"}})
        assert made.status_code == 201, made.text
        body["auth"] = {"oauth": "idp-made"}
        body["tls"]["ca_bundle"] = "ca/ca.pem"
        assigned = api.put("/api/connections/ehr", json=body)
        assert assigned.status_code == 200, assigned.text
        auth = _upstream_auth_after_get(sidecar, open_upstream)
        assert auth is not None and auth.startswith("Bearer ")
        assert bearer_validator.validate(auth.removeprefix("Bearer ")) is None
        assert _file_tls(sidecar) == {"verify": "custom", "ca_bundle": "ca/ca.pem"}

        # A changed path is refused, whether the file exists or not; nothing changes.
        before = sidecar.config_path.read_bytes()
        for other in (str(pki.other_ca_bundle_path), "ca/other.pem", "../ca/ca.pem"):
            body["tls"]["ca_bundle"] = other
            refused = api.put("/api/connections/ehr", json=body)
            assert refused.status_code == 422, (other, refused.text)
            assert "tls.ca_bundle" in refused.text
        assert sidecar.config_path.read_bytes() == before

    # And after a restart the same file serves the same way.
    sidecar.stop()
    again = start_sidecar(yaml.safe_load(sidecar.config_path.read_text()), directory=tmp_path)
    assert _file_tls(again) == {"verify": "custom", "ca_bundle": "ca/ca.pem"}
    auth = _upstream_auth_after_get(again, open_upstream)
    assert auth is not None and auth.startswith("Bearer ")


def test_the_dashboard_form_keeps_the_host_bundle_read_only_and_assigns_credentials(
        tmp_path: Path, pki: TestPKI, open_upstream: FhirTestServer,
        start_sidecar: StartSidecar) -> None:
    sidecar = _start(tmp_path, pki, open_upstream, start_sidecar)
    with httpx.Client(base_url=sidecar.admin_url, trust_env=False, timeout=30,
                      follow_redirects=True) as browser:
        assert browser.post("/login", data={"token": ADMIN_TOKEN}).status_code == 200
        page = browser.get("/basic-auth").text
        csrf = re.search(r'name="_csrf" value="([^"]+)"', page)
        assert csrf is not None
        made = browser.post("/basic-auth", data={"_csrf": csrf.group(1), "action": "save",
                                                 "name": "made-here", "username": "dash-user",
                                                 "password": NEW_PASSWORD})
        assert made.status_code == 200 and "created" in made.text, made.text

        page = browser.get("/connections").text
        form = re.search(r'<details class="card" id="edit-connection-ehr">(.*?)</details>',
                         page, re.S)
        assert form is not None, "the file-defined connection has an edit form"
        assert 'readonly value="from the config file: ca/ca.pem"' in form.group(1)
        assert 'name="ca_bundle" value="ca/ca.pem"' in form.group(1)
        fields = dict(re.findall(r'<input type="hidden" name="([a-z_]+)" value="([^"]*)"',
                                 form.group(1)))
        saved = browser.post("/connections", data={
            **fields, "url": open_upstream.base_url, "listen": f"127.0.0.1:{sidecar.port}",
            "auth": "basic:made-here", "verify": "custom"})
        assert saved.status_code == 200 and "connection ehr saved" in saved.text, saved.text
    wait_until(lambda: (_upstream_auth_after_get(sidecar, open_upstream) or "").startswith(
        "Basic "), message="the dashboard's Basic credentials upstream")
    assert _file_tls(sidecar) == {"verify": "custom", "ca_bundle": "ca/ca.pem"}
    assert yaml.safe_load(sidecar.config_path.read_text())["connections"]["ehr"]["auth"] == {
        "basic": "made-here"}

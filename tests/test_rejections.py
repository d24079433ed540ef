"""Credentials the FHIR server refuses are health (docs/admin-api.md#the-status-light): through
the real sidecar, a wrong password written into the live password file turns the light red in
the API, ``/readyz?verbose=1`` and the dashboard within the window, counted by
``fhir_sidecar_upstream_rejections_total`` and ``fhir_sidecar_upstream_responses_total``; a
401 that the one retry with a new token turns into a success is no rejection; the sidecar's
own answers are never the FHIR server's."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from support.bearer import BearerValidator
from support.constants import UPSTREAM_PASSWORD, UPSTREAM_USER
from support.fhir_routes import fhir_upstream
from support.oauth_provider import OAuthTestProvider
from support.pki import TestPKI
from support.sidecar_process import free_port, wait_until
from support.sidecars import RunningSidecar, StartSidecar

from sidecar.testkit.fhir_server import FhirTestServer

DEADLINE = 30.0
WRONG_PASSWORD = "wrong-pw-Tq47"
ADMIN_TOKEN = "rejections-admin-token-Lw30"


def metric(sidecar: RunningSidecar, name: str, **labels: str) -> float:
    text = httpx.get(f"{sidecar.admin_url}/metrics", timeout=10, trust_env=False).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no series {name}{labels}")


def row(html: str, name: str) -> str:
    found = re.search(rf'<tr id="connection-{re.escape(name)}">(.*?)</tr>', html, re.S)
    assert found, f"no row for {name}"
    return found.group(1)


def test_a_wrong_password_turns_the_light_red_everywhere(
        tmp_path: Path, upstream_good: FhirTestServer, pki: TestPKI,
        start_sidecar: StartSidecar) -> None:
    (tmp_path / "secrets").mkdir()
    password = tmp_path / "secrets" / "pw"
    password.write_text(UPSTREAM_PASSWORD + "\n")
    (tmp_path / "secrets" / "admin").write_text(ADMIN_TOKEN + "\n")
    trusted = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
    config: dict[str, Any] = {
        "admin": {"listen": f"127.0.0.1:{free_port()}", "token_file": "secrets/admin"},
        "basic_auth": {"up": {"username": UPSTREAM_USER, "password_file": "secrets/pw"}},
        "connections": {
            "epic": {"url": upstream_good.base_url, "listen": f"127.0.0.1:{free_port()}",
                     "auth": {"basic": "up"}, "tls": trusted},
            "quiet": {"url": upstream_good.base_url, "listen": f"127.0.0.1:{free_port()}",
                      "auth": {"basic": "up"}, "tls": trusted},
        },
    }
    sidecar = start_sidecar(config, directory=tmp_path)
    base = f"http://127.0.0.1:{sidecar.ports['epic']}"
    api = httpx.Client(base_url=sidecar.admin_url, trust_env=False, timeout=30)
    # Exported from zero for every connection, before any request.
    for name in ("epic", "quiet"):
        for status in ("401", "403"):
            assert metric(sidecar, "fhir_sidecar_upstream_rejections_total",
                          connection=name, status=status) == 0
        assert metric(sidecar, "fhir_sidecar_upstream_responses_total", connection=name,
                      status_class="5xx") == 0

    with httpx.Client(base_url=base, trust_env=False, timeout=30) as app:
        assert {app.get("/metadata").status_code for _ in range(4)} == {200}
        # The FHIR server's own 404 and 500 are its answers: counted, not rejections.
        assert app.get("/status/500").status_code == 500
        assert api.get("/api/connections/epic").json()["health"]["light"] == "green"
        # A request the sidecar refuses itself never reached the FHIR server.
        assert app.get("/%2e%2e/%2e%2e/x").headers.get("X-Sidecar-Error") == "bad-request"

        generation = api.get("/readyz?verbose=1").json()["config"]["generation"]
        password.write_text(WRONG_PASSWORD + "\n")
        wait_until(lambda: api.get("/readyz?verbose=1").json()["config"]["generation"]
                   > generation, DEADLINE, message="the reload of the password file")
        refused = [app.get("/metadata") for _ in range(5)]
    assert {r.status_code for r in refused} == {401}
    assert not {r.headers.get("X-Sidecar-Error") for r in refused} - {None}

    words = "the FHIR server refused the credentials (401) 5 times in 5 min; last"
    health = api.get("/api/connections/epic").json()["health"]
    assert health["light"] == "red", health
    assert health["reason"].startswith(words), health
    ready = api.get("/readyz?verbose=1")
    assert ready.status_code == 200  # refused credentials do not make the sidecar unready
    assert ready.json()["connections"]["epic"]["health"] == {"light": "red",
                                                             "reason": health["reason"]}
    assert ready.json()["connections"]["quiet"]["health"]["light"] == "green"
    page = api.get("/").text  # loopback: the dashboard reads without a login
    assert 'data-light="red"' in row(page, "epic") and words in row(page, "epic")
    summary = re.search(r'<p id="connections-summary"[^>]*>(.*?)</p>', page, re.S)
    assert summary and summary.group(1) == "Connections: 1 red, 0 amber, 1 green"
    # Broken rows first, whatever the names' order.
    assert page.index('<tr id="connection-epic">') < page.index('<tr id="connection-quiet">')
    live = api.get("/connections/live").text
    assert "Connections: 1 red, 0 amber, 1 green" in live

    assert metric(sidecar, "fhir_sidecar_upstream_rejections_total", connection="epic",
                  status="401") == 5
    assert metric(sidecar, "fhir_sidecar_upstream_rejections_total", connection="epic",
                  status="403") == 0
    assert metric(sidecar, "fhir_sidecar_upstream_responses_total", connection="epic",
                  status_class="2xx") == 4
    assert metric(sidecar, "fhir_sidecar_upstream_responses_total", connection="epic",
                  status_class="4xx") == 5  # the refusals, not the sidecar's own 400
    assert metric(sidecar, "fhir_sidecar_upstream_responses_total", connection="epic",
                  status_class="5xx") == 1
    assert WRONG_PASSWORD not in sidecar.process.output
    api.close()


class RejectFirst:
    """Validates bearer tokens, and rejects the first valid one once (a revoked token)."""

    def __init__(self, validator: BearerValidator):
        self.validator = validator
        self.rejected = 0

    def __call__(self, headers: Any) -> str | None:
        problem = self.validator(headers)
        if problem is None and self.rejected == 0:
            self.rejected += 1
            return "token revoked"
        return problem


def test_a_401_retried_into_a_success_is_no_rejection(
        tmp_path: Path, pki: TestPKI, oauth_provider: OAuthTestProvider,
        bearer_validator: BearerValidator, start_sidecar: StartSidecar) -> None:
    client = oauth_provider.clients["basic"]
    (tmp_path / "secret").write_text(str(client.secret) + "\n")
    check = RejectFirst(bearer_validator)
    with fhir_upstream(pki.server(name="rejections-oauth"), auth=check) as upstream:
        config = {
            "admin": {"listen": f"127.0.0.1:{free_port()}"},
            "oauth": {
                "prov": {"token_url": oauth_provider.token_url, "client_id": client.client_id,
                         "client_secret_file": "secret", "scopes": list(oauth_provider.scopes),
                         "tls": {"verify": "custom", "ca_bundle": str(oauth_provider.ca_bundle)}},
                "down": {"token_url": f"https://127.0.0.1:{free_port()}/token",
                         "client_id": "nobody", "client_secret": "unused-secret-Ux81",
                         "tls": {"verify": "custom", "ca_bundle": str(oauth_provider.ca_bundle)}},
            },
            "connections": {
                "app": {"url": upstream.base_url, "listen": f"127.0.0.1:{free_port()}",
                        "auth": {"oauth": "prov"},
                        "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}},
                "nokey": {"url": upstream.base_url, "listen": f"127.0.0.1:{free_port()}",
                          "auth": {"oauth": "down"}, "timeout_seconds": 5,
                          "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}},
            },
        }
        sidecar = start_sidecar(config, directory=tmp_path)
        answers = [httpx.get(f"http://127.0.0.1:{sidecar.ports['app']}/metadata",
                             timeout=30, trust_env=False) for _ in range(3)]
        unavailable = httpx.get(f"http://127.0.0.1:{sidecar.ports['nokey']}/metadata",
                                timeout=30, trust_env=False)
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert check.rejected == 1
    assert metric(sidecar, "fhir_sidecar_auth_retries_total", connection="app") == 1
    assert metric(sidecar, "fhir_sidecar_upstream_rejections_total", connection="app",
                  status="401") == 0
    assert metric(sidecar, "fhir_sidecar_upstream_responses_total", connection="app",
                  status_class="2xx") == 3
    assert metric(sidecar, "fhir_sidecar_upstream_responses_total", connection="app",
                  status_class="4xx") == 0
    health = httpx.get(f"{sidecar.admin_url}/api/connections/app", timeout=10,
                       trust_env=False).json()["health"]
    assert health["light"] == "green", health
    # The sidecar's own 503 is no answer of the FHIR server.
    assert unavailable.headers["X-Sidecar-Error"] == "token-unavailable"
    for status_class in ("2xx", "4xx", "5xx"):
        assert metric(sidecar, "fhir_sidecar_upstream_responses_total", connection="nokey",
                      status_class=status_class) == 0

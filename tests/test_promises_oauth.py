"""OAuth promises of docs/configuration.md end to end: the real ``fhir-sidecar run`` process, the
real authorization server (oidc-provider, with its failure injection) and an upstream that
verifies the bearer tokens it receives."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.bearer import BearerValidator
from support.fhir_routes import fhir_upstream
from support.oauth_provider import OAuthTestProvider
from support.pki import TestPKI
from support.sidecar_process import free_port, wait_until
from support.sidecars import StartSidecar

from sidecar.testkit.fhir_server import FhirTestServer

TTL = 12  # seconds: long enough to see the outage served, short enough to wait out


class RejectWhenEnabled:
    """Validates bearer tokens; while ``enabled`` it also rejects the first token it sees, as a
    server does that revoked a token the client still thinks valid."""

    def __init__(self, validator: BearerValidator) -> None:
        self.validator = validator
        self.enabled = False
        self.rejected: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, headers: Any) -> str | None:
        problem = self.validator(headers)
        if problem is not None:
            return problem
        token = str(headers.get("authorization"))
        with self._lock:
            if self.enabled and (not self.rejected or token in self.rejected):
                self.rejected.append(token)
                return "token revoked"
        return None


class Setup:
    def __init__(self, tmp: Path, pki: TestPKI, provider: OAuthTestProvider,
                 upstream: FhirTestServer, start: StartSidecar) -> None:
        self.provider, self.upstream = provider, upstream
        (tmp / "secrets").mkdir()
        client = provider.clients["basic"]
        (tmp / "secrets" / "secret").write_text(str(client.secret) + "\n")
        self.port, self.admin_port = free_port(), free_port()
        config = {
            "admin": {"listen": f"127.0.0.1:{self.admin_port}"},
            "oauth": {"o": {
                "token_url": provider.token_url, "client_id": client.client_id,
                "client_auth": "client_secret_basic", "client_secret_file": "secrets/secret",
                "scopes": list(provider.scopes),
                "tls": {"verify": "custom", "ca_bundle": str(provider.ca_bundle)}}},
            "connections": {"c": {
                "url": upstream.base_url, "listen": f"127.0.0.1:{self.port}",
                "auth": {"oauth": "o"},
                "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}},
        }
        self.sidecar = start(config, directory=tmp).process

    def get(self) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.port}/metadata", timeout=30, trust_env=False)

    def retries(self) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=30,
                         trust_env=False).text
        found = re.search(r'^fhir_sidecar_auth_retries_total\{connection="c"\} (\S+)$', text,
                          re.M)
        assert found, "fhir_sidecar_auth_retries_total{connection=c} is not exposed"
        return float(found.group(1))


@pytest.fixture
def check(bearer_validator: BearerValidator) -> RejectWhenEnabled:
    return RejectWhenEnabled(bearer_validator)


@pytest.fixture
def setup(tmp_path: Path, pki: TestPKI, oauth_provider: OAuthTestProvider,
          check: RejectWhenEnabled, start_sidecar: StartSidecar) -> Iterator[Setup]:
    oauth_provider.settings(ttl=TTL)
    with fhir_upstream(pki.server(name="oauth-promises"), auth=check) as upstream:
        yield Setup(tmp_path, pki, oauth_provider, upstream, start_sidecar)


def test_token_outage_keeps_serving_the_valid_token_then_answers_token_unavailable(
        setup: Setup) -> None:
    """Promise (docs/configuration.md): "While the token endpoint fails (error status, timeout,
    refused connection) a still-valid token keeps being used [...] Once no valid token is left,
    requests get `503` `token-unavailable` whose diagnostics name the connection, the
    definition, the token URL and the endpoint's answer"."""
    s = setup
    first = s.get()
    assert first.status_code == 200, first.text
    token = s.upstream.requests_seen[-1].headers["authorization"]
    issued_before = s.provider.stats()["issued"]

    s.provider.fail("status", status=503)
    outage_start = time.monotonic()
    served_during_outage = 0
    answer: httpx.Response | None = None
    deadline = outage_start + TTL + 30
    while time.monotonic() < deadline:
        answer = s.get()
        if answer.status_code != 200:
            break
        assert s.upstream.requests_seen[-1].headers["authorization"] == token
        served_during_outage += 1
        time.sleep(0.2)  # pacing of the client's own requests, not a synchronisation
    assert answer is not None and answer.status_code == 503, answer and answer.text
    assert served_during_outage >= 3, "the still-valid token was not used during the outage"
    assert answer.headers["X-Sidecar-Error"] == "token-unavailable"
    diagnostics = answer.json()["issue"][0]["diagnostics"]
    assert "'c'" in diagnostics and "'o'" in diagnostics
    assert s.provider.token_url in diagnostics and "503" in diagnostics
    assert s.provider.stats()["issued"] == issued_before  # no token came from anywhere else

    s.provider.fail("none")
    wait_until(lambda: s.get().status_code == 200, 30, interval=0.3,
               message="recovery after the outage")


def test_upstream_401_on_a_streamed_body_is_passed_through_and_not_retried(
        setup: Setup, check: RejectWhenEnabled) -> None:
    """Promise (docs/configuration.md): "When the FHIR server answers `401` to a bearer token,
    that token is dropped [...] and the request is sent once more, provided its body was
    buffered (bodies up to 1 MB are); otherwise the 401 is passed through." And
    `fhir_sidecar_auth_retries_total` (docs/metrics.md) counts only real retries."""
    s = setup
    assert s.get().status_code == 200
    assert s.retries() == 0
    seen_before = len(s.upstream.requests_seen)
    check.enabled = True
    big = b'{"resourceType":"Binary","data":"' + b"A" * (2 * 1024 * 1024) + b'"}'
    response = httpx.post(f"http://127.0.0.1:{s.port}/Binary", content=big, timeout=60,
                          trust_env=False, headers={"Content-Type": "application/fhir+json"})
    assert response.status_code == 401, response.text[:500]
    assert len(s.upstream.requests_seen) == seen_before + 1  # sent once, never again
    assert s.retries() == 0


def test_upstream_401_on_a_buffered_body_is_retried_once_and_counted(
        setup: Setup, check: RejectWhenEnabled) -> None:
    """Promise (docs/configuration.md): "that token is dropped (only if it is still the current
    one), a new one is fetched and the request is sent once more, provided its body was
    buffered"; docs/metrics.md: `fhir_sidecar_auth_retries_total` "Requests retried with a new
    token after an upstream `401`"."""
    s = setup
    assert s.get().status_code == 200
    seen_before = len(s.upstream.requests_seen)
    check.enabled = True
    response = httpx.post(f"http://127.0.0.1:{s.port}/Patient", timeout=30, trust_env=False,
                          json={"resourceType": "Patient", "name": [{"family": "Retried"}]})
    assert response.status_code == 201, response.text
    sent = s.upstream.requests_seen[seen_before:]
    assert len(sent) == 2
    assert sent[0].headers["authorization"] != sent[1].headers["authorization"]
    wait_until(lambda: s.retries() == 1, 10, message="auth_retries_total to count the retry")

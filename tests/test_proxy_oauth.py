"""OAuth through the real sidecar process: a real authorization server (oidc-provider), an
upstream that verifies the bearer tokens it receives, and real clients."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.bearer import BearerValidator
from support.fhir_routes import fhir_upstream
from support.oauth_provider import OAuthTestProvider
from support.pki import TestPKI
from support.sidecar_process import free_port, wait_until, write_config
from support.sidecars import StartSidecar

from sidecar.testkit.fhir_server import FhirTestServer

LIVE_DEADLINE = 5.0


class RejectOnce:
    """Upstream auth check that validates tokens and rejects the first one it sees once,
    as a server does after revoking a token the client still thinks valid."""

    def __init__(self, validator: BearerValidator):
        self.validator = validator
        self.rejected: set[str] = set()
        self.enabled = False
        self._lock = threading.Lock()

    def __call__(self, headers: Any) -> str | None:
        problem = self.validator(headers)
        if problem is not None:
            return problem
        token = str(headers.get("authorization"))
        with self._lock:
            if self.enabled and not self.rejected:
                self.rejected.add(token)
                return "token revoked"
        return None


class OAuthSetup:
    def __init__(self, tmp: Path, pki: TestPKI, provider: OAuthTestProvider,
                 upstream: FhirTestServer, start: StartSidecar):
        self.tmp, self.provider, self.upstream = tmp, provider, upstream
        (tmp / "secrets").mkdir()
        basic_client = provider.clients["basic"]
        rs384 = provider.clients["rs384"]
        (tmp / "secrets" / "basic-secret").write_text(str(basic_client.secret) + "\n")
        (tmp / "secrets" / "rs384.pem").write_bytes(rs384.private_key_pem or b"")
        (tmp / "secrets" / "wrong").write_text("not-the-secret\n")
        (tmp / "secrets" / "upstream-pw").write_text("unused-basic-pw\n")
        token_tls = {"verify": "custom", "ca_bundle": str(provider.ca_bundle)}
        self.ports = {name: free_port() for name in ("a", "b", "jwt", "wrong", "switch")}
        upstream_tls = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}

        def conn(name: str, auth: dict[str, str]) -> dict[str, Any]:
            return {"url": upstream.base_url, "listen": f"127.0.0.1:{self.ports[name]}",
                    "auth": auth, "tls": upstream_tls}

        self.config: dict[str, Any] = {
            "admin": {"listen": None},
            "basic_auth": {"up": {"username": "svc", "password_file": "secrets/upstream-pw"}},
            "oauth": {
                "shared": {"token_url": provider.token_url, "client_id": basic_client.client_id,
                           "client_auth": "client_secret_basic",
                           "client_secret_file": "secrets/basic-secret",
                           "scopes": list(provider.scopes), "tls": token_tls},
                "smart": {"token_url": provider.token_url, "client_id": rs384.client_id,
                          "client_auth": "private_key_jwt",
                          "private_key_file": "secrets/rs384.pem", "key_id": rs384.key_id,
                          "signing_alg": "RS384", "scopes": list(provider.scopes),
                          "tls": token_tls},
                "broken": {"token_url": provider.token_url, "client_id": "sidecar-unknown",
                           "client_secret_file": "secrets/wrong", "tls": token_tls},
            },
            "connections": {
                "a": conn("a", {"oauth": "shared"}),
                "b": conn("b", {"oauth": "shared"}),
                "jwt": conn("jwt", {"oauth": "smart"}),
                "wrong": conn("wrong", {"oauth": "broken"}),
                "switch": conn("switch", {"basic": "up"}),
            },
        }
        self.sidecar = start(self.config, directory=tmp).process
        self.path = self.sidecar.config

    def save(self) -> None:
        write_config(self.tmp, self.config)

    def url(self, name: str, path: str = "/metadata") -> str:
        return f"http://127.0.0.1:{self.ports[name]}{path}"

    def requests_by(self, client_id: str) -> int:
        return sum(1 for r in self.provider.recent_requests() if r.get("client_id") == client_id)


@pytest.fixture
def setup(tmp_path: Path, pki: TestPKI, oauth_provider: OAuthTestProvider,
          bearer_validator: BearerValidator,
          start_sidecar: StartSidecar) -> Iterator[tuple[OAuthSetup, RejectOnce]]:
    check = RejectOnce(bearer_validator)
    with fhir_upstream(pki.server(name="oauth-upstream"), auth=check) as upstream:
        yield OAuthSetup(tmp_path, pki, oauth_provider, upstream, start_sidecar), check


def test_bearer_tokens_injected_and_shared(setup: tuple[OAuthSetup, RejectOnce]) -> None:
    s, _ = setup
    with httpx.Client(timeout=30, trust_env=False) as client:
        for name in ("a", "b", "a", "b", "jwt"):
            response = client.get(s.url(name), headers={"Authorization": "Basic eDp5"})
            assert response.status_code == 200, response.text
    seen = s.upstream.requests_seen
    assert all(r.headers["authorization"].startswith("Bearer ") for r in seen)
    # Both connections of the shared definition use its one token.
    shared = {r.headers["authorization"] for r in seen[:4]}
    assert len(shared) == 1
    assert s.requests_by(s.provider.clients["basic"].client_id) == 1
    assert s.requests_by(s.provider.clients["rs384"].client_id) == 1


def test_token_unavailable_quotes_the_endpoint(setup: tuple[OAuthSetup, RejectOnce]) -> None:
    s, _ = setup
    response = httpx.get(s.url("wrong"), timeout=30, trust_env=False)
    assert response.status_code == 503
    assert response.headers["X-Sidecar-Error"] == "token-unavailable"
    diagnostics = response.json()["issue"][0]["diagnostics"]
    assert "'wrong'" in diagnostics and "'broken'" in diagnostics
    assert "invalid_client" in diagnostics and s.provider.token_url in diagnostics
    assert "not-the-secret" not in s.sidecar.output


def test_upstream_401_drops_token_and_retries_once(
        setup: tuple[OAuthSetup, RejectOnce]) -> None:
    s, check = setup
    client_id = s.provider.clients["basic"].client_id
    assert httpx.get(s.url("a"), timeout=30, trust_env=False).status_code == 200
    check.enabled = True
    payload = {"resourceType": "Patient", "name": [{"family": "Retried"}]}
    response = httpx.post(s.url("a", "/Patient"), json=payload, timeout=30, trust_env=False)
    assert response.status_code == 201, response.text + s.sidecar.output[-3000:]
    assert response.json()["name"] == payload["name"]
    assert len(check.rejected) == 1
    assert s.requests_by(client_id) == 2  # the rejected token was replaced once
    tokens = [r.headers["authorization"] for r in s.upstream.requests_seen]
    assert tokens[-1] != tokens[-2]


def test_reload_refetches_only_changed_definitions(
        setup: tuple[OAuthSetup, RejectOnce]) -> None:
    s, _ = setup
    shared_id = s.provider.clients["basic"].client_id
    smart_id = s.provider.clients["rs384"].client_id
    with httpx.Client(timeout=30, trust_env=False) as client:
        assert client.get(s.url("a")).status_code == 200
        assert client.get(s.url("jwt")).status_code == 200
    before_shared, before_smart = s.requests_by(shared_id), s.requests_by(smart_id)

    reloads = len(s.sidecar.events("config_reloaded"))
    s.config["oauth"]["shared"]["scopes"] = [s.provider.scopes[0]]
    s.save()
    wait_until(lambda: len(s.sidecar.events("config_reloaded")) > reloads, LIVE_DEADLINE,
               message="the reload")
    with httpx.Client(timeout=30, trust_env=False) as client:
        assert client.get(s.url("a")).status_code == 200
        assert client.get(s.url("jwt")).status_code == 200
    assert s.requests_by(shared_id) == before_shared + 1
    assert s.requests_by(smart_id) == before_smart


def test_assignment_switched_from_basic_to_oauth(setup: tuple[OAuthSetup, RejectOnce]) -> None:
    s, _ = setup
    assert httpx.get(s.url("switch"), timeout=30, trust_env=False).status_code == 401
    s.config["connections"]["switch"]["auth"] = {"oauth": "shared"}
    s.save()
    wait_until(lambda: httpx.get(s.url("switch"), timeout=30, trust_env=False).status_code
               == 200, LIVE_DEADLINE, interval=0.1, message="the switch to OAuth")
    assert s.upstream.requests_seen[-1].headers["authorization"].startswith("Bearer ")


def test_check_online_fetches_tokens(setup: tuple[OAuthSetup, RejectOnce]) -> None:
    s, _ = setup
    result = subprocess.run([sys.executable, "-m", "sidecar", "check", "--online", "-c",
                             str(s.path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1  # the 'broken' definition fails
    out = result.stdout
    assert "OAUTH DEFINITION" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "client_secret_basic" in lines["shared"] and " ok " in lines["shared"]
    assert "private_key_jwt" in lines["smart"] and "system/Patient.rs" in lines["smart"]
    assert "invalid_client" in lines["broken"]

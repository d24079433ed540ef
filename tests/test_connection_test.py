"""``POST /api/connections/{name}/test`` and ``POST /api/oauth/{name}/test`` against the real
sidecar process: real TLS upstreams (one whose CA the connection does not trust, one that
echoes the credentials it got), the real oidc-provider, a closed port, a wrong password; the
rate limit, read-only mode, and no secret in any form in the raw answer bytes."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, quote_plus

import httpx
import pytest
from support.bearer import BearerValidator
from support.constants import UPSTREAM_PASSWORD, UPSTREAM_USER
from support.fhir_routes import FhirAppForTests, fhir_upstream
from support.oauth_provider import OAuthTestProvider
from support.pki import TestPKI
from support.sidecar_process import free_port, wait_until
from support.sidecars import StartSidecar

from sidecar.admin.probe_gate import ProbeBusy, ProbeGate
from sidecar.testkit.fhir_app import IncomingRequest, Reply, error_reply, fhir_reply
from sidecar.testkit.fhir_resources import capability_statement
from sidecar.testkit.fhir_server import FhirTestServer, server_tls_context

ADMIN_TOKEN = "probe-admin-token-Xe42"
ECHO_USER = "echo.user"
# "+", "/", "&", "%", "=", "?", space and non-ASCII: every encoding differs from the raw text.
ECHO_PASSWORD = "Pr+obe/s3cret&Ω 42%="
ECHO_CLIENT = "echo.client"
ECHO_CLIENT_SECRET = "cl1ent=Secret?x+y/z&Ω"
WRONG_PASSWORD = "wrong-pw-Tz81"
DEADLINE = 60.0


class EchoingFhirApp(FhirAppForTests):
    """A hostile FHIR server that quotes the request's credentials back in every answer:
    ``[base]/metadata`` in a CapabilityStatement's software name, ``[base]/refuse/metadata``
    in a 401 OperationOutcome."""

    def route(self, request: IncomingRequest, segments: list[str],
              query: dict[str, list[str]]) -> Reply:
        authorization = (request.headers.get("authorization")
                         or request.headers.get("Authorization") or "")
        echo = _echo(authorization)
        if segments == ["metadata"]:
            statement = capability_statement(self.base_url)
            statement["software"] = {"name": f"echo {echo}", "version": echo}
            statement["fhirVersion"] = f"4.0.1 {echo}"
            return fhir_reply(200, statement)
        if segments == ["refuse", "metadata"]:
            return error_reply(401, f"refused: {echo}",
                               **{"WWW-Authenticate": f"Basic realm=\"{authorization}\""})
        return super().route(request, segments, query)


def _echo(authorization: str) -> str:
    """The header, its Base64 alone, the decoded pair and the password URL-encoded."""
    parts = [authorization]
    scheme, _, value = authorization.partition(" ")
    parts.append(value)
    if scheme.lower() == "basic":
        decoded = base64.b64decode(value).decode()
        password = decoded.partition(":")[2]
        parts += [decoded, password, quote(password, safe=""), quote_plus(password)]
    return " | ".join(parts)


class EchoingTokenEndpoint:
    """An HTTPS token endpoint that refuses every request and quotes it (header and form
    body, and the client secret decoded from either) in its error_description."""

    def __init__(self, pki: TestPKI):
        self.requests = 0

        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                endpoint.requests += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                auth = self.headers.get("Authorization") or ""
                form = parse_qs(body)
                secret = (form.get("client_secret") or [""])[0]
                echo = f"you sent {_echo(auth)} with body {body} and secret {secret}"
                data = json.dumps({"error": "invalid_client",
                                   "error_description": echo}).encode()
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        context = server_tls_context(pki.server(name="probe-echo-token"), None)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://localhost:{self._server.server_address[1]}/token"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> EchoingTokenEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def secret_forms(identity: str, secret: str) -> set[str]:
    """Every form the raw answer must not contain: raw, JSON-escaped, URL-encoded, and the
    Base64 of identity:secret (plain and form-urlencoded parts)."""
    forms = {secret, json.dumps(secret)[1:-1], quote(secret, safe=""), quote(secret),
             quote_plus(secret), quote_plus(secret, safe="")}
    for pair in (f"{identity}:{secret}",
                 f"{quote_plus(identity, safe='')}:{quote_plus(secret, safe='')}"):
        std = base64.b64encode(pair.encode()).decode()
        url = base64.urlsafe_b64encode(pair.encode()).decode()
        forms |= {std, std.rstrip("="), url, url.rstrip("=")}
    return forms


class Sidecar:
    def __init__(self, tmp: Path, pki: TestPKI, provider: OAuthTestProvider,
                 good: FhirTestServer, other_ca: FhirTestServer, bearer: FhirTestServer,
                 echo: FhirTestServer, echo_token: EchoingTokenEndpoint, start: StartSidecar):
        self.tmp = tmp
        self.admin = f"127.0.0.1:{free_port()}"
        secrets = tmp / "secrets"
        secrets.mkdir()
        (secrets / "admin-token").write_text(ADMIN_TOKEN + "\n")
        (secrets / "upstream-pw").write_text(UPSTREAM_PASSWORD + "\n")
        (secrets / "wrong-pw").write_text(WRONG_PASSWORD + "\n")
        (secrets / "echo-pw").write_text(ECHO_PASSWORD + "\n")
        (secrets / "echo-client").write_text(ECHO_CLIENT_SECRET + "\n")
        (secrets / "client").write_text(str(provider.clients["basic"].secret) + "\n")
        trusted = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
        token_tls = {"verify": "custom", "ca_bundle": str(provider.ca_bundle)}
        self.closed_port = free_port()  # nothing listens there

        def echo_oauth(method: str) -> dict[str, Any]:
            return {"token_url": echo_token.url, "client_id": ECHO_CLIENT,
                    "client_auth": method, "client_secret_file": "secrets/echo-client",
                    "tls": trusted}

        self.running = start({
            "admin": {"listen": self.admin, "token_file": "secrets/admin-token"},
            "basic_auth": {
                "up": {"username": UPSTREAM_USER, "password_file": "secrets/upstream-pw"},
                "wrong": {"username": UPSTREAM_USER, "password_file": "secrets/wrong-pw"},
                "echo": {"username": ECHO_USER, "password_file": "secrets/echo-pw"}},
            "oauth": {
                "prov": {"token_url": provider.token_url,
                         "client_id": provider.clients["basic"].client_id,
                         "client_auth": "client_secret_basic",
                         "client_secret_file": "secrets/client",
                         "scopes": list(provider.scopes), "tls": token_tls},
                "echo-basic": echo_oauth("client_secret_basic"),
                "echo-post": echo_oauth("client_secret_post"),
                "untrusted": {"token_url": provider.token_url,
                              "client_id": provider.clients["basic"].client_id,
                              "client_secret_file": "secrets/client", "tls": trusted}},
            "connections": {
                "good": {"url": good.base_url, "auth": {"basic": "up"}, "tls": trusted},
                "wrong-ca": {"url": other_ca.base_url, "auth": {"basic": "up"},
                             "tls": trusted},
                "closed": {"url": f"https://localhost:{self.closed_port}/fhir",
                           "auth": {"basic": "up"}, "tls": trusted},
                "wrong-pw": {"url": good.base_url, "auth": {"basic": "wrong"},
                             "tls": trusted},
                "oauth": {"url": bearer.base_url, "auth": {"oauth": "prov"}, "tls": trusted},
                "echo": {"url": echo.base_url, "auth": {"basic": "echo"}, "tls": trusted},
                "echo-refused": {"url": f"{echo.base_url}/refuse", "auth": {"basic": "echo"},
                                 "tls": trusted},
            },
        }, directory=tmp)
        self.path, self.process = self.running.config_path, self.running.process
        self.api = httpx.Client(base_url=f"http://{self.admin}", trust_env=False,
                                timeout=DEADLINE)
        self.auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def test(self, kind: str, name: str, fresh: bool = False) -> httpx.Response:
        """POST the test; waits out the one-per-second limit (the answer says how long)."""
        path = f"/api/{kind}/{name}/test" + ("?fresh=1" if fresh else "")
        deadline = time.monotonic() + DEADLINE
        while True:
            response = self.api.post(path, headers=self.auth)
            if response.status_code != 429 or time.monotonic() > deadline:
                return response
            time.sleep(float(response.headers["Retry-After"]))  # the server's own backoff


def steps(response: httpx.Response) -> dict[str, dict[str, Any]]:
    assert response.status_code == 200, response.text
    return {step["step"]: step for step in response.json()["steps"]}


@pytest.fixture(scope="module")
def bearer_upstream(pki: TestPKI, oauth_provider_process: OAuthTestProvider
                    ) -> Iterator[FhirTestServer]:
    provider = oauth_provider_process
    validator = BearerValidator(provider.jwks(), audience=provider.default_resource,
                                issuer=provider.issuer)
    with fhir_upstream(pki.server(name="probe-bearer"), auth=validator) as server:
        yield server


@pytest.fixture(scope="module")
def echo_upstream(pki: TestPKI) -> Iterator[FhirTestServer]:
    with FhirTestServer(pki.server(name="probe-echo"), app_class=EchoingFhirApp) as server:
        yield server


@pytest.fixture(scope="module")
def echo_token(pki: TestPKI) -> Iterator[EchoingTokenEndpoint]:
    with EchoingTokenEndpoint(pki) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI, upstreams: Any,
            oauth_provider_process: OAuthTestProvider, bearer_upstream: FhirTestServer,
            echo_upstream: FhirTestServer, echo_token: EchoingTokenEndpoint,
            start_module_sidecar: StartSidecar) -> Iterator[Sidecar]:
    s = Sidecar(tmp_path_factory.mktemp("probe"), pki, oauth_provider_process,
                upstreams.get("good"), upstreams.get("other_ca"), bearer_upstream,
                echo_upstream, echo_token, start_module_sidecar)
    yield s
    s.api.close()
    s.running.stop()
    for secret in (ECHO_PASSWORD, ECHO_CLIENT_SECRET, WRONG_PASSWORD, UPSTREAM_PASSWORD):
        assert secret not in s.process.output, "a secret reached the log"


def test_a_working_basic_connection(sidecar: Sidecar, pki: TestPKI) -> None:
    response = sidecar.test("connections", "good")
    report = response.json()
    assert report["ok"] is True and report["kind"] == "connection"
    found = steps(response)
    assert [s["status"] for s in found.values()] == ["ok"] * 4
    assert all(s["ms"] is not None and s["ms"] >= 0 for s in found.values())
    assert "resolved to 127.0.0.1" in found["connect"]["detail"]
    tls = found["tls"]
    assert tls["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert tls["certificate"]["subject"] and "valid for localhost" in tls["detail"]
    assert tls["certificate"]["issuer"] and tls["certificate"]["not_after"].endswith("Z")
    assert str(pki.ca_bundle_path) in tls["detail"]
    assert "basic_auth.up" in found["credentials"]["detail"]
    metadata = found["metadata"]
    assert metadata["http_status"] == 200
    assert metadata["fhir_version"] == "4.0.1"
    assert metadata["software"] and "fhir-sidecar demo FHIR server" in metadata["software"]
    assert "CapabilityStatement" in metadata["detail"]
    assert response.headers["Cache-Control"] == "no-store"
    # One log line per test, with the verdict and without the details.
    line = wait_until(lambda: next((r for r in sidecar.process.events("connection_test")
                                    if r.get("name") == "good"), None),
                      DEADLINE, message="the test's log line")
    assert line["ok"] is True and line["kind"] == "connection" and "failed_step" not in line


def count_token_requests_from_zero(sidecar: Sidecar, oauth_provider: OAuthTestProvider) -> None:
    """Wait for the sidecar's own first token, then zero the provider's counters.

    The module's sidecar fetches that token in the background at start; in a random order the
    first test to count token requests would otherwise count it too.
    """
    wait_until(lambda: sidecar.api.get("/api/oauth/prov").json()["token"]["valid_until"],
               DEADLINE, message="the sidecar's first token")
    oauth_provider.reset()


def test_an_oauth_connection_reuses_the_token_unless_fresh(
        sidecar: Sidecar, oauth_provider: OAuthTestProvider,
        bearer_upstream: FhirTestServer) -> None:
    count_token_requests_from_zero(sidecar, oauth_provider)
    reused = steps(sidecar.test("connections", "oauth"))
    assert reused["credentials"]["status"] == "ok", reused["credentials"]
    assert reused["credentials"]["token_reused"] is True
    assert reused["credentials"]["token_expires_in_seconds"] > 0
    assert "reused the cached token" in reused["credentials"]["detail"]
    assert reused["metadata"]["status"] == "ok", reused["metadata"]  # the upstream checked it
    assert oauth_provider.stats()["token_requests"] == 0

    fresh = steps(sidecar.test("connections", "oauth", fresh=True))
    assert fresh["credentials"]["token_reused"] is False
    assert "fetched a new token" in fresh["credentials"]["detail"]
    assert fresh["metadata"]["status"] == "ok", fresh["metadata"]
    assert oauth_provider.stats()["token_requests"] == 1

    # The fresh token did not replace the cache: the next plain test reuses it again.
    again = steps(sidecar.test("connections", "oauth"))
    assert again["credentials"]["token_reused"] is True
    assert oauth_provider.stats()["token_requests"] == 1


def test_an_oauth_definition_alone(sidecar: Sidecar, oauth_provider: OAuthTestProvider) -> None:
    count_token_requests_from_zero(sidecar, oauth_provider)
    response = sidecar.test("oauth", "prov", fresh=True)
    report = response.json()
    assert report["kind"] == "oauth" and report["url"] == oauth_provider.token_url
    found = steps(response)
    assert list(found) == ["connect", "tls", "credentials"]
    assert all(s["status"] == "ok" for s in found.values()), found
    assert found["tls"]["certificate"]["subject"]
    assert oauth_provider.stats()["token_requests"] == 1


def test_a_ca_that_does_not_trust_the_server(sidecar: Sidecar, pki: TestPKI) -> None:
    response = sidecar.test("connections", "wrong-ca")
    assert response.json()["ok"] is False
    found = steps(response)
    assert found["connect"]["status"] == "ok"
    tls = found["tls"]
    assert tls["status"] == "failed"
    assert "is not signed by a CA in" in tls["detail"], tls["detail"]
    assert str(pki.ca_bundle_path) in tls["detail"]
    assert "(refused certificate: CN=localhost)" in tls["detail"]
    line = wait_until(lambda: next((r for r in sidecar.process.events("connection_test")
                                    if r.get("name") == "wrong-ca"), None),
                      DEADLINE, message="the test's log line")
    assert line["ok"] is False and line["failed_step"] == "tls"
    for later in ("credentials", "metadata"):
        assert found[later]["status"] == "skipped" and found[later]["ms"] is None
        assert "earlier step failed" in found[later]["detail"]


def test_an_oauth_definition_whose_ca_does_not_trust_the_token_endpoint(
        sidecar: Sidecar, oauth_provider: OAuthTestProvider) -> None:
    count_token_requests_from_zero(sidecar, oauth_provider)
    found = steps(sidecar.test("oauth", "untrusted"))
    assert found["tls"]["status"] == "failed"
    assert "is not signed by a CA in" in found["tls"]["detail"]
    assert found["credentials"]["status"] == "skipped"
    assert oauth_provider.stats()["token_requests"] == 0


def test_a_server_that_requires_a_client_certificate(tmp_path: Path, pki: TestPKI,
                                                     upstreams: Any,
                                                     start_sidecar: StartSidecar) -> None:
    mtls = upstreams.get("mtls")
    admin = f"127.0.0.1:{free_port()}"
    (tmp_path / "admin-token").write_text(ADMIN_TOKEN + "\n")
    start_sidecar({
        "admin": {"listen": admin, "token_file": "admin-token"},
        "connections": {"mtls": {"url": mtls.base_url, "tls": {
            "verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}}}, directory=tmp_path)
    with httpx.Client(base_url=f"http://{admin}", trust_env=False, timeout=DEADLINE) as api:
        found = steps(api.post("/api/connections/mtls/test",
                               headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}))
    # TLS 1.3 servers refuse the missing certificate after the client's handshake: the test
    # waits for their verdict, so it is the TLS step that fails.
    assert found["tls"]["status"] == "failed", found
    assert "requires a client certificate and none is configured" in found["tls"]["detail"]
    assert found["credentials"]["status"] == found["metadata"]["status"] == "skipped"


def test_an_unreachable_port(sidecar: Sidecar) -> None:
    found = steps(sidecar.test("connections", "closed"))
    assert found["connect"]["status"] == "failed"
    assert "refused the connection" in found["connect"]["detail"]
    assert f"port {sidecar.closed_port}" in found["connect"]["detail"]
    assert [found[s]["status"] for s in ("tls", "credentials", "metadata")] == ["skipped"] * 3


def test_metadata_401(sidecar: Sidecar) -> None:
    found = steps(sidecar.test("connections", "wrong-pw"))
    assert [found[s]["status"] for s in ("connect", "tls", "credentials")] == ["ok"] * 3
    metadata = found["metadata"]
    assert metadata["status"] == "failed" and metadata["http_status"] == 401
    assert "401" in metadata["detail"] and "credentials were refused" in metadata["detail"]
    assert "invalid username or password" in metadata["detail"]  # the server's own words
    assert WRONG_PASSWORD not in json.dumps(found)


def test_nothing_secret_in_the_raw_answer(sidecar: Sidecar, echo_token: EchoingTokenEndpoint
                                          ) -> None:
    answers = {
        "echo (200)": sidecar.test("connections", "echo"),
        "echo (401)": sidecar.test("connections", "echo-refused"),
        "echo-basic": sidecar.test("oauth", "echo-basic", fresh=True),
        "echo-post": sidecar.test("oauth", "echo-post", fresh=True),
    }
    forbidden = (secret_forms(ECHO_USER, ECHO_PASSWORD)
                 | secret_forms(ECHO_CLIENT, ECHO_CLIENT_SECRET) | {ADMIN_TOKEN})
    for place, response in answers.items():
        assert response.status_code == 200, (place, response.text)
        for form in forbidden:
            assert form.encode() not in response.content, f"{place} shows {form!r}"
    # The hostile servers did echo, and the report quotes them, redacted.
    statement = steps(answers["echo (200)"])["metadata"]
    assert statement["status"] == "ok" and "[redacted]" in statement["software"]
    refused = steps(answers["echo (401)"])["metadata"]
    assert refused["http_status"] == 401 and "[redacted]" in refused["detail"]
    for name in ("echo-basic", "echo-post"):
        credentials = steps(answers[name])["credentials"]
        assert credentials["status"] == "failed" and "[redacted]" in credentials["detail"]
    assert echo_token.requests >= 2


def test_one_at_a_time_and_one_per_second(sidecar: Sidecar) -> None:
    first = sidecar.test("connections", "good")
    assert first.status_code == 200
    # Right after a test: too soon.
    soon = sidecar.api.post("/api/connections/good/test", headers=sidecar.auth)
    assert soon.status_code == 429, soon.text
    assert int(soon.headers["Retry-After"]) >= 1
    assert "less than 1 s ago" in soon.json()["error"]
    # Two at once (another name): one runs, the other is refused while it runs or too soon.
    with ThreadPoolExecutor(2) as pool:
        deadline = time.monotonic() + DEADLINE
        while True:
            answers = list(pool.map(
                lambda _: sidecar.api.post("/api/connections/wrong-pw/test",
                                           headers=sidecar.auth), range(2)))
            codes = sorted(a.status_code for a in answers)
            if codes != [429, 429] or time.monotonic() > deadline:
                break
            time.sleep(float(answers[0].headers["Retry-After"]))
    assert codes == [200, 429], [a.text for a in answers]
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["Retry-After"] == "1"
    assert "is running" in refused.json()["error"] or "ago" in refused.json()["error"]
    # A different name is not held up by either.
    assert sidecar.test("connections", "closed").status_code == 200


def test_a_concurrent_test_is_refused_while_one_runs(sidecar: Sidecar,
                                                     oauth_provider: OAuthTestProvider) -> None:
    # The token endpoint answers late, so the first test is still running when the second
    # arrives: it has reached the token endpoint (counted on arrival) and waits there.
    count_token_requests_from_zero(sidecar, oauth_provider)
    oauth_provider.fail("delay", delay_ms=3000)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(sidecar.test, "oauth", "prov", True)
        wait_until(lambda: oauth_provider.stats()["token_requests"] >= 1, DEADLINE,
                   message="the first test's token request")
        second = sidecar.api.post("/api/oauth/prov/test", headers=sidecar.auth)
        assert second.status_code == 429
        assert "is running" in second.json()["error"]
        assert second.headers["Retry-After"] == "1"
        assert steps(slow.result(timeout=DEADLINE))["credentials"]["status"] == "ok"
    assert oauth_provider.stats()["token_requests"] == 1  # the refused one asked nobody


def test_unknown_names_and_access(sidecar: Sidecar) -> None:
    for path in ("/api/connections/nope/test", "/api/oauth/nope/test"):
        response = sidecar.api.post(path, headers=sidecar.auth)
        assert response.status_code == 404 and "nope" in response.json()["error"]
    assert sidecar.api.post("/api/connections/Bad%20Name/test",
                            headers=sidecar.auth).status_code == 400
    # A body is not taken, GET is not a test, and the admin token is needed, even on a
    # loopback listener.
    assert sidecar.api.post("/api/connections/good/test", headers=sidecar.auth,
                            content=b"{}").status_code == 413
    assert sidecar.api.get("/api/connections/good/test",
                           headers=sidecar.auth).status_code == 405
    assert sidecar.api.post("/api/connections/good/test").status_code == 401
    assert sidecar.api.post("/api/connections/good/test", headers={
        "Authorization": "Bearer wrong"}).status_code == 401
    # The wrong token makes this address wait a moment (429) before its next attempt.
    wait_until(lambda: sidecar.api.post("/api/connections/nope/test",
                                        headers=sidecar.auth).status_code == 404,
               DEADLINE, message="the failed-token wait to pass")


def test_a_browser_session_needs_its_csrf_token(sidecar: Sidecar) -> None:
    with httpx.Client(base_url=f"http://{sidecar.admin}", trust_env=False,
                      timeout=DEADLINE) as browser:
        login = browser.post("/login", data={"token": ADMIN_TOKEN})
        assert login.status_code == 303
        page = browser.get("/").text
        [csrf] = set(re.findall(r'id="test-connections-good"[^>]*data-csrf="([^"]+)"', page,
                                re.DOTALL))
        without = browser.post("/api/connections/good/test")
        assert without.status_code == 403 and "X-CSRF-Token" in without.json()["error"]
        deadline = time.monotonic() + DEADLINE
        while True:
            with_csrf = browser.post("/api/connections/good/test",
                                     headers={"X-CSRF-Token": csrf})
            if with_csrf.status_code != 429 or time.monotonic() > deadline:
                break
            time.sleep(float(with_csrf.headers["Retry-After"]))  # the server's own backoff
        assert steps(with_csrf)["metadata"]["status"] == "ok"


def test_read_only_mode_still_tests(sidecar: Sidecar) -> None:
    mode = sidecar.path.stat().st_mode
    os.chmod(sidecar.path, 0o444)
    try:
        change = sidecar.api.put("/api/basic-auth/x", json={"username": "u", "password": "p"},
                                 headers=sidecar.auth)
        assert change.status_code == 403 and "read-only" in change.json()["error"]
        found = steps(sidecar.test("connections", "good"))
        assert all(s["status"] == "ok" for s in found.values())
    finally:
        os.chmod(sidecar.path, stat.S_IMODE(mode))


def test_through_an_egress_proxy(tmp_path: Path, pki: TestPKI, upstreams: Any,
                                 start_sidecar: StartSidecar) -> None:
    from support.tinyproxy import Tinyproxy

    good = upstreams.get("good")
    proxy_password = "proxy-pw-Kd72x"  # tinyproxy.conf takes no quoting
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "admin-token").write_text(ADMIN_TOKEN + "\n")
    (secrets / "proxy-pw").write_text(proxy_password + "\n")
    (secrets / "wrong-proxy-pw").write_text("not-the-proxy-pw\n")
    (secrets / "upstream-pw").write_text(UPSTREAM_PASSWORD + "\n")
    trusted = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
    admin = f"127.0.0.1:{free_port()}"
    with Tinyproxy(tmp_path / "tinyproxy", auth=("egress", proxy_password)) as proxy:
        start_sidecar({
            "admin": {"listen": admin, "token_file": "secrets/admin-token"},
            "basic_auth": {"up": {"username": UPSTREAM_USER,
                                  "password_file": "secrets/upstream-pw"}},
            "egress_proxies": {
                "corp": {"url": proxy.url, "username": "egress",
                         "password_file": "secrets/proxy-pw"},
                "corp-wrong": {"url": proxy.url, "username": "egress",
                               "password_file": "secrets/wrong-proxy-pw"}},
            "connections": {
                "through": {"url": good.base_url, "auth": {"basic": "up"}, "tls": trusted,
                            "via": "corp"},
                "refused": {"url": good.base_url, "auth": {"basic": "up"}, "tls": trusted,
                            "via": "corp-wrong"}},
        }, directory=tmp_path)
        with httpx.Client(base_url=f"http://{admin}", trust_env=False,
                          timeout=DEADLINE) as api:
            auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            through = api.post("/api/connections/through/test", headers=auth)
            found = steps(through)
            assert all(s["status"] == "ok" for s in found.values()), found
            assert "through egress proxy 'corp'" in found["connect"]["detail"]
            assert f"localhost:{good.port}" in proxy.connects()
            assert found["metadata"]["http_status"] == 200
            refused = steps(api.post("/api/connections/refused/test", headers=auth))
            assert refused["connect"]["status"] == "failed"
            assert "refused the tunnel" in refused["connect"]["detail"]
            assert "401 Unauthorized" in refused["connect"]["detail"]  # tinyproxy says 401
            for response in (through,):
                for form in secret_forms("egress", proxy_password):
                    assert form.encode() not in response.content


def test_the_gate_counts_from_each_start() -> None:
    now = [100.0]
    gate = ProbeGate(clock=lambda: now[0])
    gate.enter("a", "a")
    with pytest.raises(ProbeBusy, match="is running") as running:
        gate.enter("a", "a")
    assert running.value.retry_after == 1
    gate.enter("b", "b")  # another name is not held up
    gate.leave("a")
    now[0] += 0.4
    with pytest.raises(ProbeBusy, match="less than 1 s ago") as soon:
        gate.enter("a", "a")
    assert soon.value.retry_after == 1
    now[0] += 0.7
    gate.enter("a", "a")  # a second after the last start

"""A token endpoint cannot drive the sidecar into a storm or a crash
(docs/architecture.md#credentials): against a scripted TLS token endpoint answering
``expires_in`` of ``0.001``, ``1``, ``true``,
``9223372036854775807`` and ``1e20``, with the sidecar's real limits (RefreshPolicy's
defaults), counting the endpoint's requests over fixed windows: at most 12 token requests a
minute, never two within 5 s, requests waiting for the next fetch within their own timeout,
lifetimes capped at a year; through the real sidecar, the 401 retry skipped once the budget is
spent and the Test button saying so; every admin 500 logged with its request id."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.pki import TestPKI
from support.scripted_token_endpoint import ScriptedTokenEndpoint
from support.sidecar_process import free_port, wait_until, write_config
from support.sidecars import StartSidecar

from sidecar.admin import ListenerState, StatusSources, build_app
from sidecar.admin.server import AdminServer
from sidecar.config.models import OAuthDefinition, TlsSettings
from sidecar.credentials import RefreshPolicy, TokenSource, TokenUnavailable
from sidecar.observe.metrics import SidecarMetrics
from sidecar.report.logs import JsonFormatter
from sidecar.runtime.live import LiveConfig
from sidecar.testkit.fhir_server import FhirTestServer
from sidecar.tls.policy import compile_tls_policy

YEAR = 365 * 86400
REAL = RefreshPolicy()  # the sidecar's own limits: 12 a minute, 5 s apart
ADMIN_TOKEN = "budget-admin-token-Vb63"


def run(coro: Coroutine[Any, Any, None], deadline: float = 60.0) -> None:
    asyncio.run(asyncio.wait_for(coro, deadline))


@pytest.fixture
def endpoint(pki: TestPKI) -> Any:
    with ScriptedTokenEndpoint(pki.server(name="scripted-token")) as scripted:
        yield scripted


def source_for(endpoint: ScriptedTokenEndpoint, pki: TestPKI,
               metrics: SidecarMetrics | None = None) -> TokenSource:
    definition = OAuthDefinition(
        token_url=endpoint.token_url, client_id="storm-client",
        client_secret_env="UNUSED_THE_SECRET_IS_PASSED_IN_MEMORY",
        tls=TlsSettings(verify="custom", ca_bundle=pki.ca_bundle_path))
    return TokenSource("storm", definition, client_secret="storm-secret-Jc52",
                       private_key_pem=None, tls=compile_tls_policy(definition.tls),
                       observer=metrics, policy=REAL)


@asynccontextmanager
async def started(source: TokenSource) -> AsyncIterator[TokenSource]:
    source.start()
    try:
        yield source
    finally:
        await source.aclose()


@pytest.mark.parametrize("expires_in", ["0.001", "1", "true"])
def test_a_short_or_senseless_lifetime_makes_no_storm(
        endpoint: ScriptedTokenEndpoint, pki: TestPKI, expires_in: str) -> None:
    endpoint.expires_in = expires_in
    window = 7.0
    got: list[str] = []
    refused: list[str] = []

    async def app(source: TokenSource, until: float) -> None:
        while time.monotonic() < until:
            try:
                got.append(await source.token(wait_limit=10.0))
            except TokenUnavailable as exc:
                refused.append(exc.reason)
            await asyncio.sleep(0.05)  # traffic pacing, not synchronisation

    async def scenario() -> None:
        async with started(source_for(endpoint, pki)) as source:
            start = time.monotonic()
            await asyncio.gather(*(app(source, start + window) for _ in range(10)))
            # Idle as well as busy: nothing more than the pace allows.
            assert endpoint.count_between(start - 1, start + window) <= 2, endpoint.arrivals
            gaps = [b - a for a, b in zip(endpoint.arrivals, endpoint.arrivals[1:],
                                          strict=False)]
            assert all(gap >= REAL.min_interval - 0.05 for gap in gaps), gaps

    run(scenario())
    if expires_in == "true":
        # Not a number of seconds: refused, and retried no sooner than 5 s.
        assert not got and refused
        assert all("expires_in is not a number" in r for r in refused), set(refused)
    else:
        # The token is used as it is; callers in the gap wait for the next one (within their
        # 10 s) and get it: no 503 for them.
        assert got and not refused, set(refused)
        assert set(got) <= set(endpoint.issued)


def test_a_caller_whose_timeout_ends_before_the_next_fetch_is_told_at_once(
        endpoint: ScriptedTokenEndpoint, pki: TestPKI) -> None:
    endpoint.expires_in = "0.001"

    async def scenario() -> None:
        async with started(source_for(endpoint, pki)) as source:
            await source.token(wait_limit=10.0)  # the first fetch
            began = time.monotonic()
            with pytest.raises(TokenUnavailable) as caught:
                await source.token(wait_limit=1.0)
            assert time.monotonic() - began < 0.5  # told, not kept waiting
            assert re.fullmatch(r"the last token request was less than 5 s ago; next fetch "
                                r"in [1-5] s", caught.value.reason), caught.value.reason
            assert endpoint.count == 1

    run(scenario())


def test_at_most_12_token_requests_a_minute_then_the_budget_is_spent(
        endpoint: ScriptedTokenEndpoint, pki: TestPKI) -> None:
    metrics = SidecarMetrics()

    async def scenario() -> None:
        async with started(source_for(endpoint, pki, metrics)) as source:
            first = await source.token()
            answers: list[str] = []
            for _ in range(20):  # the Test button's fresh=1, as fast as it can be pressed
                try:
                    answers.append((await source.token_for_test(fresh=True)).value)
                except TokenUnavailable as exc:
                    answers.append(exc.reason)
            fresh, spent = answers[:11], answers[11:]
            assert set(fresh) <= set(endpoint.issued)
            for reason in spent:
                match = re.fullmatch(r"token budget spent; next fetch in (\d+) s", reason)
                assert match and 50 <= int(match[1]) <= 60, reason
            assert source.budget_spent()
            assert endpoint.count == 12
            # The requests keep the cached token; without one they are told at once.
            assert await source.token() == first
            source.invalidate(first)
            with pytest.raises(TokenUnavailable) as caught:
                await source.token(wait_limit=5.0)
            assert caught.value.reason.startswith("token budget spent; next fetch in ")
            with pytest.raises(TokenUnavailable):
                await source.fetch_once()
            assert endpoint.count == 12

    run(scenario())
    # Each request's time is in the histogram; the refusals sent nothing.
    text = metrics.exposition().decode()
    assert 'fhir_sidecar_token_request_duration_seconds_count{definition="storm"} 12.0' in text
    assert 'fhir_sidecar_token_requests_total{definition="storm",result="success"} 12.0' in text


@pytest.mark.parametrize("expires_in", ["9223372036854775807", "1e20"])
def test_a_lifetime_over_a_year_counts_as_a_year(
        endpoint: ScriptedTokenEndpoint, pki: TestPKI, expires_in: str,
        caplog: pytest.LogCaptureFixture) -> None:
    endpoint.expires_in = expires_in

    async def scenario() -> None:
        async with started(source_for(endpoint, pki)) as source:
            await source.token()
            status = source.status()
            assert status.valid_until is not None
            assert abs(status.valid_until.timestamp() - (time.time() + YEAR)) < 60
            probe = await source.token_for_test(fresh=False)
            assert YEAR - 60 < probe.expires_in <= YEAR
            assert (await source.fetch_once()).expires_in == YEAR

    with caplog.at_level(logging.WARNING, logger="sidecar.credentials.oauth"):
        run(scenario())
    capped = [r for r in caplog.records if getattr(r, "event", None)
              == "oauth_token_lifetime_capped"]
    assert capped and "a year" in capped[0].getMessage()
    assert endpoint.count == 2


# -- through the real sidecar ------------------------------------------------------------------

def _post_when_free(api: httpx.Client, path: str) -> dict[str, Any]:
    """A test, once the Test button's one-a-second limit lets it run."""
    found: list[httpx.Response] = []

    def attempt() -> bool:
        response = api.post(path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        found.append(response)
        return response.status_code != 429

    wait_until(attempt, 10, interval=0.1, message=f"the test of {path}")
    assert found[-1].status_code == 200, found[-1].text
    body: dict[str, Any] = found[-1].json()
    return body


def test_once_the_budget_is_spent_the_401_passes_and_the_test_says_so(
        tmp_path: Path, pki: TestPKI, upstream_good: FhirTestServer,
        start_sidecar: StartSidecar) -> None:
    with ScriptedTokenEndpoint(pki.server(name="scripted-token-2")) as endpoint, \
            ScriptedTokenEndpoint(pki.server(name="scripted-token-3"),
                                  expires_in="9223372036854775807") as forever:
        (tmp_path / "admin-token").write_text(ADMIN_TOKEN + "\n")
        trusted = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
        config = {
            "admin": {"listen": f"127.0.0.1:{free_port()}", "token_file": "admin-token"},
            "oauth": {"tok": {"token_url": endpoint.token_url, "client_id": "budget",
                              "client_secret": "budget-secret-Pn20", "tls": trusted},
                      "forever": {"token_url": forever.token_url, "client_id": "forever",
                                  "client_secret": "forever-secret-Qa93", "tls": trusted}},
            # The good upstream wants Basic: every bearer token gets 401.
            "connections": {
                "app": {"url": upstream_good.base_url, "listen": f"127.0.0.1:{free_port()}",
                        "auth": {"oauth": "tok"}, "tls": trusted},
                "long": {"url": upstream_good.base_url, "listen": f"127.0.0.1:{free_port()}",
                         "auth": {"oauth": "forever"}, "tls": trusted},
            },
        }
        sidecar = start_sidecar(config, directory=tmp_path)
        api = httpx.Client(base_url=sidecar.admin_url, trust_env=False, timeout=60)
        wait_until(lambda: endpoint.count == 1, 10, message="the token fetched at start")
        # Spend the budget: fresh tokens for the Test buttons of the definition and the
        # connection, in turn (each may be tested once a second).
        while endpoint.count < 12:
            _post_when_free(api, "/api/oauth/tok/test?fresh=1")
            if endpoint.count < 12:
                _post_when_free(api, "/api/connections/app/test?fresh=1")
        assert endpoint.count == 12
        tested = _post_when_free(api, "/api/oauth/tok/test?fresh=1")
        assert tested["ok"] is False
        credentials = next(s for s in tested["steps"] if s["step"] == "credentials")
        assert re.search(r"token budget spent; next fetch in \d+ s$", credentials["detail"]), \
            credentials

        # The upstream refuses the cached token: no retry now, its own 401 passes.
        refused = httpx.get(f"http://127.0.0.1:{sidecar.ports['app']}/metadata", timeout=30,
                            trust_env=False)
        assert refused.status_code == 401 and "X-Sidecar-Error" not in refused.headers
        assert endpoint.count == 12
        metrics = api.get("/metrics").text
        assert 'fhir_sidecar_auth_retries_total{connection="app"} 0.0' in metrics
        assert 'fhir_sidecar_upstream_rejections_total{connection="app",status="401"} 1.0' \
            in metrics

        # A lifetime past any date: every page answers (it was a 500 everywhere).
        wait_until(lambda: forever.count == 1, 10, message="the token of 'forever'")
        for path in ("/api/oauth", "/api/oauth/forever", "/api/connections", "/",
                     "/oauth", "/readyz?verbose=1"):
            assert api.get(path).status_code == 200, path
        until = api.get("/api/oauth/forever").json()["token"]["valid_until"]
        assert until.startswith(str(time.gmtime(time.time() + YEAR).tm_year))
        assert "oauth_token_lifetime_capped" in sidecar.process.output
        api.close()


# -- the admin listener's 500s -----------------------------------------------------------------

def test_every_admin_500_is_logged_with_its_request_id_and_no_secret(
        tmp_path: Path, pki: TestPKI, caplog: pytest.LogCaptureFixture) -> None:
    secret = "admin-500-secret-Hy28"
    path = write_config(tmp_path, {
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "basic_auth": {"b": {"username": "u", "password": secret}},
        "connections": {"a": {"url": "https://a.example/fhir", "auth": {"basic": "b"}}},
    })
    live = LiveConfig(path)

    def broken_listeners() -> ListenerState:
        raise RuntimeError(f"cannot tell: the password is {secret}")

    sources = StatusSources(live, SidecarMetrics(), broken_listeners)
    app = build_app(sources)

    async def scenario() -> list[httpx.Response]:
        server = AdminServer(app, f"127.0.0.1:{free_port()}")
        server.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://{server.address}",
                                         trust_env=False) as client:
                return [await client.get("/readyz"), await client.get("/readyz?verbose=1"),
                        await client.get("/healthz")]
        finally:
            await server.stop()

    with caplog.at_level(logging.ERROR, logger="fhir_sidecar"):
        ready, verbose, healthz = asyncio.run(scenario())
    assert healthz.status_code == 200 and "X-Request-ID" not in healthz.headers
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records
             if getattr(r, "event", None) == "admin_error"]
    assert len(lines) == 2
    for response, line in zip((ready, verbose), lines, strict=True):
        assert response.status_code == 500
        assert line["level"] == "error" and line["event"] == "admin_error"
        assert response.headers["X-Request-ID"] == line["request_id"]
        assert "RuntimeError: cannot tell: the password is [redacted]" in line["traceback"]
        assert "broken_listeners" in line["traceback"]  # a real traceback, line by line
        assert secret not in json.dumps(line) and secret not in response.text

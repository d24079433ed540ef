"""The admin listener: /healthz, /readyz (plain and verbose) and /metrics, in process and on the
real ``fhir-sidecar run`` process with real traffic, reloads and secrets that must never show."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import tornado.web
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from support.constants import UPSTREAM_PASSWORD, UPSTREAM_USER
from support.oauth_provider import OAuthTestProvider
from support.pki import TestPKI
from support.sidecar_process import SidecarProcess, free_port, wait_until, write_config
from support.sidecars import StartSidecar
from support.upstreams import Upstreams

from sidecar.admin import ListenerState, StatusSources, build_app, start_admin
from sidecar.admin.server import AdminServer
from sidecar.observe.metrics import SidecarMetrics
from sidecar.runner import listener_state
from sidecar.runtime.live import LiveConfig
from sidecar.testkit.fhir_server import FhirTestServer

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

WRONG_PASSWORD = "wrong-pw-Zq81"
INLINE_PASSWORD = "inline-pw-Kx73"
DOWN_SECRET = "down-secret-Pw55"
APP_TOKEN = "app-token-Ab12"
QUERY_SECRET = "qsecret-Zz91"


def scrape(admin: str) -> Samples:
    response = httpx.get(f"http://{admin}/metrics", timeout=10, trust_env=False)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    found: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def readyz(admin: str, verbose: bool = False) -> httpx.Response:
    return httpx.get(f"http://{admin}/readyz", params={"verbose": "1"} if verbose else None,
                     timeout=10, trust_env=False)


# -- in process: the admin application on its own ---------------------------------------------

def _live(tmp_path: Path, pki: TestPKI) -> LiveConfig:
    path = write_config(tmp_path, {
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "connections": {"a": {"url": "https://a.example/fhir", "listen": "127.0.0.1:18081",
                              "tls": {"verify": "custom",
                                      "ca_bundle": str(pki.ca_bundle_path)}}},
    })
    return LiveConfig(path)


def test_readyz_follows_the_listeners_and_healthz_always_answers(tmp_path: Path,
                                                                 pki: TestPKI) -> None:
    live = _live(tmp_path, pki)
    metrics = SidecarMetrics()
    metrics.attach(live)
    state = [ListenerState(False, ("127.0.0.1:18081",))]
    sources = StatusSources(live, metrics, lambda: state[0])

    async def run() -> None:
        server = start_admin(sources)
        assert server is not None
        try:
            async with httpx.AsyncClient(base_url=f"http://{server.address}",
                                         trust_env=False) as client:
                assert (await client.get("/healthz")).status_code == 200
                before = await client.get("/readyz")
                assert before.status_code == 503
                verbose = await client.get("/readyz", params={"verbose": "1"})
                assert verbose.status_code == 503
                report = verbose.json()
                assert report["ready"] is False
                assert report["listeners"]["missing"] == ["127.0.0.1:18081"]
                assert report["config"]["last_reload"]["result"] == "success"
                assert report["connections"]["a"]["tls"]["ok"] is None  # not tried yet
                assert report["connections"]["a"]["tls"]["ca_bundle_expires_at"].endswith("Z")

                state[0] = ListenerState(True)
                after = await client.get("/readyz")
                assert after.status_code == 200 and after.text == "ready\n"
                assert after.headers["Cache-Control"] == "no-store"

                openmetrics = await client.get("/metrics", headers={
                    "Accept": "application/openmetrics-text; version=1.0.0"})
                assert openmetrics.headers["Content-Type"].startswith(
                    "application/openmetrics-text")
                assert openmetrics.text.rstrip().endswith("# EOF")
        finally:
            await server.stop()

    asyncio.run(run())


def test_more_routes_join_the_same_application(tmp_path: Path, pki: TestPKI) -> None:
    class Hello(tornado.web.RequestHandler):
        def get(self) -> None:
            self.finish({"hello": "dashboard"})

    live = _live(tmp_path, pki)
    sources = StatusSources(live, SidecarMetrics(), lambda: ListenerState(True))
    app = build_app(sources, extra_handlers=[(r"/api/hello", Hello, {})])

    async def run() -> None:
        server = AdminServer(app, f"127.0.0.1:{free_port()}")
        server.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://{server.address}",
                                         trust_env=False) as client:
                assert (await client.get("/api/hello")).json() == {"hello": "dashboard"}
                assert (await client.get("/readyz")).status_code == 200
        finally:
            await server.stop()

    asyncio.run(run())


def test_a_moved_admin_listen_warns_until_restart(tmp_path: Path, pki: TestPKI,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    live = _live(tmp_path, pki)
    sources = StatusSources(live, SidecarMetrics(), lambda: ListenerState(True))
    moved = f"127.0.0.1:{free_port()}"

    async def run() -> None:
        server = start_admin(sources)
        assert server is not None
        try:
            text = live.path.read_text()
            live.path.write_text(text.replace(server.listen, moved))
            with caplog.at_level(logging.WARNING, logger="fhir_sidecar"):
                assert live.reload().ok
            async with httpx.AsyncClient(trust_env=False) as client:
                assert (await client.get(f"http://{server.address}/healthz")).status_code == 200
        finally:
            await server.stop()

    asyncio.run(run())
    assert any(f"admin.listen: changed to {moved}" in r.getMessage() for r in caplog.records)


def test_listener_state_compares_the_current_snapshot_with_bound_sockets(
        tmp_path: Path, pki: TestPKI) -> None:
    @dataclass
    class FakeProxyserver:
        bound: list[tuple[str, int]]

        def listen_addrs(self) -> list[tuple[str, int]]:
            return self.bound

    @dataclass
    class FakeListeners:
        bound: bool

    live = _live(tmp_path, pki)
    proxy, listeners = FakeProxyserver([]), FakeListeners(False)
    check = lambda: listener_state(live, listeners, proxy)  # type: ignore[arg-type]  # noqa: E731
    assert check() == ListenerState(False, ("127.0.0.1:18081",))
    proxy.bound = [("127.0.0.1", 18081)]
    assert check() == ListenerState(False, ())  # bound, but startup has not finished
    listeners.bound = True
    assert check() == ListenerState(True, ())
    proxy.bound = []  # draining: listeners closed
    assert check().bound is False


# -- the real process ------------------------------------------------------------------------

@dataclass
class Running:
    sidecar: SidecarProcess
    admin: str
    ports: dict[str, int]
    proxy_port: int
    config: Path
    provider: OAuthTestProvider
    ca_bundle: Path
    good: FhirTestServer

    @property
    def good_port(self) -> int:
        return self.good.port

    def base(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def client(self) -> httpx.Client:
        return httpx.Client(timeout=30, trust_env=False)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI, upstreams: Upstreams,
            oauth_provider_process: OAuthTestProvider,
            start_module_sidecar: StartSidecar) -> Running:
    """One sidecar for the module's read-only tests: they send traffic and compare metrics
    before and after, and change nothing (a reload gets its own sidecar)."""
    provider = oauth_provider_process
    client = provider.clients["basic"]
    tmp = Path(tmp_path_factory.mktemp("admin"))
    (tmp / "secrets").mkdir()
    (tmp / "secrets" / "upstream").write_text(UPSTREAM_PASSWORD + "\n")
    (tmp / "secrets" / "wrong").write_text(WRONG_PASSWORD + "\n")
    (tmp / "secrets" / "down").write_text(DOWN_SECRET + "\n")
    custom = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}

    def url(kind: str, host: str = "localhost", suffix: str = "") -> str:
        return f"https://{host}:{upstreams.get(kind).port}/fhir{suffix}"  # type: ignore[arg-type]

    connections: dict[str, dict[str, Any]] = {
        "good": {"url": url("good"), "auth": {"basic": "upstream"}},
        "wrong-password": {"url": url("good", suffix="-wrong"), "auth": {"basic": "wrong"}},
        "inline": {"url": url("good", suffix="-inline"), "auth": {"basic": "inline"}},
        "other-ca": {"url": url("other_ca"), "auth": {"basic": "upstream"}},
        "wrong-host": {"url": url("wrong_host"), "auth": {"basic": "upstream"}},
        "expired": {"url": url("expired"), "auth": {"basic": "upstream"}},
        "oauth-ok": {"url": url("good", "127.0.0.1", "-oauth"), "auth": {"oauth": "real"}},
        "oauth-down": {"url": url("good", "127.0.0.1", "-down"), "auth": {"oauth": "down"}},
    }
    ports = {}
    for name, conn in connections.items():
        ports[name] = free_port()
        conn["listen"] = f"127.0.0.1:{ports[name]}"
        conn["tls"] = custom
    proxy_port, admin_port = free_port(), free_port()
    # Tokens outlive the module, so no background refresh is ever counted (the tests compare
    # exact counts); the provider goes back to its defaults once the first token is out.
    provider.reset()
    provider.settings(ttl=3600)
    try:
        config: dict[str, Any] = {
            "proxy": {"listen": f"127.0.0.1:{proxy_port}"},
            "admin": {"listen": f"127.0.0.1:{admin_port}"},
            "basic_auth": {
                "upstream": {"username": UPSTREAM_USER, "password_file": "secrets/upstream"},
                "wrong": {"username": UPSTREAM_USER, "password_file": "secrets/wrong"},
                "inline": {"username": UPSTREAM_USER, "password": INLINE_PASSWORD},
            },
            "oauth": {
                "real": {"token_url": provider.token_url, "client_id": client.client_id,
                         "client_secret_env": "ADMIN_TEST_CLIENT_SECRET",
                         "tls": {"verify": "custom", "ca_bundle": str(provider.ca_bundle)}},
                # Nothing listens on a free port: every token request fails (network).
                "down": {"token_url": f"http://127.0.0.1:{free_port()}/token",
                         "client_id": "down-client", "client_secret_file": "secrets/down"},
            },
            "connections": connections,
        }
        sidecar = start_module_sidecar(
            config, directory=tmp, env={"ADMIN_TEST_CLIENT_SECRET": str(client.secret)}).process
        ready = sidecar.events("ready")[0]
        assert ready["admin"] == f"127.0.0.1:{admin_port}"
        wait_until(lambda: readyz(ready["admin"], verbose=True).json()["oauth"]["real"][
            "token_valid_until"], 30, message="the first token")
    finally:
        provider.reset()
    return Running(sidecar, ready["admin"], ports, proxy_port, sidecar.config, provider,
                   pki.ca_bundle_path, upstreams.get("good"))


def test_healthz_and_readyz_answer_once_ready(running: Running) -> None:
    assert httpx.get(f"http://{running.admin}/healthz", trust_env=False).text == "ok\n"
    assert readyz(running.admin).status_code == 200


def test_request_metrics_change_with_real_traffic(running: Running) -> None:
    before = scrape(running.admin)
    with running.client() as client:
        for _ in range(2):
            assert client.get(f"{running.base('good')}/metadata").status_code == 200
        created = client.post(f"{running.base('good')}/Patient",
                              json={"resourceType": "Patient"})
        assert created.status_code == 201
        assert client.get(f"{running.base('wrong-password')}/Patient").status_code == 401
    with httpx.Client(timeout=30, trust_env=False,
                      proxy=f"http://127.0.0.1:{running.proxy_port}") as forward:
        refused = forward.get("http://unconfigured.example/fhir/Patient")
    assert refused.status_code == 403
    after = scrape(running.admin)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "fhir_sidecar_requests_total"
    assert delta(requests, connection="good", method="GET", status_class="2xx") == 2
    assert delta(requests, connection="good", method="POST", status_class="2xx") == 1
    assert delta(requests, connection="wrong-password", method="GET", status_class="4xx") == 1
    assert delta(requests, connection="-", method="GET", status_class="4xx") == 1
    assert delta("fhir_sidecar_request_duration_seconds_count", connection="good") == 3
    assert delta("fhir_sidecar_request_duration_seconds_sum", connection="good") > 0
    assert value(after, "fhir_sidecar_requests_in_flight", connection="good") == 0
    assert value(after, "fhir_sidecar_build_info", version="0.1.0") == 1


def test_tls_failures_are_counted_by_reason(running: Running) -> None:
    before = scrape(running.admin)
    with running.client() as client:
        for name in ("other-ca", "wrong-host", "expired"):
            response = client.get(f"{running.base(name)}/metadata")
            assert response.headers.get("X-Sidecar-Error") == "upstream-tls", name
    after = scrape(running.admin)
    for connection, reason in (("other-ca", "unknown_ca"), ("wrong-host", "hostname_mismatch"),
                               ("expired", "expired")):
        labels = {"connection": connection, "reason": reason}
        name = "fhir_sidecar_upstream_tls_failures_total"
        assert value(after, name, **labels) - value(before, name, **labels) == 1, labels
        requests = {"connection": connection, "method": "GET", "status_class": "5xx"}
        name = "fhir_sidecar_requests_total"
        assert value(after, name, **requests) - value(before, name, **requests) == 1, labels


def test_token_metrics_and_ca_bundle_expiry(running: Running) -> None:
    tokens = "fhir_sidecar_token_requests_total"
    before = scrape(running.admin)
    with running.client() as client:
        down = client.get(f"{running.base('oauth-down')}/metadata")
        # The bearer reaches the upstream, which only takes Basic: it answers 401, the
        # sidecar drops that token, fetches exactly one new one and retries once
        # (sidecar/proxy/bearer_retry.py); that second 401 passes through.
        rejected = client.get(f"{running.base('oauth-ok')}/metadata")
    assert down.status_code == 503 and down.headers["X-Sidecar-Error"] == "token-unavailable"
    assert rejected.status_code == 401
    found = scrape(running.admin)
    assert value(found, tokens, definition="real", result="success") - \
        value(before, tokens, definition="real", result="success") == 1
    assert value(found, tokens, definition="real", result="network") == 0

    # The dead endpoint is retried in the background with backoff, so its running total is
    # compared with the sidecar's own log of failed attempts, not with a delta.
    def failed_attempts() -> int:
        return sum(1 for r in running.sidecar.events("oauth_token_failed")
                   if "'down'" in r.get("message", ""))

    wait_until(lambda: value(scrape(running.admin), tokens, definition="down",
                             result="network") == failed_attempts() > 0, 10,
               message="the network failures counted once each")
    assert value(found, tokens, definition="down", result="success") == 0
    assert value(found, "fhir_sidecar_token_expiry_timestamp_seconds", definition="real") > 0
    assert value(found, "fhir_sidecar_token_expiry_timestamp_seconds", definition="down") == 0

    certs = x509.load_pem_x509_certificates(running.ca_bundle.read_bytes())
    earliest = min(c.not_valid_after_utc for c in certs).timestamp()
    assert value(found, "fhir_sidecar_ca_bundle_expiry_timestamp_seconds",
                 connection="good") == pytest.approx(earliest)


def test_verbose_readiness_reports_failing_connections_and_definitions(running: Running
                                                                      ) -> None:
    with running.client() as client:
        assert client.get(f"{running.base('good')}/metadata").status_code == 200
        assert client.get(f"{running.base('other-ca')}/metadata").status_code == 502
        assert client.get(f"{running.base('oauth-down')}/metadata").status_code == 503
    response = readyz(running.admin, verbose=True)
    # Failing upstreams and token endpoints do not make the sidecar unready
    # (docs/metrics.md#health-readiness-and-metrics).
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    report = response.json()
    assert report["ready"] is True and report["listeners"]["missing"] == []
    connections = report["connections"]
    assert connections["good"]["tls"]["ok"] is True
    assert connections["good"]["auth"] == "basic"
    failing = connections["other-ca"]
    assert failing["tls"]["ok"] is False
    assert failing["tls"]["last_failure"]["reason"] == "unknown_ca"
    assert failing["last_error"]["error"] == "upstream-tls"
    assert connections["oauth-down"]["last_error"]["error"] == "token-unavailable"
    assert connections["oauth-down"]["token_valid_until"] is None
    assert connections["oauth-ok"]["token_valid_until"] is not None
    oauth = report["oauth"]
    assert oauth["down"]["token_valid_until"] is None
    assert oauth["down"]["last_error"] and oauth["down"]["last_result"] == "network"
    assert oauth["real"]["token_valid_until"] is not None
    assert oauth["real"]["last_error"] is None and oauth["real"]["used_by"] == ["oauth-ok"]


@dataclass
class Reloadable:
    """A sidecar of the test's own: reloading the module's shared one would change what the
    other tests see."""

    sidecar: SidecarProcess
    admin: str
    config: Path
    port: int

    def base(self, name: str) -> str:
        assert name == "good"
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> httpx.Client:
        return httpx.Client(timeout=30, trust_env=False)


def test_reloads_are_counted_by_result(tmp_path: Path, pki: TestPKI, upstreams: Upstreams,
                                       start_sidecar: StartSidecar) -> None:
    admin_port, listen_port = free_port(), free_port()
    config = _small_config(tmp_path, pki, upstreams, admin_port, listen_port)
    sidecar = start_sidecar(config, directory=tmp_path)
    _count_reloads(Reloadable(sidecar.process, f"127.0.0.1:{admin_port}", sidecar.config_path,
                              listen_port))


def _count_reloads(running: Reloadable) -> None:
    reloads = "fhir_sidecar_config_reloads_total"
    last_success = "fhir_sidecar_config_last_reload_success_timestamp_seconds"
    before = scrape(running.admin)
    original = running.config.read_text()

    # SIGHUP with an unchanged file is still a successful reload.
    running.sidecar.signal(signal.SIGHUP)
    after_ok = wait_until(lambda: (s := scrape(running.admin)) and value(
        s, reloads, result="success") > value(before, reloads, result="success") and s,
        message="a successful reload to be counted")
    assert value(after_ok, last_success) > value(before, last_success)

    try:
        running.config.write_text(original + "\nconnections: [not, valid\n")
        running.sidecar.signal(signal.SIGHUP)
        after_bad = wait_until(lambda: (s := scrape(running.admin)) and value(
            s, reloads, result="failure") > value(before, reloads, result="failure") and s,
            message="a failed reload to be counted")
        assert value(after_bad, last_success) == value(after_ok, last_success)
        report = readyz(running.admin, verbose=True)
        assert report.status_code == 200  # the previous config keeps serving
        last = report.json()["config"]["last_reload"]
        assert last["result"] == "failure" and "invalid YAML" in " ".join(last["problems"])
    finally:
        running.config.write_text(original)
        running.sidecar.signal(signal.SIGHUP)
    wait_until(lambda: readyz(running.admin, verbose=True).json()["config"]["last_reload"][
        "result"] == "success", message="the restored config to load")
    with running.client() as client:
        assert client.get(f"{running.base('good')}/metadata").status_code == 200


def test_in_flight_returns_to_zero_after_every_kind_of_answer(running: Running) -> None:
    with running.client() as client:
        for name in running.ports:  # 200, 401, 502 (TLS), 503 (token), upstream 401 to a bearer
            client.get(f"{running.base(name)}/metadata")

    def all_idle() -> bool:
        gauges = {labels: v for (metric, labels), v in scrape(running.admin).items()
                  if metric == "fhir_sidecar_requests_in_flight"}
        return len(gauges) >= len(running.ports) and not any(gauges.values())

    wait_until(all_idle, 10, message="every in-flight gauge to return to 0")


def test_no_secret_token_or_query_in_logs_metrics_or_readiness(running: Running) -> None:
    # Self-contained: it sends every kind of request itself (each connection, with an app
    # Authorization and a query secret), and also checks whatever other tests added before.
    running.good.clear()
    request_id = "rid-no-secrets-1"
    with running.client() as client:
        for name in running.ports:
            client.get(f"{running.base(name)}/Patient",
                       params={"name": QUERY_SECRET, "_count": "1"},
                       headers={"Authorization": f"Bearer {APP_TOKEN}",
                                "Proxy-Authorization": f"Basic {APP_TOKEN}",
                                "X-Request-ID": f"{request_id}-{name}"})
    with httpx.Client(timeout=30, trust_env=False,
                      proxy=f"http://127.0.0.1:{running.proxy_port}") as forward:
        forward.get(f"http://localhost:{running.good_port}/fhir/Patient",
                    params={"q": QUERY_SECRET}, headers={"Authorization": f"Bearer {APP_TOKEN}"})
        forward.get(f"http://unconfigured.example/x?token={QUERY_SECRET}")
    line = running.sidecar.wait_for_event(
        "request", lambda r: r.get("request_id") == f"{request_id}-good")
    assert line["connection"] == "good" and line["path"] == "/fhir/Patient"
    assert line["status"] == 200 and line["upstream_status"] == 200
    # The bearer tokens the real authorization server issued, as they reached the upstream.
    issued = {r.headers["authorization"].removeprefix("Bearer ")
              for r in running.good.requests_seen if r.path.startswith("/fhir-oauth/")}
    assert issued, "no bearer token reached the upstream"
    oauth_client = running.provider.clients["basic"]

    metrics_text = httpx.get(f"http://{running.admin}/metrics", trust_env=False).text
    readiness_text = readyz(running.admin, verbose=True).text
    secrets = [UPSTREAM_PASSWORD, WRONG_PASSWORD, INLINE_PASSWORD, str(oauth_client.secret),
               DOWN_SECRET, APP_TOKEN, QUERY_SECRET, *issued]
    for user, password in ((UPSTREAM_USER, UPSTREAM_PASSWORD), (UPSTREAM_USER, WRONG_PASSWORD),
                           (UPSTREAM_USER, INLINE_PASSWORD),
                           (oauth_client.client_id, str(oauth_client.secret)),
                           ("down-client", DOWN_SECRET)):
        secrets.append(base64.b64encode(f"{user}:{password}".encode()).decode())
    # JSON may escape non-ASCII characters; look for that spelling too.
    secrets += [json.dumps(s)[1:-1] for s in secrets]
    for where, text in (("log output", running.sidecar.output), ("metrics", metrics_text),
                        ("verbose readiness", readiness_text)):
        for secret in secrets:
            assert secret not in text, f"{secret!r} appears in the {where}"
        assert "Authorization" not in text, where
    for record in running.sidecar.records():
        assert "?" not in str(record.get("path", "")), record


# -- the real process: start, drain, failures ---------------------------------------------------

def _small_config(tmp_path: Path, pki: TestPKI, upstreams: Upstreams, admin_port: int,
                  listen_port: int) -> dict[str, Any]:
    """One Basic connection "good"; its password file is written to ``tmp_path``."""
    (tmp_path / "pw").write_text(UPSTREAM_PASSWORD + "\n")
    return {
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "basic_auth": {"b": {"username": UPSTREAM_USER, "password_file": "pw"}},
        "connections": {"good": {
            "url": f"https://localhost:{upstreams.get('good').port}/fhir",
            "listen": f"127.0.0.1:{listen_port}", "auth": {"basic": "b"},
            "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}},
    }


def test_readiness_503_until_listeners_are_bound_and_while_draining(
        tmp_path: Path, pki: TestPKI, upstreams: Upstreams, start_sidecar: StartSidecar) -> None:
    admin_port, listen_port = free_port(), free_port()
    config = _small_config(tmp_path, pki, upstreams, admin_port, listen_port)
    admin = f"127.0.0.1:{admin_port}"
    server = upstreams.get("good")
    running = start_sidecar(config, directory=tmp_path, wait_ready=False)
    sidecar = running.process
    seen: list[int] = []

    def answered_ready() -> bool:
        assert sidecar.proc is not None and sidecar.proc.poll() is None, sidecar.output
        try:
            status = readyz(admin).status_code
        except httpx.TransportError:  # the admin listener is not bound yet
            return False
        seen.append(status)
        return status == 200

    wait_until(answered_ready, 30, interval=0.005, message="/readyz to answer 200")
    # The admin listener is up before the proxy listeners: whatever it answered before
    # they were bound was 503, never 200 too early.
    assert set(seen[:-1]) <= {503} and seen[-1] == 200, seen
    assert sidecar.wait_for_event("ready")["admin"] == admin
    with httpx.Client(trust_env=False, timeout=30) as client:
        assert client.get(f"http://127.0.0.1:{listen_port}/metadata").status_code == 200

    results: list[int] = []
    slow = threading.Thread(target=lambda: results.append(httpx.get(
        f"http://127.0.0.1:{listen_port}/slow?seconds=3", timeout=30,
        trust_env=False).status_code))
    slow.start()
    wait_until(lambda: any(r.path.startswith("/fhir/slow") for r in server.requests_seen),
               message="the slow request to reach the upstream")
    sidecar.signal(signal.SIGTERM)
    wait_until(lambda: readyz(admin).status_code == 503, 10,
               message="/readyz to answer 503 while draining")
    assert not results, "the slow request finished before readiness was checked"
    slow.join(30)
    assert results == [200]
    running.stop()


def test_a_taken_admin_port_is_a_config_error(tmp_path: Path, pki: TestPKI,
                                              upstreams: Upstreams) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(tmp_path, _small_config(tmp_path, pki, upstreams, port, free_port()))
        result = subprocess.run([sys.executable, "-m", "sidecar", "run", "-c", str(path),
                                 "--state-dir", str(tmp_path / "s")],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{path}: admin.listen: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_text_log_format_and_level(tmp_path: Path, pki: TestPKI, upstreams: Upstreams,
                                   start_sidecar: StartSidecar) -> None:
    admin_port, listen_port = free_port(), free_port()
    running = start_sidecar(_small_config(tmp_path, pki, upstreams, admin_port, listen_port),
                            directory=tmp_path, wait_ready=False,
                            args=("--log-format", "text", "--log-level", "warning"))
    sidecar = running.process

    def ready() -> bool:
        try:
            return readyz(f"127.0.0.1:{admin_port}").status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, 30, message="/readyz to answer 200")
    with httpx.Client(trust_env=False, timeout=30) as client:
        client.get(f"http://127.0.0.1:{listen_port}/metadata",
                   params={"q": QUERY_SECRET})  # info: below the level, not logged
        client.get(f"http://127.0.0.1:{listen_port}/status/503",
                   headers={"X-Request-ID": "rid-text-1"})  # a 5xx is a warning
    line = wait_until(lambda: next((x for x in sidecar.stdout_lines
                                    if "rid-text-1" in x), None),
                      message="the warning request line")
    running.stop()
    assert not line.startswith("{")
    assert "request" in line and "status=503" in line and "path=/fhir/status/503" in line
    assert not any(x.lstrip().startswith("{") for x in sidecar.stdout_lines)
    assert not any("/fhir/metadata" in x for x in sidecar.stdout_lines)
    assert QUERY_SECRET not in sidecar.output

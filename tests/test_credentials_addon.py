"""The credentials addon in process: which credentials a routed request carries.

The real ``Routing`` and ``Credentials`` addons (``sidecar/proxy/credential_injection.py``)
with a real config snapshot run on mitmproxy test flows against a real token endpoint and a
real FHIR server on loopback (the test kit), so the mutation checks (docs/testing.md,
"Mutation checks") see these decisions; the end-to-end tests drive the same code in a sidecar
subprocess.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.test import tflow
from support.sidecar_process import free_port, write_config

from sidecar.proxy.config_source import SidecarConfig
from sidecar.proxy.credential_injection import Credentials
from sidecar.proxy.flow_state import FLOW_KEY, REQUEST_ID, FlowState, state_of
from sidecar.proxy.request_log import RequestLog
from sidecar.proxy.request_routing import Routing
from sidecar.report.observe import NullObserver
from sidecar.request.errors import ERROR_HEADER
from sidecar.runtime.live import LiveConfig
from sidecar.testkit.auth_checks import bearer_token_check
from sidecar.testkit.fhir_server import FhirTestServer
from sidecar.testkit.pki import DemoPKI
from sidecar.testkit.token_server import TokenServer

USER, PASSWORD = "svc user", "pä:ss word"
CLIENT_ID, CLIENT_SECRET = "sidecar-client", "client-secret-9"


class RecordingObserver(NullObserver):
    def __init__(self) -> None:
        self.retried: list[str] = []

    def auth_retry(self, connection: str) -> None:
        self.retried.append(connection)


class Kit:
    def __init__(self, tokens: TokenServer, fhir: FhirTestServer, ca: Path,
                 revoked: set[str]) -> None:
        self.tokens, self.fhir, self.ca, self.revoked = tokens, fhir, ca, revoked


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kit]:
    pki = DemoPKI(tmp_path_factory.mktemp("pki"))
    revoked: set[str] = set()
    with TokenServer(pki.server(), CLIENT_ID, CLIENT_SECRET) as tokens:
        check = bearer_token_check(lambda t: tokens.is_valid(t) and t not in revoked)
        with FhirTestServer(pki.server(), auth=check) as fhir:
            yield Kit(tokens, fhir, pki.ca_bundle_path, revoked)


def make_addons(tmp_path: Path, kit: Kit) -> tuple[Routing, Credentials, RecordingObserver]:
    (tmp_path / "password").write_text(PASSWORD + "\n")
    (tmp_path / "client-secret").write_text(CLIENT_SECRET + "\n")
    tls = {"verify": "custom", "ca_bundle": str(kit.ca)}
    config = write_config(tmp_path, {
        "proxy": {"listen": "127.0.0.1:0"},
        "admin": {"listen": None},
        "basic_auth": {"up": {"username": USER, "password_file": "password"}},
        "oauth": {
            "tok": {"token_url": kit.tokens.token_url, "client_id": CLIENT_ID,
                    "client_secret_file": "client-secret", "tls": tls},
            "down": {"token_url": f"https://localhost:{free_port()}/token",
                     "client_id": CLIENT_ID, "client_secret_file": "client-secret",
                     "tls": tls},
        },
        "connections": {
            "basic": {"url": "https://basic.example/fhir", "auth": {"basic": "up"}},
            "oauth": {"url": kit.fhir.base_url, "auth": {"oauth": "tok"}, "tls": tls},
            "down": {"url": "https://down.example/fhir", "auth": {"oauth": "down"}},
            "none": {"url": "https://none.example/fhir"},
        },
    })
    observer = RecordingObserver()
    routing = Routing(SidecarConfig(LiveConfig(str(config))), RequestLog(observer))
    return routing, Credentials(observer), observer


@pytest.fixture
def addons(tmp_path: Path, kit: Kit) -> tuple[Routing, Credentials, RecordingObserver]:
    return make_addons(tmp_path, kit)


def routed(routing: Routing, url: str, **headers: str) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.url = url
    for name, value in headers.items():
        flow.request.headers[name] = value
    routing.requestheaders(flow)
    return flow


def run(awaitable: Awaitable[Any] | None, flow: http.HTTPFlow,
        then: Callable[[], None] = lambda: None) -> None:
    """Await a hook, run ``then``, and close the token sources, all in one event loop."""
    assert awaitable is not None, "the hook should have waited for a token"
    state = state_of(flow)
    assert state is not None

    async def wait() -> None:
        try:
            await awaitable
            then()
        finally:
            for source in state.snapshot.token_sources.values():
                await source.aclose()

    asyncio.run(wait())


def test_basic_credentials_replace_the_app_ones(addons: Any) -> None:
    routing, credentials, _ = addons
    flow = routed(routing, "http://basic.example/fhir/Patient",
                  Authorization="Basic YXBwOnB3")
    assert credentials.requestheaders(flow) is None
    expected = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert flow.request.headers.get_all("Authorization") == [f"Basic {expected}"]
    state = state_of(flow)
    assert state is not None and state.bearer is None


def test_a_connection_without_auth_sends_none(addons: Any) -> None:
    routing, credentials, _ = addons
    flow = routed(routing, "http://none.example/fhir/Patient", Authorization="Basic YXBwOnB3")
    assert credentials.requestheaders(flow) is None
    assert "Authorization" not in flow.request.headers


def test_no_credentials_for_a_refused_or_unrouted_request(addons: Any) -> None:
    routing, credentials, _ = addons
    refused = routed(routing, "http://basic.example/other")
    assert refused.response is not None
    assert credentials.requestheaders(refused) is None
    assert "Authorization" not in refused.request.headers
    # A flow the routing addon never saw (no state), and one already answered.
    assert credentials.requestheaders(tflow.tflow()) is None
    answered = routed(routing, "http://basic.example/fhir/Patient")
    answered.response = http.Response.make(204)
    assert credentials.requestheaders(answered) is None
    assert "Authorization" not in answered.request.headers
    # A state without a connection (refused before routing) gets nothing either.
    bare = tflow.tflow()
    state = state_of(refused)
    assert state is not None
    bare.metadata[FLOW_KEY] = FlowState(
        state.snapshot, None, "rid")
    assert credentials.requestheaders(bare) is None
    assert "Authorization" not in bare.request.headers


def test_a_bearer_token_is_fetched_then_taken_from_the_cache(addons: Any, kit: Kit) -> None:
    routing, credentials, _ = addons
    first = routed(routing, f"http://localhost:{kit.fhir.port}/fhir/Patient",
                   Authorization="Bearer app-token")
    issued = kit.tokens.issued
    second = routed(routing, f"http://localhost:{kit.fhir.port}/fhir/Observation")

    def cached() -> None:
        assert credentials.requestheaders(second) is None  # cached: no waiting

    run(credentials.requestheaders(first), first, cached)
    assert first.response is None
    value = first.request.headers["Authorization"]
    scheme, _, token = value.partition(" ")
    assert scheme == "Bearer" and kit.tokens.is_valid(token)
    assert kit.tokens.issued == issued + 1
    state = state_of(first)
    assert state is not None and state.bearer == token
    assert second.request.headers["Authorization"] == f"Bearer {token}"
    second_state = state_of(second)
    assert second_state is not None and second_state.bearer == token


def test_an_unavailable_token_refuses_the_request(addons: Any) -> None:
    routing, credentials, _ = addons
    flow = routed(routing, "http://down.example/fhir/Patient", Authorization="Bearer app")
    run(credentials.requestheaders(flow), flow)
    assert flow.response is not None
    assert flow.response.status_code == 503
    assert flow.response.headers[ERROR_HEADER] == "token-unavailable"
    # Which connection, and why: the token source's own words (redacted, see failures.py).
    said = json.loads(flow.response.get_text() or "")["issue"][0]["diagnostics"]
    assert said.startswith("connection 'down': no access token available: "
                           "OAuth definition 'down': no token from https://localhost:")
    assert said.endswith("/token: connection refused")
    assert "Authorization" not in flow.request.headers
    state = state_of(flow)
    assert state is not None and state.error == "token-unavailable" and state.bearer is None


def test_a_fault_while_fetching_a_token_refuses_the_request(
        addons: Any, kit: Kit, monkeypatch: pytest.MonkeyPatch) -> None:
    routing, credentials, _ = addons
    flow = routed(routing, f"http://localhost:{kit.fhir.port}/fhir/Patient")
    state = state_of(flow)
    assert state is not None

    async def broken() -> str:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(state.snapshot.token_sources["tok"], "token", broken)
    run(credentials.requestheaders(flow), flow)
    assert flow.response is not None
    assert flow.response.headers[ERROR_HEADER] == "internal-error"
    assert b"failed while fetching an access token" in (flow.response.content or b"")
    assert "Authorization" not in flow.request.headers
    assert state.bearer is None


def test_a_401_to_a_bearer_token_is_retried_once_with_a_new_token(addons: Any,
                                                                   kit: Kit) -> None:
    routing, credentials, observer = addons
    flow = routed(routing, f"http://localhost:{kit.fhir.port}/fhir/metadata",
                  **{REQUEST_ID: "rid-401"})
    state = state_of(flow)
    assert state is not None

    async def scenario() -> None:
        hook = credentials.requestheaders(flow)
        assert hook is not None
        await hook
        assert state.bearer is not None
        kit.revoked.add(state.bearer)
        # What the upstream answered (mitmproxy's flow.response, as it arrives).
        flow.response = http.Response.make(401, b"expired", {"WWW-Authenticate": "Bearer"})
        flow.response.stream = True
        credentials.responseheaders(flow)
        assert flow.response.stream is False  # kept whole, to be replaced
        retry = credentials.response(flow)
        assert retry is not None
        await retry
        for source in state.snapshot.token_sources.values():
            await source.aclose()

    asyncio.run(scenario())
    assert flow.response is not None and flow.response.status_code == 200
    assert flow.response.headers[REQUEST_ID] == "rid-401"
    assert observer.retried == ["oauth"]
    assert state.bearer is None  # once only
    assert credentials.response(flow) is None


def test_other_answers_are_left_alone(addons: Any, kit: Kit) -> None:
    routing, credentials, observer = addons
    basic = routed(routing, "http://basic.example/fhir/Patient")
    credentials.requestheaders(basic)
    basic.response = http.Response.make(401, b"no")
    basic.response.stream = True
    credentials.responseheaders(basic)
    assert basic.response.stream is True  # Basic credentials are never retried
    assert credentials.response(basic) is None

    flow = routed(routing, f"http://localhost:{kit.fhir.port}/fhir/metadata")
    run(credentials.requestheaders(flow), flow)
    flow.response = http.Response.make(200, b"{}")
    flow.response.stream = True
    credentials.responseheaders(flow)
    assert flow.response.stream is True
    assert credentials.response(flow) is None
    assert credentials.response(tflow.tflow()) is None
    credentials.responseheaders(tflow.tflow(resp=True))
    assert observer.retried == []

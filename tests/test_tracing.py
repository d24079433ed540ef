"""Traces (issue 31): each request and each token fetch as OpenTelemetry spans, joined to the
app's own trace, checked on what crossed the wire: the spans a real OTLP receiver decoded
(opentelemetry-proto), and the traceparent the upstream received."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.bearer import BearerValidator
from support.constants import UPSTREAM_PASSWORD, UPSTREAM_USER
from support.fhir_routes import fhir_upstream
from support.oauth_provider import OAuthTestProvider
from support.otlp_receiver import OtlpReceiver, attributes
from support.pki import TestPKI
from support.sidecar_process import free_port, wait_until
from support.sidecars import RunningSidecar, StartSidecar

from sidecar.testkit.fhir_server import FhirTestServer

APP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"
APP_TRACESTATE = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as found:
        yield found


@pytest.fixture
def open_upstream(pki: TestPKI) -> Iterator[FhirTestServer]:
    with fhir_upstream(pki.server(name="tracing")) as server:
        yield server


def _config(upstream: FhirTestServer, pki: TestPKI, tracing: dict[str, Any] | None,
            **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "basic_auth": {"b": {"username": UPSTREAM_USER, "password_file": "pw"}},
        "connections": {"ehr": {
            "url": upstream.base_url, "listen": f"127.0.0.1:{free_port()}",
            "auth": {"basic": "b"},
            "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}},
        **extra,
    }
    if tracing is not None:
        config["tracing"] = tracing
    return config


def _start(tmp: Path, config: dict[str, Any], start_sidecar: StartSidecar) -> RunningSidecar:
    (tmp / "pw").write_text(UPSTREAM_PASSWORD + "\n")
    return start_sidecar(config, directory=tmp)


def _hex(raw: bytes) -> str:
    return raw.hex()


def test_an_apps_trace_is_continued_and_the_upstream_nests_under_the_sidecar(
        tmp_path: Path, pki: TestPKI, open_upstream: FhirTestServer, receiver: OtlpReceiver,
        start_sidecar: StartSidecar) -> None:
    sidecar = _start(tmp_path, _config(open_upstream, pki, {"endpoint": receiver.endpoint}),
                     start_sidecar)
    response = httpx.get(f"{sidecar.base}/Patient/example?name=Secret-Name", trust_env=False,
                         timeout=30, headers={"traceparent": f"00-{APP_TRACE}-{APP_SPAN}-01",
                                              "tracestate": APP_TRACESTATE})
    assert response.status_code == 200
    [server] = wait_until(lambda: receiver.spans_named("GET ehr"), message="the server span")
    [client] = wait_until(lambda: receiver.spans_named("upstream ehr"),
                          message="the client span")
    assert _hex(server.trace_id) == APP_TRACE and _hex(server.parent_span_id) == APP_SPAN
    assert server.kind == server.SPAN_KIND_SERVER
    assert _hex(client.trace_id) == APP_TRACE and client.parent_span_id == server.span_id
    assert client.kind == client.SPAN_KIND_CLIENT
    # The upstream got a traceparent whose parent is the sidecar's (client) span.
    upstream_parent = open_upstream.requests_seen[-1].headers.get("traceparent")
    assert upstream_parent == f"00-{APP_TRACE}-{_hex(client.span_id)}-01"
    assert open_upstream.requests_seen[-1].headers.get("tracestate") == APP_TRACESTATE
    server_attrs = attributes(server)
    assert server_attrs["fhir.connection"] == "ehr"
    assert server_attrs["http.response.status_code"] == 200
    assert server_attrs["fhir.interaction"] == "read"
    assert server_attrs["fhir.resource_type"] == "Patient"
    assert server_attrs["url.path"] == "/fhir/Patient/example"  # never the query
    client_attrs = attributes(client)
    assert client_attrs["server.port"] == open_upstream.port
    assert str(client_attrs["tls.protocol.version"]).startswith("TLS")
    assert receiver.resources[0]["service.name"] == "fhir-sidecar"
    everything = b"".join(receiver.bodies)
    basic = base64.b64encode(f"{UPSTREAM_USER}:{UPSTREAM_PASSWORD}".encode())
    for secret in (b"Secret-Name", UPSTREAM_PASSWORD.encode(), basic):
        assert secret not in everything
    # The log line carries the trace id.
    line = sidecar.process.wait_for_event("request")
    assert line["trace_id"] == APP_TRACE


def test_without_a_traceparent_a_new_trace_starts_and_errors_name_it(
        tmp_path: Path, pki: TestPKI, open_upstream: FhirTestServer, receiver: OtlpReceiver,
        start_sidecar: StartSidecar) -> None:
    sidecar = _start(tmp_path, _config(open_upstream, pki, {"endpoint": receiver.endpoint,
                                                            "service_name": "ward-7-sidecar"}),
                     start_sidecar)
    refused = httpx.get(f"{sidecar.base}/Patient/1", trust_env=False, timeout=30,
                        headers={"Host": "attacker.example"})
    assert refused.status_code == 421
    [server] = wait_until(lambda: receiver.spans_named("GET ehr"), message="the server span")
    trace = _hex(server.trace_id)
    assert server.parent_span_id == b""
    assert f"(trace {trace})" in refused.json()["issue"][0]["diagnostics"]
    assert attributes(server)["error.type"] == "misdirected"
    assert receiver.spans_named("upstream") == []  # nothing went upstream
    assert receiver.resources[0]["service.name"] == "ward-7-sidecar"


def test_a_token_fetch_is_a_span_of_the_request_that_waited_and_a_cached_token_is_not(
        tmp_path: Path, pki: TestPKI, receiver: OtlpReceiver, oauth_provider: OAuthTestProvider,
        bearer_validator: BearerValidator, start_sidecar: StartSidecar) -> None:
    client = oauth_provider.clients["basic"]
    (tmp_path / "cs").write_text(client.secret + "\n" if client.secret else "")
    with fhir_upstream(pki.server(name="tracing-oauth"), auth=bearer_validator) as upstream:
        config = _config(upstream, pki, {"endpoint": receiver.endpoint})
        config["oauth"] = {"idp": {
            "token_url": oauth_provider.token_url, "client_id": client.client_id,
            "client_secret_file": "cs", "scopes": list(oauth_provider.scopes),
            "resource": oauth_provider.default_resource,
            "tls": {"verify": "custom", "ca_bundle": str(oauth_provider.ca_bundle)}}}
        config["connections"]["ehr"]["auth"] = {"oauth": "idp"}
        sidecar = _start(tmp_path, config, start_sidecar)
        # Wait until the start-up fetch is done, then drop the token: the next request waits.
        wait_until(lambda: oauth_provider.stats().get("tokens_issued", 0) >= 1
                   or oauth_provider.stats().get("token_requests", 0) >= 1,
                   message="the start-up token fetch")
        first = httpx.get(f"{sidecar.base}/Patient/example", trust_env=False, timeout=30)
        second = httpx.get(f"{sidecar.base}/Patient/example", trust_env=False, timeout=30)
        assert first.status_code == second.status_code == 200
        servers = wait_until(lambda: len(receiver.spans_named("GET ehr")) >= 2 and
                             receiver.spans_named("GET ehr"), message="two server spans")
    cached = [attributes(s).get("fhir_sidecar.token.cached") for s in servers]
    assert cached[-1] is True
    tokens = receiver.spans_named("token idp")
    waited = [s for s in servers if attributes(s).get("fhir_sidecar.token.cached") is False]
    children = [t for t in tokens if t.parent_span_id]
    assert len(children) == len(waited)
    for token_span in children:
        assert token_span.parent_span_id in {s.span_id for s in waited}
        assert attributes(token_span)["fhir_sidecar.oauth.definition"] == "idp"
    # The start-up fetch no request asked for is a trace of its own: a root span.
    roots = wait_until(lambda: [t for t in receiver.spans_named("token idp")
                                if not t.parent_span_id], message="the background fetch")
    assert attributes(roots[0])["fhir_sidecar.token.background"] == "true"
    assert roots[0].trace_id not in {s.trace_id for s in servers}
    everything = b"".join(receiver.bodies)
    assert client.secret is None or client.secret.encode() not in everything


def test_nothing_is_exported_when_sampling_is_off_and_the_context_passes_unchanged(
        tmp_path: Path, pki: TestPKI, open_upstream: FhirTestServer, receiver: OtlpReceiver,
        start_sidecar: StartSidecar) -> None:
    sidecar = _start(tmp_path, _config(open_upstream, pki, {"endpoint": receiver.endpoint,
                                                            "sample_ratio": 0.0}),
                     start_sidecar)
    unsampled = f"00-{APP_TRACE}-{APP_SPAN}-00"
    for headers in ({}, {"traceparent": unsampled, "tracestate": APP_TRACESTATE}):
        assert httpx.get(f"{sidecar.base}/Patient/example", headers=headers, trust_env=False,
                         timeout=30).status_code == 200
    seen = open_upstream.requests_seen[-1].headers
    assert seen.get("traceparent") == unsampled and seen.get("tracestate") == APP_TRACESTATE
    assert open_upstream.requests_seen[-2].headers.get("traceparent") is None
    sidecar.stop()  # the exporter flushes on stop: anything queued would arrive now
    assert receiver.spans == []


def test_without_tracing_the_apps_context_passes_through_unchanged(
        tmp_path: Path, pki: TestPKI, open_upstream: FhirTestServer,
        start_sidecar: StartSidecar) -> None:
    sidecar = _start(tmp_path, _config(open_upstream, pki, None), start_sidecar)
    sent = f"00-{APP_TRACE}-{APP_SPAN}-01"
    assert httpx.get(f"{sidecar.base}/Patient/example", trust_env=False, timeout=30,
                     headers={"traceparent": sent, "tracestate": APP_TRACESTATE}
                     ).status_code == 200
    seen = open_upstream.requests_seen[-1].headers
    assert seen.get("traceparent") == sent and seen.get("tracestate") == APP_TRACESTATE
    assert "trace_id" not in sidecar.process.wait_for_event("request")


def test_the_sidecar_keeps_answering_while_the_collector_is_slow_or_gone(
        tmp_path: Path, pki: TestPKI, open_upstream: FhirTestServer, receiver: OtlpReceiver,
        start_sidecar: StartSidecar) -> None:
    gone = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for endpoint in (receiver.endpoint, gone):
        receiver.hold.clear()  # the live collector takes its time
        sidecar = _start(tmp_path, _config(open_upstream, pki, {"endpoint": endpoint}),
                         start_sidecar)
        started = time.monotonic()
        with httpx.Client(trust_env=False, timeout=30) as app:
            for _ in range(40):
                assert app.get(f"{sidecar.base}/Patient/example").status_code == 200
        # Bounded far below the collector's 30 s hold: nothing waited on it.
        assert time.monotonic() - started < 20
        if endpoint == gone:
            def failed(admin: str = sidecar.admin_url) -> float:
                text = httpx.get(f"{admin}/metrics", trust_env=False, timeout=10).text
                for line in text.splitlines():
                    if line.startswith('fhir_sidecar_trace_exports_total{result="failed"}'):
                        return float(line.rsplit(" ", 1)[1])
                return 0.0
            wait_until(lambda: failed() >= 40, 15, interval=0.2,
                       message="the failed exports counted")
        receiver.hold.set()
        sidecar.stop()


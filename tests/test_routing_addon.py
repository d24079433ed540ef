"""The routing addon in process: where a request goes, what is refused, which headers go.

The real ``Routing`` addon (``sidecar/proxy/request_routing.py``) with a real config snapshot
runs on mitmproxy test flows, so the mutation checks (docs/testing.md, "Mutation checks") see
these decisions; the end-to-end tests drive the same code in a sidecar subprocess.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow
from support.sidecar_process import write_config

from sidecar.proxy.config_source import SidecarConfig
from sidecar.proxy.flow_state import REQUEST_ID, state_of
from sidecar.proxy.request_log import RequestLog
from sidecar.proxy.request_routing import Routing
from sidecar.report.observe import NullObserver
from sidecar.request.errors import ERROR_HEADER
from sidecar.runtime.live import LiveConfig

REVERSE_LISTEN = "127.0.0.1:18777"


def make_routing(tmp_path: Path, *, intercept: bool = False) -> Routing:
    config = write_config(tmp_path, {
        "proxy": {"listen": "127.0.0.1:0", "intercept_https": intercept},
        "admin": {"listen": None},
        "connections": {
            "fhir": {"url": "https://fhir.example/base"},
            "plain": {"url": "http://plain.example:8080/", "rewrite_links": False},
            "rev": {"url": "https://rev.example:8443/r4", "listen": REVERSE_LISTEN},
            "alt": {"url": "https://alt.example:8443/"},
        },
    })
    return Routing(SidecarConfig(LiveConfig(str(config))), RequestLog(NullObserver()))


@pytest.fixture
def routing(tmp_path: Path) -> Routing:
    return make_routing(tmp_path)


def forward_flow(host: str, path: str, port: int = 80, **headers: str) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.scheme, flow.request.host, flow.request.port = "http", host, port
    flow.request.path = path
    flow.request.host_header = host if port == 80 else f"{host}:{port}"
    for name, value in headers.items():
        flow.request.headers[name.replace("_", "-")] = value
    return flow


def reverse_flow(path: str, listen: str = REVERSE_LISTEN, **headers: str) -> http.HTTPFlow:
    flow = forward_flow("127.0.0.1", path, port=18777, **headers)
    flow.client_conn.proxy_mode = ProxyMode.parse(f"reverse:https://rev.example:8443@{listen}")
    return flow


def refused_kind(flow: http.HTTPFlow) -> str | None:
    return flow.response.headers[ERROR_HEADER] if flow.response is not None else None


def body_text(flow: http.HTTPFlow) -> str:
    assert flow.response is not None
    return flow.response.get_text() or ""


def test_a_forward_request_is_pointed_at_its_connection_without_the_app_credentials(
        routing: Routing) -> None:
    flow = forward_flow("FHIR.example", "/base/Patient?name=x", Authorization="Basic YXBwOnB3",
                        Proxy_Authorization="Basic cHJveHk6cHc=", X_Request_ID="app-id-1")
    routing.requestheaders(flow)
    assert flow.response is None
    request = flow.request
    assert (request.scheme, request.host, request.port) == ("https", "fhir.example", 443)
    assert request.path == "/base/Patient?name=x"
    assert request.host_header == "fhir.example"
    assert "Authorization" not in request.headers
    assert "Proxy-Authorization" not in request.headers
    assert request.headers[REQUEST_ID] == "app-id-1"
    state = state_of(flow)
    assert state is not None and state.connection is not None
    assert state.connection.name == "fhir"
    assert state.request_id == "app-id-1"
    assert state.error is None
    assert state.snapshot is routing._config.current()
    # rewrite_links is on by default: upstream URLs are turned into the app's own.
    assert state.links is not None
    assert state.links.app_base == "http://FHIR.example/base"


def test_a_forward_request_keeps_its_port_and_links_are_left_alone_when_told(
        routing: Routing) -> None:
    flow = forward_flow("plain.example", "/Patient/1", port=8080)
    routing.requestheaders(flow)
    assert flow.response is None
    request = flow.request
    assert (request.scheme, request.host, request.port) == ("http", "plain.example", 8080)
    assert request.host_header == "plain.example:8080"
    state = state_of(flow)
    assert state is not None and state.connection is not None
    assert state.connection.name == "plain"
    assert state.links is None
    # A request without an acceptable ID of its own gets a fresh one, sent upstream too.
    assert len(state.request_id) == 32
    assert request.headers[REQUEST_ID] == state.request_id


def test_a_request_on_a_connection_listener_gets_the_base_path_once(routing: Routing) -> None:
    flow = reverse_flow("/Patient?x=1", Authorization="Bearer app-token")
    routing.requestheaders(flow)
    assert flow.response is None
    request = flow.request
    assert (request.scheme, request.host, request.port) == ("https", "rev.example", 8443)
    assert request.path == "/r4/Patient?x=1"
    assert request.host_header == "rev.example:8443"
    assert "Authorization" not in request.headers
    state = state_of(flow)
    assert state is not None and state.connection is not None
    assert state.connection.name == "rev"
    assert state.links is not None
    assert state.links.app_base == "http://127.0.0.1:18777"


def test_a_request_on_an_unknown_listener_is_refused(routing: Routing) -> None:
    flow = reverse_flow("/Patient", listen="127.0.0.1:18778", Authorization="Bearer t")
    routing.requestheaders(flow)
    assert refused_kind(flow) == "no-route"
    assert flow.request.host == "127.0.0.1"
    assert "Authorization" not in flow.request.headers


@pytest.mark.parametrize(("host", "path"), [
    ("evil.example", "/base/Patient"),
    ("fhir.example", "/other/Patient"),
    ("fhir.example", "/basement"),
])
def test_an_unrouted_forward_request_is_refused_and_goes_nowhere(
        routing: Routing, host: str, path: str) -> None:
    flow = forward_flow(host, path + "?secret=q", Authorization="Basic YXBwOnB3")
    routing.requestheaders(flow)
    assert flow.response is not None
    assert flow.response.status_code == 403
    assert refused_kind(flow) == "no-route"
    body = flow.response.get_text() or ""
    assert f"http://{host}{path};" in body
    assert "secret=q" not in body
    assert (flow.request.host, flow.request.scheme) == (host, "http")
    assert "Authorization" not in flow.request.headers
    state = state_of(flow)
    assert state is not None and state.connection is None
    assert state.error == "no-route"


def test_dot_segments_are_resolved_before_routing_and_may_not_leave_the_base(
        routing: Routing) -> None:
    # Routed by its resolved path: /base/../other is not under /base.
    flow = forward_flow("fhir.example", "/base/../other/Patient")
    routing.requestheaders(flow)
    assert refused_kind(flow) == "no-route"

    flow = forward_flow("fhir.example", "/base/x/../Patient")
    routing.requestheaders(flow)
    assert flow.response is None
    assert flow.request.path == "/base/Patient"

    flow = reverse_flow("/../Patient")
    routing.requestheaders(flow)
    assert refused_kind(flow) == "bad-request"
    assert flow.response is not None
    text = flow.response.get_text() or ""
    assert "connection 'rev': " in text
    assert flow.response.headers.get("Connection") == "close"
    state = state_of(flow)
    assert state is not None and state.connection is not None
    assert state.connection.name == "rev"
    assert flow.request.host == "127.0.0.1"


def test_a_hidden_dot_segment_is_refused_before_any_route_is_chosen(routing: Routing) -> None:
    flow = forward_flow("fhir.example", "/base/Patient/..%5cadmin")
    routing.requestheaders(flow)
    assert refused_kind(flow) == "bad-request"
    assert flow.response is not None
    assert "connection '" not in body_text(flow)
    assert "refused and not forwarded: a path segment hides '..'" in body_text(flow)
    assert flow.request.host == "fhir.example" and flow.request.scheme == "http"


def test_a_bad_header_is_refused_and_the_connection_closed(routing: Routing) -> None:
    flow = forward_flow("fhir.example", "/base/Patient", Authorization="Basic YXBwOnB3")
    flow.request.headers["X-Bad"] = "a\x00b"
    routing.requestheaders(flow)
    assert flow.response is not None
    assert flow.response.status_code == 400
    assert refused_kind(flow) == "bad-request"
    assert flow.response.headers.get("Connection") == "close"
    assert flow.request.host == "fhir.example" and flow.request.scheme == "http"
    assert "Authorization" not in flow.request.headers
    assert "refused and not forwarded: the value of the header X-Bad contains a NUL byte" in \
        body_text(flow)
    state = state_of(flow)
    assert state is not None and state.connection is None and state.error == "bad-request"
    assert state.snapshot is routing._config.current()


def test_bad_framing_is_refused_by_the_sidecar_not_mitmproxy(routing: Routing) -> None:
    flow = forward_flow("fhir.example", "/base/Patient")
    flow.request.headers["Transfer-Encoding"] = "chunked"
    flow.request.headers["Content-Length"] = "7"
    routing.requestheaders(flow)
    assert flow.response is not None
    assert flow.response.status_code == 400
    assert refused_kind(flow) == "bad-request"
    assert "Transfer-Encoding" in (flow.response.get_text() or "")
    assert flow.request.host == "fhir.example"


def test_no_snapshot_means_no_decision(routing: Routing, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    monkeypatch.setattr(routing._config, "current", lambda: None)
    flow = forward_flow("evil.example", "/x")
    routing.requestheaders(flow)
    routing.http_connect(flow)
    assert flow.response is None and state_of(flow) is None


def connect_flow(host: str) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.method, flow.request.host, flow.request.port = "CONNECT", host, 443
    return flow


def test_connect_is_refused_unless_intercepted_for_a_configured_host(
        routing: Routing, tmp_path: Path) -> None:
    flow = connect_flow("FHIR.example")
    routing.http_connect(flow)
    assert refused_kind(flow) == "no-route"
    assert "tunnels (CONNECT) to FHIR.example are not supported" in body_text(flow)
    state = state_of(flow)
    assert state is not None and state.error == "no-route" and state.connection is None
    assert state.snapshot is routing._config.current()

    flow = connect_flow("evil.example")
    routing.http_connect(flow)
    assert refused_kind(flow) == "no-route"
    assert "no connection is configured" in body_text(flow)

    (tmp_path / "intercepting").mkdir()
    intercepting = make_routing(tmp_path / "intercepting", intercept=True)
    flow = connect_flow("FHIR.example")
    intercepting.http_connect(flow)
    assert flow.response is None
    flow = connect_flow("evil.example")
    intercepting.http_connect(flow)
    assert refused_kind(flow) == "no-route"


def test_a_request_without_a_host_header_links_back_to_the_address_it_asked_for(
        routing: Routing) -> None:
    flow = forward_flow("alt.example", "/Patient", port=8443)
    flow.request.host_header = None
    routing.requestheaders(flow)
    assert flow.response is None
    state = state_of(flow)
    assert state is not None and state.connection is not None
    assert state.connection.name == "alt"
    assert state.links is not None
    assert state.links.app_base == "http://alt.example:8443"
    assert flow.request.host_header == "alt.example:8443"
    # On the scheme's default port the address has no port, as a Host header would have.
    flow = forward_flow("fhir.example", "/base/Patient")
    flow.request.host_header = None
    routing.requestheaders(flow)
    state = state_of(flow)
    assert state is not None and state.links is not None
    assert state.links.app_base == "http://fhir.example/base"


def test_an_intercepted_https_request_is_routed_by_its_https_default_port(
        tmp_path: Path) -> None:
    routing = make_routing(tmp_path, intercept=True)
    flow = forward_flow("fhir.example", "/base/Patient", port=443)
    flow.request.scheme, flow.request.host_header = "https", "fhir.example"
    flow.client_conn.tls = True
    routing.requestheaders(flow)
    assert flow.response is None
    state = state_of(flow)
    assert state is not None and state.connection is not None
    assert state.connection.name == "fhir"
    # The app used the upstream's own base URL: there is nothing to rewrite.
    assert state.links is None


# -- issue 26 §4: target forms, versions, hop-by-hop headers ---------------------------------------

PREFACE_WORDS = ("the request was refused and not forwarded: the method PRI belongs to the "
                 "HTTP/2 connection preface, not to an HTTP/1.1 request")
ASTERISK_WORDS = ("the request was refused and not forwarded: the request target is '*' "
                  "(asterisk-form, as in OPTIONS * or the HTTP/2 preface PRI *): it asks about "
                  "the server itself, not about a FHIR resource")


def version_words(version: str) -> str:
    return (f"the request was refused and not forwarded: the request line names {version!r}; "
            "the sidecar speaks HTTP/1.1 (and HTTP/1.0) on its listeners")


@pytest.mark.parametrize(("method", "path", "version", "words"), [
    ("PRI", "*", "HTTP/2.0", PREFACE_WORDS),
    ("PRI", "/Patient", "HTTP/1.1", PREFACE_WORDS),
    ("OPTIONS", "*", "HTTP/1.1", ASTERISK_WORDS),
    ("GET", "*", "HTTP/1.0", ASTERISK_WORDS),
    ("GET", "/Patient", "HTTP/2.0", version_words("HTTP/2.0")),
    ("GET", "/Patient", "HTTP/0.9", version_words("HTTP/0.9")),
    ("GET", "/Patient", "HTTP/1.2", version_words("HTTP/1.2")),
])
def test_asterisk_form_the_preface_and_other_versions_are_refused(
        routing: Routing, method: str, path: str, version: str, words: str) -> None:
    flow = reverse_flow("/Patient")
    flow.request.method, flow.request.http_version = method, version
    flow.request.data.path = path.encode()
    routing.requestheaders(flow)
    assert refused_kind(flow) == "bad-request"
    assert json.loads(body_text(flow))["issue"][0]["diagnostics"] == words
    assert flow.response is not None and flow.response.headers["Connection"] == "close"
    assert flow.request.host == "127.0.0.1"  # never pointed at the upstream


@pytest.mark.parametrize("version", ["HTTP/1.0", "HTTP/1.1"])
def test_http1_versions_pass(routing: Routing, version: str) -> None:
    flow = reverse_flow("/Patient")
    flow.request.http_version = version
    routing.requestheaders(flow)
    assert flow.response is None
    assert flow.request.http_version == version


def test_http2_passes_only_where_the_app_negotiated_it(routing: Routing) -> None:
    # HTTP/2 requests exist only where the app's TLS is the sidecar's and ALPN chose h2.
    negotiated = reverse_flow("/Patient")
    negotiated.request.http_version = "HTTP/2.0"
    negotiated.client_conn.alpn = b"h2"
    routing.requestheaders(negotiated)
    assert negotiated.response is None
    claimed = reverse_flow("/Patient")
    claimed.request.http_version = "HTTP/2.0"
    claimed.client_conn.alpn = b"http/1.1"
    routing.requestheaders(claimed)
    assert refused_kind(claimed) == "bad-request"


def test_an_absolute_form_request_on_a_listener_goes_upstream_in_origin_form(
        routing: Routing) -> None:
    flow = reverse_flow("/Patient/1")
    flow.request.authority = "127.0.0.1:18777"  # GET http://127.0.0.1:18777/Patient/1
    routing.requestheaders(flow)
    assert flow.response is None
    assert flow.request.authority == ""
    assert flow.request.path == "/r4/Patient/1"
    assert flow.request.host == "rev.example"


@pytest.mark.parametrize(("version", "connection", "forwarded"), [
    ("HTTP/1.1", "close, X-Hop, TE", "close"),
    ("HTTP/1.1", "Keep-Alive, X-Hop", None),
    ("HTTP/1.1", "X-Hop", None),
    ("HTTP/1.0", "Keep-Alive, X-Hop", "keep-alive"),
    ("HTTP/1.0", "X-Hop", None),
])
def test_hop_by_hop_headers_are_dropped_and_connection_is_the_sidecars_own(
        routing: Routing, version: str, connection: str, forwarded: str | None) -> None:
    flow = reverse_flow("/Patient", Connection=connection, X_Hop="secret-hop",
                        Keep_Alive="timeout=5", TE="trailers", Trailer="X-Sum",
                        Upgrade="h2c", HTTP2_Settings="AAMAAABk", Proxy_Connection="close",
                        X_Other="kept")
    flow.request.http_version = version
    routing.requestheaders(flow)
    assert flow.response is None
    headers = flow.request.headers
    assert headers.get_all("Connection") == ([forwarded] if forwarded else [])
    for name in ("X-Hop", "Keep-Alive", "TE", "Trailer", "Upgrade", "HTTP2-Settings",
                 "Proxy-Connection"):
        assert name not in headers, name
    assert headers["X-Other"] == "kept"


def test_framing_and_host_named_in_connection_stay(routing: Routing) -> None:
    flow = reverse_flow("/Patient", Connection="Content-Length, Transfer-Encoding, Host",
                        Content_Length="5")
    flow.request.method = "POST"
    routing.requestheaders(flow)
    assert flow.response is None
    assert flow.request.headers["Content-Length"] == "5"
    assert flow.request.host_header == "rev.example:8443"
    assert "Connection" not in flow.request.headers


@pytest.mark.parametrize(("version", "shown"), [
    (b"HTTP/1.1234567890123", "HTTP/1.123456789"),  # at most 16 characters of it
    (b"HTTP/\xff\xfe", "HTTP/\ufffd\ufffd"),  # bytes that are not ASCII, never an exception
])
def test_an_odd_version_is_quoted_short_and_safe(routing: Routing, version: bytes,
                                                 shown: str) -> None:
    flow = reverse_flow("/Patient")
    flow.request.data.http_version = version
    routing.requestheaders(flow)
    assert refused_kind(flow) == "bad-request"
    assert json.loads(body_text(flow))["issue"][0]["diagnostics"] == version_words(shown)


def test_refusal_allows_http2_only_when_told_so() -> None:
    from sidecar.proxy.request_checks import refusal

    flow = reverse_flow("/Patient")
    flow.request.http_version = "HTTP/2.0"
    assert refusal(flow.request) is not None
    assert refusal(flow.request, http2=True) is None

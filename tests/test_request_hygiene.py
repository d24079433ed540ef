"""Hostile requests against the real sidecar process, over raw sockets, as an attacker sends them.

The upstream is RawRecordingUpstream: it keeps every byte it receives. A refused request must
leave nothing there at all; to know that nothing is still on its way, each check ends with an
ordinary request on a fresh connection and waits until that one -- and only that one -- arrived.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import pytest
from support.constants import basic_header
from support.pki import TestPKI
from support.raw_upstream import RawRecordingUpstream
from support.sidecar_process import SidecarProcess, free_port, wait_until
from support.sidecars import StartSidecar

from sidecar.testkit.fhir_server import server_tls_context
from sidecar.testkit.pki import ServerIdentity

READ_TIMEOUT = 30.0
BASIC = {name: basic_header(f"user-{name}", f"pw-{name}") for name in ("fhir", "other", "skip")}


@dataclass
class RawResponse:
    status: int
    head: bytes
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def exchange(port: int, data: bytes) -> RawResponse:
    """Send ``data`` on a new connection; read one response (Content-Length framed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as sock:
        sock.sendall(data)
        return read_response(sock)


def read_response(sock: socket.socket) -> RawResponse:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response head: {buffer!r}")
        buffer += chunk
    head, body = buffer.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return RawResponse(int(lines[0].split()[1]), head, headers, body[:length])


def assert_bad_request(response: RawResponse, *words: str) -> str:
    assert response.status == 400, response.head + response.body
    assert response.headers["content-type"] == "application/fhir+json"
    assert response.headers["x-sidecar-error"] == "bad-request"
    assert b"<html" not in response.body.lower()
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    diagnostics: str = outcome["issue"][0]["diagnostics"]
    for word in words:
        assert word in diagnostics, diagnostics
    return diagnostics


@dataclass
class Setup:
    sidecar: SidecarProcess
    upstream: RawRecordingUpstream
    reverse_port: int
    proxy_port: int
    admin_port: int

    @property
    def authority(self) -> str:
        return f"localhost:{self.upstream.port}"

    def reverse(self, target: str, headers: bytes = b"", body: bytes = b"",
                method: bytes = b"GET") -> bytes:
        return (method + b" " + target.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1:"
                + str(self.reverse_port).encode() + b"\r\n" + headers + b"\r\n" + body)

    def forward(self, path: str, headers: bytes = b"", body: bytes = b"",
                method: bytes = b"GET") -> bytes:
        url = f"http://{self.authority}{path}".encode()
        return (method + b" " + url + b" HTTP/1.1\r\nHost: " + self.authority.encode()
                + b"\r\n" + headers + b"\r\n" + body)

    def send(self, listener: str, target: str, headers: bytes = b"", body: bytes = b"",
             method: bytes = b"GET") -> RawResponse:
        if listener == "reverse":
            return exchange(self.reverse_port,
                            self.reverse(target, headers, body, method))
        return exchange(self.proxy_port, self.forward("/fhir" + target, headers, body, method))

    def assert_nothing_reached_upstream(self) -> None:
        """Only a sentinel request, sent now, arrives: nothing before it, nothing smuggled."""
        sentinel = exchange(self.reverse_port, self.reverse("/sentinel"))
        assert sentinel.status == 200, sentinel.head
        heads = self.upstream.wait_for_heads(1)
        assert [h.split(b"\r\n")[0] for _, h in heads] == [b"GET /fhir/sentinel HTTP/1.1"], heads
        self.upstream.clear()
        # Log lines come in order: once the sentinel's is read, so is every earlier one.
        sentinel_id = sentinel.headers["x-request-id"]
        self.sidecar.wait_for_event("request", lambda r: r["request_id"] == sentinel_id)

    def refusals_logged(self) -> int:
        return sum(1 for r in self.sidecar.events("request") if r.get("error") == "bad-request")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI,
          start_module_sidecar: StartSidecar) -> Iterator[Setup]:
    tmp = Path(tmp_path_factory.mktemp("hygiene"))
    with RawRecordingUpstream(pki.server(name="raw-hygiene")) as upstream:
        custom = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
        reverse_port, proxy_port, admin_port = free_port(), free_port(), free_port()
        base = f"https://localhost:{upstream.port}"
        sidecar = start_module_sidecar({
            "proxy": {"listen": f"127.0.0.1:{proxy_port}"},
            "admin": {"listen": f"127.0.0.1:{admin_port}"},
            "basic_auth": {name: {"username": f"user-{name}", "password": f"pw-{name}"}
                           for name in BASIC},
            "connections": {
                "fhir": {"url": f"{base}/fhir", "listen": f"127.0.0.1:{reverse_port}",
                         "auth": {"basic": "fhir"}, "tls": custom},
                "other": {"url": f"{base}/other", "auth": {"basic": "other"}, "tls": custom},
                "skip": {"url": f"{base}/skip", "auth": {"basic": "skip"}, "tls": custom},
            },
        }, directory=tmp)
        yield Setup(sidecar.process, upstream, reverse_port, proxy_port, admin_port)


@pytest.fixture
def hygiene(setup: Setup) -> Setup:
    setup.upstream.clear()
    return setup


# -- item 2: dot-segments --------------------------------------------------------------------

@pytest.mark.parametrize("target", [
    "/../admin",
    "/%2e%2e/admin",
    "/%2E%2E/admin",
    "/.%2e/admin",
    "/Patient/../../admin",
    "/fhir/../admin",
    "/fhir/../fhir/Patient",
    "/Patient/..%2f..%2fadmin",
    "/Patient/..%2F..%2Fadmin",
    "/Patient/..%5c..%5cadmin",
    "/Patient/..\\..\\admin",
    "/Patient/%252e%252e/%252e%252e/admin",
    "/Patient/..;/..;/admin",
])
def test_reverse_listener_refuses_paths_that_leave_the_base(hygiene: Setup, target: str
                                                            ) -> None:
    response = hygiene.send("reverse", target)
    assert_bad_request(response, "not forwarded")
    assert "Basic" not in response.body.decode()
    hygiene.assert_nothing_reached_upstream()


@pytest.mark.parametrize("listener", ["reverse", "forward"])
@pytest.mark.parametrize("target", ["/Patient\x00/admin", "/Patient?name=a\x00b",
                                    "/Patient?name=a\x01b", "/Patient\x7f"])
def test_raw_control_bytes_in_the_target_are_refused(hygiene: Setup, listener: str,
                                                     target: str) -> None:
    response = hygiene.send(listener, target)
    assert_bad_request(response, "control character")
    hygiene.assert_nothing_reached_upstream()


def test_reverse_listener_resolves_dot_segments_inside_the_base(hygiene: Setup) -> None:
    response = hygiene.send("reverse", "/Patient/x/../%2e/123?name=../..&x=%2e%2e%2f")
    assert response.status == 200, response.head
    (_, head), = hygiene.upstream.wait_for_heads(1)
    assert head.startswith(b"GET /fhir/Patient/123?name=../..&x=%2e%2e%2f HTTP/1.1\r\n")
    assert f"\r\nAuthorization: {BASIC['fhir']}".encode() in head


@pytest.mark.parametrize("path", [
    "/other/../skip/Patient",
    "/other/%2e%2e/skip/Patient",
    "/skip/../skip/Patient",
    "/other/..%2f/skip/Patient",
    "/fhir/../../admin",
])
def test_forward_proxy_refuses_paths_that_leave_the_base(hygiene: Setup, path: str) -> None:
    response = exchange(hygiene.proxy_port, hygiene.forward(path))
    assert_bad_request(response, "not forwarded")
    hygiene.assert_nothing_reached_upstream()


def test_forward_proxy_routes_the_resolved_path(hygiene: Setup) -> None:
    response = exchange(hygiene.proxy_port, hygiene.forward("/skip/a/b/../../Patient?q=1"))
    assert response.status == 200, response.head
    (_, head), = hygiene.upstream.wait_for_heads(1)
    assert head.startswith(b"GET /skip/Patient?q=1 HTTP/1.1\r\n")
    assert f"\r\nAuthorization: {BASIC['skip']}".encode() in head
    assert BASIC["other"].encode() not in head


def split_responses(data: bytes) -> list[RawResponse]:
    """Content-Length framed responses, one after the other, from everything a socket sent."""
    found = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in
                   (line.decode("latin-1").partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        found.append(RawResponse(int(lines[0].split()[1]), head, headers, rest[:length]))
        data = rest[length:]
    return found


def test_a_pipelined_escape_behind_a_large_body_in_one_write_is_refused(hygiene: Setup) -> None:
    # The sidecar reads up to 1 MiB at once (sidecar/proxy/speedups.py): a 300 KB body and
    # the request behind it arrive together. The body (which looks like requests itself) goes
    # upstream byte for byte; the request after it is framed on its own and refused.
    body = (b"GET /fhir/../admin HTTP/1.1\r\nHost: x\r\n\r\n" * 8000)[:300_000]
    first = hygiene.reverse("/Patient", b"Content-Length: %d\r\n" % len(body), body, b"POST")
    behind = hygiene.reverse("/../admin")
    with socket.create_connection(("127.0.0.1", hygiene.reverse_port),
                                  timeout=READ_TIMEOUT) as sock:
        sock.sendall(first + behind)
        received = b""
        while chunk := sock.recv(65536):  # the refusal closes the connection
            received += chunk
    answered, refused = split_responses(received)
    assert answered.status == 200, answered.head
    assert_bad_request(refused, "not forwarded")
    assert refused.headers.get("connection") == "close"
    (_, head), = hygiene.upstream.wait_for_heads(1)
    assert head.startswith(b"POST /fhir/Patient HTTP/1.1\r\n")
    assert hygiene.upstream.all_bytes() == head + b"\r\n\r\n" + body
    hygiene.upstream.clear()
    hygiene.assert_nothing_reached_upstream()  # and nothing from behind it arrives later


# -- item 3: header injection and smuggling ------------------------------------------------------

SMUGGLED = b"GET /admin/smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n"

HOSTILE_HEADERS = {
    "bare CR before a header": (b"X-N: a\rAuthorization: Bearer APP\r\n", b"", "(CR)"),
    "bare CR smuggling a request": (
        b"X-N: a\rContent-Length: 0\r\nContent-Length: " + str(len(SMUGGLED)).encode() + b"\r\n",
        SMUGGLED, "(CR)"),
    "obs-fold": (b"X-N: a\r\n Authorization: Bearer APP\r\n", b"", "obs-fold"),
    "obs-fold with a tab": (b"X-N: a\r\n\tContent-Length: 0\r\n", b"", "obs-fold"),
    "NUL": (b"X-N: a\x00b\r\n", b"", "NUL"),
    "other control character": (b"X-N: a\x0bb\r\n", b"", "0x0b"),
    "space in a name": (b"X N: a\r\n", b"", "not a valid HTTP token"),
    "space before the colon": (b"Content-Length : 0\r\n", b"", "not a valid HTTP token"),
    "non-token name": (b"X(N): a\r\n", b"", "not a valid HTTP token"),
}


@pytest.mark.parametrize("listener", ["reverse", "forward"])
@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_hostile_headers_are_refused_before_anything_goes_upstream(
        hygiene: Setup, listener: str, case: str) -> None:
    headers, body, words = HOSTILE_HEADERS[case]
    response = hygiene.send(listener, "/Patient", headers, body,
                            method=b"POST" if body else b"GET")
    assert_bad_request(response, words)
    assert response.headers.get("connection") == "close"
    assert response.headers["x-request-id"]
    assert b"APP" not in response.body
    hygiene.assert_nothing_reached_upstream()


@pytest.mark.parametrize("listener", ["reverse", "forward"])
def test_ambiguous_framing_is_refused_as_an_operation_outcome(hygiene: Setup,
                                                              listener: str) -> None:
    # mitmproxy refuses this itself; the app gets the sidecar's answer, not mitmproxy's page.
    framing = b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"
    response = hygiene.send(listener, "/Patient", framing, b"0\r\n\r\n", method=b"POST")
    assert_bad_request(response, "Transfer-Encoding")
    assert response.headers["x-request-id"]
    hygiene.assert_nothing_reached_upstream()


# -- item 8: mitmproxy's own errors, X-Request-ID ------------------------------------------------

MALFORMED = {
    "request line": (b"GARBAGE\r\n\r\n", "request line"),
    "request line with extra words": (b"GET /fhir/x?secret=1 HTTP/1.1 extra\r\nHost: x\r\n\r\n",
                                      "request line"),
    "header line without a colon": (b"GET /x HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n",
                                    "header line"),
    "fold before any header": (b"GET /x HTTP/1.1\r\n Host: x\r\n\r\n", "header line"),
    "bad content-length": (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                           "Content-Length"),
}


@pytest.mark.parametrize("listener", ["reverse", "forward"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_mitmproxys_own_400s_are_operation_outcomes(hygiene: Setup, listener: str,
                                                    case: str) -> None:
    data, words = MALFORMED[case]
    refusals_before = hygiene.refusals_logged()
    port = hygiene.reverse_port if listener == "reverse" else hygiene.proxy_port
    response = exchange(port, data)
    diagnostics = assert_bad_request(response, words)
    assert "secret" not in diagnostics  # mitmproxy's message quotes the line; ours does not
    assert "text/html" not in response.head.decode("latin-1").lower()
    request_id = response.headers["x-request-id"]
    line = hygiene.sidecar.wait_for_event("request", lambda r: r["request_id"] == request_id)
    assert line["status"] == 400 and line["error"] == "bad-request"
    hygiene.assert_nothing_reached_upstream()
    # Logged (and counted) once, though mitmproxy may also hand the request to the addon.
    assert hygiene.refusals_logged() == refusals_before + 1


def test_forward_request_without_a_destination_is_an_operation_outcome(hygiene: Setup) -> None:
    response = exchange(hygiene.proxy_port, b"GET /fhir/Patient HTTP/1.1\r\n\r\n")
    assert_bad_request(response, "Host")
    hygiene.assert_nothing_reached_upstream()


@pytest.mark.parametrize(("given_id", "kept"), [
    (b"abc-" + b"x" * 124, True),
    (b"abc-" + b"x" * 125, False),
    (b"has space", False),
    ("caf\u00e9".encode(), False),
    (b"tab\there", False),
])
def test_request_id_is_used_only_when_short_visible_ascii(hygiene: Setup, given_id: bytes,
                                                          kept: bool) -> None:
    response = hygiene.send("reverse", "/Patient", b"X-Request-ID: " + given_id + b"\r\n")
    assert response.status == 200, response.head
    (_, head), = hygiene.upstream.wait_for_heads(1)
    sent = [line for line in head.split(b"\r\n") if line.lower().startswith(b"x-request-id:")]
    assert len(sent) == 1
    upstream_id = sent[0].split(b":", 1)[1].strip()
    assert response.headers["x-request-id"].encode() == upstream_id
    assert (upstream_id == given_id) is kept
    assert 1 <= len(upstream_id) <= 128 and all(0x21 <= c <= 0x7E for c in upstream_id)


def test_refused_requests_are_logged_without_their_path_or_query(hygiene: Setup) -> None:
    response = hygiene.send("reverse", "/../admin?token=querysecret")
    request_id = response.headers["x-request-id"]
    line = hygiene.sidecar.wait_for_event(
        "request", lambda r: r.get("request_id") == request_id)
    assert line["status"] == 400 and line["error"] == "bad-request"
    assert "querysecret" not in hygiene.sidecar.output
    hygiene.assert_nothing_reached_upstream()


def _refused_count(setup: Setup, connection: str) -> float:
    metrics = exchange(setup.admin_port, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
    prefix = f'fhir_sidecar_requests_total{{connection="{connection}",method="GET",' \
             'status_class="4xx"} '
    for line in metrics.body.decode().splitlines():
        if line.startswith(prefix):
            return float(line.removeprefix(prefix))
    return 0.0


def test_refused_requests_are_counted(hygiene: Setup) -> None:
    header_before = _refused_count(hygiene, "-")
    path_before = _refused_count(hygiene, "fhir")
    assert hygiene.send("reverse", "/Patient", b"X-N: a\rb\r\n").status == 400
    assert hygiene.send("reverse", "/../admin").status == 400
    wait_until(lambda: _refused_count(hygiene, "-") == header_before + 1
               and _refused_count(hygiene, "fhir") == path_before + 1,
               message="both refusals counted")
    hygiene.assert_nothing_reached_upstream()


# -- item 3: a hostile token endpoint ------------------------------------------------------------

class HostileTokenEndpoint:
    """A tiny HTTPS token endpoint that issues, per client id, whatever token it is told to.

    Not the real oidc-provider used elsewhere: that one never issues a broken token, and a
    token endpoint that does (compromised, or simply buggy) is exactly the case tested here.
    """

    def __init__(self, identity: ServerIdentity, tokens: dict[str, str]) -> None:
        self.tokens = tokens
        self.requests: list[str] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                credentials = self.headers.get("Authorization", "").removeprefix("Basic ")
                client_id = unquote_plus(base64.b64decode(credentials).decode().split(":")[0])
                endpoint.requests.append(client_id)
                data = json.dumps({"access_token": endpoint.tokens[client_id],
                                   "token_type": "Bearer", "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        context: ssl.SSLContext = server_tls_context(identity, None)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> HostileTokenEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


HOSTILE_TOKENS = {
    "crlf": "tok\r\nX-Injected: yes",
    "cr": "tok\rX-Injected: yes",
    "lf": "tok\nX-Injected: yes",
    "nul": "tok\x00",
    "space": "tok en",
    "comma": "tok,en",
    "inner-equals": "tok=en",
    "non-ascii": "t\u00f6k",
    "good": "good-token.with_all~token68+chars/==",
}


@dataclass
class TokenSetup:
    sidecar: SidecarProcess
    upstream: RawRecordingUpstream
    endpoint: HostileTokenEndpoint
    ports: dict[str, int]


@pytest.fixture(scope="module")
def token_setup(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI,
                start_module_sidecar: StartSidecar) -> Iterator[TokenSetup]:
    tmp = Path(tmp_path_factory.mktemp("hostile-token"))
    with RawRecordingUpstream(pki.server(name="raw-token")) as upstream, \
            HostileTokenEndpoint(pki.server(name="hostile-token"), HOSTILE_TOKENS) as endpoint:
        custom = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
        ports = {name: free_port() for name in HOSTILE_TOKENS}
        sidecar = start_module_sidecar({
            "admin": {"listen": None},
            "oauth": {name: {"token_url": f"https://localhost:{endpoint.port}/token",
                             "client_id": name, "client_secret": "client-secret-value",
                             "tls": custom} for name in HOSTILE_TOKENS},
            "connections": {name: {"url": f"https://localhost:{upstream.port}/fhir",
                                   "listen": f"127.0.0.1:{ports[name]}",
                                   "auth": {"oauth": name}, "tls": custom}
                            for name in HOSTILE_TOKENS},
        }, directory=tmp)
        yield TokenSetup(sidecar.process, upstream, endpoint, ports)


@pytest.mark.parametrize("name", [n for n in HOSTILE_TOKENS if n != "good"])
def test_a_hostile_access_token_is_a_token_failure_never_a_header(token_setup: TokenSetup,
                                                                  name: str) -> None:
    response = exchange(token_setup.ports[name],
                        b"GET /Patient HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert response.status == 503, response.head + response.body
    assert response.headers["content-type"] == "application/fhir+json"
    assert response.headers["x-sidecar-error"] == "token-unavailable"
    diagnostics = response.json()["issue"][0]["diagnostics"]
    assert "not a valid bearer token" in diagnostics and f"'{name}'" in diagnostics
    assert "Injected" not in diagnostics and "tok en" not in diagnostics
    assert name in token_setup.endpoint.requests
    # The proof that the check is what stopped it: a good token from the same endpoint is
    # sent, and only that one ever reaches the upstream.
    good = exchange(token_setup.ports["good"], b"GET /Patient HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert good.status == 200, good.head
    wait_until(lambda: token_setup.upstream.heads(), message="the good request upstream")
    received = token_setup.upstream.all_bytes()
    assert b"Authorization: Bearer " + HOSTILE_TOKENS["good"].encode() + b"\r\n" in received
    assert b"Injected" not in received and b"Bearer tok" not in received
    assert b"Injected" not in token_setup.sidecar.output.encode()
    token_setup.upstream.clear()

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
from support.raw_client import READ_TIMEOUT, RawResponse, exchange, read_response
from support.raw_upstream import RawRecordingUpstream
from support.scripted_upstream import ScriptedUpstream
from support.sidecar_process import SidecarProcess, free_port, wait_until
from support.sidecars import StartSidecar

from sidecar.testkit.fhir_server import server_tls_context
from sidecar.testkit.pki import ServerIdentity

BASIC = {name: basic_header(f"user-{name}", f"pw-{name}") for name in ("fhir", "other", "skip")}


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


# -- issue 26 §4: what other decoders read differently, request-target forms, framing ------------

@pytest.mark.parametrize("listener", ["reverse", "forward"])
@pytest.mark.parametrize(("target", "words"), [
    ("/Patient/%u002e%u002e/%u002e%u002e/admin", "%u002e"),
    ("/Patient/%c0%ae%c0%ae/%c0%ae%c0%ae/admin", "overlong UTF-8"),
    ("/Patient/%c0%af..%c0%afadmin", "overlong UTF-8"),
    ("/Patient/1%00.json", "control character"),
    ("/Patient/%ef%bc%8e%ef%bc%8e/%ef%bc%8e%ef%bc%8e/admin", "fullwidth dot"),
    ("/Patient/\uff0e\uff0e/\uff0e\uff0e/admin", "fullwidth dot"),  # the same bytes, raw
])
def test_escapes_that_other_decoders_read_as_dots_are_refused(hygiene: Setup, listener: str,
                                                              target: str, words: str) -> None:
    response = hygiene.send(listener, target)
    if listener == "forward" and not target.isascii():
        words = "request line"  # mitmproxy refuses raw UTF-8 in an absolute URL itself
    assert_bad_request(response, "not forwarded", words)
    assert response.headers.get("connection") == "close"
    hygiene.assert_nothing_reached_upstream()


@pytest.mark.parametrize("authority", ["127.0.0.1:{port}", "localhost:{port}"])
def test_an_absolute_form_request_on_a_reverse_listener_goes_upstream_in_origin_form(
        hygiene: Setup, authority: str) -> None:
    # Apps behind a misconfigured HTTP_PROXY send absolute-form to the connection's own
    # listener; mitmproxy would pass the target on as it came (GET https://localhost:N/...).
    host = authority.format(port=hygiene.reverse_port)
    request = (f"GET http://{host}/Patient/123?_format=json HTTP/1.1\r\nHost: {host}\r\n"
               "\r\n").encode()
    response = exchange(hygiene.reverse_port, request)
    assert response.status == 200, response.head
    (_, head), = hygiene.upstream.wait_for_heads(1)
    assert head.startswith(b"GET /fhir/Patient/123?_format=json HTTP/1.1\r\n"), head
    assert f"\r\nHost: {hygiene.authority}".encode() in head
    assert b"http://" not in head and b"https://" not in head


ASTERISK = {
    "OPTIONS *": (b"OPTIONS * HTTP/1.1\r\nHost: {host}\r\n\r\n", "asterisk-form"),
    "GET *": (b"GET * HTTP/1.1\r\nHost: {host}\r\n\r\n", "asterisk-form"),
    "PRI * as HTTP/1.1": (b"PRI * HTTP/1.1\r\nHost: {host}\r\n\r\n", "HTTP/2 connection preface"),
    # The HTTP/2 prior-knowledge preface itself: mitmproxy's DisableH2C killed it unanswered.
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", ""),
}


@pytest.mark.parametrize("listener", ["reverse", "forward"])
@pytest.mark.parametrize("case", list(ASTERISK))
def test_asterisk_form_is_refused(hygiene: Setup, listener: str, case: str) -> None:
    # On a reverse listener '*' was joined to the base path: "OPTIONS /fhir/*" went upstream.
    template, words = ASTERISK[case]
    port = hygiene.reverse_port if listener == "reverse" else hygiene.proxy_port
    response = exchange(port, template.replace(b"{host}", hygiene.authority.encode()))
    # The forward proxy refuses a preface without Host itself (mitmproxy: no destination).
    assert_bad_request(response, "not forwarded", words if listener == "reverse" else "")
    hygiene.assert_nothing_reached_upstream()


@pytest.mark.parametrize("listener", ["reverse", "forward"])
@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/3.0", "HTTP/1.2", "HTTP/0.9"])
def test_other_http_versions_are_refused(hygiene: Setup, listener: str, version: str) -> None:
    # mitmproxy parsed these and sent "GET /fhir/Patient HTTP/0.9" (with headers) upstream.
    data = (hygiene.reverse if listener == "reverse" else hygiene.forward)(
        "/Patient" if listener == "reverse" else "/fhir/Patient")
    response = exchange(hygiene.reverse_port if listener == "reverse" else hygiene.proxy_port,
                        data.replace(b" HTTP/1.1\r\n", f" {version}\r\n".encode(), 1))
    assert_bad_request(response, "not forwarded", version)
    hygiene.assert_nothing_reached_upstream()


BROKEN_CHUNKS = {
    "invalid chunk size": b"zz\r\nhello\r\n0\r\n\r\n",
    "negative chunk size": b"-5\r\nhello\r\n0\r\n\r\n",
    "chunk size with a space inside": b"5 5\r\nhello\r\n0\r\n\r\n",
    "chunk without its CRLF": b"5\r\nhelloXX0\r\n\r\n",
}


@pytest.mark.parametrize("listener", ["reverse", "forward"])
@pytest.mark.parametrize("case", list(BROKEN_CHUNKS))
def test_a_malformed_chunked_body_gets_a_400_operation_outcome(hygiene: Setup, listener: str,
                                                               case: str) -> None:
    # mitmproxy closed the connection without a word (docs/errors.md promises a 400).
    response = hygiene.send(listener, "/Patient", b"Transfer-Encoding: chunked\r\n",
                            BROKEN_CHUNKS[case], method=b"POST")
    assert_bad_request(response, "not forwarded", "chunked request body is malformed")
    assert response.headers.get("connection") == "close"
    request_id = response.headers["x-request-id"]
    line = hygiene.sidecar.wait_for_event("request", lambda r: r["request_id"] == request_id)
    assert line["status"] == 400 and line["error"] == "bad-request"
    hygiene.assert_nothing_reached_upstream()


def test_a_malformed_chunk_after_100_continue_gets_a_400_operation_outcome(hygiene: Setup
                                                                           ) -> None:
    # The body arrives after the request was routed (and the upstream connection opened):
    # mitmproxy reports a request-side error to the flow and answered nothing at all.
    head = hygiene.reverse("/Patient", b"Transfer-Encoding: chunked\r\n"
                                       b"Expect: 100-continue\r\n", method=b"POST")
    with socket.create_connection(("127.0.0.1", hygiene.reverse_port),
                                  timeout=READ_TIMEOUT) as sock:
        sock.sendall(head)
        assert read_interim(sock) == b"HTTP/1.1 100 Continue"
        sock.sendall(b"5\r\nhello\r\nzz\r\n")
        response = read_response(sock)
    assert_bad_request(response, "chunked request body is malformed")
    hygiene.assert_nothing_reached_upstream()


def read_interim(sock: socket.socket) -> bytes:
    """Read exactly one interim response head (``HTTP/1.1 100 Continue\\r\\n\\r\\n``)."""
    buffer = b""
    while not buffer.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise AssertionError(f"closed while reading an interim response: {buffer!r}")
        buffer += chunk
    return buffer.split(b"\r\n", 1)[0]


# -- issue 26 §4: hop-by-hop headers (RFC 9110 §7.6.1) ---------------------------------------------

HOP_BY_HOP = (b"X-Hop-Secret: only-for-the-sidecar\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
              b"Trailer: X-Checksum\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
              b"Proxy-Connection: keep-alive\r\n")
HOP_NAMES = (b"x-hop-secret", b"keep-alive", b"te", b"trailer", b"upgrade", b"http2-settings",
             b"proxy-connection")


def header_names(head: bytes) -> list[bytes]:
    return [line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")[1:]]


def header_value(head: bytes, name: bytes) -> bytes | None:
    values = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")[1:]
              if line.split(b":", 1)[0].lower() == name]
    assert len(values) <= 1, head
    return values[0] if values else None


@pytest.mark.parametrize("listener", ["reverse", "forward"])
def test_connection_and_the_headers_it_names_are_not_forwarded(hygiene: Setup,
                                                               listener: str) -> None:
    headers = b"Connection: X-Hop-Secret, TE, Upgrade\r\n" + HOP_BY_HOP
    with socket.create_connection(
            ("127.0.0.1", hygiene.reverse_port if listener == "reverse" else hygiene.proxy_port),
            timeout=READ_TIMEOUT) as sock:
        build = hygiene.reverse if listener == "reverse" else hygiene.forward
        prefix = "" if listener == "reverse" else "/fhir"
        sock.sendall(build(f"{prefix}/Patient/1", headers))
        first = read_response(sock)
        # Keep-alive is kept: the same app connection carries a second request.
        sock.sendall(build(f"{prefix}/Patient/2"))
        second = read_response(sock)
    assert first.status == 200 and second.status == 200, (first.head, second.head)
    [(number_1, head_1), (number_2, head_2)] = hygiene.upstream.wait_for_heads(2)
    for name in (b"connection", *HOP_NAMES):
        assert name not in header_names(head_1), head_1
    assert b"only-for-the-sidecar" not in hygiene.upstream.all_bytes()
    assert head_2.startswith(b"GET /fhir/Patient/2 HTTP/1.1\r\n"), head_2
    assert number_1 == number_2, "the upstream connection was not kept alive either"
    assert f"\r\nAuthorization: {BASIC['fhir']}".encode() in head_1


def test_connection_close_is_the_sidecars_own_option_and_still_closes(hygiene: Setup) -> None:
    headers = b"Connection: close, X-Hop-Secret\r\n" + HOP_BY_HOP
    with socket.create_connection(("127.0.0.1", hygiene.reverse_port),
                                  timeout=READ_TIMEOUT) as sock:
        sock.sendall(hygiene.reverse("/Patient", headers))
        response = read_response(sock)
        assert sock.recv(65536) == b"", "the app asked to close, and the sidecar did not"
    assert response.status == 200, response.head
    (_, head), = hygiene.upstream.wait_for_heads(1)
    assert header_value(head, b"connection") == b"close"  # not the app's list
    for name in HOP_NAMES:
        assert name not in header_names(head), head


def test_an_http10_app_keeps_its_connection_alive(hygiene: Setup) -> None:
    request = (f"GET /Patient HTTP/1.0\r\nHost: 127.0.0.1:{hygiene.reverse_port}\r\n"
               "Connection: Keep-Alive, X-Hop-Secret\r\nX-Hop-Secret: 1\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", hygiene.reverse_port),
                                  timeout=READ_TIMEOUT) as sock:
        sock.sendall(request)
        assert read_response(sock).status == 200
        sock.sendall(request)
        assert read_response(sock).status == 200
    heads = hygiene.upstream.wait_for_heads(2)
    for _, head in heads:
        assert header_value(head, b"connection") == b"keep-alive"
        assert b"x-hop-secret" not in header_names(head)


@pytest.mark.parametrize("named", [b"Content-Length", b"Transfer-Encoding", b"Host"])
def test_framing_and_host_named_in_connection_are_kept(hygiene: Setup, named: bytes) -> None:
    # Dropping Content-Length from a request with a body would leave the body to be read as
    # the next request: a smuggled one, with the sidecar's credentials on the connection.
    body = SMUGGLED
    chunked = named == b"Transfer-Encoding"
    framing = (b"Transfer-Encoding: chunked\r\n" if chunked
               else b"Content-Length: %d\r\n" % len(body))
    wire_body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if chunked else body
    response = hygiene.send("reverse", "/Patient", b"Connection: " + named + b"\r\n" + framing,
                            wire_body, method=b"POST")
    assert response.status == 200, response.head
    wait_until(lambda: hygiene.upstream.all_bytes().endswith(wire_body),
               message="the whole body upstream")
    head, _, sent_body = hygiene.upstream.all_bytes().partition(b"\r\n\r\n")
    assert head.startswith(b"POST /fhir/Patient HTTP/1.1\r\n")
    assert sent_body == wire_body  # framed exactly as the app framed it: one request
    assert b"connection" not in header_names(head)
    assert header_value(head, b"host") == hygiene.authority.encode()
    if chunked:
        assert header_value(head, b"transfer-encoding") == b"chunked"
    else:
        assert header_value(head, b"content-length") == str(len(body)).encode()
    hygiene.upstream.clear()
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


# -- issue 26 §4: Expect: 100-continue when the request cannot be sent ----------------------------

class SilentTlsServer:
    """Accepts TCP connections and never says a word: a TLS handshake with it never ends."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self.accepted.append(sock)

    def __enter__(self) -> SilentTlsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()
        for sock in self.accepted:
            sock.close()


@dataclass
class ExpectSetup:
    sidecar: SidecarProcess
    good: RawRecordingUpstream
    untrusted: RawRecordingUpstream
    ports: dict[str, int]


@pytest.fixture(scope="module")
def expect_setup(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI,
                 start_module_sidecar: StartSidecar) -> Iterator[ExpectSetup]:
    tmp = Path(tmp_path_factory.mktemp("expect"))
    closed_port = free_port()  # nothing listens there: the token endpoint is unreachable
    with RawRecordingUpstream(pki.server(name="raw-expect")) as good, \
            RawRecordingUpstream(pki.server_from_other_ca(name="raw-expect-other")) as untrusted, \
            SilentTlsServer() as silent, ScriptedUpstream(pki.server(name="expect-reset")) as reset:
        custom = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
        ports = {name: free_port() for name in ("good", "tls", "token", "silent", "reset", "proxy")}

        def connection(name: str, port: int, **extra: Any) -> dict[str, Any]:
            return {"url": f"https://localhost:{port}/fhir", "listen": f"127.0.0.1:{ports[name]}",
                    "tls": custom, **extra}

        sidecar = start_module_sidecar({
            "admin": {"listen": None},
            "proxy": {"listen": f"127.0.0.1:{ports['proxy']}"},
            "basic_auth": {"b": {"username": "user-expect", "password": "pw-expect"}},
            "oauth": {"down": {"token_url": f"https://localhost:{closed_port}/token",
                               "client_id": "c", "client_secret": "expect-client-secret",
                               "tls": custom}},
            "connections": {
                "good": connection("good", good.port, auth={"basic": "b"}),
                "tls": connection("tls", untrusted.port, auth={"basic": "b"}),
                "token": connection("token", good.port, auth={"oauth": "down"}),
                "silent": connection("silent", silent.port, auth={"basic": "b"},
                                     timeout_seconds=1),
                "reset": {**connection("reset", reset.port, auth={"basic": "b"}),
                          "url": f"https://localhost:{reset.port}"},
            },
        }, directory=tmp)
        yield ExpectSetup(sidecar.process, good, untrusted, ports)


def expect_head(target: str, host: str, length: int = 5) -> bytes:
    return (f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/fhir+json\r\n"
            f"Content-Length: {length}\r\nExpect: 100-continue\r\n\r\n").encode()


@pytest.mark.parametrize(("connection", "status", "kind"), [
    ("tls", 502, "upstream-tls"),
    ("token", 503, "token-unavailable"),
    ("silent", 504, "upstream-timeout"),
    ("no route", 403, "no-route"),
])
def test_expect_continue_gets_the_final_error_when_the_request_cannot_be_sent(
        expect_setup: ExpectSetup, connection: str, status: int, kind: str) -> None:
    # mitmproxy said "100 Continue" at once; the app sent its body, and then the connection
    # closed without any status (TLS), or the answer came only after the body (token, route).
    expect_setup.good.clear()
    expect_setup.untrusted.clear()
    if connection == "no route":
        port, target = expect_setup.ports["proxy"], "http://nowhere.example/fhir/Patient"
    else:
        port, target = expect_setup.ports[connection], "/Patient"
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as sock:
        sock.sendall(expect_head(target, "127.0.0.1"))
        response = read_response(sock)  # the body is never sent
        assert sock.recv(65536) == b"", "the connection stayed open for a body that was refused"
    assert response.status == status, response.head + response.body
    assert response.headers["x-sidecar-error"] == kind
    assert response.headers["content-type"] == "application/fhir+json"
    assert response.headers.get("connection") == "close"
    assert response.json()["resourceType"] == "OperationOutcome"
    assert expect_setup.good.all_bytes() == b"" and expect_setup.untrusted.all_bytes() == b""


def test_expect_continue_is_answered_once_the_upstream_connection_is_open(
        expect_setup: ExpectSetup) -> None:
    expect_setup.good.clear()
    port = expect_setup.ports["good"]
    body = b'{"resourceType":"Patient"}'
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as sock:
        sock.sendall(expect_head("/Patient", f"127.0.0.1:{port}", len(body)))
        assert read_interim(sock) == b"HTTP/1.1 100 Continue"
        sock.sendall(body)
        first = read_response(sock)
        # Expect without a body: nothing to continue, no interim answer.
        sock.sendall(expect_head("/Patient", f"127.0.0.1:{port}", 0))
        second = read_response(sock)
    assert first.status == 200 and second.status == 200, (first.head, second.head)
    [(number_1, head_1), (number_2, head_2)] = expect_setup.good.wait_for_heads(2)
    assert number_1 == number_2  # the connection opened before "100 Continue" was used
    assert expect_setup.good.all_bytes().startswith(head_1 + b"\r\n\r\n" + body)
    assert b"expect" not in header_names(head_1) + header_names(head_2)


def test_a_failure_after_100_continue_still_gets_its_final_status(expect_setup: ExpectSetup
                                                                  ) -> None:
    # The upstream resets the connection once it has the request: after "100 Continue",
    # mitmproxy wrote nothing at all (it took the 100 for the response), and closed.
    port = expect_setup.ports["reset"]
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as sock:
        sock.sendall(expect_head("/reset", f"127.0.0.1:{port}"))
        assert read_interim(sock) == b"HTTP/1.1 100 Continue"
        sock.sendall(b"hello")
        response = read_response(sock)
    assert response.status == 502, response.head + response.body
    assert response.headers["x-sidecar-error"] == "upstream-unreachable"
    assert response.json()["resourceType"] == "OperationOutcome"

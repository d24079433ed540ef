"""A token endpoint that echoes the request's credentials must not leak them anywhere.

Some gateways and misconfigured authorization servers answer an error with the request they
refused: its ``Authorization`` header (``base64(client_id:secret)``) and its form body
(``client_secret=...``, ``client_assertion=<JWT>``). The sidecar quotes token endpoint errors in
seven places; none may show any form of the secret or any JWT-shaped text:
the 503 OperationOutcome to the app, the process's log output, ``/readyz?verbose=1``,
``GET /api/oauth``, the dashboard's OAuth page and ``fhir-sidecar check --online``.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from support.pki import TestPKI
from support.sidecar_process import free_port, wait_until
from support.sidecars import StartSidecar

from sidecar.testkit.fhir_server import FhirTestServer, server_tls_context

ADMIN_TOKEN = "echo-admin-token-Vb71"
CLIENT_ID = "hostile.client"
# "+", "/", "&", "%", "=", "?", space and non-ASCII: every encoding differs from the raw text.
BASIC_SECRET = "Ec+ho/s3cret&Ω 42%"
POST_SECRET = "p0st=Secret?x+y/z"
JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+\.")
DEADLINE = 20.0


class EchoingTokenEndpoint:
    """An HTTPS token endpoint that refuses every request and quotes it back in its answer.

    This is deliberately not the real oidc-provider used elsewhere: a conforming authorization
    server never echoes credentials, and the point here is a hostile (or badly built) one that
    does. Paths choose the shape of the refusal: ``/json`` an RFC 6749 error with the echo in
    ``error_description`` (401), ``/html`` an HTML error page (500), ``/ok-error`` a 200 answer
    that carries an ``error`` member anyway.
    """

    def __init__(self, pki: TestPKI):
        endpoint = self
        self.seen: list[tuple[str, str]] = []  # (Authorization, body) as received
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                auth = self.headers.get("Authorization") or ""
                with endpoint._lock:
                    endpoint.seen.append((auth, body))
                echo = f"you sent Authorization: {auth} with body {body}"
                if self.path == "/html":
                    self._reply(500, "text/html", f"<html><body><h1>Refused</h1><pre>{echo}"
                                                  "</pre></body></html>")
                    return
                status = 200 if self.path == "/ok-error" else 401
                self._reply(status, "application/json", json.dumps(
                    {"error": "invalid_client", "error_description": echo}))

            def _reply(self, status: int, content_type: str, text: str) -> None:
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        context = server_tls_context(pki.server(name="echo-token"), None)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.base_url = f"https://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> EchoingTokenEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def b64_variants(data: bytes) -> set[str]:
    std = base64.b64encode(data).decode()
    url = base64.urlsafe_b64encode(data).decode()
    return {std, std.rstrip("="), url, url.rstrip("=")}


def forbidden_forms(secret: str) -> set[str]:
    forms = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret),
             quote_plus(secret, safe="")}
    for pair in (f"{CLIENT_ID}:{secret}",
                 f"{quote_plus(CLIENT_ID, safe='')}:{quote_plus(secret, safe='')}"):
        forms |= b64_variants(pair.encode())
    return forms


def assert_no_secret(place: str, text: str, extra: set[str]) -> None:
    for form in forbidden_forms(BASIC_SECRET) | forbidden_forms(POST_SECRET) | extra:
        assert form not in text, f"{place} shows a form of a secret: {form!r}"
    found = JWT_LIKE.search(text)
    assert found is None, f"{place} shows a JWT: {found.group(0) if found else ''}"


@pytest.fixture
def echo_endpoint(pki: TestPKI) -> Iterator[EchoingTokenEndpoint]:
    with EchoingTokenEndpoint(pki) as endpoint:
        yield endpoint


def test_echoed_credentials_reach_no_one(tmp_path: Path, pki: TestPKI,
                                         upstream_good: FhirTestServer,
                                         echo_endpoint: EchoingTokenEndpoint,
                                         start_sidecar: StartSidecar) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "admin-token").write_text(ADMIN_TOKEN + "\n")
    (secrets / "basic-secret").write_text(BASIC_SECRET + "\n")
    (secrets / "post-secret").write_text(POST_SECRET + "\n")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (secrets / "jwt.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (secrets / "jwt.key").chmod(0o600)

    tls = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
    definitions = {
        "echo-basic": {"token_url": f"{echo_endpoint.base_url}/json", "client_id": CLIENT_ID,
                       "client_secret_file": "secrets/basic-secret", "tls": tls},
        "echo-post": {"token_url": f"{echo_endpoint.base_url}/html", "client_id": CLIENT_ID,
                      "client_auth": "client_secret_post",
                      "client_secret_file": "secrets/post-secret", "tls": tls},
        "echo-jwt": {"token_url": f"{echo_endpoint.base_url}/ok-error", "client_id": CLIENT_ID,
                     "client_auth": "private_key_jwt", "private_key_file": "secrets/jwt.key",
                     "tls": tls},
    }
    ports = {name: free_port() for name in definitions}
    admin = f"127.0.0.1:{free_port()}"
    running = start_sidecar({
        "admin": {"listen": admin, "token_file": "secrets/admin-token"},
        "oauth": definitions,
        "connections": {f"via-{name}": {"url": upstream_good.base_url,
                                        "listen": f"127.0.0.1:{ports[name]}",
                                        "auth": {"oauth": name}, "tls": tls}
                        for name in definitions},
    }, directory=tmp_path)
    config, sidecar = running.config_path, running.process
    shown: dict[str, str] = {}
    with httpx.Client(base_url=f"http://{admin}", trust_env=False,
                      timeout=30) as admin_client:
        def oauth_errors() -> dict[str, Any] | None:
            report = admin_client.get("/readyz", params={"verbose": "1"}).json()
            errors = {n: d["last_error"] for n, d in report["oauth"].items()}
            return report if all(errors.values()) else None

        report = wait_until(oauth_errors, DEADLINE, interval=0.2,
                            message="every definition to have failed once")
        shown["/readyz?verbose=1"] = json.dumps(report, ensure_ascii=False)
        for name, port in ports.items():
            answer = httpx.get(f"http://127.0.0.1:{port}/Patient/1", timeout=30,
                               trust_env=False)
            assert answer.status_code == 503, answer.text
            assert answer.headers["X-Sidecar-Error"] == "token-unavailable"
            shown[f"503 for {name}"] = answer.text
        api = admin_client.get("/api/oauth",
                               headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert api.status_code == 200
        shown["GET /api/oauth"] = api.text
        assert admin_client.post("/login", data={"token": ADMIN_TOKEN}).status_code in (200, 303)
        page = admin_client.get("/oauth")
        assert page.status_code == 200 and "echo-basic" in page.text
        shown["dashboard OAuth page"] = page.text
    running.stop()
    online = subprocess.run(
        [sys.executable, "-m", "sidecar", "check", "--online", "-c", str(config)],
        capture_output=True, text=True, timeout=120, check=False)
    assert online.returncode == 1, online.stdout + online.stderr
    shown["check --online"] = online.stdout + online.stderr
    shown["process output"] = sidecar.output

    # The endpoint did echo every kind of credential; otherwise this test proves nothing.
    received = list(echo_endpoint.seen)
    assert any(auth.startswith("Basic ") for auth, _ in received)
    assert any(quote_plus(POST_SECRET) in body for _, body in received)
    assert any(JWT_LIKE.search(body) for _, body in received)
    sent = {auth.split(" ", 1)[1] for auth, _ in received if auth}  # exactly as received
    for place, text in shown.items():
        assert_no_secret(place, text, sent)
    # ...and what was echoed is shown redacted, not dropped: the operator sees the answer.
    for place in ("/readyz?verbose=1", "GET /api/oauth", "check --online", "process output",
                  "503 for echo-basic", "503 for echo-post", "503 for echo-jwt"):
        assert "invalid_client" in shown[place] or "Refused" in shown[place], place
        assert "[redacted]" in shown[place], place
    assert "[redacted]" in shown["dashboard OAuth page"]


class EchoingBrokenUpstream:
    """A TLS FHIR "server" whose answer is not HTTP: it sends back the request's Authorization
    value as its status line. mitmproxy quotes a broken answer's first bytes in its own error
    text, so this is how an upstream could get the injected credential into the sidecar's 502
    and its log. Deliberately hand-made: no real server answers like this."""

    def __init__(self, pki: TestPKI) -> None:
        self._tls = server_tls_context(pki.server(name="echo-broken"), None)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.answered = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return
            raw.settimeout(DEADLINE)
            try:
                with self._tls.wrap_socket(raw, server_side=True) as conn:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        head += chunk
                    auth = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                            if line.lower().startswith(b"authorization:")]
                    conn.sendall(b"".join(auth) + b" \r\n\r\n")
                    self.answered.set()
            except (OSError, ssl.SSLError):
                continue

    def __enter__(self) -> EchoingBrokenUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()
        self._thread.join(5)


def test_an_upstream_echoing_the_credential_in_a_broken_answer_leaks_nothing(
        tmp_path: Path, pki: TestPKI, start_sidecar: StartSidecar) -> None:
    (tmp_path / "basic-secret").write_text(BASIC_SECRET + "\n")
    port = free_port()
    with EchoingBrokenUpstream(pki) as upstream:
        running = start_sidecar({
            "admin": {"listen": None},
            "basic_auth": {"b": {"username": CLIENT_ID, "password_file": "basic-secret"}},
            "connections": {"broken": {
                "url": f"https://localhost:{upstream.port}/fhir",
                "listen": f"127.0.0.1:{port}", "auth": {"basic": "b"},
                "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}},
        }, directory=tmp_path)
        sidecar = running.process
        answer = httpx.get(f"http://127.0.0.1:{port}/Patient/1", trust_env=False,
                           timeout=DEADLINE)
        assert upstream.answered.is_set(), "the request never reached the upstream"
        assert answer.status_code == 502, answer.text
        outcome = answer.json()
        assert outcome["resourceType"] == "OperationOutcome"
        wait_until(lambda: sidecar.events("request"), DEADLINE, message="the request log")
        running.stop()
        assert_no_secret("the 502 to the app", answer.text, set())
        assert_no_secret("the process output", sidecar.output, set())


# -- an egress proxy that echoes its own credentials (issue 26) -----------------------------------

PROXY_USER = "svc-egress"
# Characters whose encodings differ from the raw text, so each form is a different string.
PROXY_PASSWORD = "Egr3ss+Pw/x&7"


def proxy_forms() -> set[str]:
    pair = f"{PROXY_USER}:{PROXY_PASSWORD}".encode()
    return {PROXY_PASSWORD, quote(PROXY_PASSWORD, safe=""), quote_plus(PROXY_PASSWORD),
            *b64_variants(pair)}


class EchoingProxy:
    """An egress proxy that refuses every CONNECT with 407 and quotes the credentials it was
    sent: in its status line (the password, and the Base64 of user:password without the
    "Basic" that would give it away to any redactor) and in its HTML page."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.echoed = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with sock:
                sock.settimeout(10)
                head = b""
                try:
                    while b"\r\n\r\n" not in head:
                        chunk = sock.recv(4096)
                        if not chunk:
                            break
                        head += chunk
                    sock.sendall(self._refusal(head))
                except OSError:
                    continue

    def _refusal(self, head: bytes) -> bytes:
        token = b""
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"proxy-authorization: basic "):
                token = line.split(b" ", 2)[2].strip()
        password = base64.b64decode(token).split(b":", 1)[-1] if token else b"none"
        if token:
            self.echoed += 1
        page = (b"<html><body><h1>407</h1><p>You sent Proxy-Authorization: Basic " + token
                + b" -- that is, password " + password + b".</p></body></html>")
        return (b"HTTP/1.1 407 Denied " + password + b" " + token + b"\r\n"
                b"Proxy-Authenticate: Basic realm=\"corp\"\r\nContent-Type: text/html\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(page) + page)

    def __enter__(self) -> EchoingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()


def test_an_egress_proxy_echoing_its_password_in_a_407_leaks_it_nowhere(
        tmp_path: Path, pki: TestPKI, upstream_good: FhirTestServer,
        start_sidecar: StartSidecar) -> None:
    (tmp_path / "admin-token").write_text(ADMIN_TOKEN + "\n")
    (tmp_path / "proxy-password").write_text(PROXY_PASSWORD + "\n")
    port, admin = free_port(), f"127.0.0.1:{free_port()}"
    with EchoingProxy() as proxy:
        running = start_sidecar({
            "admin": {"listen": admin, "token_file": "admin-token"},
            "egress_proxies": {"corp": {"url": f"http://127.0.0.1:{proxy.port}",
                                        "username": PROXY_USER,
                                        "password_file": "proxy-password"}},
            "connections": {"behind": {
                "url": upstream_good.base_url, "listen": f"127.0.0.1:{port}", "via": "corp",
                "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}},
        }, directory=tmp_path)
        shown: dict[str, str] = {}
        # The proxy leg: the app's 502 quotes the proxy's status line.
        answer = httpx.get(f"http://127.0.0.1:{port}/Patient/1", trust_env=False,
                           timeout=DEADLINE)
        assert answer.status_code == 502, answer.text
        assert answer.headers["X-Sidecar-Error"] == "upstream-unreachable"
        shown["the 502 to the app"] = answer.json()["issue"][0]["diagnostics"]
        # The connection test (its own CONNECT, blocking): the report quotes it too.
        report = httpx.post(f"http://{admin}/api/connections/behind/test", trust_env=False,
                            timeout=DEADLINE, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert report.status_code == 200, report.text
        [connect] = [s for s in report.json()["steps"] if s["step"] == "connect"]
        assert connect["status"] == "failed", report.text
        shown["the connection test's report"] = connect["detail"]
        assert proxy.echoed == 2, "the proxy did not get (and echo) the credentials twice"
        for place, text in shown.items():
            # The echo is there, and it was cut out (not merely absent).
            assert "407 Denied [redacted]" in text, f"{place}: {text}"
        shown["the full report"] = report.text
        wait_until(lambda: running.process.events("request"), DEADLINE, message="the log")
        running.stop()
        shown["the process output"] = running.process.output
    for place, text in shown.items():
        for form in proxy_forms():
            assert form not in text, f"{place} shows a form of the proxy password: {form!r}"

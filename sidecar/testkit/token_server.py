"""A small HTTPS OAuth2 token endpoint: client_credentials with client_secret_basic.

The demo's authorization server and the benchmark's. Opaque random tokens (after an optional
prefix), kept in memory with their expiry and counted. The tests use a real authorization
server (oidc-provider) instead.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, unquote_plus

from sidecar.testkit.fhir_server import server_tls_context
from sidecar.testkit.pki import ServerIdentity
from sidecar.testkit.ports import LOOPBACK


class TokenServer:
    """Issues a token to exactly one client; use as a context manager or start()/stop()."""

    def __init__(self, identity: ServerIdentity, client_id: str, client_secret: str,
                 lifetime_seconds: int = 300, token_prefix: str = ""):
        self.client_id = client_id
        self.token_prefix = token_prefix
        self._secret = client_secret
        self.lifetime = lifetime_seconds
        self._tokens: dict[str, float] = {}
        self._lock = threading.Lock()
        self.issued = 0
        self._server = ThreadingHTTPServer((LOOPBACK, 0), self._handler_class())
        self._server.daemon_threads = True
        self._server.socket = server_tls_context(identity, None).wrap_socket(
            self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def token_url(self) -> str:
        return f"https://localhost:{self.port}/token"

    def is_valid(self, token: str) -> bool:
        with self._lock:
            expires = self._tokens.get(token)
        return expires is not None and time.time() < expires

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _authenticated(self, header: str | None) -> bool:
        scheme, _, value = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        with contextlib.suppress(ValueError):
            user, _, password = base64.b64decode(value).decode().partition(":")
            # RFC 6749 §2.3.1: both parts are form-urlencoded before Basic encoding.
            return (hmac.compare_digest(unquote_plus(user), self.client_id)
                    and hmac.compare_digest(unquote_plus(password), self._secret))
        return False

    def _issue(self) -> dict[str, Any]:
        token = self.token_prefix + secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = time.time() + self.lifetime
            self.issued += 1
        return {"access_token": token, "token_type": "Bearer", "expires_in": self.lifetime,
                "scope": "system/*.rs"}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                if self.path != "/token":
                    self._reply(404, {"error": "not_found"})
                elif form.get("grant_type") != ["client_credentials"]:
                    self._reply(400, {"error": "unsupported_grant_type"})
                elif not outer._authenticated(self.headers.get("Authorization")):
                    self._reply(401, {"error": "invalid_client",
                                      "error_description": "client authentication failed"})
                else:
                    self._reply(200, outer._issue())

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

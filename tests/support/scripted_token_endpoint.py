"""A TLS OAuth token endpoint that answers whatever the test scripts, for hostile answers:
``expires_in`` of ``0.001``, ``true``, ``9223372036854775807`` or ``1e20`` (written into the JSON
text as given, so big integers and ``true`` reach the sidecar unchanged).

Every request is counted with its arrival time (monotonic), so tests count the requests of a
fixed window. It asks for no client authentication: what is tested is the lifecycle.
"""

from __future__ import annotations

import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from sidecar.testkit.fhir_server import server_tls_context
from sidecar.testkit.pki import ServerIdentity
from sidecar.testkit.ports import LOOPBACK


class ScriptedTokenEndpoint:
    """``with ScriptedTokenEndpoint(identity, expires_in="0.001") as endpoint:`` then
    ``endpoint.token_url``, ``endpoint.count_between(start, end)``; ``expires_in`` is the JSON
    text of the member (``None``: left out), changeable while it runs."""

    def __init__(self, identity: ServerIdentity, expires_in: str | None = "3600"):
        self.expires_in = expires_in
        self._lock = threading.Lock()
        self.arrivals: list[float] = []  # monotonic, one per request
        self.issued: list[str] = []
        self._server = ThreadingHTTPServer((LOOPBACK, 0), self._handler_class())
        self._server.daemon_threads = True
        self._server.socket = server_tls_context(identity, None).wrap_socket(
            self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def token_url(self) -> str:
        return f"https://localhost:{self._server.server_address[1]}/token"

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.arrivals)

    def count_between(self, start: float, end: float) -> int:
        """Requests that arrived in [start, end) (monotonic times)."""
        with self._lock:
            return sum(1 for t in self.arrivals if start <= t < end)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _answer(self) -> bytes:
        token = "scripted-" + secrets.token_urlsafe(24)
        with self._lock:
            self.arrivals.append(time.monotonic())
            self.issued.append(token)
            expires = self.expires_in
        members = [f'"access_token": "{token}"', '"token_type": "Bearer"']
        if expires is not None:
            members.append(f'"expires_in": {expires}')
        return ("{" + ", ".join(members) + "}").encode()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = outer._answer()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler

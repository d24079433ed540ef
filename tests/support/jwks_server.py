"""An issuer's JWK Set over HTTPS, as a Kubernetes API server's ``/openid/v1/jwks`` serves
it: the keys can be rotated while it runs, and every fetch is counted with the
``Authorization`` it carried."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from sidecar.testkit.fhir_server import server_tls_context
from sidecar.testkit.pki import ServerIdentity


class JwksServer:
    def __init__(self, identity: ServerIdentity, *, require_bearer: str | None = None) -> None:
        self.key_set: dict[str, Any] = {"keys": []}
        self.fetches: list[str | None] = []  # the Authorization of each fetch
        self.require_bearer = require_bearer
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                auth = self.headers.get("Authorization")
                with server._lock:
                    server.fetches.append(auth)
                    body = json.dumps(server.key_set).encode()
                if server.require_bearer and auth != f"Bearer {server.require_bearer}":
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/jwk-set+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.socket = server_tls_context(identity, None).wrap_socket(
            self._server.socket, server_side=True)
        self.port: int = self._server.server_address[1]
        self.url = f"https://localhost:{self.port}/openid/v1/jwks"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def publish(self, *public_keys: dict[str, Any]) -> None:
        with self._lock:
            self.key_set = {"keys": list(public_keys)}

    def fetch_count(self) -> int:
        with self._lock:
            return len(self.fetches)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

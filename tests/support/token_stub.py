"""A minimal plain-HTTP OAuth2 token endpoint (client_credentials, client_secret_basic).

For tests that need a token to be issued or refused without the real authorization server:
metrics, readiness and the no-secret checks. Each token is unique and counted.
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote_plus


class TokenStub:
    def __init__(self, client_id: str, client_secret: str, expires_in: int = 300,
                 token_prefix: str = "stub-access-token"):
        self.client_id = client_id
        self.expected = "Basic " + base64.b64encode(
            f"{quote_plus(client_id)}:{quote_plus(client_secret)}".encode()).decode()
        self.expires_in = expires_in
        self.issued: list[str] = []
        self.refused = 0
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Authorization") != stub.expected:
                    with stub._lock:
                        stub.refused += 1
                    self._reply(401, {"error": "invalid_client"})
                    return
                with stub._lock:
                    token = f"{token_prefix}-{next(stub._numbers)}"
                    stub.issued.append(token)
                self._reply(200, {"access_token": token, "token_type": "Bearer",
                                  "expires_in": stub.expires_in})

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def __enter__(self) -> TokenStub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

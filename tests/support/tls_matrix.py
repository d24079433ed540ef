"""A TLS server for the certificate matrix: FHIR, SMART discovery and a token endpoint in one.

Each instance has one TLS situation (certificate, protocol versions, cipher suites, whether a
client certificate is required), so every leg of the sidecar can be pointed at the same server
and must reach the same verdict. It records the SNI name of every handshake and the path of
every request that got through.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Callable
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

LOOPBACK = "127.0.0.1"
MATRIX_TOKEN = "matrix-access-token"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    tls: ssl.SSLContext
    owner: MatrixServer

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The handshake runs in the request's own thread, so a client that fails (or stalls)
        # in it never blocks the others.
        tls_request = self.tls.wrap_socket(request, server_side=True,
                                           do_handshake_on_connect=False)
        try:
            tls_request.do_handshake()
        except (ssl.SSLError, OSError):
            _drain(tls_request)
            tls_request.close()
            return
        try:
            super().finish_request(tls_request, client_address)
        finally:
            with suppress(OSError):
                tls_request.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up mid-request are part of the matrix


def _drain(sock: socket.socket) -> None:
    """Read what the client already sent until it hangs up, as a lingering close does.

    Closing a socket with unread data makes the kernel send a reset, and the client's kernel
    may then drop the TLS alert it had not read yet: the refusal would arrive as a bare
    "connection reset" on some runs and as the alert on others.
    """
    sock.settimeout(5)
    with suppress(OSError):
        # The plain socket's recv: the TLS layer is broken once its handshake failed.
        while socket.socket.recv(sock, 65536):
            pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        owner = self.server.owner
        owner.record(self.path)
        if self.path.endswith("/.well-known/smart-configuration"):
            self._json(200, {"token_endpoint": owner.url("/token"),
                             "token_endpoint_auth_methods_supported": ["client_secret_basic"]})
        else:
            self._json(200, {"resourceType": "Patient", "id": "matrix"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.server.owner.record(self.path)
        self._json(200, {"access_token": MATRIX_TOKEN, "token_type": "Bearer",
                         "expires_in": 300})

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class MatrixServer:
    """``with MatrixServer(context, url_host) as server:`` then ``server.url("/fhir")``."""

    def __init__(self, context: ssl.SSLContext, url_host: str) -> None:
        self.url_host = url_host
        self.sni_names: list[str | None] = []
        self.paths: list[str] = []
        self._lock = threading.Lock()
        context.sni_callback = self._sni
        self._server = _Server((LOOPBACK, 0), _Handler)
        self._server.tls = context
        self._server.owner = self
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True)

    def url(self, path: str) -> str:
        return f"https://{self.url_host}:{self.port}{path}"

    def record(self, path: str) -> None:
        with self._lock:
            self.paths.append(path)

    def _sni(self, _conn: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        with self._lock:
            self.sni_names.append(name)

    def clear(self) -> None:
        with self._lock:
            self.paths.clear()
            self.sni_names.clear()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def server_context(cert_chain: str, key: str, *, configure: Callable[[ssl.SSLContext], None]
                   | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_chain, key)
    if configure is not None:
        configure(context)
    return context


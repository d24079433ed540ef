"""A tiny OAuth2 token endpoint for the benchmark: stdlib HTTPS, counts what it issues.

``POST /token`` answers every client-credentials request with a fresh bearer token;
``GET /count`` returns how many tokens were issued so far (the benchmark reads it between runs
to report token requests per 1000 proxied requests). Run as a script:

    python bench/token_server.py --port 0 --cert chain.pem --key key.pem --expires-in 300

It prints one JSON line ``{"port": N}`` once listening.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class TokenServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], expires_in: int) -> None:
        super().__init__(address, TokenHandler)
        self.expires_in = expires_in
        self.issued = 0
        self.lock = threading.Lock()


class TokenHandler(BaseHTTPRequestHandler):
    server: TokenServer
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        if self.path != "/token":
            self._send(404, {"error": "not_found"})
            return
        with self.server.lock:
            self.server.issued += 1
            number = self.server.issued
        self._send(200, {"access_token": f"bench-token-{number}", "token_type": "Bearer",
                         "expires_in": self.server.expires_in})

    def do_GET(self) -> None:
        if self.path == "/count":
            self._send(200, {"issued": self.server.issued})
        else:
            self._send(404, {"error": "not_found"})

    def _send(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the benchmark only wants the count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--expires-in", type=int, default=300)
    args = parser.parse_args(argv)
    server = TokenServer(("127.0.0.1", args.port), args.expires_in)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())

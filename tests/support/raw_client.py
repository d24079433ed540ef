"""An app that speaks raw bytes: one request written as given, one response read back
(Content-Length framed), so a test controls every header, the ``Host`` included."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any

READ_TIMEOUT = 30.0


@dataclass
class RawResponse:
    status: int
    head: bytes
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def exchange(port: int, data: bytes) -> RawResponse:
    """Send ``data`` on a new connection to 127.0.0.1:``port``; read one response."""
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


def get(port: int, path: str = "/metadata", **headers: str) -> RawResponse:
    """``GET path`` with exactly these headers (``Host`` too: give it, or there is none);
    header names are written with ``_`` as ``-``."""
    lines = [f"GET {path} HTTP/1.1"] + [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

"""A TLS upstream that misbehaves on request, for timeout and framing tests.

The request path picks the behaviour:

- ``/stall?sent=N&length=M``: response headers with ``Content-Length: M``, N body bytes, then
  silence until the connection is closed by the peer (or the server stops).
- ``/trickle?bytes=N&every=S``: a ``Content-Length: N`` body sent one byte every S seconds.
- ``/reset``: the connection is reset (TCP RST) right after the request head.
- ``/trailers``: a chunked response that ends with a trailer field.
- anything else: 200 with a small FHIR JSON body (after ``delay=S`` seconds, if given).

Every request is read completely (Content-Length or chunked, trailers included) and recorded
raw, so tests can assert exactly what reached the upstream.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from types import TracebackType
from typing import BinaryIO, Self
from urllib.parse import parse_qs, urlsplit

from sidecar.testkit.fhir_server import server_tls_context
from sidecar.testkit.pki import ServerIdentity

LOOPBACK = "127.0.0.1"
BODY = b'{"resourceType":"Patient","id":"scripted"}'


class ScriptedUpstream:
    """``with ScriptedUpstream(identity) as up:`` then ``up.port``, ``up.requests``."""

    def __init__(self, identity: ServerIdentity) -> None:
        self._tls = server_tls_context(identity, None)
        self._lock = threading.Lock()
        self.requests: list[bytes] = []  # each request, raw: head and body as received
        self.connections = 0
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)

    def raw(self) -> bytes:
        with self._lock:
            return b"".join(self.requests)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.connections = 0

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            worker = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._threads.append(worker)
            worker.start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(30)
        try:
            with self._tls.wrap_socket(raw, server_side=True) as sock:
                reader = sock.makefile("rb")
                while not self._stopping.is_set():
                    request = _read_request(reader)
                    if request is None:
                        return
                    with self._lock:
                        self.requests.append(request)
                    outcome = self._answer(sock, request)
                    if outcome == "reset":
                        reader.close()  # the file object holds the socket open otherwise
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                        sock.close()
                        return
                    if outcome == "close":
                        return
        except (OSError, ssl.SSLError, ValueError):
            return

    def _answer(self, sock: ssl.SSLSocket, request: bytes) -> str:
        """Send the answer; return "keep", "close" or "reset" for the connection."""
        target = request.split(b" ", 2)[1].decode()
        parts = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        path = parts.path.rsplit("/", 1)[-1]
        if path == "stall":
            length, sent = int(query.get("length", "1000")), int(query.get("sent", "500"))
            sock.sendall(_head(200, length) + b"x" * sent)
            # Silent until the sidecar gives up and closes its side.
            while not self._stopping.is_set():
                try:
                    if not sock.recv(65536):
                        return "close"
                except TimeoutError:
                    continue
            return "close"
        if path == "trickle":
            count, every = int(query.get("bytes", "10")), float(query.get("every", "0.2"))
            sock.sendall(_head(200, count))
            for _ in range(count):
                if self._stopping.wait(every):
                    return "close"
                sock.sendall(b"x")
            return "keep"
        if path == "reset":
            return "reset"
        if path == "trailers":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n"
                         b"Transfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
                         + b"%x\r\n%s\r\n" % (len(BODY), BODY)
                         + b"0\r\nX-Checksum: abc123\r\n\r\n")
            return "keep"
        if self._stopping.wait(float(query.get("delay", "0"))):
            return "close"
        sock.sendall(_head(200, len(BODY)) + BODY)
        return "keep"

    def __enter__(self) -> Self:
        self._acceptor.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stopping.set()
        self._listener.close()
        self._acceptor.join(5)
        deadline = time.monotonic() + 5
        for worker in self._threads:
            worker.join(max(0.0, deadline - time.monotonic()))


def _head(status: int, length: int) -> bytes:
    return (b"HTTP/1.1 %d OK\r\nContent-Type: application/fhir+json\r\n"
            b"Content-Length: %d\r\n\r\n" % (status, length))


def _read_request(reader: BinaryIO) -> bytes | None:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = reader.readline(65536)
        if not line:
            return None
        head += line
    lowered = head.lower()
    if b"transfer-encoding: chunked" in lowered:
        return head + _read_chunked(reader)
    for line in lowered.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return head + reader.read(int(line.split(b":", 1)[1]))
    return head


def _read_chunked(reader: BinaryIO) -> bytes:
    raw = b""
    while True:
        size_line = reader.readline(1024)
        raw += size_line
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            break
        raw += reader.read(size + 2)
    while True:  # trailer fields, then the blank line
        line = reader.readline(65536)
        raw += line
        if line in (b"\r\n", b""):
            return raw

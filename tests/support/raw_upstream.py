"""A hostile-minded TLS (or plain HTTP) upstream for security tests: it records the raw bytes
it received.

The FHIR test server parses what arrives, so a smuggled second request or a header split by a
bare CR could look harmless there. This server keeps every byte of every connection exactly as
it came off the wire, answers each request it can frame with a small FHIR JSON body, and tells
which connection carried which request (to see upstream connection reuse).

Framing is deliberately naive, like many real servers: a request ends at the blank line, plus
``Content-Length`` bytes if given. A request that tricks a proxy into sending two requests in
one shows up here as two requests on one connection.
"""

from __future__ import annotations

import base64
import socket
import ssl
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from sidecar.testkit.fhir_server import server_tls_context
from sidecar.testkit.pki import ServerIdentity

LOOPBACK = "127.0.0.1"
_READ_TIMEOUT_SECONDS = 10.0


@dataclass
class RawConnection:
    """One upstream connection: everything received on it, and the heads it framed."""

    number: int
    received: bytearray = field(default_factory=bytearray)
    heads: list[bytes] = field(default_factory=list)


class RawRecordingUpstream:
    """``with RawRecordingUpstream(identity) as up:`` then ``up.port``, ``up.all_bytes()``."""

    def __init__(self, identity: ServerIdentity | None, *,
                 body: bytes = b'{"resourceType":"Patient","id":"raw"}',
                 host: str = LOOPBACK) -> None:
        # No identity: a plain-HTTP upstream (for http:// connection URLs).
        self._tls = server_tls_context(identity, None) if identity is not None else None
        self.body = body
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.connections: list[RawConnection] = []
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)

    # -- what arrived ------------------------------------------------------------------------

    def all_bytes(self) -> bytes:
        with self._lock:
            return b"".join(bytes(c.received) for c in self.connections)

    def heads(self) -> list[tuple[int, bytes]]:
        """Every framed request head, with the number of the connection that carried it."""
        with self._lock:
            return [(c.number, h) for c in self.connections for h in c.heads]

    def wait_for_heads(self, count: int, timeout: float = 10.0) -> list[tuple[int, bytes]]:
        with self._changed:
            if not self._changed.wait_for(
                    lambda: sum(len(c.heads) for c in self.connections) >= count, timeout):
                raise TimeoutError(f"fewer than {count} requests reached the raw upstream")
        return self.heads()

    def clear(self) -> None:
        with self._lock:
            for conn in self.connections:
                conn.received.clear()
                conn.heads.clear()

    # -- serving -----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                record = RawConnection(len(self.connections) + 1)
                self.connections.append(record)
            worker = threading.Thread(target=self._serve, args=(sock, record), daemon=True)
            self._threads.append(worker)
            worker.start()

    def _serve(self, raw: socket.socket, record: RawConnection) -> None:
        raw.settimeout(_READ_TIMEOUT_SECONDS)
        try:
            wrapped = self._tls.wrap_socket(raw, server_side=True) if self._tls else raw
            with wrapped as sock:
                pending = b""
                while not self._stopping.is_set():
                    chunk = sock.recv(65536)
                    if not chunk:
                        return
                    with self._changed:
                        record.received += chunk
                    pending += chunk
                    pending = self._answer_complete(sock, record, pending)
        except (OSError, ssl.SSLError):
            return

    def _answer_complete(self, sock: socket.socket, record: RawConnection, pending: bytes
                         ) -> bytes:
        while b"\r\n\r\n" in pending:
            head, rest = pending.split(b"\r\n\r\n", 1)
            length = _content_length(head)
            if len(rest) < length:
                break
            pending = rest[length:]
            with self._changed:
                record.heads.append(head)
                self._changed.notify_all()
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(self.body), self.body))
        return pending

    def __enter__(self) -> Self:
        self._acceptor.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stopping.set()
        self._listener.close()
        self._acceptor.join(5)
        for worker in self._threads:
            worker.join(1)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                return int(value.strip())
            except ValueError:
                return 0
    return 0


def basic_credentials(data: bytes) -> list[tuple[str, str]]:
    """Every ``Authorization: Basic`` header in raw request bytes, decoded: (user, password).

    A username travels only inside the Base64 of ``user:password``; looking for it in plain
    text finds nothing whether or not it was sent.
    """
    found = []
    for line in data.split(b"\r\n"):
        name, _, value = line.partition(b":")
        scheme, _, token = value.strip().partition(b" ")
        if name.strip().lower() == b"authorization" and scheme.lower() == b"basic":
            user, _, password = base64.b64decode(token.strip()).decode("utf-8").partition(":")
            found.append((user, password))
    return found

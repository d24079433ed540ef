"""A real HTTPS FHIR server on loopback: the demo's upstream and the tests'.

Transport only: TLS (optionally requiring a client certificate), HTTP/1.1 keep-alive with
correct body framing, one thread per connection, a record of what arrived, and a ``stop()``
that returns promptly even while connections idle or wait. What it answers lives in
``fhir_app``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from sidecar.testkit.auth_checks import AuthCheck, basic_auth_check, bearer_token_check
from sidecar.testkit.fhir_app import DEFAULT_CHALLENGE, FhirApp, IncomingRequest, Reply, error_reply
from sidecar.testkit.http_io import FramingError, Headers, RequestBody
from sidecar.testkit.pki import ServerIdentity
from sidecar.testkit.ports import LOOPBACK

__all__ = [
    "FhirTestServer",
    "RecordedRequest",
    "basic_auth_check",
    "bearer_token_check",
]

_log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_SECONDS = 10.0
# Idle keep-alive connections end by themselves eventually, even if nobody calls stop().
IDLE_TIMEOUT_SECONDS = 30.0
_STOP_JOIN_SECONDS = 5.0


@dataclass(frozen=True)
class RecordedRequest:
    """One request as it reached the server (recorded before the answer is sent)."""

    method: str
    path: str  # the request target: path and query
    headers: Headers  # case-insensitive; ``headers.fields`` keeps repeats and spelling
    body_length: int
    tls_resumed: bool = False  # the request's connection resumed an earlier TLS session


class _RequestLog:
    # Bounded, because the demo server may run for hours; tests never come near the limit.
    MAX_RECORDS = 10_000

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._records: deque[RecordedRequest] = deque(maxlen=self.MAX_RECORDS)

    def append(self, record: RecordedRequest) -> None:
        with self._changed:
            self._records.append(record)
            self._changed.notify_all()

    def snapshot(self) -> list[RecordedRequest]:
        with self._changed:
            return list(self._records)

    def clear(self) -> None:
        with self._changed:
            self._records.clear()

    def wait_for(self, count: int, timeout: float) -> list[RecordedRequest]:
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._records) >= count, timeout):
                raise TimeoutError(f"{len(self._records)} of {count} requests after {timeout} s")
            return list(self._records)


def server_tls_context(identity: ServerIdentity, client_ca: Path | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(identity.cert_chain, identity.key)
    # Offer only HTTP/1.1, so a client offering h2 settles on what this server speaks.
    context.set_alpn_protocols(["http/1.1"])
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=client_ca)
    return context


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive by default
    server_version = "fhir-test-server"
    sys_version = ""
    timeout = IDLE_TIMEOUT_SECONDS
    # Headers and body go out in separate writes; Nagle would hold the second one back.
    disable_nagle_algorithm = True
    server: _TlsHttpServer

    def log_message(self, format: str, *args: Any) -> None:
        # Silence the access and error log: request lines may carry patient data.
        pass

    def _dispatch(self) -> None:
        headers = Headers(self.headers.items())
        try:
            body = RequestBody.from_headers(self.rfile, headers)
        except FramingError as exc:
            self._record(headers, 0)
            self._send(error_reply(400, str(exc)), close=True)
            return
        try:
            reply = self.server.app.handle(IncomingRequest(self.command, self.path, headers, body))
            # Whatever the route left unread must go, or it would be parsed as the next request.
            body.drain()
        except FramingError as exc:
            self._record(headers, body.bytes_read)
            self._send(error_reply(400, str(exc)), close=True)
            return
        except Exception:
            _log.exception("test FHIR server failed to handle a request")
            self._record(headers, body.bytes_read)
            self._send(error_reply(500, "internal error in the test server"), close=True)
            return
        # Recorded before answering: once a client has its answer, the record is visible.
        self._record(headers, body.bytes_read)
        if reply.delay_seconds > 0 and self.server.stopping.wait(reply.delay_seconds):
            self.close_connection = True  # stopping: answer nothing
            return
        self._send(reply)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _dispatch

    def _record(self, headers: Headers, body_length: int) -> None:
        resumed = isinstance(self.connection, ssl.SSLSocket) and self.connection.session_reused
        self.server.requests.append(RecordedRequest(self.command, self.path, headers, body_length,
                                                    bool(resumed)))

    def _send(self, reply: Reply, *, close: bool = False) -> None:
        bodiless = reply.status in (204, 304) or self.command == "HEAD"
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        chunked = reply.stream is not None and reply.length is None
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif reply.status not in (204, 304):
            length = reply.length if reply.stream is not None else len(reply.body)
            self.send_header("Content-Length", str(length))
        if close:
            self.send_header("Connection", "close")  # also sets self.close_connection
        self.end_headers()
        if bodiless:
            return
        if reply.stream is None:
            self.wfile.write(reply.body)
        elif chunked:
            for piece in reply.stream:
                if piece:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            for piece in reply.stream:
                self.wfile.write(piece)


class _TlsHttpServer(ThreadingHTTPServer):
    # Worker threads are daemons so a forgotten server cannot block interpreter exit;
    # stop() joins them itself (ThreadingMixIn only joins non-daemon threads).
    daemon_threads = True

    def __init__(self, port: int, tls: ssl.SSLContext, make_app: Callable[[int], FhirApp]) -> None:
        self.tls = tls
        self.requests = _RequestLog()
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[ssl.SSLSocket] = set()
        self._workers: set[threading.Thread] = set()
        super().__init__((LOOPBACK, port), _Handler)
        # The app's base URL needs the port, which is known only now that the socket is bound.
        self.app = make_app(self.server_address[1])

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the address with getfqdn (a reverse DNS lookup
        # that can stall for seconds); the name is only used in CGI variables anyway.
        socketserver.TCPServer.server_bind(self)
        self.server_name = "localhost"
        self.server_port = self.server_address[1]

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Runs in the connection's own thread. The TLS handshake happens here rather than on
        # the listening socket, so a client that never finishes it blocks only itself.
        connection = self.tls.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        if not self._track(connection):
            _close(connection)
            return
        try:
            connection.settimeout(HANDSHAKE_TIMEOUT_SECONDS)
            connection.do_handshake()
            _Handler(connection, client_address, self)
        except OSError:
            # Failed handshakes (unknown CA, missing client certificate), peers that went
            # away and sockets closed by stop(): all expected, none worth a traceback.
            pass
        finally:
            self._untrack(connection)
            _close(connection)

    def handle_error(self, request: Any, client_address: Any) -> None:
        _log.exception("test FHIR server: unexpected error on a connection")

    def close_connections(self) -> None:
        """Wake every connection thread: shutting the socket down ends any blocked read."""
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            # The plain socket's shutdown, not SSLSocket's: that one would also drop the TLS
            # state under the feet of the thread still using it.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(connection, socket.SHUT_RDWR)

    def join_workers(self, timeout: float) -> list[threading.Thread]:
        deadline = time.monotonic() + timeout
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        return [worker for worker in workers if worker.is_alive()]

    def _track(self, connection: ssl.SSLSocket) -> bool:
        # Checked under the same lock stop() takes to collect connections: a connection either
        # gets collected or sees the stop flag, never neither.
        with self._lock:
            if self.stopping.is_set():
                return False
            self._connections.add(connection)
            self._workers.add(threading.current_thread())
            return True

    def _untrack(self, connection: ssl.SSLSocket) -> None:
        with self._lock:
            self._connections.discard(connection)
            self._workers.discard(threading.current_thread())


def _close(connection: ssl.SSLSocket) -> None:
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_WR)  # orderly FIN, so a last response is not reset
    connection.close()


class FhirTestServer:
    """A threaded HTTPS FHIR server on 127.0.0.1; use as a context manager or start()/stop().

    ``auth`` is called with the request headers and returns ``None`` (authorized) or a reason,
    which becomes a 401 OperationOutcome with ``WWW-Authenticate: <www_authenticate>``.
    ``client_ca`` makes a client certificate signed by that CA mandatory. ``app_class`` is
    what answers (tests pass one with more routes).
    """

    def __init__(
        self,
        identity: ServerIdentity,
        *,
        base_path: str = "/fhir",
        client_ca: Path | None = None,
        auth: AuthCheck | None = None,
        port: int = 0,
        www_authenticate: str = DEFAULT_CHALLENGE,
        hostname: str = "localhost",
        app_class: type[FhirApp] = FhirApp,
    ) -> None:
        self._identity = identity
        self._app_class = app_class
        self._base_path = "/" + base_path.strip("/") if base_path.strip("/") else ""
        self._client_ca = client_ca
        self._auth = auth
        self._requested_port = port
        self._challenge = www_authenticate
        self._hostname = hostname
        self._server: _TlsHttpServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("a FhirTestServer can be started only once")
        tls = server_tls_context(self._identity, self._client_ca)
        server = _TlsHttpServer(self._requested_port, tls, self._make_app)
        port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},  # how fast shutdown() is noticed
            name=f"fhir-test-server:{port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return  # never started, or already stopped
        server.stopping.set()
        server.shutdown()  # no new connections are accepted after this returns
        server.close_connections()
        server.server_close()
        thread.join()
        lingering = server.join_workers(_STOP_JOIN_SECONDS)
        if lingering:
            _log.warning("test FHIR server: %d connection threads did not end", len(lingering))
        # The server object stays: port, base_url and the request record remain readable,
        # e.g. for a test that expects the now closed port to be unreachable.
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._started().server_address[1]

    @property
    def base_url(self) -> str:
        return self._started().app.base_url

    @property
    def identity(self) -> ServerIdentity:
        return self._identity

    @property
    def app(self) -> FhirApp:
        """The FHIR side (e.g. ``app.patients``), for tests that seed or inspect data."""
        return self._started().app

    @property
    def requests_seen(self) -> list[RecordedRequest]:
        """A snapshot, oldest first."""
        return self._started().requests.snapshot()

    def clear(self) -> None:
        self._started().requests.clear()

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until at least ``count`` requests were recorded; ``TimeoutError`` otherwise."""
        return self._started().requests.wait_for(count, timeout)

    def _make_app(self, port: int) -> FhirApp:
        return self._app_class(
            base_url=f"https://{self._hostname}:{port}{self._base_path}",
            base_path=self._base_path,
            auth=self._auth,
            www_authenticate=self._challenge,
        )

    def _started(self) -> _TlsHttpServer:
        if self._server is None:
            raise RuntimeError("server was never started")
        return self._server

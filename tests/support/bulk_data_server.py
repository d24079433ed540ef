"""A small FHIR Bulk Data Access server over TLS, following the IG's asynchronous flow.

One class, two roles:

- the FHIR server (``auth`` given): kick-off ``GET [base]/$export``, ``[base]/Patient/$export``,
  ``[base]/Group/[id]/$export`` with ``Prefer: respond-async`` -> ``202`` + ``Content-Location``
  (an absolute status URL under its base); the status URL answers ``202`` with ``Retry-After``
  and ``X-Progress`` for the first ``polls_before_done`` polls, then ``200`` with the manifest;
  ``DELETE`` on it cancels the job (``202``, then ``404``); NDJSON files under
  ``[base]/bulkfiles/...`` need the bearer token (``requiresAccessToken: true``).
- a storage host (``auth=None``): serves the files it is asked for under ``/signed/...``, the
  way a server hands out pre-signed object-storage URLs.

The manifest is written by hand (odd spacing, key order, URLs in places that are not file
URLs) so tests can check that only the file URLs change. Every NDJSON line is a Bundle whose
``link`` is under the FHIR base: a proxy that scanned NDJSON for links would change it.

Every byte received is recorded per connection, as it came off the wire (``all_bytes``).

With ``client_ca`` the server requires a client certificate from that bundle, and with
``bound_tokens`` it is an RFC 8705 resource server: a token whose ``cnf.x5t#S256`` is not the
thumbprint of the connection's client certificate is refused with ``401``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from sidecar.credentials.cert_binding import bound_thumbprint
from sidecar.testkit.fhir_server import server_tls_context
from sidecar.testkit.pki import ServerIdentity

LOOPBACK = "127.0.0.1"
FHIR_BASE_PATH = "/fhir"
NDJSON = "application/fhir+ndjson"
RETRY_AFTER = "1"
TRANSACTION_TIME = "2026-11-28T15:00:00.000Z"
_TIMEOUT_SECONDS = 30.0
_CHUNK = 64 * 1024

AuthCheck = Callable[[Any], str | None]


# -- the files' bytes (shared with the tests, which compute what must arrive) -----------------

def ndjson_line(base_url: str, number: int) -> bytes:
    """One NDJSON line: a Bundle with a paging link under ``base_url`` (fixed length per
    ``number`` width, so a file's size is easy to hit)."""
    return (b'{"resourceType":"Bundle","id":"b%09d","type":"collection","link":'
            b'[{"relation":"self","url":"%s/Patient?page=%09d"}]}\n'
            % (number, base_url.encode(), number))


def ndjson_chunks(base_url: str, size: int) -> Iterator[bytes]:
    """``size`` bytes of NDJSON (the last line cut short if it must be)."""
    sent = 0
    number = 0
    while sent < size:
        batch = bytearray()
        while len(batch) < _CHUNK and sent + len(batch) < size:
            batch += ndjson_line(base_url, number)
            number += 1
        piece = bytes(batch[: size - sent])
        sent += len(piece)
        yield piece


def ndjson_sha256(base_url: str, size: int) -> str:
    digest = hashlib.sha256()
    for chunk in ndjson_chunks(base_url, size):
        digest.update(chunk)
    return digest.hexdigest()


# -- recording --------------------------------------------------------------------------------

@dataclass(frozen=True)
class BulkRequest:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names
    client_cert_x5t: str | None = None  # x5t#S256 of the connection's client certificate


@dataclass
class _Job:
    request: str
    polls_left: int
    deleted: bool = False
    polls: int = 0


class _TeeReader(io.BufferedIOBase):
    """The request stream, with every byte read also appended to ``record``."""

    def __init__(self, raw: io.BufferedIOBase, record: bytearray, lock: threading.Lock) -> None:
        super().__init__()
        self._raw = raw
        self._record = record
        self._lock = lock

    def _keep(self, data: bytes) -> bytes:
        with self._lock:
            self._record += data
        return data

    def readable(self) -> bool:
        return True

    def readline(self, limit: int | None = -1) -> bytes:
        return self._keep(self._raw.readline(limit))

    def read(self, size: int | None = -1) -> bytes:
        return self._keep(self._raw.read(size))

    def close(self) -> None:
        self._raw.close()
        super().close()


@dataclass
class _Connection:
    received: bytearray = field(default_factory=bytearray)


class BulkDataServer:
    """``with BulkDataServer(identity, auth=check) as fhir:`` then ``fhir.base_url``."""

    def __init__(self, identity: ServerIdentity, *, auth: AuthCheck | None,
                 host_name: str = LOOPBACK, polls_before_done: int = 2,
                 small_file_size: int = 2000, client_ca: Path | None = None,
                 bound_tokens: bool = False) -> None:
        self.auth = auth
        self.bound_tokens = bound_tokens
        self.host_name = host_name
        self.polls_before_done = polls_before_done
        self.small_file_size = small_file_size
        self.storage_base: str | None = None  # where the manifest's "other host" file lives
        self.lock = threading.Lock()
        self.jobs: dict[str, _Job] = {}
        self.requests: list[BulkRequest] = []
        self.connections: list[_Connection] = []
        self._tls = server_tls_context(identity, client_ca)
        self._server = _Server(self)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True)

    @property
    def origin(self) -> str:
        return f"https://{self.host_name}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.origin + FHIR_BASE_PATH

    # -- what arrived --------------------------------------------------------------------

    def all_bytes(self) -> bytes:
        with self.lock:
            return b"".join(bytes(c.received) for c in self.connections)

    def seen(self) -> list[BulkRequest]:
        with self.lock:
            return list(self.requests)

    # -- the manifest --------------------------------------------------------------------

    def file_url(self, job: str, name: str) -> str:
        return f"{self.base_url}/bulkfiles/{job}/{name}.ndjson"

    def storage_url(self, job: str) -> str:
        assert self.storage_base is not None, "set storage_base to the storage server's origin"
        return f"{self.storage_base}/signed/{job}/Observation.ndjson?sig=c2lnbmVk&expires=99"

    def manifest(self, job: str) -> bytes:
        """Hand-written JSON: the file URLs, and upstream URLs that are not file URLs."""
        request = self.jobs[job].request
        return (
            '{\n'
            f'  "transactionTime" : "{TRANSACTION_TIME}",\n'
            f'  "request":"{request}",\n'
            '  "requiresAccessToken": true,\n'
            '  "output": [\n'
            f'    {{"type": "Patient", "url": "{self.file_url(job, "Patient")}", "count": 3}},\n'
            f'    {{ "url":"{self.storage_url(job)}", "type":"Observation" }}\n'
            '  ],\n'
            f'  "error": [{{"type":"OperationOutcome","url":"{self.file_url(job, "errors")}"}}],\n'
            f'  "extension": {{"http://example.org/source": "{self.base_url}/metadata"}}\n'
            '}\n'
        ).encode()

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.close_all()
        self._server.server_close()
        self._thread.join(5)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: BulkDataServer) -> None:
        self.owner = owner
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__((LOOPBACK, 0), _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        # The handshake happens in the connection's own thread, on its first read.
        wrapped = self.owner._tls.wrap_socket(sock, server_side=True,
                                              do_handshake_on_connect=False)
        with self._open_lock:
            self._open.add(wrapped)
        return wrapped, address

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_all(self) -> None:
        with self._open_lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._open.clear()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-download is no failure of this server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = _TIMEOUT_SECONDS
    server: _Server

    def setup(self) -> None:
        super().setup()
        owner = self.server.owner
        record = _Connection()
        with owner.lock:
            owner.connections.append(record)
        self.rfile = _TeeReader(self.rfile, record.received, owner.lock)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- dispatch ------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        owner = self.server.owner
        headers = {k.lower(): v for k, v in self.headers.items()}
        peer = self.connection.getpeercert(binary_form=True)
        presented = _x5t(peer) if peer else None
        with owner.lock:
            owner.requests.append(BulkRequest(self.command, self.path, headers, presented))
        length = int(headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        if owner.auth is None:
            self._storage(path)
            return
        problem = owner.auth(headers)
        if problem is None and owner.bound_tokens:
            token = headers.get("authorization", "").partition(" ")[2]
            if bound_thumbprint(token) != presented:
                problem = "the token is bound to another client certificate (cnf x5t#S256)"
        if problem is not None:
            self._outcome(401, "security", problem, {"WWW-Authenticate": "Bearer"})
            return
        if not path.startswith(FHIR_BASE_PATH + "/"):
            self._outcome(404, "not-found", "not under the FHIR base")
            return
        rest = path[len(FHIR_BASE_PATH):]
        if self.command == "GET" and rest.endswith("/$export") and _is_kickoff(rest):
            self._kickoff(headers)
        elif rest.startswith("/bulkstatus/"):
            self._status(rest.removeprefix("/bulkstatus/"))
        elif self.command == "GET" and rest.startswith("/bulkfiles/"):
            self._file(rest, query)
        else:
            self._outcome(404, "not-found", f"no route for {self.command} {rest}")

    # -- the IG's steps ------------------------------------------------------------------

    def _kickoff(self, headers: dict[str, str]) -> None:
        owner = self.server.owner
        if headers.get("prefer", "").strip().lower() != "respond-async":
            self._outcome(400, "invalid", "Prefer: respond-async is required")
            return
        job = uuid.uuid4().hex
        with owner.lock:
            owner.jobs[job] = _Job(request=owner.origin + self.path,
                                   polls_left=owner.polls_before_done)
        status_url = f"{owner.base_url}/bulkstatus/{job}"
        self._outcome(202, "informational", "export started", {"Content-Location": status_url},
                      severity="information")

    def _status(self, job_id: str) -> None:
        owner = self.server.owner
        with owner.lock:
            job = owner.jobs.get(job_id)
            if job is None or job.deleted:
                job = None
            elif self.command == "DELETE":
                job.deleted = True
            else:
                job.polls += 1
        if job is None:
            self._outcome(404, "not-found", "no such export (deleted or never started)")
        elif self.command == "DELETE":
            self._outcome(202, "informational", "export deleted", severity="information")
        elif job.polls <= job.polls_left:
            self._send(202, b"", None, {"Retry-After": RETRY_AFTER,
                                        "X-Progress": f"Exporting: {job.polls} of 3 steps"})
        else:
            self._send(200, owner.manifest(job_id), "application/json", {"Expires": "never"})

    def _file(self, rest: str, query: dict[str, list[str]]) -> None:
        owner = self.server.owner
        size = int(query.get("size", [owner.small_file_size])[0])
        self._stream_ndjson(owner.base_url, size, chunked="chunked" in query)

    def _storage(self, path: str) -> None:
        if self.command != "GET" or not path.startswith("/signed/"):
            self._outcome(404, "not-found", "no such object")
            return
        self._stream_ndjson(self.server.owner.origin, self.server.owner.small_file_size,
                            chunked=False)

    # -- answers -------------------------------------------------------------------------

    def _stream_ndjson(self, base_url: str, size: int, *, chunked: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", NDJSON)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(size))
        self.end_headers()
        for piece in ndjson_chunks(base_url, size):
            if chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                self.wfile.write(piece)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _outcome(self, status: int, code: str, text: str,
                 extra: dict[str, str] | None = None, severity: str = "error") -> None:
        body = json.dumps({"resourceType": "OperationOutcome", "issue": [
            {"severity": severity, "code": code, "diagnostics": text}]}).encode()
        self._send(status, body, "application/fhir+json", extra)

    def _send(self, status: int, body: bytes, content_type: str | None,
              extra: dict[str, str] | None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()


def _x5t(der: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def _is_kickoff(rest: str) -> bool:
    """``/$export``, ``/Patient/$export`` or ``/Group/[id]/$export``."""
    segments = rest.strip("/").split("/")
    return segments in (["$export"], ["Patient", "$export"]) or (
        len(segments) == 3 and segments[0] == "Group" and bool(segments[1]))


__all__ = ["NDJSON", "RETRY_AFTER", "BulkDataServer", "BulkRequest", "ndjson_chunks",
           "ndjson_line", "ndjson_sha256"]

"""Limits and timeouts on the real sidecar process, driven with raw sockets as an attacker would.

Request heads are bounded in size (431, nothing upstream, flat memory); heads dribbled slowly
and idle keep-alive connections are closed; an upstream that stalls in a response body gets the
app's connection aborted (logged and counted as upstream-timeout) while a slow but flowing body
is not cut; chunked requests with trailers are answered; and the in-flight gauge returns to 0
after every kind of hostile or aborted request.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support.constants import EXPECTED_BASIC
from support.pki import TestPKI
from support.scripted_upstream import BODY, ScriptedUpstream
from support.sidecar_process import SidecarProcess, free_port, wait_until, write_config
from support.sidecars import StartSidecar

from sidecar.runtime.snapshot import Snapshot

HEADER_TIMEOUT = 1.0
READ_TIMEOUT = 1.0
# A loaded machine delays timers and scheduling; deadlines are generous, lower bounds are not.
MARGIN = 4.0
# Far enough from the header deadline that neither test's bounds accept the other timeout: a
# head closed by the idle timer (or an idle connection by the header timer) fails.
IDLE_TIMEOUT = HEADER_TIMEOUT + MARGIN + 2.0
assert HEADER_TIMEOUT + MARGIN < IDLE_TIMEOUT * 0.8
DRAIN_SECONDS = 30
MAX_RSS_GROWTH = 16 * 1024 * 1024

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Running:
    sidecar: SidecarProcess
    upstream: ScriptedUpstream
    port: int
    admin: str

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        return sock


@pytest.fixture(scope="module")
def scripted(pki: TestPKI) -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream(pki.server()) as upstream:
        yield upstream


def limits_sidecar(start: StartSidecar, upstream: ScriptedUpstream) -> Running:
    sidecar = start.basic(
        upstream, connection="slow", admin=True,
        settings={"read_timeout_seconds": READ_TIMEOUT},
        extra={"shutdown": {"drain_seconds": DRAIN_SECONDS},
               "limits": {"client_header_timeout_seconds": HEADER_TIMEOUT,
                          "client_idle_timeout_seconds": IDLE_TIMEOUT}})
    assert sidecar.admin is not None
    return Running(sidecar.process, upstream, sidecar.port, sidecar.admin)


@pytest.fixture(scope="module")
def running(scripted: ScriptedUpstream, start_module_sidecar: StartSidecar) -> Running:
    """Shared by the tests that only send requests; a test that reloads or stops the sidecar
    takes ``own``."""
    return limits_sidecar(start_module_sidecar, scripted)


@pytest.fixture
def fresh(running: Running) -> Running:
    """The shared sidecar, with the upstream's record of the previous test cleared."""
    running.upstream.clear()
    return running


@pytest.fixture
def own(pki: TestPKI, start_sidecar: StartSidecar) -> Iterator[Running]:
    """A sidecar (and scripted upstream) of the test's own, for a test that reloads or stops it."""
    with ScriptedUpstream(pki.server()) as upstream:
        yield limits_sidecar(start_sidecar, upstream)


def scrape(admin: str) -> Samples:
    text = httpx.get(f"http://{admin}/metrics", timeout=10, trust_env=False).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def in_flight(admin: str) -> float:
    return scrape(admin).get(("fhir_sidecar_requests_in_flight",
                              frozenset({("connection", "slow")})), 0.0)


def errors(admin: str, error: str) -> float:
    return scrape(admin).get(("fhir_sidecar_request_errors_total",
                              frozenset({("connection", "slow"), ("error", error)})), 0.0)


def get(path: str) -> bytes:
    return f"GET /fhir/{path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


@dataclass
class Ending:
    data: bytes
    reset: bool
    seconds: float


def read_to_end(sock: socket.socket, timeout: float) -> Ending:
    """Everything until the sidecar closes or resets the connection, and how long it took."""
    sock.settimeout(timeout)
    start = time.monotonic()
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        return Ending(data, True, time.monotonic() - start)
    except TimeoutError:
        raise AssertionError(f"still open after {timeout} s; received {data[:200]!r}") from None
    return Ending(data, False, time.monotonic() - start)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response framed by Content-Length, read from a keep-alive connection."""
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response head: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "closed in the middle of a response body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def rss(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


# -- request head size -------------------------------------------------------------------------

def test_oversized_request_head_gets_431_outcome_and_nothing_goes_upstream(
        fresh: Running) -> None:
    padding = "a" * 70_000  # over the default limit of 65536, in one terminated head
    with fresh.connect() as sock:
        sock.sendall(f"GET /fhir/Patient HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"X-Padding: {padding}\r\n\r\n".encode())
        status, headers, body = read_response(sock)
        assert read_to_end(sock, MARGIN + HEADER_TIMEOUT).data == b""  # then closed
    assert status == 431
    assert headers["x-sidecar-error"] == "header-too-large"
    assert headers["content-type"] == "application/fhir+json"
    outcome = json.loads(body)
    assert outcome["resourceType"] == "OperationOutcome"
    assert "65536" in outcome["issue"][0]["diagnostics"]
    fresh.sidecar.wait_for_event("request_header_too_large")
    assert fresh.upstream.connections == 0 and fresh.upstream.raw() == b""


def test_a_head_one_byte_over_the_limit_gets_431(fresh: Running) -> None:
    # The exact boundary: 65537 bytes, blank line included, in one terminated head.
    head = b"GET /fhir/Patient HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: "
    padding = b"a" * (65536 + 1 - len(head) - len(b"\r\n\r\n"))
    request = head + padding + b"\r\n\r\n"
    assert len(request) == 65536 + 1
    with fresh.connect() as sock:
        sock.sendall(request)
        status, headers, _ = read_response(sock)
    assert status == 431 and headers["x-sidecar-error"] == "header-too-large"
    assert fresh.upstream.connections == 0 and fresh.upstream.raw() == b""


def test_head_just_under_the_limit_is_forwarded(fresh: Running) -> None:
    head = b"GET /fhir/Patient HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: "
    padding = b"a" * (65536 - len(head) - len(b"\r\n\r\n"))
    assert len(head + padding + b"\r\n\r\n") == 65536  # exactly the limit
    with fresh.connect() as sock:
        sock.sendall(head + padding + b"\r\n\r\n")
        status, _, body = read_response(sock)
    assert (status, body) == (200, BODY)
    assert padding in fresh.upstream.raw()


def test_unterminated_50_mb_heads_keep_memory_flat(tmp_path: Path, pki: TestPKI,
                                                   start_sidecar: StartSidecar) -> None:
    # Default limits (a 30 s header deadline): the whole flood is read, and thrown away.
    port = free_port()
    with ScriptedUpstream(pki.server()) as upstream:
        process = start_sidecar({
            "admin": {"listen": None},
            "connections": {"flood": {
                "url": f"https://localhost:{upstream.port}/fhir", "listen": f"127.0.0.1:{port}",
                "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}},
        }, directory=tmp_path).process
        assert process.proc is not None
        with httpx.Client(trust_env=False, timeout=30) as client:  # warm up
            assert client.get(f"http://127.0.0.1:{port}/fhir/Patient").status_code == 200
        upstream.clear()
        baseline = rss(process.proc.pid, "VmRSS")
        line = b"X-Flood: " + b"a" * (1024 * 1024 - 11) + b"\r\n"
        sockets = [socket.create_connection(("127.0.0.1", port), timeout=30)
                   for _ in range(4)]
        try:
            for sock in sockets:
                sock.sendall(b"GET /fhir/Patient HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            for _ in range(50):  # 4 x 50 MB, interleaved, never terminated
                for sock in sockets:
                    sock.sendall(line)
            growth = rss(process.proc.pid, "VmHWM") - baseline
            assert growth < MAX_RSS_GROWTH, f"RSS grew by {growth >> 20} MiB"
            answers = [read_response(sock) for sock in sockets]
        finally:
            for sock in sockets:
                sock.close()
        assert [status for status, _, _ in answers] == [431] * 4
        assert upstream.connections == 0


# -- client deadlines ---------------------------------------------------------------------------

def test_slowloris_head_is_closed_after_the_header_timeout(fresh: Running) -> None:
    with fresh.connect() as sock:
        start = time.monotonic()
        sock.settimeout(0.2)
        closed = False
        for byte in get("Patient")[:-2]:  # never completes: one byte every 0.2 s
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
            if time.monotonic() - start > HEADER_TIMEOUT + MARGIN:
                break
        elapsed = time.monotonic() - start
    assert closed, f"still open after {elapsed:.1f} s of dribbled header bytes"
    # The header deadline, not the idle one (which is beyond this bound: see IDLE_TIMEOUT).
    assert HEADER_TIMEOUT * 0.8 <= elapsed <= HEADER_TIMEOUT + MARGIN
    fresh.sidecar.wait_for_event("client_header_timeout")
    assert fresh.upstream.raw() == b""


def test_idle_keep_alive_connection_is_closed_after_the_idle_timeout(fresh: Running) -> None:
    with fresh.connect() as sock:
        sock.sendall(get("Patient"))
        status, _, _ = read_response(sock)
        assert status == 200
        ending = read_to_end(sock, IDLE_TIMEOUT + MARGIN)
    assert ending.data == b""
    # Idle, not the (shorter) header deadline: no request had begun.
    assert IDLE_TIMEOUT * 0.8 <= ending.seconds <= IDLE_TIMEOUT + MARGIN


def test_keep_alive_connection_serves_requests_within_the_idle_timeout(fresh: Running) -> None:
    with fresh.connect() as sock:
        for _ in range(3):
            sock.sendall(get("Patient"))
            assert read_response(sock)[0] == 200
            time.sleep(HEADER_TIMEOUT * 1.5)  # idle longer than the header timeout, on purpose
        sock.sendall(get("Patient"))
        assert read_response(sock)[0] == 200


# -- upstream read timeout ----------------------------------------------------------------------

def test_upstream_stalling_in_a_buffered_body_aborts_the_client(fresh: Running) -> None:
    before = errors(fresh.admin, "upstream-timeout")
    with fresh.connect() as sock:
        sock.sendall(get("stall?length=1000&sent=500&id=buffered"))
        ending = read_to_end(sock, READ_TIMEOUT + MARGIN)
    assert ending.seconds >= READ_TIMEOUT * 0.8
    assert b"x" * 1000 not in ending.data  # never a complete-looking response
    line = fresh.sidecar.wait_for_event(
        "request", lambda r: r.get("path") == "/fhir/stall" and bool(r.get("error")))
    assert line["error"] == "upstream-timeout"
    fresh.sidecar.wait_for_event("upstream_stalled")
    wait_until(lambda: errors(fresh.admin, "upstream-timeout") == before + 1,
               message="the stall to be counted as upstream-timeout")
    wait_until(lambda: in_flight(fresh.admin) == 0, message="in-flight to return to 0")


def test_upstream_stalling_in_a_streamed_body_resets_the_client(fresh: Running) -> None:
    length, sent = 8 * 1024 * 1024, 2 * 1024 * 1024  # over the 1 MB streaming threshold
    with fresh.connect() as sock:
        sock.sendall(get(f"stall?length={length}&sent={sent}"))
        ending = read_to_end(sock, READ_TIMEOUT + MARGIN + 10)
    head, _, body = ending.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert sent // 2 <= len(body) < length
    assert ending.reset, "a cut-short body must end in a reset, not an orderly close"
    wait_until(lambda: in_flight(fresh.admin) == 0, message="in-flight to return to 0")


def test_slow_but_flowing_body_is_not_cut_off(fresh: Running) -> None:
    count, every = 12, READ_TIMEOUT * 0.3  # 3.6 s in all, never 1 s of silence
    with fresh.connect() as sock:
        start = time.monotonic()
        sock.sendall(get(f"trickle?bytes={count}&every={every}"))
        status, _, body = read_response(sock)
        elapsed = time.monotonic() - start
    assert status == 200 and body == b"x" * count
    assert elapsed > READ_TIMEOUT * 2  # it really was slower than the read timeout overall


# -- chunked trailers and in-flight accounting ----------------------------------------------------

def test_chunked_request_with_trailers_is_answered_and_forwarded(fresh: Running) -> None:
    with fresh.connect() as sock:
        sock.sendall(b"POST /fhir/Patient HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/fhir+json\r\nTransfer-Encoding: chunked\r\n"
                     b"Trailer: X-Checksum\r\n\r\n"
                     b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc123\r\n\r\n")
        status, _, body = read_response(sock)
    assert (status, body) == (200, BODY)
    raw = fresh.upstream.raw()
    assert b"hello" in raw and b" world" in raw
    assert f"Authorization: {EXPECTED_BASIC}".encode() in raw
    assert b"X-Checksum: abc123" not in raw  # trailers are dropped, never forwarded


def test_chunked_response_with_trailers_reaches_the_client(fresh: Running) -> None:
    response = httpx.get(f"http://127.0.0.1:{fresh.port}/fhir/trailers", timeout=30,
                         trust_env=False)
    assert response.status_code == 200 and response.content == BODY


def hostile_and_aborted_requests(fresh: Running, mark: str) -> None:
    """Four requests whose IDs are ``{mark}-1`` to ``-4``: aborted mid-body, reset by the
    upstream, chunked with trailers (answered), left while the upstream is silent."""

    def head(method: str, path: str, extra: str = "", n: int = 0) -> bytes:
        return (f"{method} /fhir/{path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"X-Request-ID: {mark}-{n}\r\n{extra}\r\n").encode()

    # The client leaves in the middle of its request body.
    with fresh.connect() as sock:
        sock.sendall(head("POST", "Patient", "Content-Length: 1000\r\n", 1) + b"{" * 10)
        wait_until(lambda: in_flight(fresh.admin) == 1, message="the request to start")
    # The upstream resets the connection.
    with fresh.connect() as sock:
        sock.sendall(head("GET", "reset", n=2))
        status, headers, _ = read_response(sock)
        assert status == 502 and headers["x-sidecar-error"] == "upstream-unreachable"
    # A request with trailers; and the client leaves while the upstream is silent.
    with fresh.connect() as sock:
        sock.sendall(head("POST", "Patient", "Transfer-Encoding: chunked\r\n", 3)
                     + b"1\r\n{\r\n0\r\nX-T: 1\r\n\r\n")
        assert read_response(sock)[0] == 200
    with fresh.connect() as sock:
        sock.sendall(head("GET", "Patient?delay=3", n=4))
        wait_until(lambda: fresh.upstream.requests, message="the request to reach upstream")


def test_in_flight_returns_to_zero_after_hostile_and_aborted_requests(fresh: Running) -> None:
    # Each request names itself: the log lines of earlier tests on this shared sidecar may
    # still be arriving.
    mark = f"in-flight-{time.monotonic_ns()}"
    hostile_and_aborted_requests(fresh, mark)
    wait_until(lambda: in_flight(fresh.admin) == 0, MARGIN * 2,
               message="in-flight to return to 0")

    def ours() -> list[dict[str, Any]] | None:
        found = [r for r in fresh.sidecar.events("request")
                 if str(r.get("request_id", "")).startswith(mark)]
        return found if len(found) >= 4 else None

    requests = wait_until(ours, MARGIN, message="the four request log lines")
    outcomes = sorted((r["request_id"][-1], r["path"], r.get("error")) for r in requests)
    assert outcomes == [("1", "/fhir/Patient", "client-disconnected"),
                        ("2", "/fhir/reset", "upstream-unreachable"),
                        ("3", "/fhir/Patient", None),
                        ("4", "/fhir/Patient", "client-disconnected")], outcomes


def test_limits_reload_live(own: Running) -> None:
    fresh = own
    original = fresh.sidecar.config.read_text()
    config = yaml.safe_load(original)
    config["limits"]["max_request_header_bytes"] = 2048
    reloads = len(fresh.sidecar.events("config_reloaded"))
    head = b"GET /fhir/Patient HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 3000
    try:
        write_config(fresh.sidecar.config.parent, config)
        fresh.sidecar.signal(signal.SIGHUP)
        wait_until(lambda: len(fresh.sidecar.events("config_reloaded")) > reloads,
                   message="the reload")
        with fresh.connect() as sock:
            sock.sendall(head + b"\r\n\r\n")
            status, _, body = read_response(sock)
        assert status == 431 and b"2048" in body
    finally:
        fresh.sidecar.config.write_text(original)
        fresh.sidecar.signal(signal.SIGHUP)
    wait_until(lambda: len(fresh.sidecar.events("config_reloaded")) > reloads + 1,
               message="the original config to be back")
    with fresh.connect() as sock:
        sock.sendall(head + b"\r\n\r\n")
        assert read_response(sock)[0] == 200
    assert fresh.upstream.connections == 1


def test_mitmproxy_inactivity_backstop_stays_above_every_configured_wait(tmp_path: Path) -> None:
    from mitmproxy.test import taddons

    from sidecar.proxy.limits import ClientLimits, tcp_timeout_for
    from sidecar.runtime.live import load_snapshot

    def snapshot(timeout: float) -> Snapshot:
        return load_snapshot(write_config(tmp_path, {"connections": {"long": {
            "url": "https://fhir.example", "timeout_seconds": timeout}}}))

    assert tcp_timeout_for(snapshot(60)) == 600  # mitmproxy's default is long enough
    current = snapshot(900)
    assert tcp_timeout_for(current) == 930
    limits = ClientLimits(lambda: current)
    with taddons.context(limits) as context:
        limits.running()
        assert context.options.tcp_timeout == 930
        current = snapshot(1200)  # a reload: the next connection's backstop follows it
        limits._update_backstop()
        assert context.options.tcp_timeout == 1230


def test_sigterm_does_not_wait_for_leaked_requests(own: Running) -> None:
    running = own
    hostile_and_aborted_requests(running, f"leaked-{time.monotonic_ns()}")
    wait_until(lambda: in_flight(running.admin) == 0, message="in-flight to return to 0")
    start = time.monotonic()
    assert running.sidecar.stop() == 0
    elapsed = time.monotonic() - start
    assert elapsed < DRAIN_SECONDS / 2, f"shutdown took {elapsed:.1f} s: requests leaked"
    stopped = running.sidecar.events("draining")
    assert stopped and stopped[-1]["in_flight"] == 0
    assert not running.sidecar.events("drain_timeout")
    # Nothing of all the above reached stderr: problems are JSON log lines.
    assert running.sidecar.stderr_lines == []

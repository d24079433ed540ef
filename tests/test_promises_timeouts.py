"""docs/configuration.md: "`timeout_seconds` bounds connecting, the TLS handshake and the wait for
response headers". The handshake bound is checked against a blackhole upstream: it accepts the
TCP connection (the kernel completes it) and never says a word of TLS. The connect bound is
checked against a listener whose accept queue is full, so the kernel drops the SYN. No
non-routable address is used: everything stays on loopback."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
from support.pki import TestPKI
from support.sidecar_process import free_port
from support.sidecars import StartSidecar

TIMEOUT = 2


def one_request_through_a_sidecar(upstream_port: int, tmp_path: Path, pki: TestPKI,
                                  start_sidecar: StartSidecar) -> tuple[httpx.Response, float]:
    """A sidecar with ``timeout_seconds: TIMEOUT`` in front of ``upstream_port``, one request
    through it: the answer and how long it took."""
    port = free_port()
    start_sidecar({
        "admin": {"listen": None},
        "connections": {"c": {
            "url": f"https://localhost:{upstream_port}/fhir",
            "listen": f"127.0.0.1:{port}", "timeout_seconds": TIMEOUT,
            "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}},
    }, directory=tmp_path)
    began = time.monotonic()
    answer = httpx.get(f"http://127.0.0.1:{port}/metadata", timeout=60, trust_env=False)
    return answer, time.monotonic() - began


def assert_cut_at_the_bound(answer: httpx.Response, took: float) -> None:
    assert answer.status_code == 504, answer.text
    assert answer.headers["X-Sidecar-Error"] == "upstream-timeout"
    # Bounded by timeout_seconds, not by mitmproxy's own much longer backstop nor by the
    # kernel's SYN retries (over a minute).
    assert TIMEOUT - 0.5 <= took < TIMEOUT + 10, took


def test_an_upstream_that_never_speaks_tls_is_cut_at_the_handshake_bound(
        tmp_path: Path, pki: TestPKI, start_sidecar: StartSidecar) -> None:
    """Promise (docs/configuration.md): "`timeout_seconds` bounds connecting, the TLS
    handshake and the wait for response headers"; docs/errors.md: `upstream-timeout` 504."""
    accepted: list[socket.socket] = []
    stop = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as blackhole:
        blackhole.settimeout(0.2)

        def accept() -> None:  # hold every connection open, read nothing, send nothing
            while not stop.is_set():
                try:
                    accepted.append(blackhole.accept()[0])
                except TimeoutError:
                    continue
        acceptor = threading.Thread(target=accept, daemon=True)
        acceptor.start()
        try:
            answer, took = one_request_through_a_sidecar(blackhole.getsockname()[1], tmp_path,
                                                         pki, start_sidecar)
        finally:
            stop.set()
            acceptor.join(5)
            for conn in accepted:
                conn.close()
    assert accepted, "the sidecar never connected to the blackhole"
    assert_cut_at_the_bound(answer, took)


def test_an_upstream_whose_backlog_is_full_is_cut_at_the_connect_bound(
        tmp_path: Path, pki: TestPKI, start_sidecar: StartSidecar) -> None:
    """Promise (docs/configuration.md): "`timeout_seconds` bounds connecting". A listener that
    never accepts, its accept queue filled by the test, makes the kernel drop every further
    SYN: the sidecar's connect gets no answer at all, as from a firewall that drops."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        fillers: list[socket.socket] = []
        try:
            for _ in range(4):  # more than the queue holds; the rest stay in SYN_SENT
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(address)
                fillers.append(filler)
            # The precondition, checked rather than assumed: a connect now gets no answer.
            probe = socket.socket()
            probe.settimeout(1.0)
            try:
                probe.connect(address)
                answered: str | None = "connected"
            except TimeoutError:
                answered = None
            except OSError as error:
                answered = repr(error)
            finally:
                probe.close()
            assert answered is None, f"the backlog is not full: a connect got {answered}"

            answer, took = one_request_through_a_sidecar(address[1], tmp_path, pki,
                                                         start_sidecar)
        finally:
            for filler in fillers:
                filler.close()
    assert_cut_at_the_bound(answer, took)

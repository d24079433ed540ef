"""Bundles of any size keep their links pointing at the sidecar: bodies over the buffering
threshold are rewritten while they stream (sized and chunked, JSON and XML, gzip-coded), byte
for byte otherwise, with flat memory. Real TLS upstream, the real ``fhir-sidecar run``."""

from __future__ import annotations

import gzip
import hashlib
import socket
from collections.abc import Iterator

import httpx
import pytest
from support.fhir_bodies import large_bundle_chunks
from support.sidecar_process import SidecarProcess
from support.sidecars import StartSidecar
from support.upstreams import Upstreams
from test_streaming import MAX_RSS_GROWTH, rss_bytes

from sidecar.testkit.fhir_server import FhirTestServer

THRESHOLD = 1024 * 1024  # stream_large_bodies


class Setup:
    def __init__(self, sidecar: SidecarProcess, server: FhirTestServer, port: int) -> None:
        self.sidecar = sidecar
        self.server = server
        self.port = port
        self.base = f"http://127.0.0.1:{port}"

    def expected(self, size: int, xml: bool = False) -> Iterator[bytes]:
        """The generated Bundle with its one ``next`` link (in the first chunk) rewritten."""
        chunks = large_bundle_chunks(self.server.base_url, size, xml=xml)
        yield next(chunks).replace(f"{self.server.base_url}/Bundle/large".encode(),
                                   f"{self.base}/Bundle/large".encode(), 1)
        yield from chunks


@pytest.fixture(scope="module")
def setup(start_module_sidecar: StartSidecar, upstreams: Upstreams) -> Setup:
    running = start_module_sidecar.basic(connection="big")
    return Setup(running.process, upstreams.get("good"), running.port)


def test_a_100_mb_bundle_is_rewritten_while_it_streams(setup: Setup) -> None:
    size = 100 * 1024 * 1024
    expected = hashlib.sha256()
    expected_length = 0
    for chunk in setup.expected(size):
        expected.update(chunk)
        expected_length += len(chunk)
    assert expected_length != size  # the rewritten link has another length
    assert setup.sidecar.proc is not None
    pid = setup.sidecar.proc.pid
    digest = hashlib.sha256()
    received = 0
    head = b""
    with httpx.Client(timeout=120, trust_env=False) as client:
        client.get(f"{setup.base}/metadata").raise_for_status()  # warm up
        baseline = rss_bytes(pid, "VmRSS")
        with client.stream("GET", f"{setup.base}/Bundle/large",
                           params={"size": size}) as response:
            assert response.status_code == 200
            # The upstream sent a Content-Length; the rewritten body is sent chunked.
            assert "content-length" not in response.headers
            assert response.headers["transfer-encoding"] == "chunked"
            for chunk in response.iter_raw():
                if len(head) < 4096:
                    head += chunk[:4096]
                digest.update(chunk)
                received += len(chunk)
    peak = rss_bytes(pid, "VmHWM")
    assert received == expected_length
    assert digest.hexdigest() == expected.hexdigest()
    assert f'"url":"{setup.base}/Bundle/large?size={size}&page=2"'.encode() in head
    assert f'"fullUrl":"{setup.server.base_url}/Patient/big-0"'.encode() in head
    assert peak - baseline < MAX_RSS_GROWTH, f"RSS grew by {(peak - baseline) >> 20} MiB"
    record = setup.sidecar.wait_for_event(
        "request", lambda r: r.get("path") == "/fhir/Bundle/large"
        and r.get("bytes_out") == expected_length)
    assert record["status"] == 200


@pytest.mark.parametrize(("size", "params", "xml"), [
    (3 * THRESHOLD, {}, True),                    # sized XML over the threshold
    (3 * THRESHOLD, {"chunked": "1"}, False),     # chunked JSON over it
    (3 * THRESHOLD, {"chunked": "1"}, True),      # chunked XML over it
    (THRESHOLD // 4, {"chunked": "1"}, False),    # chunked under it: collected, rewritten whole
    (3 * THRESHOLD, {"gzip": "1"}, False),        # gzip-coded, decoded and re-encoded
    (3 * THRESHOLD, {"gzip": "1"}, True),
    (THRESHOLD // 4, {"gzip": "1"}, True),
], ids=["xml-sized", "json-chunked", "xml-chunked", "json-chunked-small", "json-gzip",
        "xml-gzip", "xml-gzip-small"])
def test_every_framing_and_format_is_rewritten(setup: Setup, size: int, params: dict[str, str],
                                               xml: bool) -> None:
    query = {"size": str(size), **params}
    if xml:
        query["_format"] = "xml"
    with httpx.Client(timeout=60, trust_env=False) as client:
        response = client.get(f"{setup.base}/Bundle/large", params=query)
    assert response.status_code == 200
    if "gzip" in params:
        assert response.headers["content-encoding"] == "gzip"
        # httpx decoded it: what went over the wire is gzip of the rewritten body.
        assert gzip.decompress(b"".join(_raw_again(setup, query))) == response.content
    assert response.content == b"".join(setup.expected(size, xml))
    if size > THRESHOLD or "chunked" in params or "gzip" in params:
        assert "content-length" not in response.headers


def _raw_again(setup: Setup, query: dict[str, str]) -> Iterator[bytes]:
    with httpx.Client(timeout=60, trust_env=False) as client, client.stream(
            "GET", f"{setup.base}/Bundle/large", params=query) as response:
        yield from response.iter_raw()


def test_an_http_1_0_client_gets_the_body_delimited_by_the_connection_close(
        setup: Setup) -> None:
    size = 2 * THRESHOLD
    with socket.create_connection(("127.0.0.1", setup.port), timeout=60) as sock:
        sock.sendall(f"GET /Bundle/large?size={size} HTTP/1.0\r\n"
                     f"Host: 127.0.0.1:{setup.port}\r\n\r\n".encode())
        received = bytearray()
        while chunk := sock.recv(1 << 16):
            received += chunk
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    lines = head.decode().lower().split("\r\n")
    assert lines[0].endswith(" 200 ok")
    assert not any(line.startswith(("content-length:", "transfer-encoding:"))
                   for line in lines)
    assert body == b"".join(setup.expected(size))

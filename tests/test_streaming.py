"""Bodies stream through the sidecar: 100 MB each way, byte-exact, with flat memory."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
from support.fhir_bodies import expected_sha256, large_body_chunks
from support.sidecar_process import SidecarProcess
from support.sidecars import StartSidecar

SIZE = 100 * 1024 * 1024
MAX_RSS_GROWTH = 30 * 1024 * 1024


def rss_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


@pytest.fixture(scope="module")
def sidecar(start_module_sidecar: StartSidecar) -> tuple[SidecarProcess, str]:
    running = start_module_sidecar.basic(connection="big")
    return running.process, running.base


def test_large_download_and_upload_stream(sidecar: tuple[SidecarProcess, str]) -> None:
    process, base = sidecar
    assert process.proc is not None
    pid = process.proc.pid
    with httpx.Client(timeout=120, trust_env=False) as client:
        client.get(f"{base}/metadata").raise_for_status()  # warm up: TLS, imports, buffers
        baseline = rss_bytes(pid, "VmRSS")

        digest = hashlib.sha256()
        received = 0
        with client.stream("GET", f"{base}/Binary/large", params={"size": SIZE}) as response:
            assert response.status_code == 200
            for chunk in response.iter_raw():
                digest.update(chunk)
                received += len(chunk)
        assert received == SIZE
        assert digest.hexdigest() == expected_sha256(SIZE)

        # Chunked upload (no Content-Length): the sidecar cannot know the size in advance.
        uploaded = client.post(f"{base}/Binary/digest", content=large_body_chunks(SIZE))
        assert uploaded.status_code == 200, uploaded.text
        assert uploaded.json() == {"length": SIZE, "sha256": expected_sha256(SIZE)}

        # Upload with a Content-Length.
        sized = client.post(f"{base}/Binary/digest", content=large_body_chunks(SIZE),
                            headers={"Content-Length": str(SIZE)})
        assert sized.json() == {"length": SIZE, "sha256": expected_sha256(SIZE)}

    peak = rss_bytes(pid, "VmHWM")
    assert peak - baseline < MAX_RSS_GROWTH, f"RSS grew by {(peak - baseline) >> 20} MiB"
    record = process.wait_for_event("request", lambda r: r.get("path") == "/fhir/Binary/large")
    assert record["bytes_out"] == SIZE

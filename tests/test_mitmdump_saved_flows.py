"""The addon script in a user's own mitmdump that saves flows (``-w``).

mitmproxy deep-copies ``flow.metadata`` to save a flow; the sidecar's per-request state there
holds the snapshot and the bearer token. Saving must work and carry none of it, and the user is
told that saved requests include the Authorization header the sidecar added.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
from mitmproxy import http, io
from support.constants import UPSTREAM_PASSWORD, UPSTREAM_USER
from support.pki import TestPKI
from support.sidecar_process import free_port, wait_until, write_config

from sidecar.testkit.fhir_server import FhirTestServer

REPO = Path(__file__).resolve().parents[1]
MITMDUMP = Path(sys.executable).parent / "mitmdump"


def test_saved_flows_work_and_carry_no_sidecar_state(tmp_path: Path, pki: TestPKI,
                                                     upstream_good: FhirTestServer) -> None:
    (tmp_path / "pw").write_text(UPSTREAM_PASSWORD + "\n")
    port = free_port()
    config = write_config(tmp_path, {
        "admin": {"listen": None},
        "basic_auth": {"b": {"username": UPSTREAM_USER, "password_file": "pw"}},
        "connections": {"fhir": {
            "url": upstream_good.base_url, "listen": f"127.0.0.1:{port}", "auth": {"basic": "b"},
            "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}},
    })
    saved = tmp_path / "flows"
    process = subprocess.Popen(
        [str(MITMDUMP), "-s", str(REPO / "addons" / "fhir_sidecar.py"),
         "--set", f"sidecar_config={config}", "--set", f"confdir={tmp_path / 'mitmproxy'}",
         "-w", str(saved)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        def answered() -> httpx.Response | None:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/Patient/example", trust_env=False,
                                 timeout=10, headers={"X-Request-ID": "saved-flow-1"})
            except httpx.TransportError:
                return None

        response = wait_until(answered, 60, interval=0.2, message="mitmdump to serve")
        assert response.status_code == 200, response.text
        wait_until(lambda: saved.exists() and saved.stat().st_size > 0, 20,
                   message="the flow to be saved")
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert "Addon error" not in output, output
    assert "include the Authorization header the sidecar added" in output
    with saved.open("rb") as f:
        flows = [flow for flow in io.FlowReader(f).stream() if isinstance(flow, http.HTTPFlow)]
    assert [flow.response.status_code for flow in flows if flow.response] == [200]
    assert flows[0].metadata["fhir_sidecar"] == {"connection": "fhir",
                                                 "request_id": "saved-flow-1"}
    assert UPSTREAM_PASSWORD not in repr(flows[0].metadata)

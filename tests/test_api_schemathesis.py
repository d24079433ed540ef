"""schemathesis against the running sidecar's own ``/api/openapi.json``: for every operation,
generated valid and invalid requests never cause a 5xx and every answer conforms to the
document (status codes, content types, bodies). Bounded: a few examples per operation."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.pki import TestPKI
from support.sidecar_process import SidecarProcess, free_port
from support.sidecars import StartSidecar

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

ADMIN_TOKEN = "fuzz-admin-token-Gq58"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
EXAMPLES_PER_OPERATION = 6


@pytest.fixture
def running(tmp_path: Path, pki: TestPKI,
            start_sidecar: StartSidecar) -> tuple[str, SidecarProcess]:
    admin = f"127.0.0.1:{free_port()}"
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "admin-token").write_text(ADMIN_TOKEN + "\n")
    (tmp_path / "secrets" / "pw").write_text("fuzz-pw-Ha20\n")
    process = start_sidecar({
        "admin": {"listen": admin, "token_file": "secrets/admin-token"},
        "basic_auth": {"b": {"username": "svc", "password_file": "secrets/pw"}},
        "egress_proxies": {"e": {"url": "http://127.0.0.1:9", "username": "svc",
                                 "password_file": "secrets/pw"}},
        "connections": {"c": {"url": "https://127.0.0.1:9/fhir", "auth": {"basic": "b"},
                              "tls": {"verify": "custom",
                                      "ca_bundle": str(pki.ca_bundle_path)}}},
    }, directory=tmp_path).process
    return f"http://{admin}", process


def _loopback_only(document: dict[str, Any]) -> dict[str, Any]:
    """The served document, with generated listen addresses kept on loopback high ports."""
    doc = copy.deepcopy(document)
    listen = doc["components"]["schemas"]["ConnectionInput"]["properties"]["listen"]
    [address] = [branch for branch in listen["anyOf"] if branch["type"] == "string"]
    address["pattern"] = r"^127\.0\.0\.1:6[0-4][0-9]{3}$"
    return doc


# Headers that frame the HTTP message itself. A generated value there (`Transfer-Encoding:
# AApq%RD"`) is refused by the HTTP server with a bare 400 before any API handler runs: that is
# HTTP/1.1 at work (the raw-socket tests in tests/test_admin_hardening.py cover framing), not the
# answers the API's document describes.
FRAMING_HEADERS = {"transfer-encoding", "content-length", "connection", "host", "expect",
                   "upgrade", "te", "trailer"}


def _drop_framing_headers(case: Any) -> None:
    if case.headers:
        for name in [n for n in case.headers if n.lower() in FRAMING_HEADERS]:
            del case.headers[name]


def test_api_conforms_to_its_openapi_document(running: tuple[str, SidecarProcess]) -> None:
    base_url, process = running
    document = httpx.get(f"{base_url}/api/openapi.json", trust_env=False, timeout=10).json()
    schema = schemathesis.openapi.from_dict(_loopback_only(document))
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    # 4 resources x (list, read, put, delete), egress proxies (list, read), 2 tests
    assert len(operations) == 20
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]

    for operation in operations:
        for mode in modes:
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                _drop_framing_headers(case)
                case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS)

            try:
                run()
            except Unsatisfiable:
                # Nothing to make invalid (a list operation has no parameters or body).
                assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label
    # Still alive and serving after all that.
    assert httpx.get(f"{base_url}/readyz", trust_env=False, timeout=10).status_code == 200
    assert ADMIN_TOKEN not in process.output

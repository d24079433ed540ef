"""The docs' promise about a bad reload by file edit, one test per kind of bad change the docs
name (a taken port, a bad PEM, an unknown definition), on the real process:

docs/configuration.md: "An invalid change (bad YAML, unknown definition, missing secret file,
bad PEM, a taken port) is rejected whole: the last good configuration keeps serving and one log
line per problem (`"event": "config_rejected"`) names the file and field."

Each test checks the effect: the upstream still receives the OLD password (so the new config
was not half applied), the rejection is logged with the file and the field, the failure is
counted in ``fhir_sidecar_config_reloads_total{result="failure"}``, /readyz stays 200, and no
part of the rejected change (the extra listener) went live.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.constants import basic_header
from support.fhir_routes import fhir_upstream
from support.pki import TestPKI
from support.sidecar_process import free_port, wait_until, write_config
from support.sidecars import StartSidecar

from sidecar.testkit.fhir_server import FhirTestServer

DEADLINE = 15.0  # the promise is about a second; a loaded 2-core machine gets slack


class Setup:
    def __init__(self, tmp: Path, pki: TestPKI, upstream: FhirTestServer,
                 start: StartSidecar) -> None:
        self.tmp, self.upstream = tmp, upstream
        self.port, self.admin_port = free_port(), free_port()
        (tmp / "secrets").mkdir()
        (tmp / "secrets" / "pw").write_text("first-password\n")
        self.config: dict[str, Any] = {
            "admin": {"listen": f"127.0.0.1:{self.admin_port}"},
            "basic_auth": {"b": {"username": "svc", "password_file": "secrets/pw"}},
            "connections": {"main": {
                "url": upstream.base_url, "listen": f"127.0.0.1:{self.port}",
                "auth": {"basic": "b"},
                "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}},
        }
        self.sidecar = start(self.config, directory=tmp).process
        self.path = self.sidecar.config

    def save(self) -> None:
        write_config(self.tmp, self.config)

    def reloads(self, result: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=30,
                         trust_env=False).text
        found = re.search(
            rf'^fhir_sidecar_config_reloads_total\{{result="{result}"\}} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0

    def upstream_auth_after_get(self) -> str | None:
        self.upstream.clear()
        response = httpx.get(f"http://127.0.0.1:{self.port}/metadata", timeout=30,
                             trust_env=False)
        assert response.status_code == 200, response.text
        (seen,) = self.upstream.wait_for_requests(1)
        return seen.headers.get("authorization")


@pytest.fixture
def setup(tmp_path: Path, pki: TestPKI, start_sidecar: StartSidecar) -> Iterator[Setup]:
    with fhir_upstream(pki.server(name="reload-promises")) as upstream:
        yield Setup(tmp_path, pki, upstream, start_sidecar)


def _taken_port(s: Setup, taken: int) -> str:
    s.config["connections"]["extra"] = {**s.config["connections"]["main"],
                                        "listen": f"127.0.0.1:{taken}"}
    return "extra"


def _bad_pem(s: Setup, taken: int) -> str:
    bad = s.tmp / "not-a-ca.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    s.config["connections"]["main"]["tls"]["ca_bundle"] = str(bad)
    return "ca_bundle"


def _unknown_definition(s: Setup, taken: int) -> str:
    s.config["connections"]["main"]["auth"] = {"basic": "no-such-definition"}
    return "no-such-definition"


@pytest.mark.parametrize("change", [_taken_port, _bad_pem, _unknown_definition],
                         ids=["taken-port", "bad-pem", "unknown-definition"])
def test_a_bad_reload_by_file_edit_keeps_the_last_good_config_serving(
        setup: Setup, change: Callable[[Setup, int], str]) -> None:
    """Promise (docs/configuration.md): "An invalid change (bad YAML, unknown definition,
    missing secret file, bad PEM, a taken port) is rejected whole: the last good configuration
    keeps serving"; README: "a bad change keeps the last good configuration"."""
    s = setup
    good_auth = basic_header("svc", "first-password")
    assert s.upstream_auth_after_get() == good_auth
    failures_before = s.reloads("failure")

    with socket.create_server(("127.0.0.1", 0)) as holder:  # a port someone else holds
        taken = holder.getsockname()[1]
        # The same edit also changes the password: if any part of it went live, it shows.
        (s.tmp / "secrets" / "pw2").write_text("second-password\n")
        s.config["basic_auth"]["b"]["password_file"] = "secrets/pw2"
        field = change(s, taken)
        s.save()

        record = s.sidecar.wait_for_event("config_rejected", timeout=DEADLINE)
        assert str(s.path) in record["message"], record
        assert field in record["message"], record
        wait_until(lambda: s.reloads("failure") > failures_before, DEADLINE,
                   message="fhir_sidecar_config_reloads_total{result=failure} to count it")

        assert s.upstream_auth_after_get() == good_auth  # the old config, whole
        ready = httpx.get(f"http://127.0.0.1:{s.admin_port}/readyz", timeout=30,
                          trust_env=False)
        assert ready.status_code == 200
    assert s.sidecar.proc is not None and s.sidecar.proc.poll() is None

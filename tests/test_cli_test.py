"""``fhir-sidecar test``: the Test button on the command line
(docs/command-line.md#testing-connections), run as a user runs it, against real TLS upstreams
and the real authorization server: each step printed with its time and detail, ``--json`` in
the API's step shape, exit 0 / 1 / 2, and ``--admin`` running the same steps inside a running
sidecar with its tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from support.bearer import BearerValidator
from support.constants import UPSTREAM_PASSWORD, UPSTREAM_USER
from support.fhir_routes import fhir_upstream
from support.oauth_provider import OAuthTestProvider
from support.pki import TestPKI
from support.sidecar_process import free_port, write_config
from support.sidecars import StartSidecar

from sidecar.testkit.fhir_server import FhirTestServer

ADMIN_TOKEN = "cli-test-admin-token-Gm75"
STEPS = ["connect", "tls", "credentials", "metadata"]


def fhir_sidecar(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ))


def config(tmp: Path, pki: TestPKI, upstream: FhirTestServer, **more: Any) -> dict[str, Any]:
    (tmp / "pw").write_text(UPSTREAM_PASSWORD + "\n")
    (tmp / "wrong").write_text("not-the-password-Rk44\n")
    trusted = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
    return {
        "admin": {"listen": None},
        "basic_auth": {"up": {"username": UPSTREAM_USER, "password_file": "pw"},
                       "stale": {"username": UPSTREAM_USER, "password_file": "wrong"}},
        "connections": {
            "good": {"url": upstream.base_url, "auth": {"basic": "up"}, "tls": trusted},
            "refused": {"url": upstream.base_url, "auth": {"basic": "stale"}, "tls": trusted},
            **more,
        },
    }


def test_each_step_is_printed_and_the_exit_status_says_what_failed(
        tmp_path: Path, pki: TestPKI, upstream_good: FhirTestServer) -> None:
    path = write_config(tmp_path, config(tmp_path, pki, upstream_good))

    both = fhir_sidecar("test", "-c", str(path))
    assert both.returncode == 1, both.stdout + both.stderr
    lines = both.stdout.splitlines()
    assert lines[0] == f"good: ok ({upstream_good.base_url})"
    assert [line.split()[:2] for line in lines[1:5]] == [[s, "ok"] for s in STEPS]
    assert lines[1].split()[3] == "ms" and "connected to" in lines[1]
    assert "CapabilityStatement" in lines[4]
    assert lines[5] == f"refused: FAILED ({upstream_good.base_url})"
    assert lines[9].split()[:2] == ["metadata", "failed"]
    assert "the FHIR server answered 401" in lines[9] and "credentials were refused" in lines[9]
    assert "not-the-password" not in both.stdout + both.stderr

    one = fhir_sidecar("test", "-c", str(path), "good", "--json")
    assert one.returncode == 0, one.stdout + one.stderr
    answer = json.loads(one.stdout)
    assert list(answer) == ["connections"] and list(answer["connections"]) == ["good"]
    good = answer["connections"]["good"]
    assert good["ok"] is True and [s["step"] for s in good["steps"]] == STEPS
    # The API's step shape (docs/admin-api.md#testing-a-connection).
    for step in good["steps"]:
        assert {"step", "title", "status", "ms", "detail", "http_status"} <= set(step)
    assert good["steps"][3]["http_status"] == 200

    unknown = fhir_sidecar("test", "-c", str(path), "good", "nope")
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert "no connection named 'nope' (known: good, refused)" in unknown.stderr

    broken = write_config(tmp_path, {"connections": {"x": {"url": "https://x.example",
                                                           "colour": "red"}}}, name="bad.yaml")
    invalid = fhir_sidecar("test", "-c", str(broken))
    assert invalid.returncode == 2 and f"{broken}: connections.x.colour: unknown key" in \
        invalid.stderr


def test_an_oauth_connection_fetches_its_own_token(
        tmp_path: Path, pki: TestPKI, oauth_provider: OAuthTestProvider,
        bearer_validator: BearerValidator) -> None:
    client = oauth_provider.clients["basic"]
    (tmp_path / "secret").write_text(str(client.secret) + "\n")
    with fhir_upstream(pki.server(name="cli-test-oauth"), auth=bearer_validator) as upstream:
        path = write_config(tmp_path, {
            "admin": {"listen": None},
            "oauth": {"prov": {"token_url": oauth_provider.token_url,
                               "client_id": client.client_id, "client_secret_file": "secret",
                               "scopes": list(oauth_provider.scopes),
                               "tls": {"verify": "custom",
                                       "ca_bundle": str(oauth_provider.ca_bundle)}}},
            "connections": {"fhir": {"url": upstream.base_url, "auth": {"oauth": "prov"},
                                     "tls": {"verify": "custom",
                                             "ca_bundle": str(pki.ca_bundle_path)}}},
        })
        before = oauth_provider.stats()["token_requests"]
        result = fhir_sidecar("test", "-c", str(path), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    steps = json.loads(result.stdout)["connections"]["fhir"]["steps"]
    credentials = steps[2]
    assert credentials["status"] == "ok" and credentials["token_reused"] is False
    assert credentials["detail"].startswith("fetched a new token for oauth.prov")
    assert steps[3]["http_status"] == 200  # the server accepted the token
    assert oauth_provider.stats()["token_requests"] == before + 1


def test_admin_runs_the_steps_inside_the_running_sidecar(
        tmp_path: Path, pki: TestPKI, upstream_good: FhirTestServer,
        start_sidecar: StartSidecar) -> None:
    settings = config(tmp_path, pki, upstream_good)
    (tmp_path / "admin-token").write_text(ADMIN_TOKEN + "\n")
    settings["admin"] = {"listen": f"127.0.0.1:{free_port()}", "token_file": "admin-token"}
    sidecar = start_sidecar(settings, directory=tmp_path)
    token_file = str(tmp_path / "admin-token")

    result = fhir_sidecar("test", "--admin", sidecar.admin_url, "--token-file", token_file,
                          "--json")
    assert result.returncode == 1 and result.stdout, result.stdout + result.stderr
    found = json.loads(result.stdout)["connections"]
    assert found["good"]["ok"] is True and found["refused"]["ok"] is False
    assert [s["status"] for s in found["refused"]["steps"]] == ["ok", "ok", "ok", "failed"]
    # The sidecar ran them: its log has one connection_test line for each.
    assert sidecar.process.output.count('"event": "connection_test"') == 2

    one = fhir_sidecar("test", "--admin", sidecar.admin_url, "--token-file", token_file, "good")
    assert one.returncode == 0 and one.stdout.startswith("good: ok"), one.stdout + one.stderr

    (tmp_path / "wrong-token").write_text("not-the-admin-token\n")
    refused = fhir_sidecar("test", "--admin", sidecar.admin_url, "--token-file",
                           str(tmp_path / "wrong-token"))
    assert refused.returncode == 2 and "answered 401" in refused.stderr, refused.stderr
    assert "not-the-admin-token" not in refused.stderr
    missing = fhir_sidecar("test", "--admin", sidecar.admin_url)
    assert missing.returncode == 2 and "--token-file" in missing.stderr
    gone = fhir_sidecar("test", "--admin", f"http://127.0.0.1:{free_port()}", "--token-file",
                        token_file)
    assert gone.returncode == 2 and "cannot reach the admin listener" in gone.stderr


def test_tests_from_the_command_line_are_audit_records(
        tmp_path: Path, pki: TestPKI, upstream_good: FhirTestServer) -> None:
    settings = config(tmp_path, pki, upstream_good)
    settings["audit"] = {"file": "audit/audit.jsonl"}
    path = write_config(tmp_path, settings)
    state = tmp_path / "state"
    ran = fhir_sidecar("test", "-c", str(path), "--state-dir", str(state))
    assert ran.returncode == 1, ran.stdout + ran.stderr
    records = [json.loads(line) for line in
               (state / "audit" / "audit.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["object"], r["result"], r.get("error")) for r in records] == [
        ("test", "connections/good", "success", None),
        ("test", "connections/refused", "failure", "metadata")]
    assert records[0]["client"].startswith("command line (")
    assert UPSTREAM_PASSWORD not in (state / "audit" / "audit.jsonl").read_text()
    # Without --state-dir, where `run` writes by default (FHIR_SIDECAR_STATE_DIR here).
    other = tmp_path / "env-state"
    again = subprocess.run([sys.executable, "-m", "sidecar", "test", "-c", str(path), "good"],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "FHIR_SIDECAR_STATE_DIR": str(other)})
    assert again.returncode == 0, again.stdout + again.stderr
    assert len((other / "audit" / "audit.jsonl").read_text().splitlines()) == 1

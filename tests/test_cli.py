"""The command line as users meet it: check, run's failure modes, SIGTERM, mitmdump -s."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from support.constants import UPSTREAM_PASSWORD, UPSTREAM_USER
from support.pki import TestPKI
from support.sidecar_process import SidecarProcess, free_port, wait_until, write_config
from support.upstreams import Upstreams

REPO = Path(__file__).resolve().parents[1]


def sidecar_cmd(*args: str, env: dict[str, str] | None = None, timeout: float = 60
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def good_config(tmp_path: Path, pki: TestPKI, upstreams: Upstreams, **extra: object) -> Path:
    (tmp_path / "pw").write_text(UPSTREAM_PASSWORD + "\n")
    return write_config(tmp_path, {
        "admin": {"listen": None},
        "basic_auth": {"b": {"username": UPSTREAM_USER, "password_file": "pw"}},
        "connections": {"good": {
            "url": f"https://localhost:{upstreams.get('good').port}/fhir",
            "auth": {"basic": "b"},
            "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}, **extra}},
    })


def test_check_valid(tmp_path: Path, pki: TestPKI, upstreams: Upstreams) -> None:
    path = good_config(tmp_path, pki, upstreams)
    result = sidecar_cmd("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    # The whole line: "invalid" or "shape valid" would contain "valid" too.
    assert result.stdout.splitlines() == [
        f"{path}: valid (1 connections, 1 Basic and 0 OAuth definitions)"], result.stdout


def test_check_reports_every_problem_without_traceback(tmp_path: Path) -> None:
    path = write_config(tmp_path, {
        "basic_auth": {"b": {"username": "u", "password_file": "missing"}},
        "connections": {
            "a": {"url": "https://a.example", "auth": {"basic": "b", "oauth": "o"}},
            "c": {"url": "https://c.example", "auth": {"basic": "nope"}, "colour": "red"},
        },
    })
    result = sidecar_cmd("check", "-c", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert f"{path}: connections.a.auth: set basic or oauth, not both: HTTP has a single " \
           "Authorization header" in lines
    assert f"{path}: connections.c.colour: unknown key" in lines
    assert "Traceback" not in result.stderr


def test_check_via_environment_and_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = sidecar_cmd("check", env={"FHIR_SIDECAR_CONFIG": str(missing)})
    assert result.returncode == 2
    assert result.stderr.strip() == f"{missing}: config file not found"


def test_check_online_table(tmp_path: Path, pki: TestPKI, upstreams: Upstreams) -> None:
    path = good_config(tmp_path, pki, upstreams)
    result = sidecar_cmd("check", "--online", "-c", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CONNECTION" in result.stdout and "ok (TLSv1.3)" in result.stdout
    assert "fhir-sidecar demo internal CA" not in result.stdout  # the leaf's subject is shown

    bad = write_config(tmp_path, {
        "admin": {"listen": None},
        "connections": {"other": {
            "url": f"https://localhost:{upstreams.get('other_ca').port}/fhir",
            "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}},
    }, name="bad.yaml")
    failed = sidecar_cmd("check", "--online", "-c", str(bad))
    assert failed.returncode == 1
    assert f"is not signed by a CA in {pki.ca_bundle_path}" in failed.stdout


def test_run_refuses_a_taken_port(tmp_path: Path, pki: TestPKI, upstreams: Upstreams) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = good_config(tmp_path, pki, upstreams, listen=f"127.0.0.1:{port}")
        result = sidecar_cmd("run", "-c", str(path), "--state-dir", str(tmp_path / "s"))
    assert result.returncode == 2
    assert f"{path}: connections.good.listen: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_lets_in_flight_requests_finish(tmp_path: Path, pki: TestPKI,
                                                upstreams: Upstreams) -> None:
    port = free_port()
    path = good_config(tmp_path, pki, upstreams, listen=f"127.0.0.1:{port}")
    server = upstreams.get("good")
    with SidecarProcess(path, tmp_path / "state") as sidecar:
        results: list[httpx.Response] = []
        slow = threading.Thread(target=lambda: results.append(httpx.get(
            f"http://127.0.0.1:{port}/slow?seconds=2", timeout=30, trust_env=False)))
        slow.start()
        wait_until(lambda: any(r.path.startswith("/fhir/slow") for r in server.requests_seen),
                   message="the slow request to reach the upstream")
        sidecar.signal(signal.SIGTERM)
        slow.join(30)
        assert sidecar.stop() == 0
    assert results and results[0].status_code == 200
    assert sidecar.events("stopped")


def test_mitmdump_loads_the_addon(tmp_path: Path, pki: TestPKI, upstreams: Upstreams) -> None:
    port = free_port()
    path = good_config(tmp_path, pki, upstreams, listen=f"127.0.0.1:{port}")
    server = upstreams.get("good")
    mitmdump = Path(sys.executable).with_name("mitmdump")
    proc = subprocess.Popen(
        [str(mitmdump), "-q", "-s", str(REPO / "addons" / "fhir_sidecar.py"),
         "--set", f"sidecar_config={path}", "--set", f"confdir={tmp_path / 'mitm'}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def answered() -> httpx.Response | None:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/Patient/example", timeout=5,
                                 trust_env=False)
            except httpx.TransportError:
                return None
        response = wait_until(answered, 30, interval=0.2, message="mitmdump to listen")
        assert response.status_code == 200, response.text
        seen = server.requests_seen
        assert seen[-1].headers["authorization"].startswith("Basic ")
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.mark.parametrize("args", [("run",), ("check",)])
def test_no_config_is_a_clear_error(args: tuple[str, ...]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FHIR_SIDECAR_CONFIG"}
    result = subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True,
                            text=True, timeout=30, env=env)
    assert result.returncode == 2
    assert "no config file" in result.stderr


@pytest.mark.parametrize(("variable", "value", "allowed"), [
    ("FHIR_SIDECAR_LOG_LEVEL", "loud", "'debug', 'info', 'warning', 'error'"),
    ("FHIR_SIDECAR_LOG_FORMAT", "xml", "'json', 'text'"),
])
@pytest.mark.parametrize("command", ["run", "check"])
def test_a_bad_environment_variable_is_one_line_and_exit_2(
        tmp_path: Path, pki: TestPKI, upstreams: Upstreams, command: str, variable: str,
        value: str, allowed: str) -> None:
    config = good_config(tmp_path, pki, upstreams)
    result = sidecar_cmd(command, "-c", str(config), env={variable: value}, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"fhir-sidecar: {variable}: must be one of {allowed}"]
    assert "Traceback" not in result.stderr

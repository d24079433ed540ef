"""``fhir-sidecar demo``: everything on loopback, nothing to install or configure.

Starts a demo TLS FHIR server (its own CA, Basic auth), writes a demo config that shows every
TLS mode, runs the real sidecar command on it, sends sample calls through it, prints what
happened, and keeps serving until Ctrl-C (``--once`` exits after the sample calls).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from sidecar.config.yaml_io import dump, round_trip
from sidecar.testkit.auth_checks import basic_auth_check, bearer_token_check
from sidecar.testkit.fhir_server import FhirTestServer
from sidecar.testkit.pki import DemoPKI
from sidecar.testkit.ports import free_port
from sidecar.testkit.token_server import TokenServer

DEMO_USER = "demo-client"
READY_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class DemoCall:
    title: str
    method: str
    url: str
    via_proxy: bool = False
    body: dict[str, Any] | None = None


def write_demo_config(directory: Path, pki: DemoPKI, fhir_port: int, token_url: str,
                      secrets: dict[str, str]) -> tuple[Path, dict[str, int]]:
    secret_dir = directory / "secrets"
    secret_dir.mkdir(exist_ok=True)
    for name, value in secrets.items():
        (secret_dir / name).touch(mode=0o600)
        (secret_dir / name).write_text(value + "\n")
    ports = {name: free_port()
             for name in ("proxy", "custom", "skip", "default", "oauth", "admin")}
    config = {
        "proxy": {"listen": f"127.0.0.1:{ports['proxy']}"},
        "admin": {"listen": f"127.0.0.1:{ports['admin']}",
                  "token_file": "secrets/admin-token"},
        "basic_auth": {"demo-basic": {"username": DEMO_USER,
                                      "password_file": "secrets/demo-password"}},
        "oauth": {"demo-oauth": {
            "token_url": token_url, "client_id": DEMO_USER,
            "client_auth": "client_secret_basic",
            "client_secret_file": "secrets/demo-client-secret",
            "scopes": ["system/Patient.rs"],
            "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}},
        "connections": {
            "demo-custom": {
                "url": f"https://localhost:{fhir_port}/fhir",
                "listen": f"127.0.0.1:{ports['custom']}",
                "auth": {"basic": "demo-basic"},
                "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)},
            },
            "demo-skip": {
                "url": f"https://127.0.0.1:{fhir_port}/fhir",
                "listen": f"127.0.0.1:{ports['skip']}",
                "auth": {"basic": "demo-basic"},
                "tls": {"verify": "skip"},
            },
            "demo-oauth": {
                "url": f"https://localhost:{fhir_port}/fhir",
                "listen": f"127.0.0.1:{ports['oauth']}",
                "auth": {"oauth": "demo-oauth"},
                "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)},
            },
            "demo-default": {
                # The demo CA is not a public CA, so certifi's bundle must refuse this server.
                "url": f"https://localhost:{fhir_port}/public-ca-only",
                "listen": f"127.0.0.1:{ports['default']}",
                "auth": {"basic": "demo-basic"},
                "tls": {"verify": "default"},
            },
        },
    }
    path = directory / "demo.yaml"
    path.write_text(dump(round_trip(), config))
    return path, ports


def _demo_calls(ports: dict[str, int], fhir_port: int) -> list[DemoCall]:
    custom = f"http://127.0.0.1:{ports['custom']}"
    return [
        DemoCall("read capabilities (custom CA, Basic)", "GET", f"{custom}/metadata"),
        DemoCall("search patients (custom CA, Basic)", "GET", f"{custom}/Patient?name=chalmers"),
        DemoCall("create a patient (custom CA, Basic)", "POST", f"{custom}/Patient",
                 body={"resourceType": "Patient", "name": [{"family": "Demo"}]}),
        DemoCall("read a patient, forward proxy", "GET",
                 f"http://localhost:{fhir_port}/fhir/Patient/example", via_proxy=True),
        DemoCall("read a patient (custom CA, OAuth client credentials)", "GET",
                 f"http://127.0.0.1:{ports['oauth']}/Patient/example"),
        DemoCall("read a patient (TLS skip)", "GET",
                 f"http://127.0.0.1:{ports['skip']}/Patient/example"),
        DemoCall("default CA bundle refuses a private CA", "GET",
                 f"http://127.0.0.1:{ports['default']}/Patient/example"),
        DemoCall("host not configured, forward proxy", "GET",
                 "http://fhir.not-configured.example/Patient", via_proxy=True),
    ]


def _summarise(response: httpx.Response) -> str:
    error = response.headers.get("X-Sidecar-Error")
    try:
        body = response.json()
    except ValueError:
        return f"{len(response.content)} bytes"
    if error:
        return f"{error}: {body['issue'][0]['diagnostics']}"
    kind = body.get("resourceType", "?")
    if kind == "Bundle":
        return f"Bundle with {body.get('total', len(body.get('entry', [])))} match(es)"
    location = response.headers.get("Location")
    return f"{kind}" + (f", Location: {location}" if location else "")


def run_calls(calls: list[DemoCall], proxy_port: int) -> list[tuple[DemoCall, int, str]]:
    results = []
    # An app's own Authorization header is always replaced by the sidecar's.
    headers = {"Authorization": "Basic bm90OnVzZWQ="}
    with httpx.Client(timeout=30, trust_env=False) as direct, \
            httpx.Client(timeout=30, trust_env=False,
                         proxy=f"http://127.0.0.1:{proxy_port}") as proxied:
        for call in calls:
            client = proxied if call.via_proxy else direct
            response = client.request(call.method, call.url, json=call.body, headers=headers)
            results.append((call, response.status_code, _summarise(response)))
    return results


def print_report(results: list[tuple[DemoCall, int, str]], server: FhirTestServer) -> None:
    print("\nSample calls through the sidecar (the app sends plain HTTP, no credentials):\n")
    for call, status, summary in results:
        print(f"  {status}  {call.method:4} {call.url}")
        print(f"        {call.title}: {summary}")
    seen = server.requests_seen
    basic = [r for r in seen if str(r.headers.get("authorization")).startswith("Basic ")]
    bearer = [r for r in seen if str(r.headers.get("authorization")).startswith("Bearer ")]
    print(f"\nThe demo FHIR server received {len(seen)} request(s): {len(basic)} with the "
          f"sidecar's Basic credentials, {len(bearer)} with its OAuth bearer token.")


@contextlib.contextmanager
def _sidecar(config: Path, state_dir: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", "-c", str(config), "--state-dir",
         str(state_dir / "state"), "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ready = threading.Event()
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            with contextlib.suppress(ValueError):
                if json.loads(line).get("event") == "ready":
                    ready.set()
    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not ready.wait(0.1):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the sidecar did not start:\n" + "".join(lines))
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_demo(once: bool = False, state_dir: Path | None = None) -> int:
    with contextlib.ExitStack() as stack:
        if state_dir is None:
            state_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fhir-demo-")))
        state_dir.mkdir(parents=True, exist_ok=True)
        pki = DemoPKI(state_dir / "pki")
        secrets = {"demo-password": os.urandom(12).hex(),
                   "demo-client-secret": os.urandom(12).hex(),
                   "admin-token": os.urandom(16).hex()}
        tokens = stack.enter_context(TokenServer(
            pki.server(name="token-server"), DEMO_USER, secrets["demo-client-secret"]))
        server = FhirTestServer(pki.server(), auth=lambda h: _check(h, secrets, tokens))
        stack.enter_context(server)
        config, ports = write_demo_config(state_dir, pki, server.port, tokens.token_url,
                                          secrets)
        print(f"Demo FHIR server (HTTPS, private CA, Basic auth): {server.base_url}")
        print(f"Demo config: {config}")
        try:
            proc = stack.enter_context(_sidecar(config, state_dir))
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        results = run_calls(_demo_calls(ports, server.port), ports["proxy"])
        print_report(results, server)
        if once:
            return 0
        print("\nThe sidecar keeps serving. Try:\n"
              f"  curl http://127.0.0.1:{ports['custom']}/Patient/example\n"
              f"  curl -x http://127.0.0.1:{ports['proxy']} "
              f"http://localhost:{server.port}/fhir/Patient?name=chalmers\n"
              f"  curl http://127.0.0.1:{ports['admin']}/metrics\n"
              f"Dashboard: http://127.0.0.1:{ports['admin']}/ (log in with the token in "
              f"{state_dir / 'secrets' / 'admin-token'})\n"
              "Press Ctrl-C to stop.")
        with contextlib.suppress(KeyboardInterrupt):
            proc.wait()
    return 0


def _check(headers: Any, secrets: dict[str, str], tokens: TokenServer) -> str | None:
    """The demo server takes either the Basic password or a token from the demo endpoint."""
    if bearer_token_check(tokens.is_valid)(headers) is None:
        return None
    return basic_auth_check(DEMO_USER, secrets["demo-password"])(headers)

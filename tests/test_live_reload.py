"""No restarts: config, secrets and CA bundles change live, with real files and real servers."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.constants import basic_header
from support.fhir_routes import fhir_upstream
from support.pki import TestPKI
from support.sidecar_process import SidecarProcess, free_port, wait_until, write_config
from support.sidecars import StartSidecar

from sidecar.testkit.fhir_server import FhirTestServer

LIVE_DEADLINE = 5.0  # the promise is 2 s; allow for a loaded CI machine


@pytest.fixture(scope="module")
def open_upstream(pki: TestPKI) -> Iterator[FhirTestServer]:
    """An upstream that accepts any credentials and records what it received."""
    with fhir_upstream(pki.server(name="open")) as server:
        yield server


class Setup:
    sidecar: SidecarProcess

    def __init__(self, tmp: Path, pki: TestPKI, upstream: FhirTestServer):
        self.tmp, self.pki, self.upstream = tmp, pki, upstream
        self.port = free_port()
        (tmp / "secrets").mkdir()
        self.write_secret("pw", "first-password")
        self.config: dict[str, Any] = {
            "admin": {"listen": None},
            "basic_auth": {"b": {"username": "svc", "password_file": "secrets/pw"}},
            "connections": {"main": {
                "url": upstream.base_url, "listen": f"127.0.0.1:{self.port}",
                "auth": {"basic": "b"},
                "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}},
        }
        self.path = write_config(tmp, self.config)

    def start(self, start_sidecar: StartSidecar) -> None:
        """Runs the sidecar on ``config`` as it is now, until the test ends."""
        self.sidecar = start_sidecar(self.config, directory=self.tmp).process

    def write_secret(self, name: str, value: str) -> None:
        (self.tmp / "secrets" / name).write_text(value + "\n")

    def save(self) -> None:
        write_config(self.tmp, self.config)

    def get(self, port: int | None = None, path: str = "/metadata") -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{port or self.port}{path}", timeout=30,
                         trust_env=False)

    def last_auth(self) -> str | None:
        seen = self.upstream.requests_seen
        return seen[-1].headers.get("authorization") if seen else None

    def auth_becomes(self, expected: str) -> None:
        def check() -> bool:
            self.get()
            return self.last_auth() == expected
        wait_until(check, LIVE_DEADLINE, interval=0.1, message=f"Authorization {expected!r}")

    def reload_events(self, event: str) -> int:
        return len(self.sidecar.events(event))


@pytest.fixture
def setup(tmp_path: Path, pki: TestPKI, open_upstream: FhirTestServer,
          start_sidecar: StartSidecar) -> Setup:
    s = Setup(tmp_path, pki, open_upstream)
    s.start(start_sidecar)
    return s


def test_password_rewritten_in_place(setup: Setup) -> None:
    setup.auth_becomes(basic_header("svc", "first-password"))
    setup.write_secret("pw", "second-password")
    setup.auth_becomes(basic_header("svc", "second-password"))


def test_kubernetes_symlink_swap(tmp_path: Path, pki: TestPKI, open_upstream: FhirTestServer,
                                 start_sidecar: StartSidecar) -> None:
    # The layout kubelet gives a Secret volume: files are symlinks through ..data, and an
    # update swaps ..data to a new timestamped directory in one rename.
    secrets = tmp_path / "k8s"
    secrets.mkdir()

    def publish(version: str, password: str) -> None:
        data = secrets / f"..{version}"
        data.mkdir()
        (data / "password").write_text(password)
        tmp_link = secrets / "..data_tmp"
        tmp_link.symlink_to(data.name)
        os.replace(tmp_link, secrets / "..data")

    publish("2026_11_26_v1", "k8s-one")
    (secrets / "password").symlink_to("..data/password")
    s = Setup(tmp_path, pki, open_upstream)
    s.config["basic_auth"]["b"]["password_file"] = "k8s/password"
    s.save()
    s.start(start_sidecar)
    s.auth_becomes(basic_header("svc", "k8s-one"))
    publish("2026_11_26_v2", "k8s-two")
    s.auth_becomes(basic_header("svc", "k8s-two"))


def test_ca_bundle_replaced_at_same_path(setup: Setup) -> None:
    bundle = setup.tmp / "ca.pem"
    bundle.write_bytes(setup.pki.other_ca_bundle_path.read_bytes())
    setup.config["connections"]["main"]["tls"]["ca_bundle"] = "ca.pem"
    setup.save()
    wait_until(lambda: setup.get().headers.get("X-Sidecar-Error") == "upstream-tls",
               LIVE_DEADLINE, interval=0.1, message="the unrelated CA to be refused")
    bundle.write_bytes(setup.pki.ca_bundle_path.read_bytes())
    wait_until(lambda: setup.get().status_code == 200, LIVE_DEADLINE, interval=0.1,
               message="the replaced bundle to be trusted")


def test_connections_and_listeners_added_and_removed(setup: Setup) -> None:
    new_port = free_port()
    setup.config["connections"]["extra"] = {
        **setup.config["connections"]["main"], "listen": f"127.0.0.1:{new_port}",
        "auth": {}}

    def answers(port: int) -> bool:
        try:
            return setup.get(port).status_code == 200
        except httpx.TransportError:
            return False

    setup.save()
    wait_until(lambda: answers(new_port), LIVE_DEADLINE, interval=0.1, message="new listener")
    assert setup.last_auth() is None  # the new connection has no credentials

    del setup.config["connections"]["extra"]
    setup.save()
    wait_until(lambda: not answers(new_port), LIVE_DEADLINE, interval=0.1,
               message="listener removal")
    assert setup.get().status_code == 200


def test_assignment_switched_to_none_and_back(setup: Setup) -> None:
    setup.auth_becomes(basic_header("svc", "first-password"))
    setup.config["connections"]["main"]["auth"] = {}
    setup.save()
    setup.auth_becomes(None)  # type: ignore[arg-type]
    setup.config["connections"]["main"]["auth"] = {"basic": "b"}
    setup.save()
    setup.auth_becomes(basic_header("svc", "first-password"))


def test_invalid_change_keeps_last_good_and_recovers(setup: Setup) -> None:
    setup.path.write_text("connections: [this is: not valid\n")
    record = setup.sidecar.wait_for_event("config_rejected", timeout=LIVE_DEADLINE)
    assert record["message"].startswith(f"{setup.path}: line ")
    # Still serving the last good config, credentials included (the upstream takes any).
    assert setup.get().status_code == 200
    assert setup.last_auth() == basic_header("svc", "first-password")

    # A config naming a secret file that does not exist yet, then the file appears.
    setup.config["basic_auth"]["b"]["password_file"] = "secrets/later"
    setup.save()
    setup.sidecar.wait_for_event(
        "config_rejected", lambda r: "secrets/later" in r["message"], timeout=LIVE_DEADLINE)
    assert setup.get().status_code == 200
    assert setup.last_auth() == basic_header("svc", "first-password")
    setup.write_secret("later", "arrived")
    setup.auth_becomes(basic_header("svc", "arrived"))


def test_sighup_reloads_immediately(setup: Setup) -> None:
    before = setup.reload_events("config_reloaded")
    setup.sidecar.signal(signal.SIGHUP)
    wait_until(lambda: setup.reload_events("config_reloaded") > before, LIVE_DEADLINE,
               message="a reload after SIGHUP")


def test_ten_reloads_under_traffic_fail_no_request(setup: Setup) -> None:
    failures: list[str] = []
    done = threading.Event()
    counts = [0] * 4

    def client(index: int) -> None:
        with httpx.Client(timeout=30, trust_env=False) as http:
            for _ in range(2000):  # bounded; normally stopped by `done` long before
                if done.is_set():
                    return
                try:
                    response = http.get(f"http://127.0.0.1:{setup.port}/Patient/example")
                    if response.status_code != 200:
                        failures.append(f"{response.status_code} {response.text[:200]}")
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                counts[index] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        for i in range(10):
            before = setup.reload_events("config_reloaded")
            setup.write_secret("pw", f"rotated-{i}")

            def reloaded(b: int = before) -> bool:
                return setup.reload_events("config_reloaded") > b

            wait_until(reloaded, LIVE_DEADLINE, message=f"reload {i}")
    finally:
        done.set()
        for thread in threads:
            thread.join(30)
    assert failures == []
    assert sum(counts) > 40
    setup.auth_becomes(basic_header("svc", "rotated-9"))


def test_slow_request_survives_a_reload(setup: Setup) -> None:
    # The upstream holds its answer longer than a reload may take (LIVE_DEADLINE), so the
    # order is: request reaches the upstream, reload done, answer arrives; checked below.
    hold_seconds = LIVE_DEADLINE + 3
    results: list[httpx.Response] = []
    slow = threading.Thread(
        target=lambda: results.append(setup.get(path=f"/slow?seconds={hold_seconds:g}")))
    slow.start()
    seen = wait_until(lambda: [r for r in setup.upstream.requests_seen
                               if r.path.startswith("/fhir/slow")], message="slow request")
    assert seen[0].headers.get("authorization") == basic_header("svc", "first-password")
    before = setup.reload_events("config_reloaded")
    setup.write_secret("pw", "during-slow")
    wait_until(lambda: setup.reload_events("config_reloaded") > before, LIVE_DEADLINE,
               message="the reload")
    assert slow.is_alive() and not results, "the slow request ended before the reload"
    setup.auth_becomes(basic_header("svc", "during-slow"))  # the new config serves meanwhile
    slow.join(30)
    assert results and results[0].status_code == 200


def test_secret_deleted_then_renamed_into_place(setup: Setup) -> None:
    setup.auth_becomes(basic_header("svc", "first-password"))
    secret = setup.tmp / "secrets" / "pw"
    secret.unlink()
    setup.sidecar.wait_for_event(
        "config_rejected", lambda r: "secrets/pw" in r["message"], timeout=LIVE_DEADLINE)
    setup.auth_becomes(basic_header("svc", "first-password"))  # the last good config keeps serving

    staged = setup.tmp / "secrets" / ".pw.new"
    staged.write_text("renamed-in\n")
    os.replace(staged, secret)  # how most tools write a file atomically
    setup.auth_becomes(basic_header("svc", "renamed-in"))


def _reload_failures(admin_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{admin_port}/metrics", timeout=10, trust_env=False).text
    for line in text.splitlines():
        if line.startswith('fhir_sidecar_config_reloads_total{result="failure"}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no reload failure counter in /metrics")


@pytest.mark.parametrize("empty_text", ["", "  \n\t\n"])
def test_config_truncated_under_traffic_keeps_serving(tmp_path: Path, pki: TestPKI,
                                                      open_upstream: FhirTestServer,
                                                      start_sidecar: StartSidecar,
                                                      empty_text: str) -> None:
    s = Setup(tmp_path, pki, open_upstream)
    admin_port = free_port()
    s.config["admin"] = {"listen": f"127.0.0.1:{admin_port}"}
    s.save()
    good_text = s.path.read_text()
    failures: list[str] = []
    answered = [0]
    done = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30, trust_env=False) as http:
            for _ in range(5000):  # bounded; normally stopped by `done` long before
                if done.is_set():
                    return
                try:
                    response = http.get(f"http://127.0.0.1:{s.port}/Patient/example")
                    if response.status_code != 200:
                        failures.append(f"{response.status_code} {response.text[:200]}")
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                answered[0] += 1

    s.start(start_sidecar)
    failed_before = _reload_failures(admin_port)
    traffic = threading.Thread(target=client)
    traffic.start()
    try:
        with s.path.open("w", encoding="utf-8") as out:  # truncated in place
            out.write(empty_text)
        record = s.sidecar.wait_for_event(
            "config_rejected", lambda r: "is empty" in r.get("message", ""),
            timeout=LIVE_DEADLINE)
        assert record["message"].startswith(f"{s.path}: the config file is empty")
        wait_until(lambda: _reload_failures(admin_port) > failed_before, LIVE_DEADLINE,
                   message="the failed reload to be counted")
        served_while_empty = answered[0]
        wait_until(lambda: answered[0] > served_while_empty + 20, LIVE_DEADLINE,
                   message="requests answered while the file is empty")

        reloads = s.reload_events("config_reloaded")
        s.path.write_text(good_text, encoding="utf-8")
        wait_until(lambda: s.reload_events("config_reloaded") > reloads, LIVE_DEADLINE,
                   message="the restored config to be reloaded")
    finally:
        done.set()
        traffic.join(30)
    assert failures == []
    assert s.get().status_code == 200
    assert s.last_auth() == basic_header("svc", "first-password")

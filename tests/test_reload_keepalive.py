"""Reloads under keep-alive traffic: no request is left without an answer, none waits on an
upstream connection a reload retired, and no listener is closed or re-bound.

The way it once broke (issue 25): keep-alive app clients on changed and unchanged connections,
while the config is rewritten by rename and in place, a Kubernetes-style secret directory is
swapped, SIGHUP arrives, and a connection's URL and credential flip back and forth. A loop of
fixed size, never a sleep; a hung request is caught by a bound far below the client timeout.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from support.constants import basic_header
from support.fhir_routes import fhir_upstream
from support.pki import TestPKI
from support.sidecar_process import free_port, wait_until, write_config
from support.sidecars import RunningSidecar, StartSidecar
from support.sockets import bound_sockets, connections_to

from sidecar.testkit.fhir_server import FhirTestServer

RELOADS = 32  # at least 30
MIN_REQUESTS = 10_000
CLIENT_TIMEOUT_SECONDS = 30.0
# The upstream answers in milliseconds. A request that takes this long waited on something a
# reload retired; a loaded CI machine stays far below it.
HUNG_SECONDS = 5.0
RELOAD_DEADLINE = 10.0


@pytest.fixture(scope="module")
def open_upstream(pki: TestPKI) -> Iterator[FhirTestServer]:
    """Accepts any credentials and records what it received (its own certificate names both
    ``localhost`` and ``127.0.0.1``, so a URL can flip between the two)."""
    with fhir_upstream(pki.server(name="keepalive")) as server:
        yield server


def _publish_k8s_secret(directory: Path, version: int, password: str) -> None:
    """What kubelet does to a Secret volume: a new timestamped directory, ``..data`` swapped
    to it in one rename; the file names are symlinks through ``..data``."""
    data = directory / f"..v{version}"
    data.mkdir()
    (data / "password").write_text(password)
    staged = directory / "..data_tmp"
    staged.symlink_to(data.name)
    os.replace(staged, directory / "..data")


class Traffic:
    """One keep-alive client (``requests.Session``) per connection, in its own thread."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.ports = ports
        self.done = threading.Event()
        self.count = 0
        self.failures: list[str] = []
        self.slowest = 0.0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(name,), daemon=True)
                         for name in ports]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        for thread in self._threads:
            thread.join(CLIENT_TIMEOUT_SECONDS + 5)

    def _client(self, name: str) -> None:
        url = f"http://127.0.0.1:{self.ports[name]}/Patient/example"
        with requests.Session() as session:
            session.trust_env = False
            for _ in range(MIN_REQUESTS * 3):  # bounded; `done` stops it long before
                if self.done.is_set():
                    return
                started = time.monotonic()
                try:
                    response = session.get(url, timeout=CLIENT_TIMEOUT_SECONDS)
                    problem = (None if response.status_code == 200
                               else f"{response.status_code} {response.text[:200]}")
                except requests.RequestException as exc:
                    problem = repr(exc)
                took = time.monotonic() - started
                with self._lock:
                    self.count += 1
                    self.slowest = max(self.slowest, took)
                    if problem is not None:
                        self.failures.append(f"{name}: {problem}")
                    elif took > HUNG_SECONDS:
                        self.failures.append(f"{name}: answered after {took:.1f} s")


class Rig:
    def __init__(self, tmp: Path, pki: TestPKI, upstream: FhirTestServer) -> None:
        self.tmp = tmp
        self.upstream = upstream
        (tmp / "secrets").mkdir()
        (tmp / "secrets" / "a").write_text("password-a\n")
        (tmp / "secrets" / "b").write_text("password-b\n")
        self.k8s = tmp / "k8s"
        self.k8s.mkdir()
        _publish_k8s_secret(self.k8s, 0, "password-k")
        (self.k8s / "password").symlink_to("..data/password")
        tls = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
        self.urls = (f"https://localhost:{upstream.port}/fhir",
                     f"https://127.0.0.1:{upstream.port}/fhir")
        self.config: dict[str, Any] = {
            "admin": {"listen": f"127.0.0.1:{free_port()}"},
            "basic_auth": {
                "a": {"username": "user-a", "password_file": "secrets/a"},
                "b": {"username": "user-b", "password_file": "secrets/b"},
                "k": {"username": "user-k", "password_file": "k8s/password"},
            },
            "connections": {
                name: {"url": self.urls[0], "listen": f"127.0.0.1:{free_port()}",
                       "auth": {"basic": auth}, "tls": dict(tls)}
                for name, auth in (("one", "a"), ("two", "b"), ("kube", "k"))},
        }
        self.path = write_config(tmp, self.config)
        self.sidecar: RunningSidecar

    def reloads(self) -> int:
        return len(self.sidecar.process.events("config_reloaded"))

    def rewrite_in_place(self) -> None:
        """The way an editor without atomic save writes: truncate, then write."""
        self.path.write_text(yaml.safe_dump(self.config, sort_keys=False), encoding="utf-8")

    def change(self, step: int) -> Callable[[], object]:
        """The ``step``-th change of the loop, and how it is made."""
        kind = step % 5
        conns = self.config["connections"]
        if kind == 0:  # a username, by atomic rename; `two` and `kube` are unchanged
            self.config["basic_auth"]["a"]["username"] = f"user-a-{step}"
            return lambda: write_config(self.tmp, self.config)
        if kind == 1:  # a username, rewritten in place
            self.config["basic_auth"]["b"]["username"] = f"user-b-{step}"
            return self.rewrite_in_place
        if kind == 2:  # the Secret volume's ..data swap
            return lambda: _publish_k8s_secret(self.k8s, step, f"password-k-{step}")
        if kind == 3:  # URL and credential of `one` flip together
            conns["one"]["url"] = self.urls[(step // 5) % 2]
            conns["one"]["auth"] = {"basic": "b" if conns["one"]["auth"]["basic"] == "a"
                                    else "a"}
            return lambda: write_config(self.tmp, self.config)
        return lambda: self.sidecar.process.signal(signal.SIGHUP)


def test_reloads_under_keepalive_traffic_leave_no_request_unanswered(
        tmp_path: Path, pki: TestPKI, open_upstream: FhirTestServer,
        start_sidecar: StartSidecar) -> None:
    rig = Rig(tmp_path, pki, open_upstream)
    rig.sidecar = start_sidecar(rig.config, directory=tmp_path)
    pid = rig.sidecar.process.proc.pid  # type: ignore[union-attr]
    sockets_before = bound_sockets(pid)
    assert set(rig.sidecar.ports.values()) <= {s.port for s in sockets_before}

    with Traffic(rig.sidecar.ports) as traffic:
        for step in range(RELOADS):
            before = rig.reloads()
            rig.change(step)()
            wait_until(lambda b=before: rig.reloads() > b, RELOAD_DEADLINE,  # type: ignore[misc]
                       message=f"reload {step}")
            # Each reload is met by traffic on every connection before the next one.
            seen = traffic.count
            wait_until(lambda s=seen: traffic.count >= s + 30 or traffic.failures,  # type: ignore[misc]
                       RELOAD_DEADLINE, message=f"traffic after reload {step}")
            if traffic.failures:
                break
        wait_until(lambda: traffic.count >= MIN_REQUESTS or traffic.failures,
                   300, interval=0.2, message=f"{MIN_REQUESTS} requests")

    assert traffic.failures == [], (
        f"{len(traffic.failures)} of {traffic.count} requests failed: {traffic.failures[:5]}")
    assert traffic.count >= MIN_REQUESTS
    assert rig.reloads() >= RELOADS
    # The listeners were never closed or re-bound: the very same sockets (inodes).
    assert bound_sockets(pid) == sockets_before
    assert not rig.sidecar.process.events("listen_failed")
    assert "address already in use" not in rig.sidecar.process.output
    # The last change of each kind took effect.
    user_a = rig.config["basic_auth"]["a"]["username"]
    with requests.Session() as session:
        session.trust_env = False
        session.get(f"http://127.0.0.1:{rig.sidecar.ports['two']}/metadata", timeout=10)
    assert open_upstream.requests_seen[-1].headers.get("authorization") == basic_header(
        rig.config["basic_auth"]["b"]["username"], "password-b")
    assert user_a.startswith("user-a-")


def _reload(sidecar: RunningSidecar) -> None:
    before = len(sidecar.process.events("config_reloaded"))
    sidecar.process.signal(signal.SIGHUP)
    wait_until(lambda: len(sidecar.process.events("config_reloaded")) > before,
               RELOAD_DEADLINE, message="the reload")


def test_an_idle_keepalive_connection_loses_its_retired_upstream_at_the_reload(
        tmp_path: Path, pki: TestPKI, open_upstream: FhirTestServer,
        start_sidecar: StartSidecar) -> None:
    rig = Rig(tmp_path, pki, open_upstream)
    sidecar = start_sidecar(rig.config, directory=tmp_path)
    pid = sidecar.process.proc.pid  # type: ignore[union-attr]
    with requests.Session() as app:
        app.trust_env = False
        url = f"http://127.0.0.1:{sidecar.ports['one']}/Patient/example"
        assert app.get(url, timeout=10).status_code == 200
        assert connections_to(pid, open_upstream.port) == 1  # kept alive, idle
        _reload(sidecar)
        # Retired and idle: closed at once, while the app's own connection stays open.
        wait_until(lambda: connections_to(pid, open_upstream.port) == 0, RELOAD_DEADLINE,
                   message="the retired upstream connection to close")
        for _ in range(8):  # more reloads than mitmproxy's five connections per address
            assert app.get(url, timeout=HUNG_SECONDS).status_code == 200
            _reload(sidecar)
        assert app.get(url, timeout=HUNG_SECONDS).status_code == 200
        assert connections_to(pid, open_upstream.port) == 1


def test_a_request_in_flight_at_the_reload_finishes_then_its_upstream_closes(
        tmp_path: Path, pki: TestPKI, open_upstream: FhirTestServer,
        start_sidecar: StartSidecar) -> None:
    rig = Rig(tmp_path, pki, open_upstream)
    rig.sidecar = sidecar = start_sidecar(rig.config, directory=tmp_path)
    pid = sidecar.process.proc.pid  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{sidecar.ports['two']}"
    with requests.Session() as app:
        app.trust_env = False
        results: list[requests.Response] = []
        slow = threading.Thread(target=lambda: results.append(
            app.get(f"{base}/slow?seconds=3", timeout=CLIENT_TIMEOUT_SECONDS)))
        slow.start()
        wait_until(lambda: any(r.path.startswith("/fhir/slow")
                               for r in open_upstream.requests_seen), message="slow request")
        rig.config["basic_auth"]["b"]["username"] = "during-the-slow-request"
        before = rig.reloads()
        write_config(tmp_path, rig.config)
        wait_until(lambda: rig.reloads() > before, RELOAD_DEADLINE, message="the reload")
        # The request in flight keeps its upstream connection until it has its answer.
        assert slow.is_alive() and connections_to(pid, open_upstream.port) == 1
        slow.join(CLIENT_TIMEOUT_SECONDS)
        assert results and results[0].status_code == 200
        # Then the retired connection closes, though the app keeps its connection open.
        wait_until(lambda: connections_to(pid, open_upstream.port) == 0, RELOAD_DEADLINE,
                   message="the retired upstream connection to close")
        assert app.get(f"{base}/metadata", timeout=HUNG_SECONDS).status_code == 200
        assert open_upstream.requests_seen[-1].headers.get("authorization") == basic_header(
            "during-the-slow-request", "password-b")

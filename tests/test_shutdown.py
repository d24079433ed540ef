"""Rolling updates without dropped requests: what SIGTERM does to the real sidecar process.

The phases (sidecar/runtime/shutdown.py): /readyz answers 503 at once while the listeners keep
accepting for shutdown.delay_seconds; then they close (connection refused) and requests in
flight get up to shutdown.drain_seconds; the exit code is 0.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.constants import UPSTREAM_PASSWORD, UPSTREAM_USER
from support.pki import TestPKI
from support.sidecar_process import SidecarProcess, free_port, wait_until, write_config
from support.upstreams import Upstreams

from sidecar.config.errors import ConfigError
from sidecar.config.loader import load_config
from sidecar.runtime.shutdown import ShutdownTimings, shutdown_timings


@dataclass
class Ports:
    admin: int
    listen: int


def _config(tmp_path: Path, pki: TestPKI, upstreams: Upstreams, ports: Ports,
            shutdown: dict[str, float] | None) -> Path:
    (tmp_path / "pw").write_text(UPSTREAM_PASSWORD + "\n")
    config: dict[str, Any] = {
        "admin": {"listen": f"127.0.0.1:{ports.admin}"},
        "basic_auth": {"b": {"username": UPSTREAM_USER, "password_file": "pw"}},
        "connections": {"good": {
            "url": f"https://localhost:{upstreams.get('good').port}/fhir",
            "listen": f"127.0.0.1:{ports.listen}", "auth": {"basic": "b"},
            "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}},
    }
    if shutdown is not None:
        config["shutdown"] = shutdown
    return write_config(tmp_path, config)


def _start(tmp_path: Path, pki: TestPKI, upstreams: Upstreams,
           shutdown: dict[str, float] | None, env: dict[str, str] | None = None
           ) -> tuple[SidecarProcess, Ports]:
    ports = Ports(free_port(), free_port())
    path = _config(tmp_path, pki, upstreams, ports, shutdown)
    sidecar = SidecarProcess(path, tmp_path / "state", env=env)
    sidecar.env.pop("FHIR_SIDECAR_DRAIN_SECONDS", None)
    sidecar.env.update(env or {})
    return sidecar.start(), ports


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def _readyz(admin: int) -> int:
    return httpx.get(f"http://127.0.0.1:{admin}/readyz", timeout=5, trust_env=False).status_code


@dataclass
class Outcome:
    started: float
    status: int | None  # None: the request failed (refused, reset, timed out)
    connection_header: str | None = None


class ContinuousClients:
    """Requests one after another until stopped: each on a new connection, like clients whose
    Service routes every connection anew, plus one client that keeps its connection alive."""

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}/metadata"
        self.fresh: list[Outcome] = []
        self.kept_alive: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._fresh_loop, daemon=True),
                         threading.Thread(target=self._kept_alive_loop, daemon=True)]

    def __enter__(self) -> ContinuousClients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _fresh_loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with httpx.Client(trust_env=False, timeout=10) as client:
                    status: int | None = client.get(self.url).status_code
            except httpx.TransportError:
                status = None
            self.fresh.append(Outcome(started, status))

    def _kept_alive_loop(self) -> None:
        with httpx.Client(trust_env=False, timeout=10) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = client.get(self.url)
                    outcome = Outcome(started, response.status_code,
                                      response.headers.get("connection"))
                except httpx.TransportError:
                    outcome = Outcome(started, None)
                self.kept_alive.append(outcome)


DELAY, DRAIN = 3.0, 15.0


def test_sigterm_keeps_serving_for_the_delay_then_refuses_and_drains(
        tmp_path: Path, pki: TestPKI, upstreams: Upstreams) -> None:
    sidecar, ports = _start(tmp_path, pki, upstreams,
                            {"delay_seconds": DELAY, "drain_seconds": DRAIN})
    server = upstreams.get("good")
    slow_seconds = DELAY + 3  # still in flight when the listeners close
    slow_result: list[int] = []

    def slow_request() -> None:
        url = f"http://127.0.0.1:{ports.listen}/slow?seconds={slow_seconds}"
        slow_result.append(httpx.get(url, timeout=60, trust_env=False).status_code)

    try:
        with ContinuousClients(ports.listen) as clients:
            wait_until(lambda: len(clients.fresh) >= 3 and len(clients.kept_alive) >= 3, 30,
                       message="continuous requests to be answered before SIGTERM")
            slow = threading.Thread(target=slow_request, daemon=True)
            slow.start()
            wait_until(lambda: any(r.path.startswith("/fhir/slow") for r in server.requests_seen),
                       30, message="the slow request to reach the upstream")

            signalled = time.monotonic()
            sidecar.signal(signal.SIGTERM)
            wait_until(lambda: _readyz(ports.admin) == 503, 5, interval=0.01,
                       message="/readyz to answer 503 after SIGTERM")
            not_ready_after = time.monotonic() - signalled

            wait_until(lambda: _refused(ports.listen), DELAY + 10, interval=0.02,
                       message="the listener to refuse connections after the delay")
            refused_after = time.monotonic() - signalled

        assert not_ready_after < 1.0, f"/readyz answered 503 only after {not_ready_after:.2f} s"
        assert refused_after >= DELAY, f"refused {refused_after:.2f} s after SIGTERM"

        # Every request that started within the delay was answered, on both kinds of client.
        # (Requests started in its last half second may meet the closing listener.)
        window = (signalled, signalled + DELAY - 0.5)
        in_delay = [o for o in clients.fresh if window[0] <= o.started <= window[1]]
        assert len(in_delay) >= 3, f"only {len(in_delay)} new-connection requests in the delay"
        assert [o.status for o in in_delay] == [200] * len(in_delay)
        kept = [o for o in clients.kept_alive if window[0] <= o.started <= window[1]]
        assert kept and [o.status for o in kept] == [200] * len(kept)
        # Once draining, responses close kept-alive connections, so clients reconnect elsewhere.
        late = [o for o in kept if o.started > signalled + 1.0]
        assert late and all(o.connection_header == "close" for o in late), late
        before = [o for o in clients.kept_alive if o.started < signalled]
        assert before and all(o.connection_header != "close" for o in before[:-1])

        # The request in flight when the listeners closed finishes within the drain time.
        slow.join(DRAIN + 10)
        assert slow_result == [200]
        assert sidecar.proc is not None
        assert sidecar.proc.wait(DRAIN + 10) == 0
    finally:
        assert sidecar.stop() == 0
    draining = sidecar.wait_for_event("draining")
    assert draining["delay_seconds"] == DELAY and draining["drain_seconds"] == DRAIN
    assert sidecar.wait_for_event("listeners_closed")["in_flight"] >= 1  # the slow one
    assert sidecar.events("stopped") and not sidecar.events("drain_timeout")


def test_requests_longer_than_the_drain_are_cut_off_and_the_exit_is_still_clean(
        tmp_path: Path, pki: TestPKI, upstreams: Upstreams) -> None:
    sidecar, ports = _start(tmp_path, pki, upstreams, {"delay_seconds": 0, "drain_seconds": 1})
    server = upstreams.get("good")
    outcome: list[str] = []

    def slow_request() -> None:
        try:
            httpx.get(f"http://127.0.0.1:{ports.listen}/slow?seconds=30", timeout=60,
                      trust_env=False)
            outcome.append("answered")
        except httpx.TransportError:
            outcome.append("cut off")

    slow = threading.Thread(target=slow_request, daemon=True)
    slow.start()
    try:
        wait_until(lambda: any("seconds=30" in r.path for r in server.requests_seen), 30,
                   message="the slow request to reach the upstream")
        signalled = time.monotonic()
        sidecar.signal(signal.SIGTERM)
        assert sidecar.proc is not None
        assert sidecar.proc.wait(20) == 0
        stopped_after = time.monotonic() - signalled
    finally:
        assert sidecar.stop() == 0
    slow.join(10)
    assert outcome == ["cut off"]
    assert stopped_after < 15, f"the stop took {stopped_after:.1f} s with a 1 s drain"
    assert sidecar.wait_for_event("drain_timeout")["in_flight"] == 1


def test_a_second_signal_cuts_the_delay_short(
        tmp_path: Path, pki: TestPKI, upstreams: Upstreams) -> None:
    sidecar, ports = _start(tmp_path, pki, upstreams, {"delay_seconds": 300})
    try:
        sidecar.signal(signal.SIGTERM)
        sidecar.wait_for_event("draining")
        assert _refused(ports.listen) is False, "the listener closed before the delay ended"
        sidecar.signal(signal.SIGINT)
        assert sidecar.proc is not None
        assert sidecar.proc.wait(20) == 0
    finally:
        assert sidecar.stop() == 0
    assert _refused(ports.listen)


def test_the_deprecated_drain_variable_still_sets_the_drain(
        tmp_path: Path, pki: TestPKI, upstreams: Upstreams) -> None:
    sidecar, _ = _start(tmp_path, pki, upstreams, None,
                        env={"FHIR_SIDECAR_DRAIN_SECONDS": "2.5"})
    try:
        warning = sidecar.wait_for_event("deprecated_setting")
        assert "FHIR_SIDECAR_DRAIN_SECONDS is deprecated" in warning["message"]
        assert "shutdown.drain_seconds" in warning["message"]
    finally:
        assert sidecar.stop() == 0
    draining = sidecar.wait_for_event("draining")
    assert draining["drain_seconds"] == 2.5 and draining["delay_seconds"] == 0


# -- the plain parts ---------------------------------------------------------------------------

def _load(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(path)


def test_defaults_and_the_environment_alias(tmp_path: Path) -> None:
    unset = _load(tmp_path, "connections: {}\n")
    assert shutdown_timings(unset, None) == (ShutdownTimings(0, 30), None)
    timings, warning = shutdown_timings(unset, 7)
    assert timings == ShutdownTimings(0, 7)
    assert warning is not None and "deprecated" in warning
    in_file = _load(tmp_path, "shutdown: {delay_seconds: 5, drain_seconds: 20}\n")
    timings, warning = shutdown_timings(in_file, 7)
    assert timings == ShutdownTimings(5, 20)  # the file wins over the old variable
    assert warning is not None and "ignored" in warning
    assert ShutdownTimings(5, 30).grace_seconds == 40
    assert ShutdownTimings(0.5, 0.2).grace_seconds == 6


@pytest.mark.parametrize(("text", "field"), [
    ("shutdown: {delay_seconds: -1}\n", "shutdown.delay_seconds"),
    ("shutdown: {drain_seconds: soon}\n", "shutdown.drain_seconds"),
    ("shutdown: {drain: 3}\n", "shutdown.drain"),
])
def test_bad_shutdown_settings_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ConfigError) as failure:
        _load(tmp_path, text)
    assert f"{tmp_path / 'c.yaml'}: {field}:" in str(failure.value)


def test_an_admin_change_during_the_drain_opens_no_listener(
        tmp_path: Path, pki: TestPKI, upstreams: Upstreams) -> None:
    token = "drain-admin-token-Zt41"
    (tmp_path / "admin-token").write_text(token + "\n")
    ports = Ports(free_port(), free_port())
    path = _config(tmp_path, pki, upstreams, ports, {"delay_seconds": 0, "drain_seconds": 30})
    text = path.read_text().replace(f"listen: 127.0.0.1:{ports.admin}",
                                    f"listen: 127.0.0.1:{ports.admin}\n  token_file: admin-token")
    assert "token_file" in text
    path.write_text(text)
    sidecar = SidecarProcess(path, tmp_path / "state").start()
    server = upstreams.get("good")
    slow = threading.Thread(target=lambda: httpx.get(
        f"http://127.0.0.1:{ports.listen}/slow?seconds=20", timeout=60, trust_env=False),
        daemon=True)
    slow.start()
    try:
        wait_until(lambda: any("seconds=20" in r.path for r in server.requests_seen), 30,
                   message="the slow request to reach the upstream")
        sidecar.signal(signal.SIGTERM)
        sidecar.wait_for_event("listeners_closed", timeout=20)
        assert _refused(ports.listen)
        # The slow request holds the drain open; a change through the admin API now adds a
        # connection with a listener of its own and moves nothing back.
        new_port = free_port()
        answer = httpx.put(
            f"http://127.0.0.1:{ports.admin}/api/connections/late",
            json={"url": server.base_url, "listen": f"127.0.0.1:{new_port}",
                  "tls": {"verify": "skip"}},
            headers={"Authorization": f"Bearer {token}"}, timeout=20, trust_env=False)
        assert answer.status_code in (201, 503), answer.text
        # Listeners open asynchronously after a reload: watch the ports for a while.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert _refused(new_port), "a listener opened after shutdown closed them"
            assert _refused(ports.listen), "a closed listener opened again"
            time.sleep(0.05)  # pacing the watch, not waiting for anything
    finally:
        assert sidecar.stop() == 0
    slow.join(30)

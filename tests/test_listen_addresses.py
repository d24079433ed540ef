"""A listen address is a (host, port): listeners that share a port on different hosts, and
forward-proxy connections that differ only by port, each reach their own upstream only.

Validation, binding, routing and reload read one list of listeners
(``SidecarConfig.listeners``); these tests drive the real process and raw upstreams that record
what arrived.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.constants import basic_header
from support.pki import TestPKI
from support.raw_upstream import RawRecordingUpstream, basic_credentials
from support.sidecar_process import SidecarProcess, free_port, wait_until, write_config
from support.sidecars import StartSidecar

from sidecar.config.models import ListenAddress
from sidecar.request.routing import Router, Upstream

SECOND_LOOPBACK = "127.0.0.2"  # all of 127.0.0.0/8 is loopback on Linux
RELOAD_DEADLINE = 10.0


def _get(host: str, port: int, target: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read())
    finally:
        conn.close()


def _secrets(tmp: Path, **passwords: str) -> dict[str, Any]:
    (tmp / "secrets").mkdir(exist_ok=True)
    definitions = {}
    for name, password in passwords.items():
        (tmp / "secrets" / name).write_text(password + "\n")
        definitions[name] = {"username": f"user-{name}", "password_file": f"secrets/{name}"}
    return definitions


def _only_own_credentials(up: RawRecordingUpstream, own: str, other: str) -> None:
    received = up.all_bytes()
    assert basic_header(f"user-{own}", f"pw-{own}").encode() in received
    # Decoded: the other connection's username travels only inside the Base64.
    sent = basic_credentials(received)
    assert sent and set(sent) == {(f"user-{own}", f"pw-{own}")}, sent


@pytest.fixture
def two_upstreams(pki: TestPKI) -> Iterator[tuple[RawRecordingUpstream, RawRecordingUpstream]]:
    identity = pki.server(name="listen-raw")
    with RawRecordingUpstream(identity) as first, RawRecordingUpstream(identity) as second:
        yield first, second


def _connection(up: RawRecordingUpstream, auth: str, pki: TestPKI, **extra: Any
                ) -> dict[str, Any]:
    return {"url": f"https://localhost:{up.port}/fhir", "auth": {"basic": auth},
            "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}, **extra}


def test_two_listeners_on_one_port_reach_their_own_upstreams(
        tmp_path: Path, pki: TestPKI,
        two_upstreams: tuple[RawRecordingUpstream, RawRecordingUpstream],
        start_sidecar: StartSidecar) -> None:
    up_a, up_b = two_upstreams
    port = free_port()
    settings = {
        "admin": {"listen": None},
        "basic_auth": _secrets(tmp_path, a="pw-a", b="pw-b"),
        "connections": {
            "conn-a": _connection(up_a, "a", pki, listen=f"127.0.0.1:{port}"),
            "conn-b": _connection(up_b, "b", pki, listen=f"{SECOND_LOOPBACK}:{port}"),
        },
    }
    running = start_sidecar(settings, directory=tmp_path)
    for _ in range(2):  # b first too: order of arrival must not matter
        assert _get(SECOND_LOOPBACK, port, "/Patient/b")[0] == 200
        assert _get("127.0.0.1", port, "/Patient/a")[0] == 200
    running.stop()
    assert [head.split(b" ")[1] for _, head in up_a.heads()] == [b"/fhir/Patient/a"] * 2
    assert [head.split(b" ")[1] for _, head in up_b.heads()] == [b"/fhir/Patient/b"] * 2
    _only_own_credentials(up_a, "a", "b")
    _only_own_credentials(up_b, "b", "a")


def test_a_reload_adds_a_listener_on_a_taken_port_of_another_host(
        tmp_path: Path, pki: TestPKI,
        two_upstreams: tuple[RawRecordingUpstream, RawRecordingUpstream],
        start_sidecar: StartSidecar) -> None:
    up_a, up_b = two_upstreams
    port = free_port()
    settings: dict[str, Any] = {
        "admin": {"listen": None},
        "basic_auth": _secrets(tmp_path, a="pw-a", b="pw-b"),
        "connections": {"conn-a": _connection(up_a, "a", pki, listen=f"127.0.0.1:{port}")},
    }
    running = start_sidecar(settings, directory=tmp_path)
    sidecar = running.process
    assert _get("127.0.0.1", port, "/Patient/a")[0] == 200

    # A wildcard on the same port overlaps: rejected, naming the field; a still serves.
    settings["connections"]["conn-b"] = _connection(up_b, "b", pki,
                                                    listen=f"0.0.0.0:{port}")
    _reload(sidecar, tmp_path, settings, "config_rejected")
    rejected = sidecar.events("config_rejected")[-1]["message"]
    assert f"connections.conn-b.listen: 0.0.0.0:{port} overlaps 127.0.0.1:{port}" in rejected
    assert _get("127.0.0.1", port, "/Patient/a")[0] == 200

    settings["connections"]["conn-b"]["listen"] = f"{SECOND_LOOPBACK}:{port}"
    _reload(sidecar, tmp_path, settings, "config_reloaded")
    wait_until(lambda: _answers(SECOND_LOOPBACK, port), RELOAD_DEADLINE,
               message="the new listener")
    assert _get("127.0.0.1", port, "/Patient/a")[0] == 200
    running.stop()
    assert {head.split(b" ")[1] for _, head in up_b.heads()} == {b"/fhir/Patient/b"}
    assert {head.split(b" ")[1] for _, head in up_a.heads()} == {b"/fhir/Patient/a"}
    _only_own_credentials(up_a, "a", "b")
    _only_own_credentials(up_b, "b", "a")


def _answers(host: str, port: int) -> bool:
    try:
        return _get(host, port, "/Patient/b")[0] == 200
    except OSError:
        return False


def _reload(sidecar: SidecarProcess, tmp: Path, settings: dict[str, Any], event: str) -> None:
    before = len(sidecar.events(event))
    # Replaced in one rename: the file watcher must never read a half-written config.
    os.replace(write_config(tmp, settings, name="staged.yaml"), tmp / "sidecar.yaml")
    sidecar.signal(signal.SIGHUP)
    wait_until(lambda: len(sidecar.events(event)) > before, RELOAD_DEADLINE,
               message=f"a {event} event")


def test_forward_proxy_tells_connections_apart_by_port(
        tmp_path: Path, pki: TestPKI,
        two_upstreams: tuple[RawRecordingUpstream, RawRecordingUpstream],
        start_sidecar: StartSidecar) -> None:
    up_a, up_b = two_upstreams
    proxy_port = free_port()
    settings = {
        "admin": {"listen": None},
        "proxy": {"listen": f"127.0.0.1:{proxy_port}"},
        "basic_auth": _secrets(tmp_path, a="pw-a", b="pw-b"),
        # Same host, same base path: only the port differs.
        "connections": {"conn-a": _connection(up_a, "a", pki),
                        "conn-b": _connection(up_b, "b", pki)},
    }
    running = start_sidecar(settings, directory=tmp_path)
    for up in (up_b, up_a, up_b):
        assert _get("127.0.0.1", proxy_port,
                    f"http://localhost:{up.port}/fhir/Patient")[0] == 200
    # No port: the scheme's default, which neither connection is on.
    status, headers, _ = _get("127.0.0.1", proxy_port, "http://localhost/fhir/Patient")
    assert status == 403 and headers["x-sidecar-error"] == "no-route"
    other = free_port()
    status, headers, _ = _get("127.0.0.1", proxy_port,
                              f"http://localhost:{other}/fhir/Patient")
    assert status == 403 and headers["x-sidecar-error"] == "no-route"
    running.stop()
    assert len(up_a.heads()) == 1 and len(up_b.heads()) == 2
    _only_own_credentials(up_a, "a", "b")
    _only_own_credentials(up_b, "b", "a")


def _check(tmp_path: Path, listens: dict[str, str | None], proxy: str | None = None
           ) -> subprocess.CompletedProcess[str]:
    config = write_config(tmp_path, {
        "proxy": {"listen": proxy},
        "admin": {"listen": "127.0.0.1:9901"},
        "connections": {name: {"url": f"https://{name}.example.org/fhir", "listen": listen}
                        for name, listen in listens.items()},
    })
    return subprocess.run([sys.executable, "-m", "sidecar", "check", "-c", str(config)],
                          capture_output=True, text=True, timeout=60)


def test_check_accepts_one_port_on_two_hosts(tmp_path: Path) -> None:
    result = _check(tmp_path, {"a": "127.0.0.1:18081", "b": "127.0.0.2:18081",
                               "c": "[::1]:18081"})
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("listens", "proxy", "path", "words"), [
    ({"a": "127.0.0.1:18081", "b": "127.0.0.1:18081"}, None, "connections.b.listen",
     "127.0.0.1:18081 is already used by connections.a.listen"),
    ({"a": "LocalHost:18081", "b": "localhost:18081"}, None, "connections.b.listen",
     "localhost:18081 is already used by connections.a.listen"),
    ({"a": "[::1]:18081", "b": "[0:0::1]:18081"}, None, "connections.b.listen",
     "[::1]:18081 is already used by connections.a.listen"),
    ({"a": "127.0.0.1:18081", "b": "0.0.0.0:18081"}, None, "connections.b.listen",
     "0.0.0.0:18081 overlaps 127.0.0.1:18081 of connections.a.listen"),
    ({"a": "[::]:18081"}, "127.0.0.2:18081", "connections.a.listen",
     "[::]:18081 overlaps 127.0.0.2:18081 of proxy.listen"),
    ({"a": "0.0.0.0:9901"}, None, "connections.a.listen",
     "0.0.0.0:9901 overlaps 127.0.0.1:9901 of admin.listen"),
    ({"a": "::1:18081"}, None, "connections.a.listen", "written in brackets"),
])
def test_check_refuses_overlapping_listen_addresses(
        tmp_path: Path, listens: dict[str, str | None], proxy: str | None, path: str,
        words: str) -> None:
    result = _check(tmp_path, listens, proxy)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() + result.stderr.splitlines()
             if f": {path}: " in line]
    assert lines and words in lines[0], result.stdout + result.stderr
    assert lines[0].startswith(str(tmp_path / "sidecar.yaml"))
    assert "Traceback" not in result.stdout + result.stderr


def test_listen_addresses_are_parsed_once_into_canonical_values() -> None:
    assert ListenAddress.parse("[::1]:8081") == ListenAddress("::1", 8081)
    assert ListenAddress.parse("[0:0::1]:8081") == ListenAddress("::1", 8081)
    assert ListenAddress.parse("LOCALHOST:8081") == ListenAddress("localhost", 8081)
    assert str(ListenAddress.parse("[::]:80")) == "[::]:80"
    assert ListenAddress.parse("0.0.0.0:1").overlaps(ListenAddress.parse("[::1]:1"))
    assert not ListenAddress.parse("127.0.0.1:1").overlaps(ListenAddress.parse("127.0.0.2:1"))
    assert not ListenAddress.parse("0.0.0.0:0").overlaps(ListenAddress.parse("127.0.0.1:0"))
    for bad in ("8081", ":8081", "host:", "host:65536", "host:-1", "::1:80"):
        with pytest.raises(ValueError):
            ListenAddress.parse(bad)


def test_forward_routing_compares_the_port_as_written() -> None:
    router = Router([
        ("default", Upstream.from_url("https://fhir.example.org/fhir")),
        ("alt", Upstream.from_url("https://fhir.example.org:8443/fhir")),
        ("plain", Upstream.from_url("http://other.example.org:8080/fhir")),
    ])

    def name(scheme: str, host: str, port: int) -> str | None:
        route = router.forward(host, "/fhir/Patient", scheme=scheme, port=port)
        return route.connection if route else None

    assert name("http", "fhir.example.org", 80) == "default"  # no port given
    assert name("https", "fhir.example.org", 443) == "default"  # intercepted HTTPS
    assert name("http", "fhir.example.org", 443) is None  # a port the URL does not name
    assert name("http", "fhir.example.org", 8443) == "alt"
    assert name("https", "fhir.example.org", 8443) == "alt"
    assert name("http", "fhir.example.org", 9999) is None
    assert name("http", "other.example.org", 8080) == "plain"
    assert name("http", "other.example.org", 80) is None
    route = router.forward("fhir.example.org", "/fhir/Patient")
    assert route is not None
    assert route.connection == "default"

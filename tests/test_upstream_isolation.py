"""An upstream connection carries only the requests of the connection that opened it.

mitmproxy reuses upstream connections by address within one client connection. Two sidecar
connections to the same host:port, or one connection before and after a reload, must not share
one: the TLS policy was checked once, at the handshake, for whoever opened it. Each test keeps
one client connection alive across its requests and asserts what reached a raw upstream.
"""

from __future__ import annotations

import base64
import http.client
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.constants import basic_header
from support.oauth_provider import OAuthTestProvider
from support.pki import TestPKI
from support.raw_upstream import RawRecordingUpstream, basic_credentials
from support.sidecar_process import SidecarProcess, free_port, wait_until, write_config
from support.sidecars import StartSidecar

RELOAD_DEADLINE = 10.0


class KeepAliveClient:
    """One HTTP/1.1 connection to the sidecar, reused for every request (fails if it is not)."""

    def __init__(self, port: int) -> None:
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self._conn.connect()
        self._sock = self._conn.sock

    def get(self, target: str, host: str | None = None) -> tuple[int, dict[str, str], bytes]:
        assert self._conn.sock is self._sock, "the client connection was not kept alive"
        headers = {"Host": host} if host else {}
        self._conn.request("GET", target, headers=headers)
        response = self._conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body

    def close(self) -> None:
        self._conn.close()


def _start(start_sidecar: StartSidecar, tmp: Path, config: dict[str, Any]) -> SidecarProcess:
    """Started in ``tmp``; a test that reads the whole log stops it itself."""
    (tmp / "secrets").mkdir(exist_ok=True)
    return start_sidecar({"admin": {"listen": None}, **config}, directory=tmp).process


def _reload(sidecar: SidecarProcess, tmp: Path, config: dict[str, Any]) -> None:
    before = len(sidecar.events("config_reloaded"))
    # Replaced in one rename: the file watcher must never read a half-written config.
    staged = write_config(tmp, {"admin": {"listen": None}, **config}, name="staged.yaml")
    os.replace(staged, tmp / "sidecar.yaml")
    sidecar.signal(signal.SIGHUP)
    wait_until(lambda: len(sidecar.events("config_reloaded")) > before, RELOAD_DEADLINE,
               message="the reload")


@pytest.fixture
def untrusted_upstream(pki: TestPKI) -> Iterator[RawRecordingUpstream]:
    """A TLS upstream whose certificate only ``verify: skip`` accepts (not ``pki.ca``)."""
    with RawRecordingUpstream(pki.server_from_other_ca()) as upstream:
        yield upstream


def _secret(tmp: Path, name: str, value: str) -> str:
    (tmp / "secrets").mkdir(exist_ok=True)
    (tmp / "secrets" / name).write_text(value + "\n")
    return f"secrets/{name}"


def test_a_skip_connection_upstream_never_carries_a_verified_connections_token(
        tmp_path: Path, pki: TestPKI, untrusted_upstream: RawRecordingUpstream,
        oauth_provider: OAuthTestProvider, start_sidecar: StartSidecar) -> None:
    # The reproduction from the security review: `skipconn` and `other` share localhost:PORT;
    # `other` verifies against a CA that does not trust the server.
    up = untrusted_upstream
    other = oauth_provider.clients["basic"]
    proxy_port = free_port()
    sidecar = _start(start_sidecar, tmp_path, {
        "proxy": {"listen": f"127.0.0.1:{proxy_port}"},
        "basic_auth": {"skip-user": {"username": "skip-user",
                                     "password_file": _secret(tmp_path, "skip", "skip-pw")}},
        "oauth": {"other": {
            "token_url": oauth_provider.token_url, "client_id": other.client_id,
            "client_secret_file": _secret(tmp_path, "other", str(other.secret)),
            "tls": {"verify": "custom", "ca_bundle": str(oauth_provider.ca_bundle)}}},
        "connections": {
            "skipconn": {"url": f"https://localhost:{up.port}/skip",
                         "auth": {"basic": "skip-user"}, "tls": {"verify": "skip"}},
            "other": {"url": f"https://localhost:{up.port}/other", "auth": {"oauth": "other"},
                      "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}},
        },
    })
    client = KeepAliveClient(proxy_port)
    try:
        status, _, _ = client.get(f"http://localhost:{up.port}/skip/x")
        assert status == 200
        status, headers, body = client.get(f"http://localhost:{up.port}/other/Patient")
    finally:
        client.close()
        assert sidecar.stop() == 0
    assert status == 502, body
    assert headers["x-sidecar-error"] == "upstream-tls"
    # The sidecar holds other's token (one, cached), so it had one to leak.
    assert oauth_provider.stats()["issued"] == 1

    heads = up.heads()
    assert len(heads) == 1 and heads[0][1].startswith(b"GET /skip/x ")
    assert basic_header("skip-user", "skip-pw").encode() in heads[0][1]
    received = up.all_bytes()
    # The provider's access tokens are JWTs: base64url of '{"...', so they start with eyJ.
    assert b"Bearer" not in received and b"eyJ" not in received
    assert b"/other/" not in received


def test_two_connections_on_one_upstream_keep_separate_reused_connections(
        tmp_path: Path, untrusted_upstream: RawRecordingUpstream,
        start_sidecar: StartSidecar) -> None:
    up = untrusted_upstream
    proxy_port = free_port()
    sidecar = _start(start_sidecar, tmp_path, {
        "proxy": {"listen": f"127.0.0.1:{proxy_port}"},
        "basic_auth": {
            "a": {"username": "user-a", "password_file": _secret(tmp_path, "a", "pw-a")},
            "b": {"username": "user-b", "password_file": _secret(tmp_path, "b", "pw-b")}},
        "connections": {
            "conn-a": {"url": f"https://localhost:{up.port}/a", "auth": {"basic": "a"},
                       "tls": {"verify": "skip"}},
            "conn-b": {"url": f"https://localhost:{up.port}/b", "auth": {"basic": "b"},
                       "tls": {"verify": "skip"}},
        },
    })
    client = KeepAliveClient(proxy_port)
    try:
        for name in ("a", "b", "a", "b", "a", "a"):
            status, _, _ = client.get(f"http://localhost:{up.port}/{name}/Patient")
            assert status == 200
    finally:
        client.close()
        assert sidecar.stop() == 0

    # Each keeps reusing its own upstream connection: two in all, however they alternate.
    assert len(up.connections) == 2
    for conn in up.connections:
        paths = {head.split(b" ")[1].split(b"/")[1] for head in conn.heads}
        assert len(paths) == 1, conn.heads
        name = paths.pop().decode()
        assert all(basic_header(f"user-{name}", f"pw-{name}").encode() in head
                   for head in conn.heads)
    assert [len(c.heads) for c in up.connections] == [4, 2]


def test_plain_http_upstreams_are_not_shared_between_connections(
        tmp_path: Path, start_sidecar: StartSidecar) -> None:
    with RawRecordingUpstream(None) as up:
        proxy_port = free_port()
        sidecar = _start(start_sidecar, tmp_path, {
            "proxy": {"listen": f"127.0.0.1:{proxy_port}"},
            "basic_auth": {
                "a": {"username": "user-a", "password_file": _secret(tmp_path, "a", "pw-a")},
                "b": {"username": "user-b", "password_file": _secret(tmp_path, "b", "pw-b")}},
            "connections": {
                "conn-a": {"url": f"http://127.0.0.1:{up.port}/a", "auth": {"basic": "a"}},
                "conn-b": {"url": f"http://127.0.0.1:{up.port}/b", "auth": {"basic": "b"}},
            },
        })
        client = KeepAliveClient(proxy_port)
        try:
            for name in ("a", "b", "a"):
                status, _, _ = client.get(f"http://127.0.0.1:{up.port}/{name}/Patient")
                assert status == 200
        finally:
            client.close()
            assert sidecar.stop() == 0
    assert len(up.connections) == 2
    first, second = up.connections
    assert len(first.heads) == 2 and len(second.heads) == 1
    # Each upstream connection carried one connection's credentials only (decoded: the
    # username travels inside the Base64, never in plain text).
    assert basic_credentials(bytes(first.received)) == [("user-a", "pw-a")] * 2
    assert basic_credentials(bytes(second.received)) == [("user-b", "pw-b")]


def test_consecutive_requests_of_one_connection_reuse_its_upstream_connection(
        tmp_path: Path, untrusted_upstream: RawRecordingUpstream,
        start_sidecar: StartSidecar) -> None:
    up = untrusted_upstream
    port = free_port()
    sidecar = _start(start_sidecar, tmp_path, {
        "basic_auth": {"a": {"username": "user-a",
                             "password_file": _secret(tmp_path, "a", "pw-a")}},
        "connections": {"main": {"url": f"https://localhost:{up.port}/fhir",
                                 "listen": f"127.0.0.1:{port}", "auth": {"basic": "a"},
                                 "tls": {"verify": "skip"}}},
    })
    client = KeepAliveClient(port)
    try:
        for _ in range(10):
            assert client.get("/Patient")[0] == 200
    finally:
        client.close()
        assert sidecar.stop() == 0
    assert len(up.connections) == 1
    assert len(up.connections[0].heads) == 10


@pytest.mark.parametrize("listener", ["reverse", "forward"])
def test_a_reload_that_tightens_tls_is_not_bypassed_by_a_kept_upstream_connection(
        tmp_path: Path, pki: TestPKI, untrusted_upstream: RawRecordingUpstream,
        listener: str, start_sidecar: StartSidecar) -> None:
    up = untrusted_upstream
    port = free_port()
    connection: dict[str, Any] = {"url": f"https://localhost:{up.port}/fhir",
                                  "auth": {"basic": "a"}, "tls": {"verify": "skip"}}
    config: dict[str, Any] = {
        "basic_auth": {"a": {"username": "user-a",
                             "password_file": _secret(tmp_path, "a", "pw-a")}},
        "connections": {"main": connection},
    }
    if listener == "reverse":
        connection["listen"] = f"127.0.0.1:{port}"
        target = "/Patient"
    else:
        config["proxy"] = {"listen": f"127.0.0.1:{port}"}
        target = f"http://localhost:{up.port}/fhir/Patient"
    sidecar = _start(start_sidecar, tmp_path, config)
    client = KeepAliveClient(port)
    try:
        assert client.get(target)[0] == 200
        assert client.get(target)[0] == 200
        connection["tls"] = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
        _reload(sidecar, tmp_path, config)
        status, headers, body = client.get(target)
    finally:
        client.close()
        assert sidecar.stop() == 0
    assert status == 502, body
    assert headers["x-sidecar-error"] == "upstream-tls"
    assert len(up.heads()) == 2  # nothing after the reload reached the upstream
    assert len(up.connections) == 2  # the kept one, and the refused handshake


def test_a_reload_that_changes_credentials_opens_a_new_upstream_connection(
        tmp_path: Path, untrusted_upstream: RawRecordingUpstream,
        start_sidecar: StartSidecar) -> None:
    up = untrusted_upstream
    port = free_port()
    config: dict[str, Any] = {
        "basic_auth": {"a": {"username": "user-a",
                             "password_file": _secret(tmp_path, "a", "pw-a")}},
        "connections": {"main": {"url": f"https://localhost:{up.port}/fhir",
                                 "listen": f"127.0.0.1:{port}", "auth": {"basic": "a"},
                                 "tls": {"verify": "skip"}}},
    }
    sidecar = _start(start_sidecar, tmp_path, config)
    client = KeepAliveClient(port)
    try:
        assert client.get("/Patient")[0] == 200
        config["basic_auth"]["a"]["username"] = "user-new"
        _reload(sidecar, tmp_path, config)
        assert client.get("/Patient")[0] == 200
        assert client.get("/Patient")[0] == 200
    finally:
        client.close()
        assert sidecar.stop() == 0
    assert len(up.connections) == 2
    old, new = up.connections
    assert len(old.heads) == 1 and len(new.heads) == 2
    assert all(basic_header("user-new", "pw-a").encode() in head for head in new.heads)
    # The connection opened before the reload never carried the new credentials.
    assert basic_credentials(bytes(old.received)) == [("user-a", "pw-a")]


def test_a_username_on_the_wire_is_only_seen_decoded() -> None:
    # Why the isolation asserts decode: "user-b" never appears in plain text, sent or not.
    raw = (b"GET /a HTTP/1.1\r\nHost: x\r\nAuthorization: " + basic_header("user-b", "pw-b")
           .encode() + b"\r\n\r\nGET /b HTTP/1.1\r\nauthorization:basic "
           + base64.b64encode(b"user-a:p:w") + b"\r\n\r\n")
    assert b"user-b" not in raw
    assert basic_credentials(raw) == [("user-b", "pw-b"), ("user-a", "p:w")]

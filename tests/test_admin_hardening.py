"""The admin listener attacked as issue 14 did, against the real ``fhir-sidecar run`` process.

- The admin token must not turn into a file reader: the API and the dashboard take secret values,
  never a path or an environment variable name, and nothing of a named file leaves the process
  (not to an upstream, not in an answer, not in the log).
- Nobody can make it buffer large bodies: who is asking is decided from the headers, before the
  body is read, and bodies are capped; its memory stays flat.
- It answers only ``Host`` names of its own (DNS rebinding), names are matched in full, and one
  wrong token slows down only its own address, briefly.
- Off loopback, reading the configuration needs the token; health, readiness and metrics not.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support.pki import TestPKI
from support.raw_upstream import RawRecordingUpstream
from support.sidecar_process import SidecarProcess, free_port, wait_until
from support.sidecars import RunningSidecar, StartSidecar

from sidecar.admin.auth import MAX_DELAY_SECONDS, Throttle

ADMIN_TOKEN = "hardening-admin-token-Tq83"
GIVEN_PASSWORD = "given-pw-Ws27"
MiB = 1024 * 1024


# -- raw HTTP, as an attacker sends it ----------------------------------------------------------

@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool = False  # the server closed the connection after answering
    raw: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


def read_answer(sock: socket.socket) -> Answer:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before an answer: {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Answer(int(lines[0].split()[1]), headers, body[:length], raw=data)


def send(port: int, method: str, path: str, *, host: str | None = None,
         headers: dict[str, str] | None = None, body: bytes = b"",
         source: str = "127.0.0.1") -> Answer:
    head = f"{method} {path} HTTP/1.1\r\n"
    if host is not None:
        head += f"Host: {host}\r\n"
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n"
    if body and "Content-Length" not in (headers or {}):
        head += f"Content-Length: {len(body)}\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=15,
                                  source_address=(source, 0)) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n" + body)
        return read_answer(sock)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# -- one sidecar for most tests -----------------------------------------------------------------

@dataclass
class Hardened:
    tmp: Path
    sidecar: RunningSidecar
    upstream: RawRecordingUpstream
    canary: bytes
    canary_path: Path
    answers: list[str] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.sidecar.config_path

    @property
    def process(self) -> SidecarProcess:
        return self.sidecar.process

    @property
    def admin_port(self) -> int:
        return self.sidecar.admin_port

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def client(self, source: str = "127.0.0.1") -> httpx.Client:
        return httpx.Client(base_url=self.api, trust_env=False, timeout=30,
                            transport=httpx.HTTPTransport(local_address=source))

    def put(self, path: str, body: Any) -> httpx.Response:
        with self.client() as client:
            response = client.put(path, json=body,
                                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        self.answers.append(response.text)
        return response


@pytest.fixture(scope="module")
def collector(pki: TestPKI) -> Iterator[RawRecordingUpstream]:
    """Where an attacker would send what the sidecar read."""
    with RawRecordingUpstream(pki.server(name="collector")) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def hardened(tmp_path_factory: pytest.TempPathFactory, collector: RawRecordingUpstream,
             start_module_sidecar: StartSidecar) -> Hardened:
    # The file the attacker is after lies outside the config's directory, which is under tmp.
    tmp = Path(tmp_path_factory.mktemp("hardening"))
    canary = f"CANARY-{secrets.token_hex(16)}".encode()
    host_dir, config_dir = tmp / "host", tmp / "config"
    host_dir.mkdir()
    config_dir.mkdir()
    canary_path = host_dir / "shadow"
    canary_path.write_bytes(canary + b"\n")
    (config_dir / "admin-token").write_text(ADMIN_TOKEN + "\n")
    sidecar = start_module_sidecar({
        "admin": {"listen": f"127.0.0.1:{free_port()}", "token_file": "admin-token",
                  "allowed_hosts": ["sidecar.internal"]},
    }, directory=config_dir, env={"CANARY_ENV": canary.decode()})
    assert sidecar.admin_token == ADMIN_TOKEN
    return Hardened(tmp, sidecar, collector, canary, canary_path)


# -- 1. no file read ---------------------------------------------------------------------------

def _canary_forms(canary: bytes) -> list[bytes]:
    text = canary.decode()
    forms = [canary, base64.b64encode(canary), base64.b64encode(b"u:" + canary)]
    forms += [base64.b64encode(f"u:{text}\n".encode()), text.encode("utf-16-le")]
    return forms


def test_the_exfiltration_sequence_is_refused_and_no_byte_of_the_file_leaves(
        hardened: Hardened) -> None:
    relative = os.path.relpath(hardened.canary_path, hardened.config.parent)
    assert relative.startswith("../")
    missing = str(hardened.tmp / "host" / "no-such-file")
    attempts: list[tuple[str, dict[str, Any]]] = [
        ("/api/basic-auth/exfil", {"username": "u", "password_file": str(hardened.canary_path)}),
        ("/api/basic-auth/exfil", {"username": "u", "password_file": relative}),
        ("/api/basic-auth/exfil", {"username": "u", "password_env": "CANARY_ENV"}),
        ("/api/oauth/exfil", {"token_url": f"https://127.0.0.1:{hardened.upstream.port}/t",
                              "client_id": "c", "client_secret_file": relative}),
        ("/api/oauth/exfil", {"token_url": f"https://127.0.0.1:{hardened.upstream.port}/t",
                              "client_id": "c", "client_secret_env": "CANARY_ENV"}),
        ("/api/oauth/exfil", {"token_url": f"https://127.0.0.1:{hardened.upstream.port}/t",
                              "client_id": "c", "client_auth": "private_key_jwt",
                              "private_key_file": str(hardened.canary_path)}),
        ("/api/connections/evil", {"url": f"https://127.0.0.1:{hardened.upstream.port}/c",
                                   "tls": {"verify": "custom",
                                           "ca_bundle": str(hardened.canary_path)}}),
        ("/api/connections/evil", {"url": f"https://127.0.0.1:{hardened.upstream.port}/c",
                                   "tls": {"client_cert": relative, "client_key": relative}}),
    ]
    for path, body in attempts:
        refused = hardened.put(path, body)
        assert refused.status_code == 422, (path, body, refused.text)
        assert "never file paths or environment variable names" in refused.json()["error"]
        # The same answer whether or not the named file exists: no file-existence oracle.
        swapped = {k: (missing if v in (str(hardened.canary_path), relative) else v)
                   for k, v in body.items()}
        if swapped != body:
            absent = hardened.put(path, swapped)
            assert (absent.status_code, absent.json()) == (refused.status_code, refused.json())

    # The sequence: the definition does not exist, so the connection is refused too.
    listen_port = free_port()
    evil = {"url": f"https://127.0.0.1:{hardened.upstream.port}/collect",
            "listen": f"127.0.0.1:{listen_port}", "auth": {"basic": "exfil"},
            "tls": {"verify": "skip"}}
    assert hardened.put("/api/connections/evil", evil).status_code == 422
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{listen_port}/Patient", trust_env=False, timeout=5)

    # Control: with a password given as a value, the collector does receive what it was given,
    # and switching that definition to the file is still refused.
    assert hardened.put("/api/basic-auth/exfil",
                        {"username": "u", "password": GIVEN_PASSWORD}).status_code == 201
    assert hardened.put("/api/connections/evil", evil).status_code == 201
    assert hardened.put("/api/basic-auth/exfil", {
        "username": "u", "password_file": str(hardened.canary_path)}).status_code == 422
    for _ in range(2):
        response = httpx.get(f"http://127.0.0.1:{listen_port}/Patient", trust_env=False,
                             timeout=30)
        hardened.answers.append(response.text)
        assert response.status_code == 200
    hardened.upstream.wait_for_heads(2)
    received = hardened.upstream.all_bytes()
    given = base64.b64encode(f"u:{GIVEN_PASSWORD}".encode())
    assert received.count(b"Authorization: Basic " + given) == 2

    with hardened.client() as client:
        for path in ("/api/basic-auth", "/api/oauth", "/api/connections", "/basic-auth"):
            hardened.answers.append(client.get(path).text)
    written = b"".join(p.read_bytes() for p in hardened.tmp.rglob("*")
                       if p.is_file() and p != hardened.canary_path and "mitmproxy" not in p.parts)
    for form in _canary_forms(hardened.canary):
        assert form not in received, "the file reached the collector"
        assert form.decode("latin-1") not in "\n".join(hardened.answers), "in an answer"
        assert form.decode("latin-1") not in hardened.process.output, "in the log"
        assert form not in written, "copied into a file"


# -- 3. no unauthenticated memory exhaustion ---------------------------------------------------

def _declared_huge(port: int, path: str, headers: dict[str, str], method: str = "PUT"
                   ) -> Answer:
    """Declare a 90 MB body, send 64 KiB of it, and read the answer."""
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {90 * MiB}\r\n")
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(head.encode() + b"\r\n" + b"x" * 65536)
        answer = read_answer(sock)
        answer.closed = wait_until(lambda: _closed(sock), 10, message="the server to close")
    return answer


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_large_bodies_are_refused_before_they_are_read(hardened: Hardened) -> None:
    pid = hardened.process.proc.pid  # type: ignore[union-attr]
    port = hardened.admin_port
    before = rss_bytes(pid)
    answers: list[Answer] = []

    def attack() -> None:
        answers.append(_declared_huge(port, "/api/basic-auth/x", {}))

    threads = [threading.Thread(target=attack) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [a.status for a in answers] == [401] * 6
    assert all(a.closed and a.headers.get("connection") == "close" for a in answers)
    assert "admin token" in answers[0].json()["error"]

    # Authenticated, but over the cap: 413 before the body, too.
    too_big = _declared_huge(port, "/api/basic-auth/x",
                             {"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert too_big.status == 413 and "larger than 1048576 bytes" in too_big.json()["error"]
    bundle = _declared_huge(port, "/api/ca-bundles/x", {"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert bundle.status == 413 and "CA bundle is larger than 262144" in bundle.json()["error"]
    # The dashboard without a session, and resources that take no body at all.
    form = _declared_huge(port, "/basic-auth", {}, method="POST")
    assert form.status == 401
    assert _declared_huge(port, "/api/openapi.json", {}).status == 401
    for path in ("/healthz", "/metrics", "/static/dashboard.css", "/nothing-here"):
        assert _declared_huge(port, path, {}).status == 413, path
    assert send(port, "POST", "/login", host="localhost",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
                body=b"token=" + b"a" * 20_000).status == 413

    # A chunked body has no declared length: it is cut off once past the cap.
    head = (f"PUT /api/basic-auth/x HTTP/1.1\r\nHost: localhost\r\n"
            f"Authorization: Bearer {ADMIN_TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"y" * 64 * 1024)
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(head.encode())
        sent = 0
        try:
            while sent < 4 * MiB:
                sock.sendall(chunk)
                sent += 64 * 1024
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunked = read_answer(sock)
    assert chunked.status == 413

    grown = rss_bytes(pid) - before
    assert grown < 40 * MiB, f"RSS grew by {grown / MiB:.0f} MiB"
    assert hardened.process.proc.poll() is None  # type: ignore[union-attr]


# -- 6. hosts, names, throttling ---------------------------------------------------------------

@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "0.0.0.0:{port}",
                                  "127.0.0.2:{port}", "localhost.evil.example", ""])
def test_foreign_host_names_get_421(hardened: Hardened, host: str) -> None:
    host = host.format(port=hardened.admin_port)
    for method, path in (("GET", "/api/connections"), ("GET", "/"), ("GET", "/healthz"),
                         ("GET", "/metrics"), ("PUT", "/api/basic-auth/x")):
        answer = send(hardened.admin_port, method, path, host=host,
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                      body=b'{"username": "u", "password": "p"}' if method == "PUT" else b"")
        assert answer.status == 421, (host, path, answer.raw)
        assert "admin.allowed_hosts" in answer.json()["error"]
    with hardened.client() as client:
        assert client.get("/api/basic-auth/x").status_code == 404  # nothing was created


@pytest.mark.parametrize("host", ["localhost:{port}", "LOCALHOST", "127.0.0.1:{port}",
                                  "sidecar.internal:{port}", "Sidecar.Internal."])
def test_own_host_names_are_answered(hardened: Hardened, host: str) -> None:
    host = host.format(port=hardened.admin_port)
    for path in ("/api/connections", "/", "/healthz", "/metrics"):
        assert send(hardened.admin_port, "GET", path, host=host).status == 200, (host, path)


def test_allowed_hosts_follow_a_reload(hardened: Hardened) -> None:
    port = hardened.admin_port
    assert send(port, "GET", "/healthz", host="added.internal").status == 421
    original = hardened.config.read_text()
    data = yaml.safe_load(original)
    data["admin"]["allowed_hosts"].append("added.internal")
    try:
        hardened.config.write_text(yaml.safe_dump(data))
        hardened.process.signal(signal.SIGHUP)
        wait_until(lambda: send(port, "GET", "/healthz", host="added.internal").status == 200,
                   20, interval=0.1, message="the reloaded allowed_hosts to be answered")
    finally:
        hardened.config.write_text(original)
        hardened.process.signal(signal.SIGHUP)
    wait_until(lambda: send(port, "GET", "/healthz", host="added.internal").status == 421, 20,
               message="the restored config")


def test_names_are_matched_in_full(hardened: Hardened, tmp_path: Path) -> None:
    for path in ("/api/basic-auth/x%0A", "/api/ca-bundles/x%0A", "/api/connections/x%0A"):
        response = hardened.put(path, {"username": "u", "password": "p"})
        assert response.status_code == 400 and "must match" in response.json()["error"]
    secrets_dir = hardened.tmp / "state" / "secrets"
    if secrets_dir.exists():
        assert not [p for p in secrets_dir.iterdir() if "\n" in p.name]
    # The config file follows the same rule.
    config = tmp_path / "bad.yaml"
    config.write_text('basic_auth:\n  "x\\n": {username: u, password: p}\n')
    result = subprocess.run([sys.executable, "-m", "sidecar", "check", "-c", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "basic_auth" in result.stderr and "must match" in result.stderr
    assert "Traceback" not in result.stderr


def _delete(hardened: Hardened, token: str, source: str) -> httpx.Response:
    # DELETE of an unknown name: 404 once authenticated, and nothing changes.
    with hardened.client(source) as client:
        return client.delete("/api/oauth/nope", headers={"Authorization": f"Bearer {token}"})


def test_a_wrong_token_slows_down_only_its_own_address_and_only_briefly(
        hardened: Hardened) -> None:
    assert _delete(hardened, "wrong-token", "127.0.0.2").status_code == 401
    throttled = _delete(hardened, ADMIN_TOKEN, "127.0.0.2")
    assert throttled.status_code == 429
    assert 1 <= int(throttled.headers["Retry-After"]) <= MAX_DELAY_SECONDS
    # Every other address goes on at once.
    assert _delete(hardened, ADMIN_TOKEN, "127.0.0.1").status_code == 404
    assert _delete(hardened, ADMIN_TOKEN, "127.0.0.3").status_code == 404
    with hardened.client("127.0.0.4") as client:
        assert client.post("/login", data={"token": ADMIN_TOKEN}).status_code == 303
    # The throttled address gets in again within the short bound.
    wait_until(lambda: _delete(hardened, ADMIN_TOKEN, "127.0.0.2").status_code == 404,
               MAX_DELAY_SECONDS + 5, interval=0.1, message="the throttle to let 127.0.0.2 in")


def test_the_backoff_doubles_up_to_a_short_bound_and_is_forgotten() -> None:
    now = [1000.0]
    throttle = Throttle(clock=lambda: now[0])
    delays = []
    for _ in range(12):
        now[0] += throttle.wait_seconds("a")
        throttle.failed("a")
        delays.append(throttle.wait_seconds("a"))
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(delays) == MAX_DELAY_SECONDS <= 5
    assert throttle.wait_seconds("b") == 0
    now[0] += 3600  # long quiet: the next failure starts from the first delay again
    throttle.failed("a")
    assert throttle.wait_seconds("a") == 0.5


# -- 7. an admin listener on the network ---------------------------------------------------------

@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory,
            start_module_sidecar: StartSidecar) -> tuple[int, SidecarProcess]:
    tmp = Path(tmp_path_factory.mktemp("exposed"))
    (tmp / "admin-token").write_text(ADMIN_TOKEN + "\n")
    port = free_port()
    sidecar = start_module_sidecar({
        "admin": {"listen": f"0.0.0.0:{port}", "token_file": "admin-token"},
        "connections": {"hidden-conn": {"url": "https://fhir.hidden.example/R4"}},
    }, directory=tmp)
    return port, sidecar.process


def test_off_loopback_reads_need_the_token_and_probes_do_not(
        exposed: tuple[int, SidecarProcess]) -> None:
    port, _ = exposed
    base = f"http://127.0.0.1:{port}"
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=base, trust_env=False, timeout=30) as client:
        for path in ("/healthz", "/readyz", "/readyz?verbose=1", "/metrics",
                     "/static/dashboard.css", "/static/glance.js", "/login"):
            assert client.get(path).status_code == 200, path
        for path in ("/api/connections", "/api/connections/hidden-conn", "/api/basic-auth",
                     "/api/oauth", "/api/ca-bundles", "/api/openapi.json"):
            refused = client.get(path)
            assert refused.status_code == 401, path
            assert "hidden" not in refused.text
            assert client.get(path, headers=bearer).status_code == 200, path
        for path in ("/", "/connections", "/connections/live", "/basic-auth", "/oauth",
                     "/ca-bundles"):
            page = client.get(path)
            assert page.status_code == 401, path
            assert "hidden" not in page.text and 'id="login-form"' in page.text
        wrong = client.get("/api/connections", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        wait_until(lambda: client.get("/api/connections", headers=bearer).status_code == 200,
                   MAX_DELAY_SECONDS + 5, interval=0.1, message="the throttle to pass")
        assert client.post("/login", data={"token": ADMIN_TOKEN}).status_code == 303
        page = client.get("/")
        assert page.status_code == 200 and "fhir.hidden.example" in page.text
        assert client.get("/api/connections").json()["items"][0]["name"] == "hidden-conn"
    # Bound to every interface, the listener answers the address it was reached on.
    assert send(port, "GET", "/healthz", host=f"127.0.0.1:{port}").status == 200
    assert send(port, "GET", "/healthz", host=f"127.0.0.9:{port}").status == 421


def test_off_loopback_without_a_token_file_the_api_is_closed(
        start_sidecar: StartSidecar) -> None:
    port = free_port()
    start_sidecar({
        "admin": {"listen": f"0.0.0.0:{port}"},
        "connections": {"hidden-conn": {"url": "https://fhir.hidden.example/R4"}},
    })
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False,
                      timeout=30) as client:
        closed = client.get("/api/connections")
        assert closed.status_code == 403 and "admin.token_file" in closed.json()["error"]
        assert "hidden" not in client.get("/").text
        assert client.get("/readyz").status_code == 200

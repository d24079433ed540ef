"""The admin API (and the dashboard's login, session and CSRF) against the real ``fhir-sidecar
run`` process: every operation, bad input rejected with nothing changed on disk, read-only
configs and config-file definitions, and real requests through the sidecar that carry what the
API just set."""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from support.constants import basic_header
from support.fhir_routes import fhir_upstream
from support.pki import TestPKI
from support.sidecar_process import free_port, wait_until
from support.sidecars import StartSidecar

from sidecar.runtime.watch import POLL_SECONDS
from sidecar.testkit.fhir_server import FhirTestServer

ADMIN_TOKEN = "admin-token-Vb83kq"
FIRST_PASSWORD = "first-pw-Lm20"
NEW_PASSWORD = "new-pw-Rt55"
ROTATED_PASSWORD = "rotated-pw-Qq17"
CLIENT_SECRET = "client-secret-Jd64"
SECRETS = (ADMIN_TOKEN, FIRST_PASSWORD, NEW_PASSWORD, ROTATED_PASSWORD, CLIENT_SECRET)


def disk_state(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (the config, secrets, the state dir's secrets and
    bundles) with its bytes; mitmproxy's own CA store aside."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file() and "mitmproxy" not in p.parts}


@pytest.fixture(scope="module")
def open_upstream(pki: TestPKI) -> Iterator[FhirTestServer]:
    """Accepts any credentials and records the headers it received."""
    with fhir_upstream(pki.server(name="api-open")) as server:
        yield server


class Sidecar:
    def __init__(self, tmp: Path, pki: TestPKI, upstream: FhirTestServer, start: StartSidecar,
                 token: bool = True):
        self.tmp, self.pki, self.upstream = tmp, pki, upstream
        self.port = free_port()
        self.admin = f"127.0.0.1:{free_port()}"
        (tmp / "secrets").mkdir()
        (tmp / "secrets" / "admin-token").write_text(ADMIN_TOKEN + "\n")
        (tmp / "secrets" / "pw").write_text(FIRST_PASSWORD + "\n")
        admin: dict[str, Any] = {"listen": self.admin}
        if token:
            admin["token_file"] = "secrets/admin-token"
        # "first" and "fixed" read files the operator named: the API shows them, read-only.
        # "main" names no file: the API may change it (and assign "first" to it).
        self.running = start({
            "admin": admin,
            "basic_auth": {"first": {"username": "svc", "password_file": "secrets/pw"}},
            "connections": {
                "main": {"url": upstream.base_url, "listen": f"127.0.0.1:{self.port}",
                         "auth": {"basic": "first"}, "tls": {"verify": "skip"}},
                "fixed": {"url": upstream.base_url,
                          "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}},
        }, directory=tmp)
        self.path, self.process = self.running.config_path, self.running.process
        self.secrets_dir = tmp / "state" / "secrets"
        self.api = httpx.Client(base_url=f"http://{self.admin}", trust_env=False, timeout=30)
        self.auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def put(self, path: str, body: Any, **kw: Any) -> httpx.Response:
        headers = kw.pop("headers", self.auth)
        return self.api.put(path, json=body, headers=headers, **kw)

    def delete(self, path: str) -> httpx.Response:
        return self.api.delete(path, headers=self.auth)

    def through(self, path: str = "/metadata") -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=30, trust_env=False)

    def last_auth(self) -> str | None:
        seen = self.upstream.requests_seen
        return seen[-1].headers.get("authorization") if seen else None

    def config(self) -> dict[str, Any]:
        return yaml.safe_load(self.path.read_text())

    def close(self) -> None:
        self.api.close()
        self.running.stop()
        for secret in SECRETS[1:]:
            assert secret not in self.process.output, "a secret reached the log"


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI,
            open_upstream: FhirTestServer,
            start_module_sidecar: StartSidecar) -> Iterator[Sidecar]:
    """Shared by the tests that change nothing (reads, refused writes); a test that writes
    through the API takes ``fresh``, so no test sees another's changes."""
    s = Sidecar(tmp_path_factory.mktemp("api"), pki, open_upstream, start_module_sidecar)
    yield s
    s.close()


@pytest.fixture
def fresh(tmp_path: Path, pki: TestPKI, open_upstream: FhirTestServer,
          start_sidecar: StartSidecar) -> Iterator[Sidecar]:
    s = Sidecar(tmp_path, pki, open_upstream, start_sidecar)
    yield s
    s.close()


def wait_for_quiet_watcher(sidecar: Sidecar) -> None:
    """A reload the file watcher may still owe (a write up to two polls ago) would be counted
    as the test's own; let it happen before counting reloads."""
    def quiet() -> bool:
        events = sidecar.process.events("config_reloaded")
        if not events:
            return True
        last = dt.datetime.fromisoformat(events[-1]["ts"].replace("Z", "+00:00"))
        return (dt.datetime.now(dt.UTC) - last).total_seconds() > 3 * POLL_SECONDS

    wait_until(quiet, 10, interval=0.1, message="the file watcher to settle")


def assert_no_secret(response: httpx.Response) -> None:
    for secret in SECRETS:
        assert secret not in response.text


# -- reads ----------------------------------------------------------------------------------

def test_a_request_is_counted_once_in_the_connection_status(fresh: Sidecar) -> None:
    # A sidecar of its own, so the one request is the only one counted; it is counted once
    # it has finished, which may be just after the client has its answer.
    assert fresh.api.get("/api/connections/main").json()["status"]["requests_recent"] == {}
    assert fresh.through().status_code == 200
    counted = wait_until(
        lambda: fresh.api.get("/api/connections/main").json()["status"]["requests_recent"],
        30, interval=0.1, message="the request to be counted")
    assert counted == {"2xx": 1}, counted
    assert fresh.api.get("/api/connections/fixed").json()["status"]["requests_recent"] == {}


def test_reads_list_everything_and_never_a_secret(sidecar: Sidecar) -> None:
    sidecar.through()
    for path in ("/api/connections", "/api/basic-auth", "/api/oauth", "/api/ca-bundles",
                 "/api/connections/main", "/api/basic-auth/first", "/api/openapi.json",
                 "/", "/connections/live", "/basic-auth", "/oauth", "/ca-bundles", "/login"):
        response = sidecar.api.get(path)
        assert response.status_code == 200, (path, response.text)
        assert response.headers["Cache-Control"] == "no-store"
        assert_no_secret(response)
    first = sidecar.api.get("/api/basic-auth/first").json()
    read_only = first.pop("read_only")
    assert first == {"name": "first", "username": "svc", "password": "set",
                     "password_env": None, "used_by": ["main"]}
    assert "config file" in read_only and "password_file" in read_only
    main = sidecar.api.get("/api/connections/main").json()
    assert main["auth"] == {"basic": "first", "oauth": None}
    assert main["tls"]["verify"] == "skip" and main["read_only"] is None
    fixed = sidecar.api.get("/api/connections/fixed").json()
    assert fixed["tls"]["ca_bundle"] == str(sidecar.pki.ca_bundle_path)
    # A connection the file gives a host path stays editable; the path is shown as the file
    # spells it, to be repeated (kept), never changed (docs/admin-api.md).
    assert fixed["read_only"] is None
    assert fixed["from_config_file"] == {"tls.ca_bundle": str(sidecar.pki.ca_bundle_path)}
    unknown = sidecar.api.get("/api/connections/nope")
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]
    assert sidecar.api.get("/api/connections/Bad%20Name").status_code == 400
    assert sidecar.api.get("/api/nothing-here").status_code == 404


# -- writes that work ------------------------------------------------------------------------

def test_basic_definition_created_assigned_rotated_and_used(fresh: Sidecar) -> None:
    created = fresh.put("/api/basic-auth/second", {"username": "svc2",
                                                      "password": NEW_PASSWORD})
    assert created.status_code == 201, created.text
    assert created.json()["password"] == "set"
    assert_no_secret(created)
    assert fresh.put("/api/basic-auth/second", {"username": "svc2",
                                                  "password": NEW_PASSWORD}).status_code == 200

    body = {"url": fresh.upstream.base_url, "listen": f"127.0.0.1:{fresh.port}",
            "auth": {"basic": "second"}, "tls": {"verify": "skip"}}
    assigned = fresh.put("/api/connections/main", body)
    assert assigned.status_code == 200, assigned.text
    assert assigned.json()["auth"]["basic"] == "second"
    # The reload happened before the answer: the very next request uses the new credentials.
    assert fresh.through().status_code == 200
    assert fresh.last_auth() == basic_header("svc2", NEW_PASSWORD)

    # Persisted: the config names a 0600 file in the state dir's secrets directory (0700);
    # no secret in the config.
    text = fresh.path.read_text()
    assert NEW_PASSWORD not in text
    secret_file = Path(fresh.config()["basic_auth"]["second"]["password_file"])
    assert secret_file.parent == fresh.secrets_dir
    assert secret_file.read_text() == NEW_PASSWORD + "\n"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(fresh.secrets_dir.stat().st_mode) == 0o700
    in_use = fresh.delete("/api/basic-auth/second")
    assert in_use.status_code == 409 and "used by connection main" in in_use.json()["error"]

    # Rotating only the password keeps the username; the old secret file is removed.
    rotated = fresh.put("/api/basic-auth/second", {"username": "svc2",
                                                      "password": ROTATED_PASSWORD})
    assert rotated.status_code == 200
    assert not secret_file.exists()
    fresh.through()
    assert fresh.last_auth() == basic_header("svc2", ROTATED_PASSWORD)
    # A PUT without a password keeps the current one.
    assert fresh.put("/api/basic-auth/second", {"username": "svc3"}).status_code == 200
    fresh.through()
    assert fresh.last_auth() == basic_header("svc3", ROTATED_PASSWORD)

    # Back to the first definition, then the second can go.
    body["auth"] = {"basic": "first"}
    assert fresh.put("/api/connections/main", body).status_code == 200
    assert fresh.delete("/api/basic-auth/second").status_code == 204
    assert fresh.api.get("/api/basic-auth/second").status_code == 404
    assert not [p for p in fresh.secrets_dir.iterdir() if p.name.startswith("basic-second")]
    fresh.through()
    assert fresh.last_auth() == basic_header("svc", FIRST_PASSWORD)


def test_connection_created_and_deleted(fresh: Sidecar) -> None:
    port = free_port()
    created = fresh.put("/api/connections/extra", {
        "url": fresh.upstream.base_url, "listen": f"127.0.0.1:{port}",
        "tls": {"verify": "skip"}})
    assert created.status_code == 201, created.text
    assert created.json()["auth"] == {"basic": None, "oauth": None}
    response = httpx.get(f"http://127.0.0.1:{port}/metadata", timeout=30, trust_env=False)
    assert response.status_code == 200
    assert fresh.last_auth() is None
    assert fresh.delete("/api/connections/extra").status_code == 204
    assert "extra" not in fresh.config()["connections"]


def test_oauth_definitions_with_secret_and_private_key(fresh: Sidecar) -> None:
    created = fresh.put("/api/oauth/corp", {
        "token_url": "https://127.0.0.1:9/token", "client_id": "app",
        "client_secret": CLIENT_SECRET, "scopes": ["system/Patient.rs"]})
    assert created.status_code == 201, created.text
    view = created.json()
    assert view["client_secret"] == "set" and view["private_key"] == "not used"
    assert view["token"]["valid_until"] is None
    assert_no_secret(created)
    assert CLIENT_SECRET not in fresh.path.read_text()

    key = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    switched = fresh.put("/api/oauth/corp", {
        "token_url": "https://127.0.0.1:9/token", "client_id": "app",
        "client_auth": "private_key_jwt", "private_key_pem": key, "key_id": "k1",
        "signing_alg": "ES384"})
    assert switched.status_code == 200, switched.text
    assert switched.json()["private_key"] == "set"
    assert switched.json()["client_secret"] == "not used"
    assert "PRIVATE KEY" not in switched.text
    key_file = Path(fresh.config()["oauth"]["corp"]["private_key_file"])
    assert key_file.parent == fresh.secrets_dir
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert fresh.api.get("/api/oauth").json()["items"][0]["name"] == "corp"
    assert fresh.delete("/api/oauth/corp").status_code == 204
    assert not key_file.exists()


def test_ca_bundle_uploaded_and_used_by_a_custom_connection(fresh: Sidecar) -> None:
    pem = fresh.pki.ca_bundle_path.read_bytes()
    other = fresh.pki.other_ca_bundle_path.read_bytes()
    body = {"url": fresh.upstream.base_url, "listen": f"127.0.0.1:{fresh.port}",
            "auth": {"basic": "first"}, "tls": {"verify": "custom", "ca_bundle": "corp-ca"}}
    try:
        up = fresh.api.put("/api/ca-bundles/corp-ca", content=other,
                             headers={**fresh.auth, "Content-Type": "application/x-pem-file"})
        assert up.status_code == 201, up.text
        assert up.json()["certificates"][0]["is_ca"] is True
        assert up.json()["certificates"][0]["not_after"].endswith("Z")
        assert fresh.put("/api/connections/main", body).status_code == 200
        assert fresh.api.get("/api/connections/main").json()["tls"]["ca_bundle"] == "corp-ca"
        # Trusting the other CA: the upstream's certificate no longer verifies.
        assert fresh.through().headers.get("X-Sidecar-Error") == "upstream-tls"
        replaced = fresh.api.put("/api/ca-bundles/corp-ca", content=pem,
                                   headers=fresh.auth)
        assert replaced.status_code == 200
        assert fresh.through().status_code == 200
        assert fresh.api.get("/api/ca-bundles/corp-ca").json()["used_by"] == ["main"]
        in_use = fresh.delete("/api/ca-bundles/corp-ca")
        assert in_use.status_code == 409 and "main" in in_use.json()["error"]
    finally:
        body["tls"] = {"verify": "skip"}
        assert fresh.put("/api/connections/main", body).status_code == 200
    assert fresh.delete("/api/ca-bundles/corp-ca").status_code == 204
    assert fresh.api.get("/api/ca-bundles").json() == {"items": []}


# -- bad input: 4xx, a clear message, nothing changed on disk -----------------------------------

def _leaf_pem(pki: TestPKI) -> bytes:
    chain = x509.load_pem_x509_certificates(pki.server(name="leaf-only").cert_chain.read_bytes())
    return chain[0].public_bytes(serialization.Encoding.PEM)


BAD_WRITES: list[tuple[str, str, str, Any, int, str]] = [
    # (id, method, path, body, status, words in the message)
    ("unknown-basic", "PUT", "/api/connections/main",
     {"url": "https://127.0.0.1:1/fhir", "auth": {"basic": "missing"}}, 422,
     "no Basic Auth definition named 'missing'"),
    ("both-kinds", "PUT", "/api/connections/main",
     {"url": "https://127.0.0.1:1/fhir", "auth": {"basic": "first", "oauth": "x"}}, 422,
     "not both"),
    ("unknown-key", "PUT", "/api/basic-auth/x", {"username": "u", "password": "p",
                                                 "colour": "red"}, 422, "unknown key"),
    ("new-without-password", "PUT", "/api/basic-auth/x", {"username": "u"}, 422,
     "password is required"),
    ("bad-name", "PUT", "/api/basic-auth/Bad_Name", {"username": "u", "password": "p"}, 400,
     "must match"),
    ("not-an-object", "PUT", "/api/basic-auth/x", ["u"], 400, "JSON object"),
    ("bad-url", "PUT", "/api/connections/y", {"url": "ftp://x"}, 422, "http(s) URL"),
    ("unknown-bundle", "PUT", "/api/connections/y",
     {"url": "https://127.0.0.1:1/", "tls": {"verify": "custom", "ca_bundle": "nope"}}, 422,
     "no CA bundle named 'nope'"),
    ("bad-private-key", "PUT", "/api/oauth/z",
     {"token_url": "https://127.0.0.1:1/t", "client_id": "c", "client_auth": "private_key_jwt",
      "private_key_pem": "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n"},
     422, "not an unencrypted PEM private key"),
    ("delete-unknown", "DELETE", "/api/oauth/nope", None, 404, "no OAuth definition"),
    ("delete-config-file-definition", "DELETE", "/api/basic-auth/first", None, 409,
     "comes from the config file"),
    ("change-config-file-definition", "PUT", "/api/basic-auth/first",
     {"username": "u", "password": "p"}, 409, "edit the config file"),
    ("change-config-file-connection-path", "PUT", "/api/connections/fixed",
     {"url": "https://127.0.0.1:1/fhir",
      "tls": {"verify": "custom", "ca_bundle": "/etc/ssl/certs/ca-certificates.crt"}},
     422, "tls.ca_bundle: give the name of an uploaded CA bundle"),
    ("password-file", "PUT", "/api/basic-auth/x", {"username": "u", "password_file": "/etc/hosts"},
     422, "password_file: file paths and environment variable names are not accepted"),
    ("password-env", "PUT", "/api/basic-auth/x", {"username": "u", "password_env": "HOME"},
     422, "password_env: file paths"),
    ("client-secret-file", "PUT", "/api/oauth/z",
     {"token_url": "https://127.0.0.1:1/t", "client_id": "c",
      "client_secret_file": "../../etc/hostname"}, 422, "client_secret_file"),
    ("private-key-file", "PUT", "/api/oauth/z",
     {"token_url": "https://127.0.0.1:1/t", "client_id": "c", "client_auth": "private_key_jwt",
      "private_key_file": "/etc/hosts"}, 422, "send the value itself (private_key_pem)"),
    ("ca-bundle-path", "PUT", "/api/connections/y",
     {"url": "https://127.0.0.1:1/", "tls": {"verify": "custom", "ca_bundle": "/etc/hosts"}},
     422, "tls.ca_bundle: give the name of an uploaded CA bundle"),
    ("client-cert-path", "PUT", "/api/connections/y",
     {"url": "https://127.0.0.1:1/", "tls": {"client_cert": "/etc/hosts",
                                             "client_key": "/etc/hosts"}},
     422, "tls.client_key: file paths are not accepted"),
    ("newline-name", "PUT", "/api/basic-auth/x%0A", {"username": "u", "password": "p"}, 400,
     "must match"),
    ("newline-bundle-name", "PUT", "/api/ca-bundles/x%0A", b"pem", 400, "must match"),
    ("oversized-json", "PUT", "/api/basic-auth/x",
     {"username": "u", "password": "p" * (1024 * 1024)}, 413, "larger than 1048576 bytes"),
    ("malformed-pem", "PUT", "/api/ca-bundles/bad", b"-----BEGIN CERTIFICATE-----\nxx\n"
     b"-----END CERTIFICATE-----\n", 422, "not a valid PEM certificate bundle"),
    ("not-pem", "PUT", "/api/ca-bundles/bad", b"hello", 422, "contains no PEM certificate"),
    ("oversized", "PUT", "/api/ca-bundles/big", b"x" * (300 * 1024), 413, "larger than"),
    ("no-token", "PUT", "/api/basic-auth/x", {"username": "u", "password": "p"}, 401,
     "admin token"),
    ("delete-bundle-unknown", "DELETE", "/api/ca-bundles/nope", None, 404, "no CA bundle"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "words"),
                         [case[1:] for case in BAD_WRITES], ids=[c[0] for c in BAD_WRITES])
def test_bad_writes_change_nothing(sidecar: Sidecar, method: str, path: str, body: Any,
                                   status: int, words: str) -> None:
    wait_for_quiet_watcher(sidecar)
    before = disk_state(sidecar.tmp)
    generation = sidecar.process.events("config_reloaded")
    headers = {} if words == "admin token" else sidecar.auth
    kwargs: dict[str, Any] = {"headers": headers}
    if isinstance(body, bytes):
        kwargs["content"] = body
    elif body is not None:
        kwargs["json"] = body
    response = sidecar.api.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    message = response.json()
    assert words in message["error"] + " ".join(message["problems"])
    assert_no_secret(response)
    assert disk_state(sidecar.tmp) == before
    assert sidecar.process.events("config_reloaded") == generation


def test_non_ca_bundle_is_rejected(sidecar: Sidecar) -> None:
    before = disk_state(sidecar.tmp)
    leaf = _leaf_pem(sidecar.pki)
    response = sidecar.api.put("/api/ca-bundles/leaf", content=leaf, headers=sidecar.auth)
    assert response.status_code == 422
    assert "only CA certificates" in response.json()["error"]
    assert disk_state(sidecar.tmp) == before


def test_a_change_the_sidecar_cannot_apply_is_rolled_back(sidecar: Sidecar) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = disk_state(sidecar.tmp)
        response = sidecar.put("/api/connections/clash", {
            "url": "https://127.0.0.1:1/fhir", "listen": f"127.0.0.1:{port}"})
        assert response.status_code == 409, response.text
        assert any("cannot listen" in p for p in response.json()["problems"])
        assert disk_state(sidecar.tmp) == before
    assert sidecar.api.get("/api/connections/clash").status_code == 404
    assert sidecar.through().status_code == 200


# -- authentication, sessions, CSRF ---------------------------------------------------------------

def _login(s: Sidecar, token: str) -> httpx.Response:
    return s.api.post("/login", data={"token": token}, follow_redirects=False)


def test_wrong_tokens_are_refused_and_slowed_down(fresh: Sidecar) -> None:
    before = disk_state(fresh.tmp)
    wrong = fresh.put("/api/basic-auth/x", {"username": "u", "password": "p"},
                      headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401
    assert "admin token" in wrong.json()["error"]
    # The next attempt, even with the right token, must wait.
    slowed = fresh.put("/api/basic-auth/x", {"username": "u", "password": "p"})
    assert slowed.status_code == 429
    assert int(slowed.headers["Retry-After"]) >= 1
    login = _login(fresh, "wrong")
    assert login.status_code == 429
    assert disk_state(fresh.tmp) == before
    # Once the delay has passed, the right token works again.
    wait_until(lambda: fresh.put("/api/basic-auth/x", {"username": "u", "password": "p"}
                                 ).status_code == 201, timeout=10, interval=0.2,
               message="the throttle to let the right token in")


def test_browser_session_cookie_and_csrf(fresh: Sidecar) -> None:
    failed = _login(fresh, "wrong")
    assert failed.status_code == 401 and "wrong admin token" in failed.text
    wait_until(lambda: _login(fresh, ADMIN_TOKEN).status_code == 303, timeout=10,
               interval=0.2, message="login after the failed attempt's delay")
    raw = _login(fresh, ADMIN_TOKEN).headers["set-cookie"]
    assert "HttpOnly" in raw and "SameSite=Strict" in raw
    cookie = fresh.api.cookies.get("fhir_sidecar_session")
    assert cookie
    page = fresh.api.get("/basic-auth")
    csrf = re.search(r'name="_csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    before = disk_state(fresh.tmp)

    no_csrf = fresh.api.post("/basic-auth", data={"action": "save", "name": "web",
                                                  "username": "w", "password": "p"})
    assert no_csrf.status_code == 403 and "CSRF" in no_csrf.text
    bad_csrf = fresh.api.post("/basic-auth", data={"_csrf": "forged", "action": "save",
                                                   "name": "web", "username": "w",
                                                   "password": "p"})
    assert bad_csrf.status_code == 403
    api_no_csrf = fresh.api.put("/api/basic-auth/web", json={"username": "w", "password": "p"})
    assert api_no_csrf.status_code == 403 and "CSRF" in api_no_csrf.json()["error"]
    assert disk_state(fresh.tmp) == before

    ok = fresh.api.post("/basic-auth", data={"_csrf": csrf.group(1), "action": "save",
                                             "name": "web", "username": "w",
                                             "password": NEW_PASSWORD},
                        follow_redirects=False)
    assert ok.status_code == 303, ok.text
    listed = fresh.api.get("/basic-auth")
    assert "web" in listed.text and NEW_PASSWORD not in listed.text
    api_ok = fresh.api.put("/api/basic-auth/web2", json={"username": "w", "password": "p2"},
                           headers={"X-CSRF-Token": csrf.group(1)})
    assert api_ok.status_code == 201

    fresh.api.post("/logout", data={"_csrf": csrf.group(1)})
    fresh.api.cookies.set("fhir_sidecar_session", cookie)  # an old cookie is no longer valid
    after = fresh.api.post("/basic-auth", data={"_csrf": csrf.group(1), "action": "delete",
                                                "name": "web"})
    assert after.status_code == 401


# -- read-only configs -------------------------------------------------------------------------

def test_read_only_config_file(fresh: Sidecar) -> None:
    mode = fresh.path.stat().st_mode
    os.chmod(fresh.path, 0o444)
    try:
        before = disk_state(fresh.tmp)
        response = fresh.put("/api/basic-auth/x", {"username": "u", "password": "p"})
        assert response.status_code == 403
        assert "read-only" in response.json()["error"]
        assert disk_state(fresh.tmp) == before
        page = fresh.api.get("/")
        assert "Read-only" in page.text and "ConfigMap" in page.text
    finally:
        os.chmod(fresh.path, stat.S_IMODE(mode))


def test_without_a_token_file_everything_is_read_only(
        tmp_path: Path, pki: TestPKI, open_upstream: FhirTestServer,
        start_sidecar: StartSidecar) -> None:
    s = Sidecar(tmp_path, pki, open_upstream, start_sidecar, token=False)
    try:
        before = disk_state(tmp_path)
        response = s.put("/api/basic-auth/x", {"username": "u", "password": "p"})
        assert response.status_code == 403
        assert "admin.token_file" in response.json()["error"]
        assert _login(s, ADMIN_TOKEN).status_code == 403
        page = s.api.get("/basic-auth")
        assert "Read-only" in page.text and "<form method=\"post\" class=\"edit\"" not in page.text
        assert disk_state(tmp_path) == before
    finally:
        s.close()

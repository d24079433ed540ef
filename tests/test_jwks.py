"""Published signing keys: /.well-known/jwks.json, `fhir-sidecar jwks`, the key-age metric, and a
live rotation against the real authorization server with a client registered by ``jwks_uri``."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc.jwk import ECKey, RSAKey
from prometheus_client.parser import text_string_to_metric_families
from support.bearer import BearerValidator
from support.fhir_routes import fhir_upstream
from support.oauth_provider import OAuthTestProvider
from support.pki import TestPKI
from support.sidecar_process import SidecarProcess, free_port, wait_until, write_config
from support.sidecars import RunningSidecar, StartSidecar

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
LIVE_DEADLINE = 10.0
KEY_CREATED = {"current": 1_700_000_000, "next": 1_710_000_000, "previous": 1_690_000_000}

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def write_key(path: Path, kind: str = "rsa", created: int | None = None) -> PrivateKey:
    key: PrivateKey = (rsa.generate_private_key(65537, 2048) if kind == "rsa"
                       else ec.generate_private_key(ec.SECP384R1()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    if created is not None:
        os.utime(path, (created, created))
    return key


def thumbprint(key: PrivateKey) -> str:
    imported = RSAKey.import_key(key) if isinstance(key, rsa.RSAPrivateKey) \
        else ECKey.import_key(key)
    return imported.thumbprint()


def run_jwks_cli(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", "jwks", "-c", str(config)],
                          capture_output=True, text=True, timeout=60)


def assert_public_only(key_set: dict[str, Any]) -> None:
    for jwk in key_set["keys"]:
        leaked = PRIVATE_MEMBERS & set(jwk)
        assert not leaked, f"private members {leaked} published for kid {jwk.get('kid')}"
        assert jwk["use"] == "sig"


def assertion_kid(request: dict[str, Any]) -> str:
    header_b64 = request["params"]["client_assertion"].split(".")[0]
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=" * (-len(header_b64) % 4)))
    kid: str = header["kid"]
    return kid


# --- the published set ------------------------------------------------------------------------

@dataclass(frozen=True)
class Published:
    epic: dict[str, PrivateKey]
    other: PrivateKey
    running: RunningSidecar

    @property
    def sidecar(self) -> SidecarProcess:
        return self.running.process

    @property
    def config(self) -> dict[str, Any]:
        return self.running.config

    @property
    def path(self) -> Path:
        return self.running.config_path

    @property
    def admin_port(self) -> int:
        return self.running.admin_port

    def admin(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.running.admin_url}{path}", timeout=30, trust_env=False)


@pytest.fixture
def published(tmp_path: Path, start_sidecar: StartSidecar) -> Published:
    keys = tmp_path / "keys"
    epic = {slot: write_key(keys / f"epic-{slot}.pem", "ec" if slot == "next" else "rsa",
                            KEY_CREATED[slot])
            for slot in ("current", "next", "previous")}
    other = write_key(keys / "other.pem", "ec")
    (tmp_path / "admin-token").write_text("a-long-admin-token-for-the-test\n")
    running = start_sidecar({
        "proxy": {"listen": f"127.0.0.1:{free_port()}"},
        "admin": {"listen": f"127.0.0.1:{free_port()}", "token_file": "admin-token"},
        "oauth": {
            "epic": {"token_url": "https://127.0.0.1:9/token", "client_id": "epic-app",
                     "client_auth": "private_key_jwt",
                     "private_key_file": "keys/epic-current.pem",
                     "next_private_key_file": "keys/epic-next.pem",
                     "previous_private_key_file": "keys/epic-previous.pem"},
            "other": {"token_url": "https://127.0.0.1:9/token", "client_id": "other-app",
                      "client_auth": "private_key_jwt", "signing_alg": "ES384",
                      "private_key_file": "keys/other.pem", "key_id": "other-2026"},
            "secret": {"token_url": "https://127.0.0.1:9/token", "client_id": "plain",
                       "client_secret": "not-a-key-and-never-published"},
        },
    }, directory=tmp_path)
    return Published(epic, other, running)


def test_jwks_endpoint_serves_every_slot_public_only_without_a_token(
        published: Published) -> None:
    s = published
    refused = httpx.put(f"http://127.0.0.1:{s.admin_port}/api/basic-auth/x", timeout=30,
                        json={"username": "u", "password": "p"}, trust_env=False)
    assert refused.status_code == 401  # the admin token is on ...
    response = s.admin("/.well-known/jwks.json")  # ... and the key set needs none
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "max-age=300"
    assert response.headers["Content-Type"].startswith("application/json")
    key_set = response.json()
    assert_public_only(key_set)
    by_kid = {jwk["kid"]: jwk for jwk in key_set["keys"]}
    expected = {thumbprint(s.epic["current"]): ("RS384", "RSA"),
                thumbprint(s.epic["next"]): ("ES384", "EC"),
                thumbprint(s.epic["previous"]): ("RS384", "RSA"),
                "other-2026": ("ES384", "EC")}
    assert {kid: (jwk["alg"], jwk["kty"]) for kid, jwk in by_kid.items()} == expected
    # The published members are exactly the public key: they rebuild it.
    current = s.epic["current"]
    assert isinstance(current, rsa.RSAPrivateKey)
    published_key = RSAKey.import_key(by_kid[thumbprint(current)])
    assert published_key.thumbprint() == thumbprint(current)
    assert published_key.is_private is False


def test_cli_prints_the_same_set(published: Published) -> None:
    result = run_jwks_cli(published.path)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert_public_only(printed)
    assert printed == published.admin("/.well-known/jwks.json").json()
    assert "not-a-key-and-never-published" not in result.stdout + result.stderr


def signing_key_samples(metrics_text: str) -> dict[tuple[str, str, str], float]:
    return {(sample.labels["definition"], sample.labels["kid"], sample.labels["slot"]):
            sample.value
            for family in text_string_to_metric_families(metrics_text)
            if family.name == "fhir_sidecar_signing_key_created_timestamp_seconds"
            for sample in family.samples}


def test_key_created_metric_per_definition_kid_and_slot(published: Published) -> None:
    s = published
    samples = signing_key_samples(s.admin("/metrics").text)
    expected = {("epic", thumbprint(key), slot): float(KEY_CREATED[slot])
                for slot, key in s.epic.items()}
    assert {k: v for k, v in samples.items() if k[0] == "epic"} == expected
    assert set(samples) - set(expected) == {("other", "other-2026", "current")}


def test_removed_slot_leaves_set_and_metric_on_reload(published: Published) -> None:
    s = published
    gone = thumbprint(s.epic["previous"])
    del s.config["oauth"]["epic"]["previous_private_key_file"]
    reloads = len(s.sidecar.events("config_reloaded"))
    write_config(s.path.parent, s.config)
    wait_until(lambda: len(s.sidecar.events("config_reloaded")) > reloads, LIVE_DEADLINE,
               message="the reload")
    kids = {jwk["kid"] for jwk in s.admin("/.well-known/jwks.json").json()["keys"]}
    assert gone not in kids and thumbprint(s.epic["current"]) in kids
    assert gone not in {kid for _, kid, _ in signing_key_samples(s.admin("/metrics").text)}


def test_bad_next_key_is_a_config_error_naming_the_field(tmp_path: Path) -> None:
    write_key(tmp_path / "current.pem")
    (tmp_path / "next.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n")
    config = write_config(tmp_path, {"oauth": {"epic": {
        "token_url": "https://127.0.0.1:9/token", "client_id": "epic-app",
        "client_auth": "private_key_jwt", "private_key_file": "current.pem",
        "next_private_key_file": "next.pem"}}})
    result = run_jwks_cli(config)
    assert result.returncode == 2
    assert f"{config}: oauth.epic.next_private_key_file:" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_next_key_without_private_key_jwt_is_refused(tmp_path: Path) -> None:
    write_key(tmp_path / "next.pem")
    config = write_config(tmp_path, {"oauth": {"plain": {
        "token_url": "https://127.0.0.1:9/token", "client_id": "app",
        "client_secret": "s", "next_private_key_file": "next.pem"}}})
    result = run_jwks_cli(config)
    assert result.returncode == 2
    assert "next_private_key_file is only used with private_key_jwt" in result.stderr
    assert "oauth.plain" in result.stderr


# --- rotation against the real authorization server --------------------------------------------

class RecordingRelay:
    """The ``jwks_uri`` the authorization server fetches: forwards to the sidecar's admin
    listener and counts fetches, so the test can tell a cached set from a refetch."""

    def __init__(self, target: str):
        relay = self
        self.fetches = 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                relay.fetches += 1
                answer = httpx.get(target, timeout=30, trust_env=False)
                self.send_response(answer.status_code)
                for name in ("Content-Type", "Cache-Control"):
                    if name in answer.headers:
                        self.send_header(name, answer.headers[name])
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


JWKS_URI_CLIENT = "sidecar-jwks-uri"


def test_live_rotation_is_accepted_at_once_by_a_server_caching_the_jwks_uri(
        tmp_path: Path, pki: TestPKI, start_sidecar: StartSidecar) -> None:
    keys = {name: write_key(tmp_path / "keys" / f"{name}.pem") for name in ("a", "b", "c")}
    admin_port = free_port()
    relay = RecordingRelay(f"http://127.0.0.1:{admin_port}/.well-known/jwks.json")
    provider = OAuthTestProvider.start(tmp_path / "provider", extra_clients=[{
        "client_id": JWKS_URI_CLIENT, "token_endpoint_auth_method": "private_key_jwt",
        "token_endpoint_auth_signing_alg": "RS384", "jwks_uri": relay.url,
        "grant_types": ["client_credentials"], "response_types": [], "redirect_uris": []}])
    validator = BearerValidator(provider.jwks(), audience=provider.default_resource,
                                issuer=provider.issuer)
    conn_port = free_port()
    try:
        with fhir_upstream(pki.server(name="jwks-upstream"), auth=validator) as upstream:
            config: dict[str, Any] = {
                "proxy": {"listen": f"127.0.0.1:{free_port()}"},
                "admin": {"listen": f"127.0.0.1:{admin_port}"},
                "oauth": {"epic": {
                    "token_url": provider.token_url, "client_id": JWKS_URI_CLIENT,
                    "client_auth": "private_key_jwt", "signing_alg": "RS384",
                    "private_key_file": "keys/a.pem", "next_private_key_file": "keys/b.pem",
                    "scopes": list(provider.scopes),
                    "tls": {"verify": "custom", "ca_bundle": str(provider.ca_bundle)}}},
                "connections": {"fhir": {
                    "url": upstream.base_url, "listen": f"127.0.0.1:{conn_port}",
                    "auth": {"oauth": "epic"},
                    "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}},
            }
            sidecar = start_sidecar(config, directory=tmp_path)
            _rotate_and_check(sidecar.process, provider, relay, config, sidecar.config_path,
                              conn_port, keys)
    finally:
        provider.stop()
        relay.close()


def _rotate_and_check(sidecar: SidecarProcess, provider: OAuthTestProvider,
                      relay: RecordingRelay, config: dict[str, Any], path: Path,
                      conn_port: int, keys: dict[str, PrivateKey]) -> None:
    url = f"http://127.0.0.1:{conn_port}/metadata"

    def token_requests() -> list[dict[str, Any]]:
        return [r for r in provider.recent_requests() if r.get("client_id") == JWKS_URI_CLIENT]

    def rotate(**files: str) -> None:
        reloads = len(sidecar.events("config_reloaded"))
        epic = config["oauth"]["epic"]
        for field in ("private_key_file", "next_private_key_file", "previous_private_key_file"):
            epic.pop(field, None)
        epic.update(files)
        write_config(path.parent, config)
        wait_until(lambda: len(sidecar.events("config_reloaded")) > reloads, LIVE_DEADLINE,
                   message="the reload")

    # Tokens are issued for assertions signed with the current key; the server fetched the set
    # (with the next key already in it) once.
    assert httpx.get(url, timeout=30, trust_env=False).status_code == 200
    first = token_requests()
    assert [r["status"] for r in first] == [200]
    assert assertion_kid(first[0]) == thumbprint(keys["a"])
    assert relay.fetches == 1

    # Rotation: next becomes current, current becomes previous. The server does not fetch the
    # set again (it is cached for max-age=300), yet accepts the new key at once.
    rotate(private_key_file="keys/b.pem", previous_private_key_file="keys/a.pem")
    assert httpx.get(url, timeout=30, trust_env=False).status_code == 200
    second = token_requests()[len(first):]
    assert [r["status"] for r in second] == [200]
    assert assertion_kid(second[0]) == thumbprint(keys["b"])
    assert relay.fetches == 1
    published = {jwk["kid"] for jwk in httpx.get(
        f"http://{config['admin']['listen']}/.well-known/jwks.json",
        timeout=30, trust_env=False).json()["keys"]}
    assert published == {thumbprint(keys["b"]), thumbprint(keys["a"])}

    # The control: a key that was never published ahead is refused by the caching server.
    rotate(private_key_file="keys/c.pem", previous_private_key_file="keys/b.pem")
    refused = httpx.get(url, timeout=30, trust_env=False)
    assert refused.status_code == 503
    assert refused.headers["X-Sidecar-Error"] == "token-unavailable"
    third = token_requests()[len(first) + len(second):]
    assert third and all(r["status"] == 401 for r in third)
    assert assertion_kid(third[0]) == thumbprint(keys["c"])


def test_admin_api_shows_kids_and_slots_read_only(published: Published) -> None:
    s = published
    view = s.admin("/api/oauth/epic").json()
    assert view["signing_keys"] == [
        {"slot": slot, "kid": thumbprint(s.epic[slot]), "alg": alg}
        for slot, alg in (("current", "RS384"), ("next", "ES384"), ("previous", "RS384"))]
    assert s.admin("/api/oauth/secret").json()["signing_keys"] == []


def test_check_warns_that_key_id_names_the_current_key_only(tmp_path: Path) -> None:
    write_key(tmp_path / "current.pem")
    write_key(tmp_path / "next.pem")
    config = write_config(tmp_path, {"oauth": {"epic": {
        "token_url": "https://127.0.0.1:9/token", "client_id": "epic-app",
        "client_auth": "private_key_jwt", "private_key_file": "current.pem", "key_id": "k1",
        "next_private_key_file": "next.pem"}}})
    result = subprocess.run([sys.executable, "-m", "sidecar", "check", "-c", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"warning: {config}: oauth.epic.key_id: names the current key only" in result.stderr

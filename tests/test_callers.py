"""Only the apps the credentials are for (issue 26): no browser page (DNS rebinding, cross-site
requests), no side door (HTTP/3), no stray pod (workload tokens).

Attacks are raw bytes on the sidecar's real listeners; what the upstream received is read off
a raw-byte-recording TLS upstream, so "nothing went upstream" is checked, not assumed.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey, RSAKey
from support.constants import basic_header
from support.jwks_server import JwksServer
from support.pki import TestPKI
from support.raw_client import RawResponse, get
from support.raw_upstream import RawRecordingUpstream
from support.sidecar_process import free_port, wait_until, write_config
from support.sidecars import RunningSidecar, StartSidecar
from support.sockets import bound_sockets

K8S_ISSUER = "https://kubernetes.default.svc.cluster.local"
SPIFFE_ISSUER = "https://spire.example.org"
AUDIENCE = "fhir-sidecar"
CLAIMS_API = "system:serviceaccount:billing:claims-api"
OTHER_POD = "system:serviceaccount:default:curious-pod"
SPIFFE_ID = "spiffe://example.org/claims"
PASSWORD = "callers-pw-Rt62"
JWKS_BEARER = "projected-sa-token-Yq41"
APP_ORIGIN = "https://app.example.org"
ADMIN_TOKEN = "callers-admin-token-Hp20"


@dataclass
class Rig:
    sidecar: RunningSidecar
    upstream: RawRecordingUpstream
    jwks: JwksServer
    k8s_key: RSAKey
    spiffe_key: ECKey
    directory: Path

    def port(self, name: str) -> int:
        return self.sidecar.ports[name]

    def upstream_bytes_after(self, send: Any) -> tuple[Any, bytes]:
        """What ``send()`` answered, and every byte the upstream received meanwhile."""
        before = len(self.upstream.all_bytes())
        result = send()
        return result, self.upstream.all_bytes()[before:]

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.sidecar.admin_url}/metrics", trust_env=False, timeout=10).text
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith(name + "{"):
                found = line[len(name) + 1:line.index("}")]
                if ",".join(sorted(found.split(","))) == wanted:
                    return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no series {name}{{{wanted}}}")


def k8s_token(key: RSAKey, subject: str = CLAIMS_API, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": K8S_ISSUER, "aud": [AUDIENCE], "sub": subject, "iat": now, "nbf": now,
            "exp": now + 600, **claims}
    return jwt.encode({"alg": "RS256", "kid": key.kid}, {k: v for k, v in body.items()
                                                          if v is not None}, key)


def spiffe_token(key: ECKey, subject: str = SPIFFE_ID) -> str:
    now = int(time.time())
    return jwt.encode({"alg": "ES256", "kid": key.kid},
                      {"iss": SPIFFE_ISSUER, "aud": AUDIENCE, "sub": subject, "exp": now + 600},
                      key)


def _public(key: RSAKey | ECKey) -> dict[str, Any]:
    return dict(key.as_dict(private=False))


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI,
        start_module_sidecar: StartSidecar) -> Iterator[Rig]:
    directory = tmp_path_factory.mktemp("callers")
    (directory / "pw").write_text(PASSWORD + "\n")
    (directory / "sa-token").write_text(JWKS_BEARER + "\n")
    (directory / "admin-token").write_text(ADMIN_TOKEN + "\n")
    k8s_key = RSAKey.generate_key(2048, parameters={"kid": "k8s-1"})
    spiffe_key = ECKey.generate_key("P-256", parameters={"kid": "spire-1"})
    (directory / "cluster-jwks.json").write_text(json.dumps({"keys": [_public(k8s_key)]}))
    tls = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
    with RawRecordingUpstream(pki.server(name="callers-up")) as upstream, \
            JwksServer(pki.server(name="callers-jwks"), require_bearer=JWKS_BEARER) as jwks:
        jwks.publish(_public(spiffe_key))
        url = f"https://localhost:{upstream.port}/fhir"

        def conn(**extra: Any) -> dict[str, Any]:
            return {"url": url, "listen": f"127.0.0.1:{free_port()}", "auth": {"basic": "b"},
                    "tls": tls, **extra}

        config = {
            "admin": {"listen": f"127.0.0.1:{free_port()}", "token_file": "admin-token"},
            "proxy": {"listen": f"127.0.0.1:{free_port()}"},
            "basic_auth": {"b": {"username": "svc", "password_file": "pw"}},
            "callers": {
                "k8s": {"issuer": K8S_ISSUER, "audience": AUDIENCE,
                        "jwks_file": "cluster-jwks.json"},
                "spiffe": {"issuer": SPIFFE_ISSUER, "audience": AUDIENCE,
                           "jwks_url": jwks.url, "tls": tls, "bearer_token_file": "sa-token"},
            },
            "connections": {
                "open": conn(allowed_hosts=["fhir-gw.example"], allowed_origins=[APP_ORIGIN]),
                "star": conn(allowed_hosts=["*"]),
                "guarded": conn(allowed_callers=[f"k8s:{CLAIMS_API}"]),
                "fetched": conn(allowed_callers=[f"spiffe:{SPIFFE_ID}"]),
            },
        }
        sidecar = start_module_sidecar(config, directory=directory)
        yield Rig(sidecar, upstream, jwks, k8s_key, spiffe_key, directory)


def _refused(response: RawResponse, status: int, kind: str) -> dict[str, Any]:
    assert response.status == status, response.head + response.body
    assert response.headers["x-sidecar-error"] == kind
    assert response.headers["content-type"] == "application/fhir+json"
    outcome: dict[str, Any] = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    return outcome


# -- 1. DNS rebinding and cross-site requests -----------------------------------------------------

def test_a_rebound_host_gets_421_and_nothing_goes_upstream(rig: Rig) -> None:
    port = rig.port("open")
    before = rig.metric("fhir_sidecar_caller_rejections_total", connection="open",
                        reason="misdirected")
    for host in (f"attacker.example:{port}", "attacker.example", f"fhir-gw.example:{port + 1}",
                 "0.0.0.0", f"127.0.0.1.attacker.example:{port}", ""):
        answer, arrived = rig.upstream_bytes_after(
            lambda h=host: get(port, "/Patient", Host=h, Origin="http://attacker.example"))
        outcome = _refused(answer, 421, "misdirected")
        assert arrived == b"", host
        diagnostics = outcome["issue"][0]["diagnostics"]
        assert "connections.open.allowed_hosts" in diagnostics
        if host:
            assert repr(host) in diagnostics
    # The names it answers: its address, the one the request arrived on, localhost and its
    # allowed_hosts, each with or without the listener's port.
    for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "LOCALHOST",
                 "fhir-gw.example", f"fhir-gw.example:{port}"):
        answer, arrived = rig.upstream_bytes_after(lambda h=host: get(port, "/Patient", Host=h))
        assert answer.status == 200, (host, answer.body)
        expected = basic_header("svc", PASSWORD).encode()
        assert b"Authorization: " + expected in arrived
    after = rig.metric("fhir_sidecar_caller_rejections_total", connection="open",
                       reason="misdirected")
    assert after - before == 6


def test_a_star_answers_any_host_and_check_warns(rig: Rig) -> None:
    answer = get(rig.port("star"), "/Patient", Host="anything.example")
    assert answer.status == 200
    warnings = [r["message"] for r in rig.sidecar.process.events("config_warning")]
    assert any("connections.star.allowed_hosts" in w and "DNS rebinding" in w for w in warnings)


def test_a_cross_site_origin_gets_403_and_no_cors_headers(rig: Rig) -> None:
    port = rig.port("open")
    host = f"127.0.0.1:{port}"
    for origin in ("http://attacker.example", "null", "https://app.example.org:8443",
                   "http://app.example.org"):
        answer, arrived = rig.upstream_bytes_after(
            lambda o=origin: get(port, "/Patient", Host=host, Origin=o))
        outcome = _refused(answer, 403, "origin-not-allowed")
        assert arrived == b""
        assert "connections.open.allowed_origins" in outcome["issue"][0]["diagnostics"]
        assert not any(h.startswith("access-control-") for h in answer.headers)
    for origin in (APP_ORIGIN, "HTTPS://APP.example.org:443"):
        answer = get(port, "/Patient", Host=host, Origin=origin)
        assert answer.status == 200
        assert not any(h.startswith("access-control-") for h in answer.headers)
    assert rig.metric("fhir_sidecar_caller_rejections_total", connection="open",
                      reason="origin") >= 4


def test_the_forward_proxy_checks_the_host_of_origin_form_requests_only(rig: Rig) -> None:
    proxy = rig.sidecar.proxy_port
    assert proxy is not None
    upstream = f"localhost:{rig.upstream.port}"
    # Absolute-form: routed by its URI, whatever Host it carries.
    answer = get(proxy, f"http://{upstream}/fhir/Patient", Host=upstream)
    assert answer.status == 200
    # Origin-form: routed by its Host, the one thing a rebound page controls.
    answer, arrived = rig.upstream_bytes_after(
        lambda: get(proxy, "/fhir/Patient", Host=upstream))
    outcome = _refused(answer, 421, "misdirected")
    assert arrived == b""
    assert "proxy.allowed_hosts" in outcome["issue"][0]["diagnostics"]


def test_caller_refusals_leave_the_connection_green(rig: Rig) -> None:
    port = rig.port("open")
    for _ in range(5):
        get(port, "/Patient", Host="attacker.example")
    health = httpx.get(f"{rig.sidecar.admin_url}/api/connections/open", trust_env=False,
                       timeout=10).json()["health"]
    assert health["light"] == "green", health


# -- 2. No side door ----------------------------------------------------------------------------

def test_listeners_are_tcp_only(rig: Rig) -> None:
    assert rig.sidecar.process.proc is not None
    sockets = bound_sockets(rig.sidecar.process.proc.pid)
    tcp_ports = {s.port for s in sockets if s.protocol == "tcp"}
    assert set(rig.sidecar.ports.values()) <= tcp_ports
    assert [s for s in sockets if s.protocol == "udp"] == []


# -- 3. Workload tokens -------------------------------------------------------------------------

def _as_app(rig: Rig, name: str, token: str | None, **headers: str) -> RawResponse:
    port = rig.port(name)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return get(port, "/Patient", Host=f"127.0.0.1:{port}", **headers)


def test_an_allowed_workload_gets_the_connections_credentials(rig: Rig) -> None:
    token = k8s_token(rig.k8s_key)
    answer, arrived = rig.upstream_bytes_after(lambda: _as_app(rig, "guarded", token))
    assert answer.status == 200, answer.body
    assert b"Authorization: " + basic_header("svc", PASSWORD).encode() in arrived
    # The app's token is removed: it never reaches the FHIR server, in any form.
    for form in (token, token.split(".")[1], base64.b64encode(token.encode()).decode()):
        assert form.encode() not in arrived
    line = rig.sidecar.process.wait_for_event(
        "request", lambda r: r.get("connection") == "guarded" and r.get("status") == 200)
    assert line["caller"] == f"k8s:{CLAIMS_API}"
    assert token not in rig.sidecar.process.output


def test_no_bad_or_foreign_token_gets_401_and_nothing_goes_upstream(rig: Rig) -> None:
    key = rig.k8s_key
    now = int(time.time())
    stranger = RSAKey.generate_key(2048, parameters={"kid": "k8s-1"})  # same kid, other key
    public_as_hmac = OctKey.import_key(json.dumps(_public(key)).encode())
    bad = {
        "none": None,
        "not a bearer": "Basic dXNlcjpwdw==",
        "garbage": "Bearer not.a.jwt",
        "expired": f"Bearer {k8s_token(key, exp=now - 3600, nbf=now - 7200, iat=now - 7200)}",
        "not yet valid": f"Bearer {k8s_token(key, nbf=now + 3600)}",
        "other audience": f"Bearer {k8s_token(key, aud=['kube-apiserver'])}",
        "other issuer": f"Bearer {k8s_token(key, iss='https://evil.example')}",
        "forged signature": f"Bearer {k8s_token(stranger)}",
        "alg none": "Bearer " + ".".join(
            base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=")
            for part in ({"alg": "none"}, {"iss": K8S_ISSUER, "aud": AUDIENCE,
                                           "sub": CLAIMS_API, "exp": now + 600})) + ".",
        "hmac with the public key": "Bearer " + jwt.encode(
            {"alg": "HS256", "kid": "k8s-1"},
            {"iss": K8S_ISSUER, "aud": AUDIENCE, "sub": CLAIMS_API, "exp": now + 600},
            public_as_hmac),
    }
    for case, authorization in bad.items():
        headers = {} if authorization is None else {"Authorization": authorization}
        answer, arrived = rig.upstream_bytes_after(
            lambda h=headers: get(rig.port("guarded"), "/Patient",
                                  Host="localhost", **h))
        _refused(answer, 401, "caller-unauthenticated")
        assert answer.headers["www-authenticate"].startswith("Bearer"), case
        assert arrived == b"", case


def test_a_valid_token_of_another_workload_gets_403(rig: Rig) -> None:
    answer, arrived = rig.upstream_bytes_after(
        lambda: _as_app(rig, "guarded", k8s_token(rig.k8s_key, subject=OTHER_POD)))
    outcome = _refused(answer, 403, "caller-forbidden")
    assert arrived == b""
    assert "connections.guarded.allowed_callers" in outcome["issue"][0]["diagnostics"]
    assert rig.metric("fhir_sidecar_caller_rejections_total", connection="guarded",
                      reason="forbidden") >= 1


def test_a_rotated_key_set_file_is_used_live(rig: Rig) -> None:
    new_key = RSAKey.generate_key(2048, parameters={"kid": "k8s-2"})
    assert _as_app(rig, "guarded", k8s_token(new_key)).status == 401
    jwks = rig.directory / "cluster-jwks.json"
    original = jwks.read_text()
    try:
        staged = rig.directory / ".cluster-jwks.json.new"
        staged.write_text(json.dumps({"keys": [_public(new_key)]}))
        staged.replace(jwks)
        wait_until(lambda: _as_app(rig, "guarded", k8s_token(new_key)).status == 200,
                   10, interval=0.2, message="the rotated key to be trusted")
        assert _as_app(rig, "guarded", k8s_token(rig.k8s_key)).status == 401
    finally:
        jwks.write_text(original)
        wait_until(lambda: _as_app(rig, "guarded", k8s_token(rig.k8s_key)).status == 200,
                   10, interval=0.2, message="the original key set back")


def test_a_key_set_url_is_fetched_with_its_bearer_and_refetched_for_a_new_kid(rig: Rig) -> None:
    assert _as_app(rig, "fetched", spiffe_token(rig.spiffe_key)).status == 200
    assert rig.jwks.fetches and set(rig.jwks.fetches) == {f"Bearer {JWKS_BEARER}"}
    fetched = rig.jwks.fetch_count()
    # Verified tokens and known keys cost no fetch.
    for _ in range(5):
        assert _as_app(rig, "fetched", spiffe_token(rig.spiffe_key)).status == 200
    assert rig.jwks.fetch_count() == fetched
    # The issuer rotates: the new key is published before it signs, and a token with the new
    # kid makes the sidecar fetch again, once.
    rotated = ECKey.generate_key("P-256", parameters={"kid": "spire-2"})
    rig.jwks.publish(_public(rig.spiffe_key), _public(rotated))
    assert _as_app(rig, "fetched", spiffe_token(rotated)).status == 200
    assert rig.jwks.fetch_count() == fetched + 1
    # Another unknown kid within the minute: refused without a fetch (no fetch storm).
    unknown = ECKey.generate_key("P-256", parameters={"kid": "spire-unknown"})
    for _ in range(3):
        assert _as_app(rig, "fetched", spiffe_token(unknown)).status == 401
    assert rig.jwks.fetch_count() == fetched + 1


def test_a_caller_definition_with_a_bad_key_set_is_a_config_error(
        tmp_path: Path, start_sidecar: StartSidecar) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    config: dict[str, Any] = {
        "admin": {"listen": None},
        "callers": {"k8s": {"issuer": K8S_ISSUER, "audience": AUDIENCE,
                            "jwks_file": "jwks.json"}},
        "connections": {"c": {"url": "https://127.0.0.1:9/fhir",
                              "allowed_callers": ["k8s:someone"]}}}

    def check() -> str:
        path = write_config(tmp_path, config)
        result = subprocess.run([sys.executable, "-m", "sidecar", "check", "-c", str(path)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stdout + result.stderr
        out = result.stdout + result.stderr
        assert "Traceback" not in out
        return out

    out = check()
    path = tmp_path / "sidecar.yaml"
    assert f"{path}: callers.k8s.jwks_file:" in out and "only asymmetric keys" in out
    assert "c2VjcmV0" not in out and "secret" not in out
    config["connections"]["c"]["allowed_callers"] = ["k9s:someone"]
    out = check()
    assert f"{path}: connections.c.allowed_callers[0]: no caller definition named 'k9s'" in out


def test_check_warns_about_a_shared_listener_without_callers_and_a_star(tmp_path: Path) -> None:
    path = write_config(tmp_path, {
        "admin": {"listen": None},
        "connections": {"open-door": {"url": "https://127.0.0.1:9/fhir",
                                      "listen": f"0.0.0.0:{free_port()}",
                                      "allowed_hosts": ["*"]},
                        "local": {"url": "https://127.0.0.1:9/fhir",
                                  "listen": f"127.0.0.1:{free_port()}"}}})
    result = subprocess.run([sys.executable, "-m", "sidecar", "check", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert any("connections.open-door.allowed_hosts" in w for w in warnings)
    assert any("connections.open-door.listen" in w and "allowed_callers" in w for w in warnings)
    assert not any("connections.local." in w for w in warnings)


def test_the_connection_test_names_the_callers_it_serves(rig: Rig) -> None:
    report = httpx.post(f"{rig.sidecar.admin_url}/api/connections/guarded/test",
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, trust_env=False,
                        timeout=30).json()
    [credentials] = [s for s in report["steps"] if s["step"] == "credentials"]
    assert f"k8s:{CLAIMS_API}" in credentials["detail"]
    assert "allowed_callers" in credentials["detail"]

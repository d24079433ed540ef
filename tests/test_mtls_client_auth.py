"""RFC 8705 mutual-TLS client authentication at the token endpoint, against the real
oidc-provider with its mTLS feature on (tls_client_auth, self_signed_tls_client_auth,
certificate-bound access tokens), and a FHIR server that requires the token's certificate.

The provider's HTTPS listener asks for a client certificate and hands the peer certificate to
oidc-provider (``features.mTLS.getCertificate``); it records the thumbprint of the certificate
each token request came with.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from joserfc.jwk import ECKey
from prometheus_client.parser import text_string_to_metric_families
from support.bearer import BearerValidator
from support.bulk_data_server import BulkDataServer
from support.oauth_provider import OAuthTestProvider
from support.pki import TestPKI
from support.sidecar_process import SidecarProcess, free_port, wait_until, write_config
from support.sidecars import StartSidecar

from sidecar.config.models import OAuthDefinition
from sidecar.credentials.cert_binding import bound_thumbprint, certificate_thumbprint

CLIENT_SAN = "sidecar-client.demo.internal"  # what DemoPKI.client_identity issues for
KICKOFF = {"Accept": "application/fhir+json", "Prefer": "respond-async"}
LIVE_DEADLINE = 20.0


def self_signed(directory: Path, name: str, days: int = 30) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fhir-sidecar {name}")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def jwk_with_certificate(cert_path: Path) -> dict[str, Any]:
    """The client's JWK as self_signed_tls_client_auth registers it: public key plus x5c."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    jwk = dict(ECKey.import_key(cert.public_key()).as_dict(private=False))  # type: ignore[arg-type]
    der = cert.public_bytes(serialization.Encoding.DER)
    return jwk | {"x5c": [base64.b64encode(der).decode()], "use": "sig"}


def client(client_id: str, method: str, **extra: Any) -> dict[str, Any]:
    return {"client_id": client_id, "token_endpoint_auth_method": method,
            "grant_types": ["client_credentials"], "response_types": [], "redirect_uris": [],
            "tls_client_certificate_bound_access_tokens": True, **extra}


@dataclass
class MtlsWorld:
    provider: OAuthTestProvider
    certs: Path
    self_signed_cert: Path
    client_ca: Path  # what the FHIR server trusts for client certificates


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[MtlsWorld]:
    certs = tmp_path_factory.mktemp("mtls-certs")
    self_cert, _ = self_signed(certs, "self-signed")
    provider = OAuthTestProvider.start(
        tmp_path_factory.mktemp("mtls-provider"), mtls_client_ca=pki.ca_bundle_path,
        extra_clients=[
            client("sidecar-mtls-pki", "tls_client_auth", tls_client_auth_san_dns=CLIENT_SAN),
            client("sidecar-mtls-self", "self_signed_tls_client_auth",
                   jwks={"keys": [jwk_with_certificate(self_cert)]}),
        ])
    client_ca = certs / "fhir-client-ca.pem"
    client_ca.write_bytes(pki.ca_bundle_path.read_bytes() + self_cert.read_bytes())
    try:
        yield MtlsWorld(provider, certs, self_cert, client_ca)
    finally:
        provider.stop()


@dataclass
class Setup:
    world: MtlsWorld
    fhir: BulkDataServer
    tmp: Path
    config: dict[str, Any]
    ports: dict[str, int]
    sidecar: SidecarProcess

    def url(self, connection: str) -> str:
        return f"http://127.0.0.1:{self.ports[connection]}"

    def kick_off(self, connection: str) -> httpx.Response:
        return httpx.get(f"{self.url(connection)}/$export", headers=KICKOFF, timeout=30,
                         trust_env=False)

    def token_requests(self, client_id: str) -> list[dict[str, Any]]:
        return [r for r in self.world.provider.recent_requests()
                if r.get("client_id") == client_id]


def sidecar_config(world: MtlsWorld, pki: TestPKI, tmp: Path, fhir: BulkDataServer,
                   ports: dict[str, int]) -> dict[str, Any]:
    provider = world.provider
    pki_client = pki.client_identity(name="mtls-client")
    other_client = pki.client_identity(name="mtls-other-client")
    certs = tmp / "certs"
    certs.mkdir()
    for name, source in (("client.pem", pki_client.cert), ("client.key", pki_client.key),
                         ("other.pem", other_client.cert), ("other.key", other_client.key),
                         ("self.pem", world.self_signed_cert),
                         ("self.key", world.self_signed_cert.with_suffix(".key"))):
        (certs / name).write_bytes(source.read_bytes())
    unregistered, unregistered_key = self_signed(certs, "unregistered")

    def token_tls(cert: str, key: str) -> dict[str, str]:
        return {"verify": "custom", "ca_bundle": str(provider.ca_bundle),
                "client_cert": cert, "client_key": key}

    def definition(client_id: str, method: str, cert: str, key: str) -> dict[str, Any]:
        return {"token_url": provider.token_url, "client_id": client_id, "client_auth": method,
                "scopes": list(provider.scopes), "tls": token_tls(cert, key)}

    def connection(name: str, oauth: str, cert: str, key: str) -> dict[str, Any]:
        return {"url": fhir.base_url, "listen": f"127.0.0.1:{ports[name]}",
                "auth": {"oauth": oauth},
                "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path),
                        "client_cert": cert, "client_key": key}}

    return {
        "admin": {"listen": None},
        "oauth": {
            "pki": definition("sidecar-mtls-pki", "tls_client_auth",
                              "certs/client.pem", "certs/client.key"),
            "self": definition("sidecar-mtls-self", "self_signed_tls_client_auth",
                               "certs/self.pem", "certs/self.key"),
            "stranger": definition("sidecar-mtls-self", "self_signed_tls_client_auth",
                                   str(unregistered), str(unregistered_key)),
        },
        "connections": {
            "pki": connection("pki", "pki", "certs/client.pem", "certs/client.key"),
            "self": connection("self", "self", "certs/self.pem", "certs/self.key"),
            # Same token, another (valid) certificate: the binding cannot hold.
            "mismatch": connection("mismatch", "pki", "certs/other.pem", "certs/other.key"),
            "stranger": connection("stranger", "stranger", str(unregistered),
                                   str(unregistered_key)),
        },
    }


@pytest.fixture
def setup(world: MtlsWorld, pki: TestPKI, tmp_path: Path,
          start_sidecar: StartSidecar) -> Iterator[Setup]:
    world.provider.reset()
    validator = BearerValidator(world.provider.jwks(), audience=world.provider.default_resource,
                                issuer=world.provider.issuer)
    with BulkDataServer(pki.server(name="mtls-fhir"), auth=validator,
                        client_ca=world.client_ca, bound_tokens=True) as fhir:
        ports = {name: free_port() for name in ("pki", "self", "mismatch", "stranger")}
        config = sidecar_config(world, pki, tmp_path, fhir, ports)
        sidecar = start_sidecar(config, directory=tmp_path).process
        yield Setup(world, fhir, tmp_path, config, ports, sidecar)


def thumbprint(path: Path) -> str:
    return certificate_thumbprint(path.read_bytes())


@pytest.mark.parametrize(("connection", "client_id", "cert"), [
    ("pki", "sidecar-mtls-pki", "certs/client.pem"),
    ("self", "sidecar-mtls-self", "certs/self.pem"),
])
def test_certificate_authenticates_and_binds_the_token(setup: Setup, connection: str,
                                                       client_id: str, cert: str) -> None:
    answer = setup.kick_off(connection)
    assert answer.status_code == 202, answer.text
    expected = thumbprint(setup.tmp / cert)
    # At the token endpoint: the certificate, and only the client_id in the form.
    [request] = [r for r in setup.token_requests(client_id) if r["status"] == 200][:1]
    assert request["client_cert_x5t_s256"] == expected
    assert request["authorization"] is None
    assert request["params"]["client_id"] == client_id
    assert not {"client_secret", "client_assertion"} & set(request["params"])
    # At the FHIR server: the same certificate, and a token bound to it.
    [seen] = [r for r in setup.fhir.seen() if r.target.startswith("/fhir/$export")]
    assert seen.client_cert_x5t == expected
    assert bound_thumbprint(seen.headers["authorization"].removeprefix("Bearer ")) == expected


def test_a_connection_with_another_certificate_is_refused_and_check_says_why(
        setup: Setup) -> None:
    refused = setup.kick_off("mismatch")
    assert refused.status_code == 401
    assert "bound to another client certificate" in refused.text
    config = setup.tmp / "sidecar.yaml"
    static = run_check(config)
    assert static.returncode == 0, static.stderr
    warnings = [line for line in static.stderr.splitlines() if line.startswith("warning:")]
    mismatch = [w for w in warnings if "connections.mismatch.tls.client_cert" in w]
    assert len(mismatch) == 1 and "presents a different client certificate" in mismatch[0]
    assert "oauth.pki" in mismatch[0]
    assert not [w for w in warnings if "connections.pki." in w or "connections.self." in w]
    online = run_check(config, "--online")
    bound = [line for line in online.stderr.splitlines()
             if "is bound to its client certificate" in line]
    assert len(bound) == 1 and bound[0].startswith("warning: connections.mismatch:")
    assert thumbprint(setup.tmp / "certs/client.pem") in bound[0]


def test_an_unregistered_self_signed_certificate_gets_no_token(setup: Setup) -> None:
    answer = setup.kick_off("stranger")
    assert answer.status_code == 503
    assert answer.headers["X-Sidecar-Error"] == "token-unavailable"
    assert "invalid_client" in answer.json()["issue"][0]["diagnostics"]
    assert not [r for r in setup.fhir.seen()]


def test_a_rotated_certificate_is_used_after_the_live_reload(setup: Setup, pki: TestPKI) -> None:
    assert setup.kick_off("pki").status_code == 202
    old = thumbprint(setup.tmp / "certs/client.pem")
    rotated = pki.client_identity(name="mtls-rotated")
    for source, target in ((rotated.key, "client.key.new"), (rotated.cert, "client.pem.new")):
        (setup.tmp / "certs" / target).write_bytes(source.read_bytes())
    os.replace(setup.tmp / "certs/client.key.new", setup.tmp / "certs/client.key")
    os.replace(setup.tmp / "certs/client.pem.new", setup.tmp / "certs/client.pem")
    new = thumbprint(setup.tmp / "certs/client.pem")
    assert new != old

    def kicked_off_with_the_new_certificate() -> bool:
        return setup.kick_off("pki").status_code == 202 and \
            setup.fhir.seen()[-1].client_cert_x5t == new

    wait_until(kicked_off_with_the_new_certificate, timeout=LIVE_DEADLINE, interval=0.2,
               message="a call with the rotated certificate")
    last = setup.fhir.seen()[-1]
    assert bound_thumbprint(last.headers["authorization"].removeprefix("Bearer ")) == new
    assert setup.token_requests("sidecar-mtls-pki")[-1]["client_cert_x5t_s256"] == new


def not_after(path: Path) -> float:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


@pytest.fixture
def fhir(world: MtlsWorld, pki: TestPKI) -> Iterator[BulkDataServer]:
    world.provider.reset()
    validator = BearerValidator(world.provider.jwks(), audience=world.provider.default_resource,
                                issuer=world.provider.issuer)
    with BulkDataServer(pki.server(name="mtls-fhir"), auth=validator,
                        client_ca=world.client_ca, bound_tokens=True) as server:
        yield server


def discovering_config(world: MtlsWorld, pki: TestPKI, tmp: Path, fhir: BulkDataServer,
                       ports: dict[str, int]) -> dict[str, Any]:
    """:func:`sidecar_config` with the certificate definitions discovering their endpoint."""
    config = sidecar_config(world, pki, tmp, fhir, ports)
    for name in ("pki", "self"):
        definition = config["oauth"][name]
        del definition["token_url"]
        definition["discover_from"] = world.provider.fhir_base
    return config


def kick_off(port: int) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}/$export", headers=KICKOFF, timeout=30,
                     trust_env=False)


def test_certificate_auth_sends_token_requests_to_the_mtls_alias(
        world: MtlsWorld, pki: TestPKI, tmp_path: Path, fhir: BulkDataServer,
        start_sidecar: StartSidecar) -> None:
    provider = world.provider
    alias = f"{provider.issuer}/mtls/token"
    provider.settings(smart_overrides={"mtls_endpoint_aliases": {"token_endpoint": alias}})
    ports = {name: free_port() for name in ("pki", "self", "mismatch", "stranger")}
    start_sidecar(discovering_config(world, pki, tmp_path, fhir, ports), directory=tmp_path)
    for connection, client_id, cert in (("pki", "sidecar-mtls-pki", "certs/client.pem"),
                                        ("self", "sidecar-mtls-self", "certs/self.pem")):
        answer = kick_off(ports[connection])
        assert answer.status_code == 202, answer.text
        # "stranger" shares sidecar-mtls-self's client id: told apart by the certificate.
        expected = thumbprint(tmp_path / cert)
        requests = [r for r in provider.recent_requests() if r["client_id"] == client_id
                    and r["client_cert_x5t_s256"] == expected]
        assert [r for r in requests if r["status"] == 200], f"no token for {client_id}"
        # The provider's own record: every token request came in on the alias path.
        assert {r["path"] for r in requests} == {"/mtls/token"}
    # "stranger" is configured with token_url: it keeps it.
    assert kick_off(ports["stranger"]).status_code == 503
    stranger = thumbprint(tmp_path / "certs/unregistered.pem")
    assert {r["path"] for r in provider.recent_requests()
            if r["client_cert_x5t_s256"] == stranger} == {"/token"}


@pytest.mark.parametrize(("alias", "expected"), [
    ("http://127.0.0.1:9/mtls/token",
     "(read over https) names a plain http mtls_endpoint_aliases.token_endpoint"),
    ("https://u:p@127.0.0.1:9/mtls/token",
     "mtls_endpoint_aliases.token_endpoint carries user info"),
    ("/mtls/token", "has no absolute http(s) mtls_endpoint_aliases.token_endpoint"),
])
def test_a_bad_mtls_alias_is_refused_like_a_bad_token_endpoint(
        world: MtlsWorld, pki: TestPKI, tmp_path: Path, fhir: BulkDataServer,
        start_sidecar: StartSidecar, alias: str, expected: str) -> None:
    provider = world.provider
    provider.settings(smart_overrides={"mtls_endpoint_aliases": {"token_endpoint": alias}})
    ports = {name: free_port() for name in ("pki", "self", "mismatch", "stranger")}
    start_sidecar(discovering_config(world, pki, tmp_path, fhir, ports), directory=tmp_path)
    answer = kick_off(ports["pki"])
    assert answer.status_code == 503
    assert answer.headers["X-Sidecar-Error"] == "token-unavailable"
    assert expected in answer.json()["issue"][0]["diagnostics"]
    assert not [r for r in provider.recent_requests() if r["client_id"] == "sidecar-mtls-pki"]
    assert not fhir.seen()


def oauth_cert_expiries(admin: str) -> dict[str, float]:
    text = httpx.get(f"http://{admin}/metrics", timeout=10, trust_env=False).text
    return {s.labels["definition"]: s.value
            for family in text_string_to_metric_families(text)
            if family.name == "fhir_sidecar_oauth_client_cert_expiry_timestamp_seconds"
            for s in family.samples}


def test_oauth_client_certificate_expiry_is_exported_and_follows_reloads(
        world: MtlsWorld, pki: TestPKI, tmp_path: Path, fhir: BulkDataServer,
        start_sidecar: StartSidecar) -> None:
    ports = {name: free_port() for name in ("pki", "self", "mismatch", "stranger")}
    config = sidecar_config(world, pki, tmp_path, fhir, ports)
    config["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    # A definition without a client certificate has no series.
    config["oauth"]["plain"] = {"token_url": world.provider.token_url, "client_id": "x",
                                "client_auth": "client_secret_post",
                                "client_secret_env": "MTLS_TEST_UNUSED_SECRET",
                                "tls": {"verify": "custom",
                                        "ca_bundle": str(world.provider.ca_bundle)}}
    running = start_sidecar(config, directory=tmp_path, env={"MTLS_TEST_UNUSED_SECRET": "s"})
    assert running.admin is not None
    expected = {"pki": not_after(tmp_path / "certs/client.pem"),
                "self": not_after(tmp_path / "certs/self.pem"),
                "stranger": not_after(tmp_path / "certs/unregistered.pem")}
    assert len(set(expected.values())) > 1  # the values say which certificate was read
    assert oauth_cert_expiries(running.admin) == expected

    # Reload: the definition that goes takes its series along; a new certificate is re-read.
    del config["oauth"]["stranger"], config["connections"]["stranger"]
    renewed, renewed_key = self_signed(tmp_path / "certs", "renewed", days=60)
    config["oauth"]["self"]["tls"] |= {"client_cert": str(renewed),
                                       "client_key": str(renewed_key)}
    write_config(tmp_path, config)
    reloaded = {"pki": expected["pki"], "self": not_after(renewed)}
    wait_until(lambda: oauth_cert_expiries(running.admin or "") == reloaded,
               timeout=LIVE_DEADLINE, interval=0.2, message="the reloaded expiry series")


def run_check(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_SIDECAR_")}
    return subprocess.run([sys.executable, "-m", "sidecar", "check", "-c", str(config), *args],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


@pytest.mark.parametrize(("changes", "message"), [
    ({"tls": {"verify": "default"}}, "client_auth: tls_client_auth needs tls.client_cert"),
    ({"client_secret_env": "X", "tls": {"client_cert": "c.pem"}},
     "client_auth: tls_client_auth does not use client_secret_env"),
    ({"private_key_file": "k.pem", "tls": {"client_cert": "c.pem"}},
     "private_key_file is only used with private_key_jwt, not tls_client_auth"),
])
def test_definition_shape_errors(changes: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {"token_url": "https://as.example/token", "client_id": "c",
                              "client_auth": "tls_client_auth", **changes}
    with pytest.raises(ValueError, match=message):
        OAuthDefinition(**fields)

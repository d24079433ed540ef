"""What a compiled TLS policy trusts and offers, read back from its contexts in process.

``compile_tls_policy`` and ``build_stdlib_context`` (``sidecar/tls/``) run on the test PKI; the
handshakes themselves are in ``tests/test_tls_policy.py`` and ``tests/test_tls_conformance.py``.
Fast, so that the mutation checks (docs/testing.md, "Mutation checks") can run them per mutant.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import cast

import certifi
import pytest
from cryptography import x509
from OpenSSL import SSL
from support.pki import TestPKI

from sidecar.config.models import TlsSettings
from sidecar.tls.material import TlsMaterialError
from sidecar.tls.policy import (
    client_cert_expiry,
    compile_tls_policy,
    earliest_expiry,
    retire_connection,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return TestPKI(tmp_path_factory.mktemp("pki"))


def custom(pki: TestPKI, **more: object) -> TlsSettings:
    return TlsSettings.model_validate({"verify": "custom", "ca_bundle": pki.ca_bundle_path,
                                       **more})


def test_custom_trusts_exactly_its_bundle_on_both_legs(pki: TestPKI) -> None:
    policy = compile_tls_policy(custom(pki))
    ca = x509.load_pem_x509_certificate(pki.ca_bundle_path.read_bytes())
    assert policy.verify == "custom"
    assert policy.ca_source == str(pki.ca_bundle_path)
    assert policy.ca_pem == pki.ca_bundle_path.read_bytes()
    assert len(policy.ca_certificates) == 1
    assert earliest_expiry(policy) == ca.not_valid_after_utc
    assert policy.openssl_context.get_verify_mode() == SSL.VERIFY_PEER
    store = policy.openssl_context.get_cert_store()
    assert store is not None
    stdlib = policy.stdlib_context()
    assert stdlib is policy.stdlib_context()  # built once, then shared
    assert stdlib.verify_mode == ssl.CERT_REQUIRED and stdlib.check_hostname
    cas = stdlib.get_ca_certs()
    assert len(cas) == 1
    # typeshed types every value of get_ca_certs() as one union; "subject" is the RDN tuple
    subject = cast("tuple[tuple[tuple[str, str], ...], ...]", cas[0]["subject"])
    assert dict(pair[0] for pair in subject)["commonName"] == \
        "fhir-sidecar demo internal CA"


def test_default_trusts_certifi_only_and_skip_trusts_nothing(pki: TestPKI) -> None:
    default = compile_tls_policy(TlsSettings())
    assert default.verify == "default"
    assert default.ca_source == "the default public CA bundle (certifi)"
    assert default.ca_pem is None and default.ca_certificates == ()
    assert earliest_expiry(default) is None
    assert default.openssl_context.get_verify_mode() == SSL.VERIFY_PEER
    stdlib = default.stdlib_context()
    assert stdlib.verify_mode == ssl.CERT_REQUIRED and stdlib.check_hostname
    certifi_count = len(ssl.create_default_context(cafile=certifi.where()).get_ca_certs())
    assert len(stdlib.get_ca_certs()) == certifi_count > 50

    skip = compile_tls_policy(TlsSettings(verify="skip"))
    assert skip.ca_source == "nothing (verification skipped)"
    assert skip.ca_pem is None and skip.ca_certificates == ()
    assert skip.openssl_context.get_verify_mode() == SSL.VERIFY_NONE
    stdlib = skip.stdlib_context()
    assert stdlib.verify_mode == ssl.CERT_NONE and not stdlib.check_hostname
    assert stdlib.get_ca_certs() == []


@pytest.mark.parametrize("verify", ["default", "skip", "custom"])
def test_every_stdlib_context_needs_tls12_and_never_matches_the_cn(pki: TestPKI,
                                                                   verify: str) -> None:
    settings = custom(pki) if verify == "custom" else TlsSettings(verify=verify)  # type: ignore[arg-type]
    stdlib = compile_tls_policy(settings).stdlib_context()
    assert stdlib.minimum_version == ssl.TLSVersion.TLSv1_2
    assert stdlib.hostname_checks_common_name is False
    tls12 = [c for c in stdlib.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(c["aead"] and c["kea"] in ("kx-ecdhe", "kx-dhe") for c in tls12)


def test_the_server_name_is_used_whatever_name_a_client_asks_for(pki: TestPKI) -> None:
    named = compile_tls_policy(custom(pki, server_name="fhir.internal"))
    assert named.server_name == "fhir.internal"
    assert named.sni_for("127.0.0.1") == "fhir.internal"
    ctx = named.stdlib_context()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="other.example")
    assert obj.server_hostname == "fhir.internal"
    with socket.socket() as raw, ctx.wrap_socket(raw, do_handshake_on_connect=False,
                                                 server_hostname="other.example") as wrapped:
        assert wrapped.server_hostname == "fhir.internal"

    plain = compile_tls_policy(custom(pki))
    assert plain.sni_for("127.0.0.1") == "127.0.0.1"
    obj = plain.stdlib_context().wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(),
                                          server_hostname="asked.example")
    assert obj.server_hostname == "asked.example"
    with socket.socket() as raw, plain.stdlib_context().wrap_socket(
            raw, do_handshake_on_connect=False, server_hostname="asked.example") as wrapped:
        assert wrapped.server_hostname == "asked.example"


def test_sni_is_sent_for_a_host_name_only(pki: TestPKI) -> None:
    policy = compile_tls_policy(custom(pki))
    assert policy.new_openssl_connection("localhost").get_servername() == b"localhost"
    assert policy.new_openssl_connection("127.0.0.1").get_servername() is None
    assert policy.new_openssl_connection("::1").get_servername() is None
    named = compile_tls_policy(custom(pki, server_name="fhir.internal"))
    assert named.new_openssl_connection("127.0.0.1").get_servername() == b"fhir.internal"


def test_a_connection_without_a_session_leaves_nothing_to_resume(pki: TestPKI) -> None:
    policy = compile_tls_policy(custom(pki))
    conn = policy.new_openssl_connection("localhost", port=443)
    policy.remember_session("localhost", 443, conn)
    assert policy.resumption == {}
    retire_connection(conn)
    assert conn.get_shutdown() & SSL.SENT_SHUTDOWN


def test_a_client_identity_is_loaded_on_both_legs(pki: TestPKI) -> None:
    client = pki.client_identity()
    policy = compile_tls_policy(custom(pki, client_cert=client.cert, client_key=client.key))
    assert policy.client_cert_pem == client.cert.read_bytes()
    assert policy.client_key_pem == client.key.read_bytes()
    leaf = x509.load_pem_x509_certificates(client.cert.read_bytes())[0]
    assert client_cert_expiry(policy) == leaf.not_valid_after_utc
    assert client_cert_expiry(compile_tls_policy(custom(pki))) is None
    # One file holding certificate and key.
    both = client.cert.parent / "client-both.pem"
    both.write_bytes(client.cert.read_bytes() + client.key.read_bytes())
    together = compile_tls_policy(custom(pki, client_cert=both))
    assert together.client_key_pem == both.read_bytes()
    assert together.stdlib_context() is not None


def test_a_key_that_does_not_match_its_certificate_names_the_field(pki: TestPKI,
                                                                   tmp_path: Path) -> None:
    client = pki.client_identity()
    other = pki.client_identity(name="other")
    with pytest.raises(TlsMaterialError) as err:
        compile_tls_policy(custom(pki, client_cert=client.cert, client_key=other.key))
    assert str(err.value) == "client_key does not match client_cert"
    assert err.value.field == "client_key"
    mixed = tmp_path / "mixed.pem"
    mixed.write_bytes(client.cert.read_bytes() + other.key.read_bytes())
    with pytest.raises(TlsMaterialError, match="client_key does not match client_cert") as err:
        compile_tls_policy(custom(pki, client_cert=mixed))
    assert err.value.field == "client_cert"

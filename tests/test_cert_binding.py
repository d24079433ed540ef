"""Certificate-bound tokens (sidecar.credentials.cert_binding, RFC 8705 section 3) on real
certificates from the test kit's CA and on hand-made tokens: the thumbprint a server binds,
the claim read back from a JWT, and how a connection's certificate differs from the bound one.
"""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from sidecar.credentials.cert_binding import (
    bound_thumbprint,
    certificate_thumbprint,
    presents_other_certificate,
)
from sidecar.testkit.pki import Authority


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(payload: object) -> str:
    return ".".join([_b64(b'{"alg":"none"}'), _b64(json.dumps(payload).encode()), "sig"])


@pytest.fixture(scope="module")
def certs() -> tuple[bytes, bytes, bytes]:
    authority = Authority("cert-binding-test")
    one = authority.issue(common_name="client-one", san=[]).chain_pem
    two = authority.issue(common_name="client-two", san=[]).chain_pem
    return one, two, authority.cert_pem


def test_the_thumbprint_is_base64url_sha256_of_the_leaf(certs: tuple[bytes, bytes, bytes]
                                                        ) -> None:
    one, _, ca = certs
    der = x509.load_pem_x509_certificate(one).public_bytes(Encoding.DER)
    expected = _b64(hashlib.sha256(der).digest())
    assert certificate_thumbprint(one) == expected
    assert len(expected) == 43 and "=" not in expected
    # A chain file: only its first certificate (the leaf) counts.
    assert certificate_thumbprint(one + ca) == expected


def test_the_bound_thumbprint_is_read_from_the_cnf_claim() -> None:
    assert bound_thumbprint(_jwt({"sub": "c", "cnf": {"x5t#S256": "abc_-"}})) == "abc_-"


@pytest.mark.parametrize("token", [
    "opaque-token",                          # not a JWT
    "a.b",                                   # two parts
    "a.b.c.d",                               # four parts
    "x.!!!!.y",                              # payload not base64
    "x." + _b64(b"not json") + ".y",         # payload not JSON
    "x." + _b64("\u00ff".encode("latin-1")) + ".y",  # not UTF-8
    _jwt(["cnf"]),                           # payload not an object
    _jwt({"sub": "c"}),                      # no cnf
    _jwt({"cnf": "x5t#S256"}),               # cnf not an object
    _jwt({"cnf": {"jkt": "abc"}}),           # bound to a key (DPoP), not a certificate
    _jwt({"cnf": {"x5t#S256": 42}}),         # not a string
])
def test_tokens_without_a_certificate_binding_have_none(token: str) -> None:
    assert bound_thumbprint(token) is None


def test_how_the_presented_certificate_differs(certs: tuple[bytes, bytes, bytes]) -> None:
    one, two, ca = certs
    assert presents_other_certificate(None, None) is None      # nothing bound
    assert presents_other_certificate(one, None) is None
    assert presents_other_certificate(None, one) == "no client certificate"
    assert presents_other_certificate(two, one) == "a different client certificate"
    assert presents_other_certificate(one, one) is None
    assert presents_other_certificate(one + ca, one) is None   # the same leaf, as a chain

"""The caller checks' plain modules (sidecar/callers/), each rule and each refusal in-process,
with the clock given: what tests/test_callers.py drives end to end, down to its edges."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from sidecar.callers import gate
from sidecar.callers.hosts import listener_host_allowed, split_host_port
from sidecar.callers.key_sets import (
    MAX_KEY_SET_BYTES,
    REFRESH_SECONDS,
    UNKNOWN_KID_INTERVAL_SECONDS,
    FetchedKeys,
    KeySetError,
    StaticKeys,
    parse_key_set,
    read_key_set_file,
)
from sidecar.callers.origins import normal_origin, origin_allowed
from sidecar.callers.workload_tokens import (
    CallerVerifier,
    KeysNeeded,
    TokenRefused,
    unverified_issuer,
)
from sidecar.config.models import TlsSettings
from sidecar.request.errors import ErrorKind, SidecarError
from sidecar.tls.policy import compile_tls_policy

ISSUER, AUDIENCE = "https://issuer.example", "fhir-sidecar"


def _token(key: RSAKey | ECKey, alg: str = "RS256", **claims: Any) -> str:
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "app", "exp": int(time.time()) + 600,
            **claims}
    return jwt.encode({"alg": alg, "kid": key.kid}, {k: v for k, v in body.items()
                                                     if v is not None}, key)


def _b64(value: object) -> str:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.fixture(scope="module")
def key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "k1"})


# -- key sets --------------------------------------------------------------------------------------

def test_a_key_set_keeps_public_members_only(key: RSAKey) -> None:
    private = key.as_dict(private=True)
    keys = parse_key_set(json.dumps({"keys": [private]}).encode(), "test")
    [only] = keys.keys
    assert "d" not in only.as_dict(private=False) and only.kid == "k1"
    assert not only.is_private


@pytest.mark.parametrize(("data", "words"), [
    (b"x" * (MAX_KEY_SET_BYTES + 1), "larger than"),
    (b"not json", "is not JSON"),
    (b"\xff\xfe", "is not JSON"),
    (b'{"keys": []}', "has no keys"),
    (b'["keys"]', "has no keys"),
    (b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "only asymmetric keys"),
    (b'{"keys": ["RSA"]}', "only asymmetric keys"),
    (b'{"keys": [{"kty": "RSA", "n": "!", "e": "AQAB"}]}', "cannot be read"),
])
def test_a_key_set_that_cannot_verify_tokens_is_refused(data: bytes, words: str) -> None:
    with pytest.raises(KeySetError, match=words) as refused:
        parse_key_set(data, "the set")
    assert "c2VjcmV0" not in str(refused.value)


def test_a_missing_key_set_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(KeySetError, match=r"cannot read .*missing\.json"):
        read_key_set_file(tmp_path / "missing.json")


def test_a_fetched_key_set_refreshes_on_its_schedule() -> None:
    now = [1000.0]
    keys = FetchedKeys("k8s", "https://127.0.0.1:9/jwks",
                       compile_tls_policy(TlsSettings(verify="default")), None,
                       clock=lambda: now[0])
    assert keys.cached() is None and keys.wants_refresh(unknown_kid=False)
    keys._attempted_at, keys._keys = now[0], parse_key_set(  # as after a fetch
        json.dumps({"keys": [RSAKey.generate_key(2048).as_dict(private=False)]}).encode(), "t")
    assert not keys.wants_refresh(unknown_kid=False)
    assert keys.wants_refresh(unknown_kid=True)  # the first unknown kid may fetch at once
    now[0] += 1
    assert not keys.wants_refresh(unknown_kid=True)  # ... then once a minute at most
    now[0] += UNKNOWN_KID_INTERVAL_SECONDS
    assert keys.wants_refresh(unknown_kid=True)
    now[0] = 1000.0 + REFRESH_SECONDS
    assert keys.wants_refresh(unknown_kid=False)  # ten minutes old


def test_a_key_set_url_that_cannot_be_reached_keeps_no_keys_and_says_why() -> None:
    keys = FetchedKeys("k8s", "https://127.0.0.1:9/jwks",
                       compile_tls_policy(TlsSettings(verify="default")), None)
    asyncio.run(keys.refresh())
    assert keys.cached() is None
    assert keys.last_error is not None and "fetching the key set failed" in keys.last_error


def test_static_keys_never_refresh(key: RSAKey) -> None:
    static = StaticKeys(parse_key_set(json.dumps({"keys": [key.as_dict()]}).encode(), "t"))
    assert not static.wants_refresh(unknown_kid=True)
    asyncio.run(static.refresh())


# -- workload tokens -------------------------------------------------------------------------------

@pytest.mark.parametrize("token", [
    "a.b", "a.b.c.d", "a.!!!.c", f"a.{_b64(b'not json')}.c", f"a.{_b64([1])}.c",
    f"a.{_b64({'iss': 7})}.c", "a." + "A" * 20000 + ".c",
])
def test_a_token_that_names_no_issuer_names_none(token: str) -> None:
    assert unverified_issuer(token) is None


def _verifier(key: RSAKey, clock: Any = time.time) -> CallerVerifier:
    keys = StaticKeys(parse_key_set(json.dumps({"keys": [key.as_dict()]}).encode(), "t"))
    return CallerVerifier("k8s", ISSUER, AUDIENCE, keys, clock=clock)


def test_a_verified_token_is_remembered_until_it_expires(key: RSAKey) -> None:
    now = [time.time()]
    verifier = _verifier(key, clock=lambda: now[0])
    token = _token(key, exp=int(now[0]) + 100)
    assert verifier.verify(token).name == "k8s:app"
    assert verifier.cached(token) is not None
    now[0] += 100 + 61  # past exp and the clock skew: forgotten, verified afresh next time
    assert verifier.cached(token) is None
    expired = _token(key, exp=int(time.time()) - 3600, iat=int(time.time()) - 7200)
    with pytest.raises(TokenRefused, match="expired"):
        verifier.verify(expired)


def test_claims_and_signatures_are_checked(key: RSAKey) -> None:
    verifier = _verifier(key)
    with pytest.raises(TokenRefused, match="sub"):
        verifier.verify(_token(key, sub=None))
    with pytest.raises(TokenRefused, match="not a valid signed token"):
        verifier.verify("e30.e30.AAAA")
    other = RSAKey.generate_key(2048, parameters={"kid": "k-other"})
    with pytest.raises(TokenRefused, match="does not publish"):
        verifier.verify(_token(other))
    with pytest.raises(TokenRefused, match="sub"):
        verifier.verify(_token(key, sub=12345))


def test_without_keys_the_keys_are_needed(key: RSAKey) -> None:
    keys = FetchedKeys("k8s", "https://127.0.0.1:9/jwks",
                       compile_tls_policy(TlsSettings(verify="default")), None)
    verifier = CallerVerifier("k8s", ISSUER, AUDIENCE, keys)
    with pytest.raises(KeysNeeded):
        verifier.verify(_token(key))


# -- the gate --------------------------------------------------------------------------------------

@pytest.mark.parametrize("authorization", [None, "Bearer", "Bearer   ", "Basic dXNlcjpwdw==",
                                           "Token abc"])
def test_no_bearer_token_is_unauthenticated(key: RSAKey, authorization: str | None) -> None:
    verdict = gate.caller_verdict(authorization, connection="c", allowed_callers=["k8s:app"],
                                  verifiers={"k8s": _verifier(key)})
    assert isinstance(verdict, SidecarError)
    assert verdict.kind is ErrorKind.CALLER_UNAUTHENTICATED
    assert verdict.headers()["WWW-Authenticate"].startswith("Bearer")


def test_the_issuer_picks_the_verifier_and_the_subject_decides(key: RSAKey) -> None:
    verifiers = {"k8s": _verifier(key)}
    allowed = ["k8s:app"]
    stranger = _token(key, iss="https://other.example")
    refused = gate.caller_verdict(f"Bearer {stranger}", connection="c",
                                  allowed_callers=allowed, verifiers=verifiers)
    assert isinstance(refused, SidecarError) and "issuer" in refused.diagnostics
    other_app = gate.caller_verdict(f"Bearer {_token(key, sub='other')}", connection="c",
                                    allowed_callers=allowed, verifiers=verifiers)
    assert isinstance(other_app, SidecarError)
    assert other_app.kind is ErrorKind.CALLER_FORBIDDEN
    # A token verified for one connection is known for the next, and judged by its list.
    token = _token(key)
    assert gate.caller_verdict(f"Bearer {token}", connection="c", allowed_callers=allowed,
                               verifiers=verifiers).name == "k8s:app"  # type: ignore[union-attr]
    forbidden = gate.caller_verdict(f"Bearer {token}", connection="d",
                                    allowed_callers=["k8s:someone-else"], verifiers=verifiers)
    assert isinstance(forbidden, SidecarError)
    assert forbidden.kind is ErrorKind.CALLER_FORBIDDEN


def test_keys_that_stay_missing_refuse_the_token(key: RSAKey) -> None:
    keys = FetchedKeys("k8s", "https://127.0.0.1:9/jwks",
                       compile_tls_policy(TlsSettings(verify="default")), None)
    verifiers = {"k8s": CallerVerifier("k8s", ISSUER, AUDIENCE, keys)}
    needed = gate.caller_verdict(f"Bearer {_token(key)}", connection="c",
                                 allowed_callers=["k8s:app"], verifiers=verifiers)
    assert isinstance(needed, gate.NeedsKeys)
    after = gate.after_keys(f"Bearer {_token(key)}", connection="c",
                            allowed_callers=["k8s:app"], verifiers=verifiers)
    assert isinstance(after, SidecarError)
    assert after.kind is ErrorKind.CALLER_UNAUTHENTICATED


def test_client_input_is_quoted_short_and_printable() -> None:
    refused = gate.host_refusal("évil\x00" + "x" * 500, listen=_listen("127.0.0.1:8081"),
                                local_address=None, allowed_hosts=[], setting="s", what="w")
    assert refused is not None
    assert "\x00" not in refused.diagnostics and "..." in refused.diagnostics
    assert len(refused.diagnostics) < 600


def _listen(value: str) -> Any:
    from sidecar.config.models import ListenAddress

    return ListenAddress.parse(value)


# -- hosts and origins -----------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("Example.ORG", ("example.org", None)),
    ("example.org:8081", ("example.org", 8081)),
    ("[::1]:8081", ("::1", 8081)),
    ("[::1]", ("::1", None)),
    ("example.org:http", ("example.org", -1)),
    ("example.org:9999999", ("example.org", -1)),
])
def test_host_values_split_into_name_and_port(value: str, expected: tuple[str, int | None]
                                              ) -> None:
    assert split_host_port(value) == expected


def test_a_listener_answers_its_names_on_its_own_port_only() -> None:
    def allowed(host: str | None, hosts: list[str] = []) -> bool:  # noqa: B006
        return listener_host_allowed(host, listen_host="0.0.0.0", listen_port=8081,
                                     local_address="10.1.2.3", allowed_hosts=hosts)
    assert allowed("10.1.2.3:8081") and allowed("localhost") and allowed("[::ffff:10.1.2.3]")
    assert not allowed("10.1.2.3:8082") and not allowed(None) and not allowed("0.0.0.0:8081")
    assert allowed("gw.example:8081", ["gw.example"]) and allowed("x", ["*"])


@pytest.mark.parametrize(("value", "expected"), [
    ("https://App.Example.org:443", "https://app.example.org"),
    ("http://app.example.org:8080", "http://app.example.org:8080"),
    ("http://[::1]:80", "http://[::1]"),
    ("null", "null"),
    ("https://app.example.org:99999", "https://app.example.org:99999"),
    ("ftp://app.example.org", "ftp://app.example.org"),
    ("https://app.example.org/path", "https://app.example.org/path"),
])
def test_origins_are_compared_as_browsers_send_them(value: str, expected: str) -> None:
    assert normal_origin(value) == expected


def test_no_origin_is_no_browser_and_others_must_be_listed() -> None:
    assert origin_allowed(None, [])
    assert not origin_allowed("https://a.example", [])
    assert origin_allowed("HTTPS://A.example:443", ["https://a.example"])

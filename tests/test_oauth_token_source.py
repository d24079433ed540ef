"""The OAuth token lifecycle (docs/architecture.md#credentials) against a real authorization server.

The server is npm ``oidc-provider`` over HTTPS (tests/oauth_server, fixtures in
support/oauth_fixtures.py). Waits are on conditions with deadlines; the only sleeps pace the
simulated traffic.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey
from support.bearer import BearerValidator
from support.fhir_routes import fhir_upstream
from support.oauth_provider import OAuthTestProvider
from support.pki import TestPKI

from sidecar.config.models import OAuthDefinition, TlsSettings
from sidecar.credentials import (
    OAuthSetupError,
    RefreshPolicy,
    TokenSource,
    TokenUnavailable,
)
from sidecar.credentials.client_auth import ASSERTION_TYPE, basic_authorization
from sidecar.tls.policy import compile_tls_policy

TEST_DEADLINE = 30.0
# Real lifetimes are minutes; these backoffs let an outage and its recovery play out in seconds.
# No spacing between fetches and a large budget, so that several cycles fit in a test; the
# rules that bound the token requests are tested with the real values (test_token_budget.py).
FAST = RefreshPolicy(backoff_initial=0.1, backoff_max=0.4, request_timeout=2.0,
                     min_interval=0.0, budget_requests=1000)
EXPECTED_SCOPE = "system/Patient.rs system/Observation.rs"


# --- helpers ----------------------------------------------------------------------------------

def async_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), TEST_DEADLINE))
    return run


class RecordingObserver:
    def __init__(self) -> None:
        self.results: list[tuple[str, str]] = []
        self.expiries: list[tuple[str, float]] = []
        self.durations: list[tuple[str, float]] = []

    def token_requested(self, definition: str, result: str) -> None:
        self.results.append((definition, result))

    def token_expiry(self, definition: str, expires_at: float) -> None:
        self.expiries.append((definition, expires_at))

    def token_request_took(self, definition: str, seconds: float) -> None:
        self.durations.append((definition, seconds))


def make_source(provider: OAuthTestProvider, client: str, *, name: str = "test-oauth",
                secret: str | None = None, policy: RefreshPolicy = FAST,
                observer: RecordingObserver | None = None,
                tls: TlsSettings | None = None, **overrides: Any) -> TokenSource:
    c = provider.clients[client]
    definition = provider.definition(client, **overrides)
    return TokenSource(
        name, definition,
        client_secret=secret if secret is not None else c.secret,
        private_key_pem=c.private_key_pem,
        tls=compile_tls_policy(tls or definition.tls),
        observer=observer, policy=policy,
    )


@asynccontextmanager
async def opened(source: TokenSource, *, start: bool = False) -> AsyncIterator[TokenSource]:
    if start:
        source.start()
    try:
        yield source
    finally:
        await source.aclose()


async def eventually(check: Callable[[], Awaitable[object] | object], what: str,
                     deadline: float = 10.0) -> None:
    """Poll ``check`` until it is true; fail with ``what`` after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > end:
            pytest.fail(f"not within {deadline:g} s: {what}")
        await asyncio.sleep(0.02)


def token_without_waiting(source: TokenSource) -> str | None:
    """The token if ``token()`` completes without suspending, else None (it would wait)."""
    coro = source.token()
    try:
        coro.send(None)
    except StopIteration as stop:
        value: str = stop.value
        return value
    coro.close()
    return None


async def unavailable_reason(source: TokenSource) -> str | None:
    try:
        await source.token()
    except TokenUnavailable as exc:
        return exc.reason
    return None


async def has_token(source: TokenSource) -> bool:
    return await unavailable_reason(source) is None


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    def part(segment: str) -> dict[str, Any]:
        padded = segment + "=" * (-len(segment) % 4)
        decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(padded))
        return decoded
    header, payload, _ = token.split(".")
    return part(header), part(payload)


# --- every client authentication method -------------------------------------------------------

@pytest.mark.parametrize("client", ["basic", "post", "rs384", "es384"])
@async_test
async def test_each_auth_method_gets_a_valid_token(oauth_provider: OAuthTestProvider,
                                                   bearer_validator: BearerValidator,
                                                   client: str) -> None:
    observer = RecordingObserver()
    async with opened(make_source(oauth_provider, client, observer=observer)) as source:
        token = await source.token()

        assert bearer_validator.validate(token) is None
        [request] = oauth_provider.recent_requests()
        assert request["client_id"] == oauth_provider.clients[client].client_id
        assert request["status"] == 200
        assert request["params"]["scope"] == EXPECTED_SCOPE
        assert request["params"]["grant_type"] == "client_credentials"
        status = source.status()
        assert status.scopes == tuple(EXPECTED_SCOPE.split())
        assert status.last_error is None and status.last_refresh is not None
        assert status.valid_until is not None
        assert 280 < status.valid_until.timestamp() - time.time() <= 300
        assert observer.results == [("test-oauth", "success")]
        [(_, expires_at)] = observer.expiries
        assert expires_at == pytest.approx(status.valid_until.timestamp())


def test_client_secret_post_sends_credentials_in_the_body(
        oauth_provider: OAuthTestProvider) -> None:
    async def scenario() -> None:
        async with opened(make_source(oauth_provider, "post")) as source:
            await source.token()
    asyncio.run(scenario())
    [request] = oauth_provider.recent_requests()
    assert request["authorization"] is None
    assert request["params"]["client_id"] == "sidecar-post"


@pytest.mark.parametrize("client", ["rs384", "es384"])
@async_test
async def test_private_key_jwt_assertion_follows_smart_backend_services(
        oauth_provider: OAuthTestProvider, client: str) -> None:
    registered = oauth_provider.clients[client]
    async with opened(make_source(oauth_provider, client)) as source:
        await source.fetch_once()
        await source.fetch_once()

    assertions = [r["params"] for r in oauth_provider.recent_requests()]
    assert [r["client_assertion_type"] for r in assertions] == [ASSERTION_TYPE] * 2
    public = _public_key(registered.private_key_pem)
    jtis = set()
    for params in assertions:
        header, claims = jwt_parts(params["client_assertion"])
        assert header["alg"] == registered.signing_alg
        assert header["kid"] == registered.key_id
        assert claims["iss"] == claims["sub"] == registered.client_id
        assert claims["aud"] == oauth_provider.token_url
        assert 0 < claims["exp"] - time.time() <= 300
        jtis.add(claims["jti"])
        jwt.decode(params["client_assertion"], public, algorithms=[header["alg"]])
    assert len(jtis) == 2, "every token request needs a fresh jti"


def _public_key(private_pem: bytes | None) -> RSAKey | ECKey:
    assert private_pem is not None
    key = serialization.load_pem_private_key(private_pem, password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        return RSAKey.import_key(key.public_key())
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return ECKey.import_key(key.public_key())


@async_test
async def test_wrong_secret_is_reported_with_the_endpoints_answer(
        oauth_provider: OAuthTestProvider, caplog: pytest.LogCaptureFixture) -> None:
    wrong = "not-the-secret-" + "x7" * 8
    observer = RecordingObserver()
    caplog.set_level(logging.DEBUG)
    async with opened(make_source(oauth_provider, "basic", secret=wrong, observer=observer,
                                  name="cerner")) as source:
        with pytest.raises(TokenUnavailable) as caught:
            await source.token()

        err = caught.value
        assert err.definition == "cerner"
        assert err.token_url == oauth_provider.token_url
        assert err.reason.startswith("invalid_client: client authentication failed")
        assert "invalid_client" in str(err) and "cerner" in str(err)
        assert oauth_provider.token_url in str(err)
        assert observer.results == [("cerner", "http_error")]
        assert source.status().last_error == err.reason
        for text in (str(err), repr(err), repr(source), str(source.status()),
                     str(source.settings_key), caplog.text):
            assert wrong not in text


# --- RFC 6749 §2.3.1: form-urlencode before Basic ----------------------------------------------

@async_test
async def test_client_id_and_secret_with_reserved_characters_authenticate(
        oauth_provider: OAuthTestProvider, bearer_validator: BearerValidator) -> None:
    reserved = oauth_provider.clients["reserved"]
    assert reserved.secret is not None
    assert {":", "+", "%", " "} <= set(reserved.client_id + reserved.secret)
    async with opened(make_source(oauth_provider, "reserved")) as source:
        token = await source.token()
    assert bearer_validator.validate(token) is None
    assert oauth_provider.recent_requests()[-1]["client_id"] == reserved.client_id


def test_the_same_client_fails_with_raw_basic_encoding(oauth_provider: OAuthTestProvider
                                                       ) -> None:
    """Shows why the fix exists: Basic-encoding the raw id and secret is read differently."""
    reserved = oauth_provider.clients["reserved"]
    raw = base64.b64encode(f"{reserved.client_id}:{reserved.secret}".encode()).decode()
    with httpx.Client(verify=oauth_provider.ssl_context(), trust_env=False) as client:
        response = client.post(oauth_provider.token_url,
                               data={"grant_type": "client_credentials"},
                               headers={"Authorization": f"Basic {raw}"})
    assert response.status_code in (400, 401)
    assert response.json()["error"] in ("invalid_client", "invalid_request")


# --- single flight -----------------------------------------------------------------------------

@async_test
async def test_hundred_concurrent_first_calls_make_one_token_request(
        oauth_provider: OAuthTestProvider) -> None:
    async with opened(make_source(oauth_provider, "basic")) as source:
        tokens = await asyncio.gather(*(source.token() for _ in range(100)))
    assert len(set(tokens)) == 1
    assert oauth_provider.stats()["token_requests"] == 1


@async_test
async def test_concurrent_callers_share_one_failure_too(oauth_provider: OAuthTestProvider
                                                        ) -> None:
    oauth_provider.fail("status", status=503)
    async with opened(make_source(oauth_provider, "basic")) as source:
        results = await asyncio.gather(*(source.token() for _ in range(50)),
                                       return_exceptions=True)
    assert all(isinstance(r, TokenUnavailable) for r in results)
    assert oauth_provider.stats()["token_requests"] == 1


# --- background refresh ------------------------------------------------------------------------

@async_test
async def test_background_refresh_keeps_steady_traffic_from_waiting(
        oauth_provider: OAuthTestProvider, bearer_validator: BearerValidator) -> None:
    lifetime, duration = 4, 6.0
    oauth_provider.settings(ttl=lifetime)
    async with opened(make_source(oauth_provider, "basic"), start=True) as source:
        await source.token()  # the first need may wait: there is no token yet
        issued_before = oauth_provider.stats()["issued"]
        calls = waits = rejected = 0
        seen: set[str] = set()
        end = time.monotonic() + duration
        while time.monotonic() < end:
            token = token_without_waiting(source)
            calls += 1
            if token is None:
                waits += 1
            else:
                seen.add(token)
                rejected += bearer_validator.validate(token) is not None
            await asyncio.sleep(0.02)  # traffic pacing, not synchronisation
        issued = oauth_provider.stats()["issued"] - issued_before

    assert waits == 0, f"{waits} of {calls} calls waited for a token"
    assert rejected == 0, f"{rejected} of {calls} tokens were expired or invalid"
    # Refresh at 40-50 % of this short lifetime (the margin is large relative to 4 s) and
    # never per request: a handful of tokens for hundreds of calls.
    assert duration / lifetime <= issued <= duration / (lifetime * 0.4) + 1, issued
    assert len(seen) >= issued
    assert calls > 100


@async_test
async def test_missing_expires_in_uses_the_definitions_default_lifetime(
        oauth_provider: OAuthTestProvider) -> None:
    oauth_provider.settings(ttl=300, strip_expires_in=True)
    source = make_source(oauth_provider, "basic", default_expires_in=3)
    async with opened(source, start=True):
        fetched = await source.fetch_once()
        assert fetched.expires_in == 3 and fetched.expires_in_defaulted

        await source.token()
        status = source.status()
        assert status.valid_until is not None
        assert 1 < status.valid_until.timestamp() - time.time() <= 3
        # The server's own 300 s would mean no refresh for minutes; the default makes it soon.
        await eventually(lambda: oauth_provider.stats()["issued"] >= 3,
                         "a refresh based on the 3 s default lifetime", deadline=8)


# --- outages -----------------------------------------------------------------------------------

OUTAGES: dict[str, tuple[dict[str, Any], str]] = {
    "http-5xx": ({"mode": "status", "status": 503}, "temporarily_unavailable: injected outage"),
    "delay": ({"mode": "delay", "delay_ms": 4000}, "no answer within 0.5 s"),
    "refused": ({"mode": "refuse"}, "connection refused"),
}


@pytest.mark.parametrize("outage", list(OUTAGES))
@async_test
async def test_outage_serves_the_valid_token_then_reports_unavailable(
        oauth_provider: OAuthTestProvider, bearer_validator: BearerValidator,
        outage: str) -> None:
    failure, expected_reason = OUTAGES[outage]
    oauth_provider.settings(ttl=3)
    policy = RefreshPolicy(backoff_initial=0.1, backoff_max=0.4, request_timeout=0.5,
                           min_interval=0.0, budget_requests=1000)
    observer = RecordingObserver()
    source = make_source(oauth_provider, "basic", policy=policy, observer=observer)
    async with opened(source, start=True):
        first = await source.token()
        oauth_provider.fail(**failure)

        await eventually(lambda: source.status().last_error is not None,
                         "a failed background refresh")
        assert token_without_waiting(source) == first, "the still-valid token must be served"

        await eventually(lambda: unavailable_reason(source), "the token to run out")
        reason = await unavailable_reason(source)
        assert reason is not None and expected_reason in reason
        failures = [r for _, r in observer.results if r != "success"]
        assert set(failures) == {"http_error" if outage == "http-5xx" else "network"}

        # Callers arriving during the backoff are answered at once, without a request each.
        requests_before = oauth_provider.stats()["token_requests"]
        for _ in range(100):
            await unavailable_reason(source)
        assert oauth_provider.stats()["token_requests"] - requests_before <= 3

        oauth_provider.fail("none")
        await eventually(lambda: has_token(source), "a new token after the outage")
        token = await source.token()
        assert token != first
        assert bearer_validator.validate(token) is None
        assert source.status().last_error is None


@async_test
async def test_no_token_at_all_reports_the_endpoints_error(
        oauth_provider: OAuthTestProvider) -> None:
    oauth_provider.fail("status", status=500, body="<html><b>Gateway</b> broke</html>",
                        content_type="text/html")
    async with opened(make_source(oauth_provider, "basic")) as source:
        with pytest.raises(TokenUnavailable) as caught:
            await source.token()
    assert caught.value.reason == "HTTP 500: Gateway broke"
    assert caught.value.result == "http_error"


@pytest.mark.parametrize(("body", "content_type", "expected"), [
    ("hello", "text/plain", "unreadable token response: Token endpoint response is not a JSON"),
    ('{"token_type": "Bearer"}', "application/json", "the token response has no access_token"),
    ('{"access_token": "abc", "token_type": "DPoP"}', "application/json",
     "token_type is 'DPoP', not Bearer"),
    ('{"access_token": "abc", "expires_in": -5}', "application/json",
     "expires_in is not positive"),
])
@async_test
async def test_unusable_success_answers_are_invalid_responses(
        oauth_provider: OAuthTestProvider, body: str, content_type: str, expected: str) -> None:
    oauth_provider.fail("status", status=200, body=body, content_type=content_type)
    observer = RecordingObserver()
    async with opened(make_source(oauth_provider, "basic", observer=observer)) as source:
        with pytest.raises(TokenUnavailable) as caught:
            await source.token()
    assert caught.value.reason.startswith(expected)
    assert caught.value.result == "invalid_response"
    assert observer.results == [("test-oauth", "invalid_response")]


@async_test
async def test_start_fetches_a_token_before_any_request(oauth_provider: OAuthTestProvider
                                                        ) -> None:
    async with opened(make_source(oauth_provider, "basic"), start=True) as source:
        await eventually(lambda: source.status().valid_until is not None,
                         "a token fetched at start, for readiness")
        assert token_without_waiting(source) is not None
    assert oauth_provider.stats()["token_requests"] == 1


# --- invalidate --------------------------------------------------------------------------------

@async_test
async def test_invalidate_drops_only_the_current_token(oauth_provider: OAuthTestProvider
                                                       ) -> None:
    async with opened(make_source(oauth_provider, "basic")) as source:
        first = await source.token()
        source.invalidate("some-older-token")
        assert await source.token() == first
        assert oauth_provider.stats()["token_requests"] == 1

        source.invalidate(first)
        second = await source.token()
        assert second != first
        assert oauth_provider.stats()["token_requests"] == 2

        source.invalidate(first)  # a late 401 for the old token must not drop the new one
        assert await source.token() == second
        assert oauth_provider.stats()["token_requests"] == 2


@async_test
async def test_cached_token_answers_without_fetching(oauth_provider: OAuthTestProvider) -> None:
    async with opened(make_source(oauth_provider, "basic")) as source:
        assert source.cached_token() is None  # nothing fetched yet, and nothing started
        assert oauth_provider.stats()["token_requests"] == 0
        token = await source.token()
        assert source.cached_token() == token
        source.invalidate(token)
        assert source.cached_token() is None
    assert oauth_provider.stats()["token_requests"] == 1


@async_test
async def test_invalidate_with_a_running_refresher_fetches_one_replacement(
        oauth_provider: OAuthTestProvider) -> None:
    async with opened(make_source(oauth_provider, "basic"), start=True) as source:
        first = await source.token()
        source.invalidate(first)
        tokens = await asyncio.gather(*(source.token() for _ in range(20)))
    assert set(tokens) != {first} and len(set(tokens)) == 1
    assert oauth_provider.stats()["token_requests"] == 2


# --- request parameters ------------------------------------------------------------------------

@async_test
async def test_audience_resource_and_extra_params_are_sent(oauth_provider: OAuthTestProvider
                                                           ) -> None:
    source = make_source(oauth_provider, "post", audience="https://aud.example",
                         resource=oauth_provider.other_resource,
                         extra_params={"tenant": "t-1"}, scopes=["system/Patient.rs"])
    async with opened(source):
        token = await source.token()
        assert source.status().scopes == ("system/Patient.rs",)
    [request] = oauth_provider.recent_requests()
    assert request["params"] == {
        "grant_type": "client_credentials", "client_id": "sidecar-post",
        "client_secret": oauth_provider.clients["post"].secret,
        "scope": "system/Patient.rs", "audience": "https://aud.example",
        "resource": oauth_provider.other_resource, "tenant": "t-1",
    }
    # The token is issued for the requested resource.
    validator = BearerValidator(oauth_provider.jwks(), audience=oauth_provider.other_resource)
    assert validator.validate(token) is None


# --- discovery ---------------------------------------------------------------------------------

@pytest.mark.parametrize("client", ["basic", "es384"])
@async_test
async def test_discovery_finds_the_token_endpoint(oauth_provider: OAuthTestProvider,
                                                  bearer_validator: BearerValidator,
                                                  client: str) -> None:
    source = make_source(oauth_provider, client, discover_from=oauth_provider.fhir_base)
    async with opened(source):
        assert source.token_url == oauth_provider.fhir_base + "/.well-known/smart-configuration"
        token = await source.token()
        assert source.token_url == oauth_provider.token_url
        fetched = await source.fetch_once()
    assert bearer_validator.validate(token) is None
    assert fetched.token_url == oauth_provider.token_url
    assert fetched.scopes == tuple(EXPECTED_SCOPE.split())
    assert fetched.expires_in == 300 and not fetched.expires_in_defaulted


@pytest.mark.parametrize(("client", "overrides", "expected"), [
    ("basic", {"token_endpoint_auth_methods_supported": ["private_key_jwt"]},
     "does not support client_auth client_secret_basic (its SMART configuration lists: "
     "private_key_jwt)"),
    ("es384", {"token_endpoint_auth_signing_alg_values_supported": ["RS384"]},
     "does not accept ES384 client assertions"),
    ("basic", {"token_endpoint": None}, "has no absolute http(s) token_endpoint"),
    ("basic", {"token_endpoint": "https://u:p@127.0.0.1:9/token"},
     "token_endpoint carries user info"),
    ("basic", {"token_endpoint": "http://127.0.0.1:9/token"},
     "(read over https) names a plain http token_endpoint"),
])
@async_test
async def test_discovery_reports_what_the_server_cannot_do(
        oauth_provider: OAuthTestProvider, client: str, overrides: dict[str, Any],
        expected: str) -> None:
    oauth_provider.settings(smart_overrides=overrides)
    source = make_source(oauth_provider, client, discover_from=oauth_provider.fhir_base)
    async with opened(source):
        with pytest.raises(TokenUnavailable) as caught:
            await source.token()
        with pytest.raises(TokenUnavailable) as caught_by_check:
            await source.fetch_once()  # what `check --online` reports
    for err in (caught.value, caught_by_check.value):
        assert expected in err.reason
        assert err.token_url.endswith("/.well-known/smart-configuration")
    assert oauth_provider.stats()["token_requests"] == 0


@pytest.mark.parametrize("alias", ["/mtls/token", "http://u:p@127.0.0.1:9/mtls/token"])
@async_test
async def test_discovery_ignores_the_mtls_alias_for_other_client_auth(
        oauth_provider: OAuthTestProvider, alias: str) -> None:
    # RFC 8705 §5 aliases are for certificate client auth only (tests/test_mtls_client_auth.py):
    # a secret goes to token_endpoint, even when the alias would be valid (resolved here).
    target = oauth_provider.issuer + alias if alias.startswith("/") else alias
    oauth_provider.settings(
        smart_overrides={"mtls_endpoint_aliases": {"token_endpoint": target}})
    source = make_source(oauth_provider, "basic", discover_from=oauth_provider.fhir_base)
    async with opened(source):
        await source.token()
        assert source.token_url == oauth_provider.token_url
    assert [r["path"] for r in oauth_provider.recent_requests()] == ["/token"]


@pytest.mark.parametrize("discover", [False, True])
@async_test
async def test_token_endpoint_tls_ignores_the_environments_ca_settings(
        oauth_provider: OAuthTestProvider, monkeypatch: pytest.MonkeyPatch,
        discover: bool) -> None:
    # The environment trusts the provider's CA; verify: default (certifi) must not.
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(var, str(oauth_provider.ca_bundle))
    overrides: dict[str, Any] = {"discover_from": oauth_provider.fhir_base} if discover else {}
    source = make_source(oauth_provider, "basic", tls=TlsSettings(verify="default"),
                         **overrides)
    async with opened(source):
        with pytest.raises(TokenUnavailable) as caught:
            await source.token()
    assert "is not signed by a CA in the default public CA bundle" in caught.value.reason
    assert caught.value.result == "network"


# --- secrets stay secret -----------------------------------------------------------------------

@async_test
async def test_secrets_keys_and_tokens_never_appear_in_text(
        oauth_provider: OAuthTestProvider, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    basic = oauth_provider.clients["basic"]
    assert basic.secret is not None
    # An endpoint that echoes the request back must not leak the secret through the reason.
    oauth_provider.fail("status", status=400, body=f"bad request: client_secret={basic.secret}")
    texts: list[str] = []
    async with opened(make_source(oauth_provider, "basic")) as source:
        with pytest.raises(TokenUnavailable) as caught:
            await source.token()
        texts += [str(caught.value), repr(caught.value), str(source.status())]
        assert "[redacted]" in caught.value.reason

        oauth_provider.fail("none")
        await eventually(lambda: has_token(source), "the backoff to pass", deadline=5)
        token = await source.token()
        texts += [repr(source), str(source.status()), str(source.settings_key),
                  repr(source.definition)]

    rs = oauth_provider.clients["rs384"]
    assert rs.private_key_pem is not None
    pem_body = rs.private_key_pem.decode().splitlines()[1]
    async with opened(make_source(oauth_provider, "rs384")) as jwt_source:
        await jwt_source.token()
        texts += [repr(jwt_source), str(jwt_source.settings_key), str(jwt_source.status())]
    texts.append(caplog.text)
    basic_header = basic_authorization(basic.client_id, basic.secret).split()[1]
    for text in texts:
        assert basic.secret not in text
        assert basic_header not in text
        assert token not in text
        assert pem_body not in text


def test_setup_errors_name_the_problem_not_the_key(oauth_provider: OAuthTestProvider) -> None:
    rs = oauth_provider.clients["rs384"]
    es = oauth_provider.clients["es384"]
    tls = compile_tls_policy(oauth_provider.tls_settings())
    definition = oauth_provider.definition("es384")
    with pytest.raises(OAuthSetupError, match="ES384 needs an EC P-384 key, not an RSA-2048"
                       ) as caught:
        TokenSource("jwt", definition, client_secret=None, private_key_pem=rs.private_key_pem,
                    tls=tls)
    assert rs.private_key_pem is not None
    assert rs.private_key_pem.decode().splitlines()[1] not in str(caught.value)
    with pytest.raises(OAuthSetupError, match="not an unencrypted PEM private key"):
        TokenSource("jwt", definition, client_secret=None, private_key_pem=b"garbage",
                    tls=tls)
    with pytest.raises(OAuthSetupError, match="needs a client secret"):
        TokenSource("basic", oauth_provider.definition("basic"), client_secret=None,
                    private_key_pem=None, tls=tls)
    with pytest.raises(OAuthSetupError, match="extra_params must not set grant_type"):
        TokenSource("basic", oauth_provider.definition("basic", extra_params={
            "grant_type": "password"}), client_secret="s", private_key_pem=None, tls=tls)
    # The right key for the algorithm builds fine.
    TokenSource("jwt", definition, client_secret=None, private_key_pem=es.private_key_pem,
                tls=tls)


def test_settings_key_follows_definition_secret_key_and_tls(
        oauth_provider: OAuthTestProvider) -> None:
    def key(client: str = "basic", secret: str | None = None, tls: TlsSettings | None = None,
            **overrides: Any) -> object:
        return make_source(oauth_provider, client, secret=secret, tls=tls,
                           **overrides).settings_key

    assert key() == key()
    assert key() != key(secret="another-secret")
    assert key() != key(scopes=["system/Patient.rs"])
    assert key() != key(tls=TlsSettings(verify="skip"))
    assert key("rs384") == key("rs384")
    definition: OAuthDefinition = oauth_provider.definition("rs384")
    other_key = make_source(oauth_provider, "es384").settings_key
    assert TokenSource("x", definition, client_secret=None,
                       private_key_pem=oauth_provider.clients["rs384"].private_key_pem,
                       tls=compile_tls_policy(definition.tls)).settings_key != other_key


# --- the test server's bearer validation (used by FHIR test upstreams) -------------------------

@async_test
async def test_bearer_validator_checks_signature_audience_and_expiry(
        oauth_provider: OAuthTestProvider, bearer_validator: BearerValidator) -> None:
    oauth_provider.settings(ttl=1)
    async with opened(make_source(oauth_provider, "basic")) as source:
        token = await source.token()
    assert bearer_validator({"Authorization": f"Bearer {token}"}) is None
    assert bearer_validator({}) == "no Authorization header"
    header, payload, signature = token.split(".")
    tampered = f"{header}.{payload}.{signature[:-4]}AAAA"
    assert bearer_validator.validate(tampered) == "invalid token: bad_signature"
    other = BearerValidator(oauth_provider.jwks(), audience=oauth_provider.other_resource)
    assert other.validate(token) is not None
    await eventually(lambda: bearer_validator.validate(token) == "invalid token: expired",
                     "the 1 s token to expire", deadline=5)


def test_bearer_validator_guards_a_fhir_test_server(oauth_provider: OAuthTestProvider,
                                                   bearer_validator: BearerValidator,
                                                   pki: TestPKI) -> None:
    async def get_token() -> str:
        async with opened(make_source(oauth_provider, "basic")) as source:
            return await source.token()
    token = asyncio.run(get_token())
    with fhir_upstream(pki.server(), auth=bearer_validator) as server, \
            httpx.Client(verify=ssl.create_default_context(cafile=pki.ca_bundle_path),
                         trust_env=False) as client:
        url = f"{server.base_url}/metadata"
        assert client.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200
        refused = client.get(url, headers={"Authorization": "Bearer not-a-jwt"})
    assert refused.status_code == 401
    assert refused.json()["resourceType"] == "OperationOutcome"

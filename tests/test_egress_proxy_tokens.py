"""Token requests and SMART discovery through an egress proxy (a real tinyproxy), against the
real oidc-provider; environment proxy variables never apply."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Iterator
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

import httpx
import pytest
from support.oauth_provider import OAuthTestProvider
from support.pki import TestPKI
from support.raw_upstream import RawRecordingUpstream
from support.sidecar_process import free_port, wait_until
from support.sidecars import StartSidecar
from support.tinyproxy import Tinyproxy

from sidecar.credentials.oauth import RefreshPolicy, TokenSource, TokenUnavailable
from sidecar.egress.proxies import EgressProxy
from sidecar.tls.policy import compile_tls_policy

PROXY_USER = "svc-egress"
PROXY_PASSWORD = "t0ken-Pr0xy-Secret"
FAST = RefreshPolicy(backoff_initial=0.1, backoff_max=0.4, request_timeout=5.0,
                     min_interval=0.0, budget_requests=1000)


def _ambient_proxies(port: int) -> dict[str, str]:
    """Proxy variables pointing at a dead port: honouring them would fail every request."""
    url = f"http://127.0.0.1:{port}"
    return {name: url for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                   "ALL_PROXY", "all_proxy")} | {"NO_PROXY": "", "no_proxy": ""}


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Tinyproxy]:
    with Tinyproxy(tmp_path / "tinyproxy", auth=(PROXY_USER, PROXY_PASSWORD)) as running:
        yield running


def _authority(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


def test_the_sidecar_discovers_and_fetches_its_token_through_the_proxy(
        tmp_path: Path, pki: TestPKI, oauth_provider: OAuthTestProvider,
        proxy: Tinyproxy, start_sidecar: StartSidecar) -> None:
    client = oauth_provider.clients["basic"]
    assert client.secret is not None
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "proxy-password").write_text(PROXY_PASSWORD + "\n")
    (tmp_path / "secrets" / "client-secret").write_text(client.secret + "\n")
    listen = free_port()
    with RawRecordingUpstream(pki.server(name="egress-token-upstream")) as upstream:
        settings = {
            "admin": {"listen": None},
            "egress_proxies": {"corp": {"url": proxy.url, "username": PROXY_USER,
                                        "password_file": "secrets/proxy-password"}},
            "oauth": {"idp": {
                "discover_from": oauth_provider.fhir_base, "client_id": client.client_id,
                "client_auth": client.client_auth,
                "client_secret_file": "secrets/client-secret",
                "scopes": list(oauth_provider.scopes),
                "tls": {"verify": "custom", "ca_bundle": str(oauth_provider.ca_bundle)},
                "via": "corp"}},
            "connections": {"fhir": {
                "url": f"https://localhost:{upstream.port}/fhir",
                "listen": f"127.0.0.1:{listen}", "auth": {"oauth": "idp"},
                "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)},
                "via": "corp"}},
        }
        env = _ambient_proxies(free_port())
        sidecar = start_sidecar(settings, directory=tmp_path, env=env).process
        response = httpx.get(f"http://127.0.0.1:{listen}/fhir/Patient/1", timeout=30,
                             trust_env=False)
        assert response.status_code == 200, response.text + sidecar.output
        head = upstream.wait_for_heads(1)[0][1]
        assert b"Authorization: Bearer " in head
        assert b"proxy-authorization" not in upstream.all_bytes().lower()
        # Discovery, the token request and the FHIR request all went through the proxy.
        idp = _authority(oauth_provider.issuer)
        idp = _authority(oauth_provider.issuer)
        connects = wait_until(lambda: proxy.connects() if len(proxy.connects()) >= 3
                              else None, message="three CONNECTs")
        assert connects.count(idp) >= 2, connects  # the SMART document, then the token
        assert f"localhost:{upstream.port}" in connects
        assert set(connects) == {idp, f"localhost:{upstream.port}"}
        password_forms = [PROXY_PASSWORD.encode(),
                          base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode())]
        for form in password_forms:
            assert form not in sidecar.output.encode()


def _source(provider: OAuthTestProvider, via: EgressProxy | None, **overrides: object
            ) -> TokenSource:
    client = provider.clients["basic"]
    definition = provider.definition("basic", **overrides)
    return TokenSource("idp", definition, client_secret=client.secret, private_key_pem=None,
                       tls=compile_tls_policy(definition.tls), policy=FAST, via=via)


async def _token(source: TokenSource) -> str:
    try:
        return await source.token()
    finally:
        await source.aclose()


def test_a_wrong_proxy_password_is_reported_naming_the_proxy_never_the_password(
        oauth_provider: OAuthTestProvider, proxy: Tinyproxy) -> None:
    wrong = "wr0ng-Pr0xy-Secret"
    via = EgressProxy.from_url("corp", proxy.url, username=PROXY_USER, password=wrong)
    with pytest.raises(TokenUnavailable) as caught:
        asyncio.run(_token(_source(oauth_provider, via)))
    text = str(caught.value)
    assert f"egress proxy 'corp' (127.0.0.1:{proxy.port}) refused the tunnel" in text
    assert "401" in text or "407" in text
    assert wrong not in text
    assert base64.b64encode(f"{PROXY_USER}:{wrong}".encode()).decode() not in text


def test_an_unreachable_proxy_is_reported_naming_the_proxy(
        oauth_provider: OAuthTestProvider) -> None:
    port = free_port()
    via = EgressProxy.from_url("nowhere", f"http://127.0.0.1:{port}")
    with pytest.raises(TokenUnavailable) as caught:
        asyncio.run(_token(_source(oauth_provider, via)))
    assert f"cannot reach egress proxy 'nowhere' (127.0.0.1:{port})" in str(caught.value)


def test_https_proxy_variables_in_the_environment_are_ignored(
        oauth_provider: OAuthTestProvider, proxy: Tinyproxy) -> None:
    # Without via: direct, whatever the environment says (the variables name a dead port).
    with mock.patch.dict(os.environ, _ambient_proxies(free_port())):
        token = asyncio.run(_token(_source(oauth_provider, None)))
    assert token
    # With via: the configured proxy, not the environment's.
    before = len(proxy.connects())
    via = EgressProxy.from_url("corp", proxy.url, username=PROXY_USER, password=PROXY_PASSWORD)
    with mock.patch.dict(os.environ, _ambient_proxies(free_port())):
        token = asyncio.run(_token(_source(oauth_provider, via)))
    assert token
    assert proxy.connects()[before:] == [_authority(oauth_provider.token_url)]

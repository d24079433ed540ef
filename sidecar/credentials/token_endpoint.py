"""One client_credentials token request (RFC 6749 §4.4), made with httpx.

This module knows the wire: the form parameters, client authentication, TLS, and what counts as a
usable answer. It talks to httpx directly, not through authlib's httpx integration: that one is
deprecated (authlib 1.7 and later warn at import that its httpx module is deprecated in favour
of httpx2) and the request is a single form POST (docs/architecture.md, "authlib and httpx").
It keeps no state between requests apart from the HTTP connection pool; caching, refresh and
backoff live in :mod:`sidecar.credentials.oauth`.
"""

from __future__ import annotations

import math
import re
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx

from sidecar.config.models import ClientAuth
from sidecar.credentials.cert_binding import bound_thumbprint
from sidecar.credentials.client_auth import (
    PrivateKeyJwt,
    client_authentication,
)
from sidecar.credentials.egress_client import httpx_proxy
from sidecar.credentials.endpoint_errors import (
    EndpointFailure,
    describe_http_error,
    describe_transport_error,
)
from sidecar.egress.proxies import EgressProxy
from sidecar.report.redaction import Redactor
from sidecar.tls.policy import UpstreamTlsPolicy

# What every token request sends besides its form (authlib's defaults, kept as they were).
_HEADERS = {"Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded;charset=UTF-8"}

# RFC 6750 §2.1 b64token (RFC 9110 token68): what may follow "Bearer " in a header.
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

# Parameters the sidecar sets itself; extra_params may not override them.
RESERVED_PARAMS = frozenset({
    "grant_type", "scope", "audience", "resource", "client_id", "client_secret",
    "client_assertion", "client_assertion_type",
})


@dataclass(frozen=True)
class IssuedToken:
    access_token: str = field(repr=False)
    expires_in: float | None  # None: the endpoint did not say
    scope: tuple[str, ...] | None  # None: the endpoint did not say (= as requested, RFC 6749 §5.1)

    @property
    def bound_thumbprint(self) -> str | None:
        """``cnf.x5t#S256``: the client certificate the token is bound to (RFC 8705)."""
        return bound_thumbprint(self.access_token)


@dataclass(frozen=True)
class TokenRequest:
    """What to ask for; the same for every request of one token source."""

    scopes: tuple[str, ...] = ()
    audience: str | None = None
    resource: str | None = None
    extra_params: tuple[tuple[str, str], ...] = ()

    def params(self) -> list[tuple[str, str]]:
        params: list[tuple[str, str]] = list(self.extra_params)
        if self.scopes:
            params.append(("scope", " ".join(self.scopes)))
        if self.audience is not None:
            params.append(("audience", self.audience))
        if self.resource is not None:
            params.append(("resource", self.resource))
        return params

    def form(self) -> str:
        return urlencode(self.params())


class TokenEndpoint:
    """A token endpoint as seen by one client; raises :class:`EndpointFailure` on failure."""

    def __init__(self, token_url: str, *, client_id: str, client_auth: ClientAuth,
                 client_secret: str | None, assertion_signer: PrivateKeyJwt | None,
                 request: TokenRequest, tls: UpstreamTlsPolicy, timeout: float,
                 redactor: Redactor, via: EgressProxy | None = None):
        self.token_url = token_url
        self._redactor = redactor
        self._via = via
        self._request = request
        self._timeout = timeout
        self._tls = tls
        self._client_id = client_id
        self._client_secret = client_secret
        self._client_auth: ClientAuth = client_auth
        self._signer = assertion_signer
        # RFC 8705: with tls_client_auth, the certificate (in the TLS context) authenticates.
        self._client = httpx.AsyncClient(
            verify=tls.stdlib_context(),
            trust_env=False,  # no proxy or CA settings from the environment
            proxy=httpx_proxy(via),
            timeout=timeout,
            follow_redirects=False,
        )

    async def _post(self) -> httpx.Response:
        headers, auth_params = client_authentication(
            self._client_auth, self._client_id, self._client_secret, self._signer)
        params = [*self._request.params(), ("grant_type", "client_credentials"), *auth_params]
        return await self._client.post(self.token_url, content=urlencode(params).encode(),
                                       headers={**_HEADERS, **headers})

    def _answer(self, response: httpx.Response) -> dict[str, Any]:
        # A non-2xx answer fails whatever its body says, and keeps its status for diagnostics.
        if not 200 <= response.status_code < 300:
            raise EndpointFailure("http_error", describe_http_error(response, self._redactor))
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise EndpointFailure("invalid_response", self._redact(
                "unreadable token response: Token endpoint response is not a JSON object "
                f"(HTTP {response.status_code})."))
        if "error" in answer:  # a 2xx answer that carries an OAuth error anyway
            error, description = answer["error"], answer.get("error_description")
            raise EndpointFailure("http_error", self._redact(
                f"{error}: {description}" if description else str(error)))
        return answer

    async def request_token(self) -> IssuedToken:
        try:
            response = await self._post()
        # A TLS alert after the handshake (a TLS 1.3 server refusing the client certificate)
        # reaches us as a bare ssl.SSLError: httpx does not wrap it.
        except (httpx.TransportError, ssl.SSLError) as exc:
            reason = describe_transport_error(exc, self._timeout, self._tls, self.token_url,
                                              via=self._via)
            raise EndpointFailure("network", self._redact(reason)) from None
        return self._parse(self._answer(response))

    def _parse(self, raw: dict[str, Any]) -> IssuedToken:
        token = raw.get("access_token")
        if not isinstance(token, str) or not token:
            raise EndpointFailure("invalid_response", "the token response has no access_token")
        if not _TOKEN68.fullmatch(token):
            # It goes into an upstream request's header: a CR/LF in it would add headers or
            # requests of the endpoint's choosing. Its characters are not quoted (a secret).
            raise EndpointFailure("invalid_response",
                                  "the access_token is not a valid bearer token (RFC 6750 "
                                  "allows letters, digits and -._~+/ followed by '=' only)")
        token_type = raw.get("token_type")
        # RFC 6749 makes token_type required, but some servers omit it; anything other than
        # Bearer (DPoP, MAC, ...) cannot be sent as "Authorization: Bearer".
        if token_type is not None and str(token_type).lower() != "bearer":
            raise EndpointFailure("invalid_response",
                                  f"token_type is {str(token_type)[:40]!r}, not Bearer")
        return IssuedToken(access_token=token, expires_in=_expires_in(raw.get("expires_in")),
                           scope=_scopes(raw.get("scope")))

    def _redact(self, text: str) -> str:
        return self._redactor.scrub(text)

    async def aclose(self) -> None:
        await self._client.aclose()

    def __repr__(self) -> str:
        return f"TokenEndpoint({self.token_url!r})"


def _expires_in(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):  # JSON true is no number of seconds (float(True) would be 1)
        raise EndpointFailure("invalid_response", f"expires_in is not a number: {value!r}")
    try:
        seconds = float(value)  # type: ignore[arg-type]  # a few servers send a string
    except (TypeError, ValueError):
        raise EndpointFailure("invalid_response",
                              f"expires_in is not a number: {str(value)[:40]!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise EndpointFailure("invalid_response", f"expires_in is not positive: {seconds:g}")
    return seconds


def _scopes(value: object) -> tuple[str, ...] | None:
    if not isinstance(value, str):
        return None
    return tuple(value.split())

"""One client_credentials token request, made with authlib over httpx.

This module knows the wire: the form parameters, client authentication, TLS, and what counts as a
usable answer. It keeps no state between requests apart from the HTTP connection pool; caching,
refresh and backoff live in :mod:`sidecar.credentials.oauth`.
"""

from __future__ import annotations

import math
import re
import ssl
import warnings
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import authlib.deprecate  # noqa: F401  (its warning filter must be installed outside the block)
import httpx

from sidecar.config.models import ClientAuth
from sidecar.credentials.cert_binding import bound_thumbprint
from sidecar.credentials.client_auth import (
    PrivateKeyJwt,
    encode_client_id_only,
    encode_client_secret_basic,
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

with warnings.catch_warnings():
    # authlib ≥ 1.7 prefers the "httpx2" package and warns once at import when it falls back to
    # httpx, which is what we use deliberately; the warning would only be noise in our logs.
    warnings.simplefilter("ignore", DeprecationWarning)
    from authlib.integrations.base_client import OAuthError
    from authlib.integrations.httpx_client import AsyncOAuth2Client

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

    def form(self) -> str:
        params: list[tuple[str, str]] = list(self.extra_params)
        if self.scopes:
            params.append(("scope", " ".join(self.scopes)))
        if self.audience is not None:
            params.append(("audience", self.audience))
        if self.resource is not None:
            params.append(("resource", self.resource))
        return urlencode(params)


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
        self._client = AsyncOAuth2Client(
            client_id=client_id,
            client_secret=client_secret,
            token_endpoint_auth_method=client_auth,
            verify=tls.stdlib_context(),
            trust_env=False,  # no proxy or CA settings from the environment
            proxy=httpx_proxy(via),
            timeout=timeout,
            follow_redirects=False,
        )
        self._client.register_client_auth_method(
            ("client_secret_basic", encode_client_secret_basic))
        if assertion_signer is not None:
            self._client.register_client_auth_method(("private_key_jwt", assertion_signer))
        # RFC 8705: the certificate (in the TLS context above) authenticates the client.
        for method in ("tls_client_auth", "self_signed_tls_client_auth"):
            self._client.register_client_auth_method((method, encode_client_id_only))
        # authlib only looks at the body for an "error" member; a non-2xx answer must fail
        # whatever its body says, and keep its status for the diagnostics.
        self._client.register_compliance_hook("access_token_response", self._require_success)

    def _require_success(self, response: httpx.Response) -> httpx.Response:
        if not 200 <= response.status_code < 300:
            raise EndpointFailure("http_error", describe_http_error(response, self._redactor))
        return response

    async def request_token(self) -> IssuedToken:
        try:
            raw = await self._client.fetch_token(
                self.token_url, grant_type="client_credentials", body=self._request.form())
        except EndpointFailure:
            raise
        # A TLS alert after the handshake (a TLS 1.3 server refusing the client certificate)
        # reaches us as a bare ssl.SSLError: httpx does not wrap it.
        except (httpx.TransportError, ssl.SSLError) as exc:
            reason = describe_transport_error(exc, self._timeout, self._tls, self.token_url,
                                              via=self._via)
            raise EndpointFailure("network", self._redact(reason)) from None
        except OAuthError as exc:  # a 2xx answer that carries an OAuth error anyway
            answer = f"{exc.error}: {exc.description}" if exc.description else str(exc.error)
            raise EndpointFailure("http_error", self._redact(answer)) from None
        except (ValueError, TypeError) as exc:  # not JSON, or values authlib cannot read
            raise EndpointFailure("invalid_response",
                                  self._redact(f"unreadable token response: {exc}")) from None
        finally:
            # authlib keeps the last token on the client object; we hold it ourselves.
            self._client.token = None
        return self._parse(raw)

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

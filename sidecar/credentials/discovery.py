"""``discover_from``: find a FHIR server's token endpoint in its SMART configuration.

The document is ``<FHIR base>/.well-known/smart-configuration`` (SMART App Launch 2.x) and is
fetched with the OAuth definition's own TLS policy, never the environment's CAs.
A definition that authenticates with its TLS client certificate uses the document's
``mtls_endpoint_aliases.token_endpoint`` instead when there is one (RFC 8705 §5; see
docs/configuration.md, "Discovery").
Besides ``token_endpoint`` it says which client authentication methods and signing algorithms
the server accepts; a definition the server would reject is reported here, in words, instead of
as an opaque ``invalid_client`` later.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from sidecar.credentials.egress_client import httpx_proxy
from sidecar.credentials.endpoint_errors import (
    EndpointFailure,
    describe_http_error,
    describe_transport_error,
)
from sidecar.egress.proxies import EgressProxy
from sidecar.report.redaction import Redactor
from sidecar.tls.policy import UpstreamTlsPolicy

WELL_KNOWN_PATH = "/.well-known/smart-configuration"


@dataclass(frozen=True)
class SmartConfiguration:
    url: str  # where the document was read
    token_endpoint: str
    auth_methods: tuple[str, ...] | None  # None: the server does not say
    signing_algs: tuple[str, ...] | None
    mtls_token_endpoint: object = None  # mtls_endpoint_aliases.token_endpoint, unchecked

    def token_endpoint_for(self, client_auth: str) -> str:
        """The URL token requests go to: for certificate client authentication the mTLS
        alias when the document has one, checked like ``token_endpoint``; else
        ``token_endpoint``. Other methods ignore the alias, even a malformed one."""
        if client_auth in CERTIFICATE_AUTH and self.mtls_token_endpoint is not None:
            return _checked_endpoint(self.url, self.mtls_token_endpoint,
                                     "mtls_endpoint_aliases.token_endpoint")
        return self.token_endpoint


CERTIFICATE_AUTH = frozenset({"tls_client_auth", "self_signed_tls_client_auth"})


def smart_configuration_url(fhir_base: str) -> str:
    return fhir_base.rstrip("/") + WELL_KNOWN_PATH


async def fetch_smart_configuration(fhir_base: str, *, tls: UpstreamTlsPolicy,
                                    timeout: float, redactor: Redactor,
                                    via: EgressProxy | None = None) -> SmartConfiguration:
    """Read and parse the document; raise :class:`EndpointFailure` when that is not possible."""
    url = smart_configuration_url(fhir_base)
    # trust_env=False: neither proxy nor CA settings from the environment apply here.
    async with httpx.AsyncClient(verify=tls.stdlib_context(), trust_env=False, timeout=timeout,
                                 follow_redirects=True, proxy=httpx_proxy(via)) as client:
        try:
            response = await client.get(url, headers={"Accept": "application/json"})
        except (httpx.TransportError, ssl.SSLError) as exc:  # see TokenEndpoint.request_token
            reason = describe_transport_error(exc, timeout, tls, url, via=via)
            raise EndpointFailure(
                "network", redactor.scrub(reason)) from None
    if response.status_code != 200:
        raise EndpointFailure("http_error", describe_http_error(response, redactor))
    return parse_smart_configuration(url, response.content)


def parse_smart_configuration(url: str, content: bytes) -> SmartConfiguration:
    try:
        doc = json.loads(content)
    except ValueError:
        raise EndpointFailure("invalid_response", "the SMART configuration is not JSON") from None
    if not isinstance(doc, dict):
        raise EndpointFailure("invalid_response", "the SMART configuration is not a JSON object")
    token_endpoint = _checked_endpoint(url, doc.get("token_endpoint"), "token_endpoint")
    aliases = doc.get("mtls_endpoint_aliases")
    return SmartConfiguration(
        url=url,
        token_endpoint=token_endpoint,
        auth_methods=_string_list(doc, "token_endpoint_auth_methods_supported"),
        signing_algs=_string_list(doc, "token_endpoint_auth_signing_alg_values_supported"),
        mtls_token_endpoint=aliases.get("token_endpoint") if isinstance(aliases, dict) else None,
    )


def _checked_endpoint(url: str, value: object, field: str) -> str:
    """``value`` as a token endpoint read from the document at ``url``, or EndpointFailure."""
    if not isinstance(value, str) or not _is_absolute_http_url(value):
        raise EndpointFailure("invalid_response",
                              f"the SMART configuration has no absolute http(s) {field}")
    # The client secret or assertion goes to this URL: it may not carry credentials of its own,
    # nor take the secret off TLS when the document itself came over TLS.
    parts = urlsplit(value)
    if parts.username is not None or parts.password is not None:
        raise EndpointFailure("invalid_response",
                              f"the SMART configuration's {field} carries user info")
    if urlsplit(url).scheme == "https" and parts.scheme != "https":
        raise EndpointFailure("invalid_response",
                              "the SMART configuration (read over https) names a plain http "
                              f"{field}")
    return value


def check_client_support(config: SmartConfiguration, client_auth: str,
                         signing_alg: str | None) -> None:
    """Raise :class:`EndpointFailure` when the server says it cannot accept this client.

    Servers that do not list their methods or algorithms are given the benefit of the doubt:
    many real SMART servers omit the lists.
    """
    if config.auth_methods is not None and client_auth not in config.auth_methods:
        raise EndpointFailure(
            "invalid_response",
            f"the server does not support client_auth {client_auth} "
            f"(its SMART configuration lists: {', '.join(config.auth_methods) or 'none'})",
        )
    if (client_auth == "private_key_jwt" and signing_alg is not None
            and config.signing_algs is not None and signing_alg not in config.signing_algs):
        raise EndpointFailure(
            "invalid_response",
            f"the server does not accept {signing_alg} client assertions "
            f"(its SMART configuration lists: {', '.join(config.signing_algs) or 'none'})",
        )


def _string_list(doc: dict[str, object], key: str) -> tuple[str, ...] | None:
    value = doc.get(key)
    if not isinstance(value, list):
        return None
    return tuple(v for v in value if isinstance(v, str))


def _is_absolute_http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname)

"""Egress proxies: corporate HTTP proxies that upstream traffic tunnels through.

Every use is a CONNECT tunnel to ``host:port``; TLS to the FHIR server or token endpoint runs
inside it, end to end, under that connection's own policy, so the proxy sees only
``host:port``. An ``https://`` proxy is itself reached over TLS, verified with the proxy
definition's ``tls`` policy.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from sidecar.tls.policy import UpstreamTlsPolicy


class ProxyAddress(tuple[str, int]):
    """An egress proxy's ``(host, port)`` that also knows which proxy definition it is.

    mitmproxy opens the tunnel to the address given in a server connection's ``via`` and
    keeps that object as the tunnel's address; the hooks that see only the tunnel
    (the CONNECT request, the TLS to an https:// proxy) read the definition from it.
    """

    proxy: EgressProxy

    def __new__(cls, proxy: EgressProxy) -> ProxyAddress:
        address = super().__new__(cls, (proxy.host, proxy.port))
        address.proxy = proxy
        return address


ProxyScheme = Literal["http", "https"]


@dataclass(frozen=True, eq=False)
class EgressProxy:
    """One compiled egress proxy definition (compared by identity: one per snapshot)."""

    name: str
    scheme: ProxyScheme
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: UpstreamTlsPolicy | None = None  # https:// proxies only

    @classmethod
    def from_url(cls, name: str, url: str, *, username: str | None = None,
                 password: str | None = None, tls: UpstreamTlsPolicy | None = None
                 ) -> EgressProxy:
        parts = urlsplit(url)
        scheme: ProxyScheme = "https" if parts.scheme == "https" else "http"
        assert parts.hostname is not None
        port = parts.port or (443 if scheme == "https" else 80)
        return cls(name, scheme, parts.hostname.lower(), port, username, password, tls)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The proxy's URL without credentials: safe to show."""
        return f"{self.scheme}://{self.address}"

    def describe(self) -> str:
        """How diagnostics name the proxy: its config name and address, never credentials."""
        return f"egress proxy '{self.name}' ({self.address})"

    def proxy_authorization(self) -> str | None:
        """The ``Proxy-Authorization`` value for the CONNECT request, if the proxy wants one."""
        if self.username is None or self.password is None:
            return None
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")
        return f"Basic {token}"

    def via(self) -> tuple[ProxyScheme, tuple[str, int]]:
        """mitmproxy's ``ServerSpec`` for a server connection that tunnels through this proxy."""
        return (self.scheme, ProxyAddress(self))

    def secrets(self) -> list[str]:
        """What must never appear in a diagnostic."""
        found = [self.password] if self.password else []
        authorization = self.proxy_authorization()
        if authorization is not None:
            found.append(authorization.removeprefix("Basic "))
        return found

"""Where a secret from the config file travels, so that the admin API sends it nowhere new
(docs/admin-api.md#credentials-go-only-to-known-upstreams).

A secret travels to a *destination*: an origin (scheme, host and port), reached directly or
through an egress proxy (the proxy's origin), and over TLS with a *trust* (which server
certificates are accepted: ``skip``; the default CAs; or a custom bundle, known by the
fingerprints of its certificates, not by its file name; each with the ``server_name`` checked).
Anyone who can choose any one of the three can read the secret off the wire: a server of
their own, a proxy of their own, or a position on the network path plus a certificate the
trust accepts.

Two kinds of secret travel, under their own keys:

- a Basic or OAuth definition's credentials go to the upstreams of the connections that use
  it: ``("basic_auth", name)`` and ``("oauth", name)``;
- an OAuth definition's client secret (or signed assertion) goes to its token endpoint, the
  ``token_url`` or the one ``discover_from`` yields: ``("oauth_endpoint", name)``. Both the
  ``token_url`` and the ``discover_from`` server count as that endpoint's destination: the
  one receives the secret, the other says where it goes.

This module has no I/O besides reading CA bundles, and knows nothing about HTTP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel

from sidecar.config.models import SidecarConfig, TlsSettings
from sidecar.tls.material import TlsMaterialError, ca_fingerprints

# What a definition's secret is sent along with, by key (see the module docstring).
Key = tuple[str, str]


@dataclass(frozen=True)
class Trust:
    """Which server certificates a TLS leg accepts."""

    verify: str  # "skip" | "default" | "custom"
    bundle: frozenset[str] | str | None = None  # custom: certificate fingerprints, or the path
    bundle_path: str | None = field(default=None, compare=False)  # for the words only
    server_name: str | None = None

    def describe(self) -> str:
        if self.verify == "skip":
            words = "TLS verify: skip"
        elif self.verify == "default":
            words = "TLS: default CAs"
        else:
            words = f"TLS: CA bundle {self.bundle_path}"
        return words + (f", server_name {self.server_name}" if self.server_name else "")


@dataclass(frozen=True)
class Destination:
    origin: str  # scheme://host:port; "" for what is not an http(s) URL
    via: str | None  # the egress proxy's origin, None for a direct connection
    trust: Trust | None  # None for plain http://

    def describe(self) -> str:
        words = self.origin or "(not a URL)"
        if self.via is not None:
            words += f" through the egress proxy {self.via}"
        if self.trust is not None:
            words += f" ({self.trust.describe()})"
        return words


def origin(url: str) -> str:
    """scheme://host:port, the port spelt out; "" for what is not an http(s) URL."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError:
        return ""
    if not parts.hostname or port is None:
        return ""
    return f"{parts.scheme.lower()}://{parts.hostname.lower()}:{port}"


def trust_of(tls: TlsSettings, url: str) -> Trust | None:
    if not url.lower().startswith("https:"):
        return None
    if tls.verify == "skip":
        return Trust("skip")
    if tls.verify == "default":
        return Trust("default", server_name=tls.server_name)
    path = tls.ca_bundle
    bundle: frozenset[str] | str | None = None
    if path is not None:
        try:
            bundle = ca_fingerprints(Path(path).read_bytes(), str(path))
        except (OSError, TlsMaterialError):
            bundle = str(path)  # unreadable now: only the very same file is the same trust
    return Trust("custom", bundle, None if path is None else str(path), tls.server_name)


def destination(config: SidecarConfig, url: str, tls: TlsSettings, via: str | None
                ) -> Destination:
    proxy = config.egress_proxies.get(via) if via is not None else None
    via_origin = origin(proxy.url) if proxy is not None else (None if via is None else via)
    return Destination(origin(url), via_origin, trust_of(tls, url))


def destinations(config: SidecarConfig, carries_file_secret: Callable[[BaseModel], bool]
                 ) -> Iterator[tuple[Key, Destination]]:
    """Every destination ``config`` sends a definition's secret to, for the definitions
    ``carries_file_secret`` says hold a secret from the config file."""
    for conn in config.connections.values():
        for kind, name in (("basic_auth", conn.auth.basic), ("oauth", conn.auth.oauth)):
            if name is None:
                continue
            definition = getattr(config, kind).get(name)
            if definition is not None and carries_file_secret(definition):
                yield (kind, name), destination(config, conn.url, conn.tls, conn.via)
    for name, oauth in config.oauth.items():
        if not carries_file_secret(oauth):
            continue
        for url in (oauth.token_url, oauth.discover_from):
            if url is not None:
                yield ("oauth_endpoint", name), destination(config, url, oauth.tls, oauth.via)


def is_known(new: Destination, seen: set[Destination]) -> bool:
    """Whether ``new`` is a destination the secret already goes to. Leaving ``verify: skip``
    is no new destination: any trust accepts fewer servers than none."""
    return new in seen or any(
        s.origin == new.origin and s.via == new.via and s.trust is not None
        and s.trust.verify == "skip" for s in seen)

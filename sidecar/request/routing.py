"""Where a request is routed: which named connection it belongs to, and its upstream target.

Reverse listeners belong to exactly one connection. Forward-proxy requests are matched by
hostname (case-insensitive) and port, then by the longest connection base path that is a prefix
of the request path on a segment boundary. A port is compared as written in the URL: a request
without one (or with its scheme's default) matches a connection URL without one (or with its
scheme's default), so ``http://fhir.example.org/`` reaches ``https://fhir.example.org/``, and
``http://fhir.example.org:8443/`` only ``https://fhir.example.org:8443/``. Anything else
matches nothing: the sidecar is never an open proxy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


def port_key(scheme: str, port: int) -> int | None:
    """A URL's port as forward routing compares it: None for its scheme's default port."""
    return None if DEFAULT_PORTS.get(scheme) == port else port


@dataclass(frozen=True)
class Upstream:
    """An upstream base URL, split into the parts a request is re-originated with."""

    scheme: str
    host: str
    port: int
    base_path: str  # "" or "/segment/..." without a trailing slash

    @classmethod
    def from_url(cls, url: str) -> Upstream:
        parts = urlsplit(url)
        assert parts.hostname is not None
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname.lower(), port, parts.path.rstrip("/"))

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def port_key(self) -> int | None:
        return port_key(self.scheme, self.port)

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.base_path}"


@dataclass(frozen=True)
class Route:
    connection: str
    upstream_path: str  # path and query to send upstream


def is_path_prefix(base_path: str, path: str) -> bool:
    """``/fhir`` is a prefix of ``/fhir`` and ``/fhir/Patient``, not of ``/fhir-other``."""
    if not base_path:
        return True
    return path == base_path or path.startswith(base_path + "/")


class Router:
    def __init__(self, upstreams: Iterable[tuple[str, Upstream]]):
        self._by_host: dict[tuple[str, int | None], list[tuple[str, Upstream]]] = {}
        for name, upstream in upstreams:
            self._by_host.setdefault((upstream.host, upstream.port_key), []).append(
                (name, upstream))
        for candidates in self._by_host.values():
            # Longest base path first, so the first prefix match is the most specific one.
            candidates.sort(key=lambda item: len(item[1].base_path), reverse=True)

    def forward(self, host: str, path: str, *, scheme: str = "http", port: int | None = None
                ) -> Route | None:
        """Route an absolute-form proxy request; ``path`` includes any query string.

        ``port`` is the request's (None: none given, the scheme's default).
        """
        only_path = path.split("?", 1)[0]
        key = (host.lower().rstrip("."), None if port is None else port_key(scheme, port))
        for name, upstream in self._by_host.get(key, ()):
            if is_path_prefix(upstream.base_path, only_path):
                return Route(name, path)
        return None

    @staticmethod
    def reverse(name: str, upstream: Upstream, path: str) -> Route:
        """Route a request on a connection's own listener: its path is relative to the base."""
        if not path.startswith("/"):
            path = "/" + path
        if upstream.base_path and is_path_prefix(upstream.base_path, path.split("?", 1)[0]):
            # The app already sent the upstream's full path; don't apply the base twice.
            return Route(name, path)
        return Route(name, upstream.base_path + path)

"""What the proxy reports as it works, for metrics and status pages.

The addon calls a :class:`ProxyObserver`; ``sidecar.observe.metrics`` implements it with Prometheus
counters. Arguments are configured names and small enums only, never URLs, hosts or paths.
"""

from __future__ import annotations

from typing import Literal, Protocol

NO_CONNECTION = "-"  # requests that matched no connection (no config name can be "-")
# How a token request ended: the result label of fhir_sidecar_token_requests_total.
TokenFailureResult = Literal["http_error", "invalid_response", "network"]
TokenResult = Literal["success", TokenFailureResult]


class ProxyObserver(Protocol):
    def request_started(self, connection: str) -> None: ...

    def request_finished(self, connection: str, method: str, status: int | None,
                         duration_seconds: float, error: str | None,
                         upstream_status: int | None = None) -> None:
        """``status``: what the app got; ``upstream_status``: what the FHIR server itself
        answered (None when the answer is the sidecar's own, or there was none)."""

    def auth_retry(self, connection: str) -> None: ...

    def upstream_tls_failure(self, connection: str, reason: str) -> None: ...

    def egress_proxy_failure(self, proxy: str) -> None: ...


class NullObserver:
    def request_started(self, connection: str) -> None:
        pass

    def request_finished(self, connection: str, method: str, status: int | None,
                         duration_seconds: float, error: str | None,
                         upstream_status: int | None = None) -> None:
        pass

    def auth_retry(self, connection: str) -> None:
        pass

    def upstream_tls_failure(self, connection: str, reason: str) -> None:
        pass

    def egress_proxy_failure(self, proxy: str) -> None:
        pass

"""httpx settings for token requests and SMART discovery that tunnel through an egress proxy.

httpx tunnels ``https://`` targets with CONNECT and runs the target's TLS inside the tunnel
with the client's own ``verify`` context, so the token endpoint's policy stays end to end.
Environment proxy variables never apply (``trust_env=False`` at every client).
"""

from __future__ import annotations

import httpx

from sidecar.egress.proxies import EgressProxy


def httpx_proxy(via: EgressProxy | None) -> httpx.Proxy | None:
    if via is None:
        return None
    headers = {}
    authorization = via.proxy_authorization()
    if authorization is not None:
        headers["Proxy-Authorization"] = authorization
    # An https:// proxy's own certificate is checked with the proxy definition's policy.
    ssl_context = via.tls.stdlib_context() if via.tls is not None else None
    return httpx.Proxy(via.url, headers=headers, ssl_context=ssl_context)

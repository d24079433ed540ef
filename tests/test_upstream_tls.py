"""The upstream TLS addon (sidecar/proxy/upstream_tls.py) refuses what has no policy of its
own: a server connection that no compiled connection opened, or an https:// egress proxy
without a ``tls`` policy, never gets mitmproxy's default TLS; the refusal is remembered as the
client's handshake failure (for the error answer) and blamed on the proxy when it is one's.
The paths with a policy run end to end in the sidecar process (test_tls_*, test_egress_*)."""

from __future__ import annotations

import pytest
from mitmproxy import connection, options, tls
from mitmproxy.proxy import context

from sidecar.egress.proxies import EgressProxy, ProxyAddress
from sidecar.proxy.failures import TlsFailure
from sidecar.proxy.upstream_tls import UpstreamTls


def _client() -> connection.Client:
    return connection.Client(peername=("127.0.0.1", 50000), sockname=("127.0.0.1", 8080))


def _refused(addon: UpstreamTls, client: connection.Client, server: connection.Server,
             match: str) -> TlsFailure | None:
    data = tls.TlsData(server, context.Context(client, options.Options()))
    with pytest.raises(ValueError, match=match):
        addon.tls_start_server(data)
    assert data.ssl_conn is None and server.sni is None  # nothing was set up
    server.error = "fhir-sidecar: refused"
    addon.tls_failed_server(data)
    return addon.pop_failure(client, server)


def test_a_server_no_connection_opened_gets_no_tls() -> None:
    addon = UpstreamTls()
    client = _client()
    server = connection.Server(address=("fhir.example.org", 443))
    failure = _refused(addon, client, server, "no TLS policy for this upstream")
    assert failure == TlsFailure("handshake", "fhir-sidecar: refused", None)
    assert addon.pop_failure(client, server) is None  # reported once


def test_an_https_proxy_without_a_policy_gets_no_tls() -> None:
    addon = UpstreamTls()
    client = _client()
    proxy = EgressProxy.from_url("corp", "https://proxy.example.org:3128")
    server = connection.Server(address=ProxyAddress(proxy))
    failure = _refused(addon, client, server, "no TLS policy for this egress proxy")
    assert failure is not None and failure.proxy is proxy and failure.reason == "handshake"

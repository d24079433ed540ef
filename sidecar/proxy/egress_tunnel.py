"""The mitmproxy addon that sends a connection's upstream traffic through its egress proxy.

A server connection whose ``via`` names a proxy is opened by mitmproxy as a CONNECT tunnel
through it (its HTTP layer does this in every proxy mode); TLS to the FHIR server then runs
inside the tunnel under the connection's own policy (``upstream_tls.py``). The proxy's
credentials go only on the CONNECT request, which only the proxy sees.
"""

from __future__ import annotations

from mitmproxy import connection, http

from sidecar.egress.proxies import ProxyAddress
from sidecar.proxy.flow_state import state_of


class EgressTunnel:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if state is None or state.connection is None or flow.response is not None:
            return
        proxy = state.connection.via
        if proxy is None:
            return
        # ``flow.server_conn`` is the client connection's shared (possibly open) server
        # connection: the request gets a fresh one to describe the tunnelled connection it
        # needs, as mitmproxy's own upstream-proxy switching does.
        flow.server_conn = connection.Server(address=flow.server_conn.address,
                                             via=proxy.via())

    def http_connect_upstream(self, flow: http.HTTPFlow) -> None:
        address = flow.server_conn.address
        if isinstance(address, ProxyAddress):
            authorization = address.proxy.proxy_authorization()
            if authorization is not None:
                flow.request.headers["Proxy-Authorization"] = authorization

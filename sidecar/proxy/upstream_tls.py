"""The mitmproxy addon where upstream TLS is decided: each routed connection's own policy.

mitmproxy's global options cannot express per-connection verification, so this addon builds
every upstream TLS connection itself (``tls_start_server``) from the compiled policy of the
connection the server connection was opened for (``sidecar.tls.policy``). Each upstream
connection belongs to the one compiled connection whose request opened it, and only that
connection's requests reuse it (``mitm_compat.bind_upstream_connections``), so the handshake's
policy holds for every request it carries. It also remembers TLS sessions for resumption and
why a handshake failed, for the error answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from mitmproxy import connection, http, tls
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import server_hooks
from OpenSSL import SSL

from sidecar.egress.proxies import ProxyAddress
from sidecar.proxy import failures, mitm_compat
from sidecar.proxy.flow_state import upstream_owner
from sidecar.runtime.snapshot import CompiledConnection
from sidecar.tls.policy import UpstreamTlsPolicy, retire_connection

HTTP1_ALPN = [b"http/1.1"]


class UpstreamTls:
    def __init__(self) -> None:
        # Why a client's latest upstream handshake failed.
        self._failures: dict[str, failures.TlsFailure] = {}
        # Open upstream TLS connections by server connection id. A session is remembered at
        # the connection's first response (TLS 1.3 tickets arrive after the handshake) and
        # kept resumable when the connection closes.
        self._open: dict[str, _UpstreamConnection] = {}

    def load(self, loader: Loader) -> None:
        mitm_compat.install_tls_close_fix()
        # An upstream connection carries only requests of the compiled connection (TLS
        # policy, client certificate, credentials, snapshot) that opened it.
        mitm_compat.bind_upstream_connections(upstream_owner)

    def pop_failure(self, client: connection.Client, server: connection.Server
                    ) -> failures.TlsFailure | None:
        failure = self._failures.pop(client.id, None)
        upstream = self._open.get(server.id)
        if failure is None and upstream is not None:
            # A TLS 1.3 server judges the client's certificate after the client's handshake
            # has completed: its refusal is an alert on the first read.
            failure = failures.TlsFailure.after_handshake(upstream.ssl_conn)
        return failure

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        server = tls_start.conn
        assert isinstance(server, connection.Server) and server.address is not None
        if isinstance(server.address, ProxyAddress):
            self._start_proxy_tls(tls_start, server, server.address)
            return
        conn = mitm_compat.opened_for(server)
        if not isinstance(conn, CompiledConnection) or conn.tls is None:
            # Not opened for one of our upstreams: refuse rather than fall back to
            # mitmproxy's defaults.
            raise ValueError("fhir-sidecar: no TLS policy for this upstream")
        policy = conn.tls
        host, port = server.address
        server.sni = policy.sni_for(host)
        server.alpn_offers = HTTP1_ALPN
        # Resuming the session of an earlier connection under this same policy saves most of
        # the handshake: a client opening a connection per request pays one per request.
        tls_start.ssl_conn = policy.new_openssl_connection(host, HTTP1_ALPN, port=port)
        self._open[server.id] = _UpstreamConnection(policy, tls_start.ssl_conn, host, port)

    @staticmethod
    def _start_proxy_tls(tls_start: tls.TlsData, server: connection.Server,
                         address: ProxyAddress) -> None:
        """TLS to an https:// egress proxy itself, under the proxy definition's policy."""
        policy = address.proxy.tls
        if policy is None:
            raise ValueError("fhir-sidecar: no TLS policy for this egress proxy")
        host, port = address
        server.sni = policy.sni_for(host)
        server.alpn_offers = HTTP1_ALPN
        tls_start.ssl_conn = policy.new_openssl_connection(host, HTTP1_ALPN, port=port)

    def tls_failed_server(self, tls_start: tls.TlsData) -> None:
        address = getattr(tls_start.conn, "address", None)
        proxy = address.proxy if isinstance(address, ProxyAddress) else None
        detail = tls_start.conn.error or ""
        if tls_start.ssl_conn is not None:
            failure = failures.TlsFailure.from_conn(tls_start.ssl_conn, detail, proxy=proxy)
        else:  # no TLS connection was ever built for it
            failure = failures.TlsFailure("handshake", detail, proxy)
        self._failures[tls_start.context.client.id] = failure

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        upstream = self._open.get(flow.server_conn.id)
        if upstream is not None and not upstream.session_remembered:
            upstream.session_remembered = True
            upstream.policy.remember_session(upstream.host, upstream.port, upstream.ssl_conn)

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        upstream = self._open.pop(data.server.id, None)
        if upstream is not None:
            retire_connection(upstream.ssl_conn)

    def client_disconnected(self, client: connection.Client) -> None:
        self._failures.pop(client.id, None)


@dataclass
class _UpstreamConnection:
    policy: UpstreamTlsPolicy
    ssl_conn: SSL.Connection
    host: str
    port: int
    session_remembered: bool = False

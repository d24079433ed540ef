"""The addon that closes the upstream connections a reload retired, once nothing uses them.

An upstream connection belongs to the compiled connection that opened it
(``mitm_compat.bind_upstream_connections``), and a reload compiles new ones: after a swap, no
new request ever rides an upstream connection opened under the old snapshot. Left open, such
a connection would cost a socket at both ends for as long as the app's keep-alive connection
lives, and mitmproxy allows an app connection only five connections to one upstream address,
so after five reloads a keep-alive app would wait for ever (docs/architecture.md, "Reloads
and upstream connections").

So, at each swap: an app connection with no request in flight has its retired upstream
connections closed at once (they are idle); one with a request in flight keeps them until that
request has finished (its response hook or its error), then they are closed. A request that
started before the swap finishes on the connection it started with.
"""

from __future__ import annotations

import asyncio

from mitmproxy import connection, http

from sidecar.proxy import mitm_compat
from sidecar.proxy.config_source import SidecarConfig
from sidecar.proxy.request_log import RequestLog
from sidecar.runtime.snapshot import CompiledConnection, Snapshot


class RetiredUpstreams:
    def __init__(self, config: SidecarConfig, request_log: RequestLog) -> None:
        self._config = config
        self._request_log = request_log
        # The owners upstream connections may still serve: the current snapshot's compiled
        # connections, by identity (a dict keeps them alive, so an id is never reused).
        self._live: dict[int, CompiledConnection] = {}
        # App connections whose retired upstream connections wait for a request to finish.
        self._waiting: dict[str, connection.Client] = {}
        config.on_swap(self._swapped)

    def running(self) -> None:
        current = self._config.current()
        if current is not None:
            self._live = _owners(current)

    def retired(self, owner: object | None) -> bool:
        """An upstream connection no request can use any more: opened for a compiled
        connection that is not the current snapshot's, or for none at all."""
        return owner is None or self._live.get(id(owner)) is not owner

    def _swapped(self, old: Snapshot, new: Snapshot) -> None:
        self._live = _owners(new)
        for client in mitm_compat.app_connections():
            if self._request_log.in_flight_on(client):
                self._waiting[client.id] = client
            else:
                mitm_compat.close_upstreams_of(client, self.retired)

    # -- hooks: a request on an app connection that was waiting has finished ------------------

    def response(self, flow: http.HTTPFlow) -> None:
        self._finished(flow.client_conn)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finished(flow.client_conn)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # HTTP/1: the app's next request comes after the last one ended, so every upstream
        # connection of its app connection is idle now. A backstop for an end no hook saw.
        client = flow.client_conn
        if self._waiting.pop(client.id, None) is not None:
            mitm_compat.close_upstreams_of(client, self.retired)

    def client_disconnected(self, client: connection.Client) -> None:
        self._waiting.pop(client.id, None)  # mitmproxy closes its upstream connections

    def _finished(self, client: connection.Client) -> None:
        if client.id in self._waiting:
            # After this hook: the response is complete, and the last addons may still
            # read the flow; the app's next request cannot arrive before it is sent.
            asyncio.get_running_loop().call_soon(self._close_if_idle, client)

    def _close_if_idle(self, client: connection.Client) -> None:
        if client.id in self._waiting and not self._request_log.in_flight_on(client):
            del self._waiting[client.id]
            mitm_compat.close_upstreams_of(client, self.retired)


def _owners(snapshot: Snapshot) -> dict[int, CompiledConnection]:
    return {id(conn): conn for conn in snapshot.connections.values()}

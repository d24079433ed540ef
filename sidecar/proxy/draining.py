"""While the sidecar stops, every response tells the client to close its connection.

A client that keeps its connection alive would otherwise go on sending requests to this process
until the listener closes, and lose the one in transit at that moment; after ``Connection:
close`` it opens a new connection, which the Service routes to a pod that stays.

The runner adds this addon to the chain when the stop begins (:func:`start_draining`), so it
costs nothing on the request path before that.
"""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.master import Master


class CloseConnectionsWhenDraining:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # Streamed responses send their headers right after this hook.
        _close(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        # Also here: an addon earlier in the chain may have replaced the response.
        _close(flow)


def _close(flow: http.HTTPFlow) -> None:
    if flow.response is not None:
        flow.response.headers["Connection"] = "close"


def start_draining(master: Master) -> None:
    if master.addons.get("closeconnectionswhendraining") is None:
        master.addons.add(CloseConnectionsWhenDraining())

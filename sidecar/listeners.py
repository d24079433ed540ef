"""Which listeners a snapshot needs, as mitmproxy proxy-mode specs.

The forward proxy is a ``regular`` mode; each connection with ``listen`` gets a ``reverse``
mode of its own, so an app can use ``http://127.0.0.1:PORT`` as its FHIR base URL.
"""

from __future__ import annotations

from sidecar.config.models import split_listen
from sidecar.snapshot import Snapshot


def _at(listen: str) -> str:
    host, port = split_listen(listen)
    host = f"[{host}]" if ":" in host else host
    return f"@{host}:{port}"


def listener_modes(snapshot: Snapshot) -> list[str]:
    modes = []
    proxy_listen = snapshot.config.proxy.listen
    if proxy_listen:
        modes.append("regular" + _at(proxy_listen))
    for conn in snapshot.connections.values():
        if conn.settings.listen:
            # The reverse target only labels the listener; every request is re-targeted by
            # the addon from the connection's own settings.
            modes.append(f"reverse:{conn.upstream.scheme}://{conn.upstream.host_header}"
                         + _at(conn.settings.listen))
    return modes

"""Which listeners a snapshot needs, as mitmproxy proxy-mode specs, and back.

The forward proxy is a ``regular`` mode; each connection with ``listen`` gets a ``reverse``
mode of its own, so an app can use ``http://127.0.0.1:PORT`` as its FHIR base URL. Both come
from the config's one list of listeners (``SidecarConfig.listeners``); a request on a
connection's listener is routed by that listener's address (``listen_address_of``).
"""

from __future__ import annotations

from functools import lru_cache

from sidecar.config.models import ListenAddress
from sidecar.snapshot import Snapshot


def listener_modes(snapshot: Snapshot) -> list[str]:
    modes = []
    for listener in snapshot.config.listeners():
        if listener.kind == "proxy":
            modes.append(f"regular@{listener.address}")
        elif listener.connection is not None:
            upstream = snapshot.connections[listener.connection].upstream
            # The reverse target only labels the listener; every request is re-targeted by
            # the addon from the connection's own settings.
            modes.append(f"reverse:{upstream.scheme}://{upstream.host_header}"
                         f"@{listener.address}")
    return modes


@lru_cache(maxsize=256)
def listen_address_of(mode_spec: str) -> ListenAddress | None:
    """The configured address of a listener whose mode spec ``listener_modes`` made; None
    for a mode spec that names no ``HOST:PORT``.

    The configured address, not the socket's: a wildcard or host-name listener accepts
    connections on addresses that appear nowhere in the config.
    """
    _, at, listen = mode_spec.rpartition("@")
    try:
        return ListenAddress.parse(listen) if at else None
    except ValueError:
        return None

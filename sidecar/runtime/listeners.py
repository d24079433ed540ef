"""Which listeners a snapshot needs, as mitmproxy proxy-mode specs, and back.

The forward proxy is a ``regular`` mode; each connection with ``listen`` gets a ``reverse``
mode of its own, so an app can use ``http://127.0.0.1:PORT`` as its FHIR base URL. Both come
from the config's one list of listeners (``SidecarConfig.listeners``); a request on a
connection's listener is routed by that listener's address (``listen_address_of``).
"""

from __future__ import annotations

from functools import lru_cache

from sidecar.config.models import ListenAddress
from sidecar.runtime.snapshot import Snapshot

# The target every connection listener's reverse mode names. It only labels the listener:
# every request is re-targeted by the routing addon from its connection's own settings. It
# is the same for every connection and every config, so a reload that changes a connection's
# URL, credentials or TLS leaves its listener's mode, and so its socket, untouched (mitmproxy
# closes and re-binds a listener whose mode spec changes). It is plain ``http`` because an
# ``https`` reverse mode also binds a UDP socket for HTTP/3; and the name can never resolve
# (RFC 6761 ``.invalid``), so nothing could reach it even if a request escaped re-targeting.
REVERSE_LABEL = "http://fhir-sidecar.invalid:9"


def listener_modes(snapshot: Snapshot) -> list[str]:
    modes = []
    for listener in snapshot.config.listeners():
        if listener.kind == "proxy":
            modes.append(f"regular@{listener.address}")
        elif listener.connection is not None:
            modes.append(f"reverse:{REVERSE_LABEL}@{listener.address}")
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

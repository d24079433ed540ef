"""Loopback ports for servers and listeners the kit's users start."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    The socket is closed before the port is used, so another process may take it in between;
    callers that can bind port 0 themselves should do that instead.
    """
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])

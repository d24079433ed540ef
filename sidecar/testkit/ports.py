"""Loopback ports for servers and listeners the kit's users start."""

from __future__ import annotations

import collections
import os
import random
import socket

LOOPBACK = "127.0.0.1"
# ``LOW-HIGH``: hand out ports from this range only. CI runs the suite on two Pythons at once,
# each in its own range below the kernel's ephemeral range, so neither can take a port the
# other was just given (docs/testing.md#ci-time).
PORT_RANGE_ENV = "FHIR_SIDECAR_TEST_PORTS"
_ATTEMPTS = 500
# Its own generator: pytest-randomly reseeds the global one before every test, which would
# hand every test the same ports.
_rng = random.Random()
_recent: collections.deque[int] = collections.deque(maxlen=256)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    The socket is closed before the port is used, so another process may take it in between;
    callers that can bind port 0 themselves should do that instead.
    """
    span = port_range()
    if span is None:
        with socket.socket() as sock:
            sock.bind((LOOPBACK, 0))
            return int(sock.getsockname()[1])
    low, high = span
    for _ in range(_ATTEMPTS):
        port = _rng.randint(low, high)
        # A port handed out a moment ago may not be bound yet: never give it twice in a row.
        if port in _recent or not _bindable(port):
            continue
        _recent.append(port)
        return port
    raise RuntimeError(f"{PORT_RANGE_ENV}={os.environ[PORT_RANGE_ENV]}: no free port found "
                       f"in {_ATTEMPTS} attempts")


def port_range() -> tuple[int, int] | None:
    """The range ``FHIR_SIDECAR_TEST_PORTS`` names, or None (any port the kernel picks)."""
    text = os.environ.get(PORT_RANGE_ENV, "").strip()
    if not text:
        return None
    low_text, sep, high_text = text.partition("-")
    try:
        low, high = int(low_text), int(high_text)
    except ValueError:
        low = high = 0
    if not sep or not 1024 <= low < high <= 65535:
        raise ValueError(f"{PORT_RANGE_ENV}={text!r}: expected LOW-HIGH within 1024-65535, "
                         "e.g. 20000-25999")
    return low, high


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True

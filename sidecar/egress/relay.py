"""Carry a plain socket's bytes through a TLS connection to an https:// egress proxy.

Used by :mod:`sidecar.egress.connect`: the caller runs the upstream's TLS on a plain socket
(one end of a socket pair), and one thread moves bytes between the other end and the proxy's
``SSLSocket``. One thread, non-blocking, so the proxy's TLS object is never used by two threads
at once. The relay ends when either side closes, on any error, or after ``IDLE_SECONDS``
without traffic, so no thread outlives its use for long.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading

IDLE_SECONDS = 60.0
_CHUNK = 65536


def relay_through(tls: ssl.SSLSocket) -> socket.socket:
    """A plain socket whose bytes travel inside ``tls``; closing it ends the relay."""
    ours, theirs = socket.socketpair()
    ours.settimeout(tls.gettimeout())
    threading.Thread(target=_pump, args=(tls, theirs), name="egress-tls-relay",
                     daemon=True).start()
    return ours


def _pump(tls: ssl.SSLSocket, plain: socket.socket) -> None:
    tls.setblocking(False)
    plain.setblocking(False)
    to_tls = b""
    to_plain = b""
    tls_open = True
    try:
        while True:
            readers: list[socket.socket] = []
            if tls_open and not to_plain:
                readers.append(tls)
            if not to_tls:
                readers.append(plain)
            writers = ([tls] if to_tls else []) + ([plain] if to_plain else [])
            if not tls_open and not to_plain:
                return  # the proxy closed and everything it sent was passed on
            if tls in readers and tls.pending():
                ready_r: list[socket.socket] = [tls]
                ready_w: list[socket.socket] = []
            else:
                ready_r, ready_w, _ = select.select(readers, writers, [], IDLE_SECONDS)
                if not ready_r and not ready_w:
                    return
            if tls in ready_r:
                try:
                    data = tls.recv(_CHUNK)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    data = None
                if data == b"":
                    tls_open = False
                elif data:
                    to_plain += data
            if plain in ready_r:
                data = plain.recv(_CHUNK)
                if not data:
                    return  # the caller closed its end
                to_tls += data
            if to_tls and tls in ready_w:
                with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    to_tls = to_tls[tls.send(to_tls):]
            if to_plain and plain in ready_w:
                to_plain = to_plain[plain.send(to_plain):]
    except OSError:
        return
    finally:
        for sock in (plain, tls):
            with contextlib.suppress(OSError):
                sock.close()

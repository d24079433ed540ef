"""A blocking CONNECT tunnel through an egress proxy, for ``check --online`` and the
connection test (:mod:`sidecar.check.probe`).

The socket returned carries bytes to ``host:port`` through the proxy; the caller runs the
upstream's TLS inside it under the connection's own policy, as the proxy leg does. An
``https://`` proxy is reached over TLS verified by its own ``tls`` policy; the upstream's TLS
then runs inside that TLS. The stdlib cannot layer one ``SSLSocket`` over another, so the
caller gets one end of a socket pair and a relay thread (:mod:`sidecar.egress.relay`) carries
its bytes through the proxy's TLS.
"""

from __future__ import annotations

import socket
import ssl

from sidecar.egress.proxies import EgressProxy
from sidecar.egress.relay import relay_through
from sidecar.tls.verdict import describe, reason_of_stdlib_error, stdlib_error_detail

_MAX_HEAD_BYTES = 16384


class TunnelRefused(OSError):
    """The proxy could not be reached or answered the CONNECT with anything but 2xx."""


def open_tunnel(proxy: EgressProxy, host: str, port: int, timeout: float) -> socket.socket:
    try:
        sock: socket.socket = socket.create_connection((proxy.host, proxy.port),
                                                       timeout=timeout)
    except OSError as exc:
        raise TunnelRefused(f"cannot reach {proxy.describe()}: {exc.strerror or exc}") from None
    if proxy.scheme == "https":
        sock = _tls_to_proxy(proxy, sock)
    try:
        sock.sendall(_connect_request(proxy, host, port))
        status_line = _read_status_line(sock)
    except OSError as exc:
        sock.close()
        raise TunnelRefused(f"{proxy.describe()} did not answer the CONNECT: "
                            f"{exc.strerror or exc}") from None
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].startswith("2"):
        sock.close()
        answer = " ".join(parts[1:])[:120] or "no status line"
        raise TunnelRefused(f"{proxy.describe()} refused the tunnel to {host}:{port}: {answer}")
    if isinstance(sock, ssl.SSLSocket):
        return relay_through(sock)
    return sock


def _tls_to_proxy(proxy: EgressProxy, sock: socket.socket) -> ssl.SSLSocket:
    """The TLS to an https:// proxy, verified under the proxy definition's ``tls``; a failure
    names the proxy and says why in the words every TLS leg uses."""
    policy = proxy.tls
    assert policy is not None  # compiled for every https:// proxy
    try:
        return policy.stdlib_context().wrap_socket(sock, server_hostname=policy.sni_for(
            proxy.host))
    except ssl.SSLError as exc:
        sock.close()
        reason = reason_of_stdlib_error(exc) or "handshake"
        words = describe(reason, policy, proxy.host, stdlib_error_detail(exc))
        raise TunnelRefused(f"TLS to {proxy.describe()} failed: {words}") from None
    except OSError as exc:
        sock.close()
        raise TunnelRefused(f"TLS to {proxy.describe()} failed: {exc.strerror or exc}") \
            from None


def _connect_request(proxy: EgressProxy, host: str, port: int) -> bytes:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    authorization = proxy.proxy_authorization()
    if authorization is not None:
        lines.append(f"Proxy-Authorization: {authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def _read_status_line(sock: socket.socket) -> str:
    """Read the proxy's answer head byte by byte: nothing of the tunnel may be consumed."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            raise TunnelRefused("the proxy closed the connection")
        head += byte
        if len(head) > _MAX_HEAD_BYTES:
            raise TunnelRefused("the proxy's answer head is too long")
    first = head.split(b"\r\n", 1)[0].decode("latin-1")
    return "".join(c for c in first if c.isprintable())

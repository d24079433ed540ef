"""Which ``Host`` header values a listener answers (the admin listener, the connection
listeners and the forward proxy), and whether a listener is loopback-only.

A web page can make a browser send requests to ``127.0.0.1:9901`` by rebinding its own DNS name
to that address ("DNS rebinding"); the browser then still sends the page's name as ``Host``.
Answering only names that belong to the listener (its own address, ``localhost`` and the
operator's ``admin.allowed_hosts``) turns such requests away. An IP literal is never a rebound
name, but the unspecified address (``0.0.0.0``) is refused: browsers connect it to localhost.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

LOCALHOST = "localhost"


def host_name(value: str) -> str:
    """The name part of a ``Host`` value or listen host: lower case, no port, no brackets,
    no trailing dot; IP addresses in their canonical spelling."""
    name = value.strip().lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    name = name.rstrip(".")
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return name
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def _is_unspecified(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_unspecified
    except ValueError:
        return False


def host_allowed(host_header: str, *, listen_host: str, local_address: str | None,
                 allowed_hosts: Iterable[str]) -> bool:
    """Whether a request with this ``Host`` value names this listener.

    ``local_address`` is the address the connection arrived on: for a listener bound to every
    interface (``0.0.0.0``) that is the one address the client can have named, e.g. the pod IP
    that kubelet probes and Prometheus use.
    """
    name = host_name(host_header)
    if not name or _is_unspecified(name):
        return False
    own = {LOCALHOST, host_name(listen_host)}
    if local_address:
        own.add(host_name(local_address))
    return name in own or name in {host_name(h) for h in allowed_hosts}


def is_loopback_listen(listen_host: str) -> bool:
    """Whether a listener on ``listen_host`` is reachable only from this machine."""
    name = host_name(listen_host)
    if name == LOCALHOST:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # another host name may resolve to any interface


def split_host_port(value: str) -> tuple[str, int | None]:
    """A ``Host`` value's name (as :func:`host_name` spells it) and its port, if it has one;
    a port that is not a number is ``-1`` (never a listener's)."""
    text = value.strip()
    port_text = ""
    if text.startswith("["):
        rest = text.partition("]")[2]
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        port_text = text.partition(":")[2]
    port: int | None = None
    if port_text:
        port = int(port_text) if port_text.isdigit() and len(port_text) <= 5 else -1
    return host_name(text), port


def listener_host_allowed(host_header: str | None, *, listen_host: str, listen_port: int,
                          local_address: str | None, allowed_hosts: Iterable[str]) -> bool:
    """Whether a request to a connection listener (or the forward proxy) names it.

    Its own configured address, the address the connection arrived on, ``localhost`` and
    the operator's ``allowed_hosts`` (``"*"``: any), each with or without the listener's
    port. A page whose DNS name was rebound to this address still sends its own name.
    """
    allowed = list(allowed_hosts)
    if "*" in allowed:
        return True
    if not host_header:
        return False
    name, port = split_host_port(host_header)
    if port is not None and port != listen_port:
        return False
    return host_allowed(name, listen_host=listen_host, local_address=local_address,
                        allowed_hosts=allowed)

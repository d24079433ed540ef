"""Which ``Host`` header values the admin listener answers, and whether it is loopback-only.

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

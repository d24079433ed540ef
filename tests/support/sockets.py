"""The sockets a process holds, read from /proc (Linux): which addresses it listens on (TCP)
or has bound (UDP), each with the socket's inode, so a test can tell a socket kept from one
closed and bound again."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column


@dataclass(frozen=True)
class BoundSocket:
    protocol: str  # "tcp" | "udp"
    port: int
    inode: int


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed while we looked
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:["):-1]))
    return inodes


def bound_sockets(pid: int) -> set[BoundSocket]:
    """TCP sockets in LISTEN and every UDP socket of ``pid``, IPv4 and IPv6."""
    mine = _socket_inodes(pid)
    found = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if inode not in mine or (table.startswith("tcp") and state != _LISTEN):
                continue
            found.add(BoundSocket(table[:3], int(local.rpartition(":")[2], 16), inode))
    return found


_ESTABLISHED = "01"


def connections_to(pid: int, port: int) -> int:
    """How many established TCP connections ``pid`` holds to a remote ``port`` (loopback)."""
    mine = _socket_inodes(pid)
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], int(fields[9])
            if (inode in mine and state == _ESTABLISHED
                    and int(remote.rpartition(":")[2], 16) == port):
                count += 1
    return count

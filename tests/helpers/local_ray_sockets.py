"""Listening TCP sockets of a process and its descendants, read from /proc (Linux): (process name, address)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    tree, queue = [pid], [pid]
    while queue:
        for child in children(queue.pop()):
            tree.append(child)
            queue.append(child)
    return tree


def listening_inodes() -> dict[str, str]:
    """Socket inode -> local address, for every TCP socket in the LISTEN state."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            address_hex = fields[1].split(":")[0]
            raw = bytes.fromhex(address_hex)
            # The kernel prints each 32-bit word in host (little-endian) order.
            ordered = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            address = ipaddress.ip_address(ordered)
            mapped = getattr(address, "ipv4_mapped", None)  # an IPv4 address on an IPv6 socket
            found[fields[9]] = str(mapped or address)
    return found


def listening_sockets_of_tree(pid: int) -> list[tuple[str, str]]:
    addresses = listening_inodes()
    sockets = []
    for member in descendants(pid):
        try:
            name = Path(f"/proc/{member}/comm").read_text().strip()
            links = [os.readlink(fd) for fd in Path(f"/proc/{member}/fd").iterdir()]
        except OSError:
            continue
        for link in links:
            inode = link.removeprefix("socket:[").removesuffix("]")
            if link.startswith("socket:[") and inode in addresses:
                sockets.append((name, addresses[inode]))
    return sockets

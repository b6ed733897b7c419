"""The server's socket audit: the kernel's table for its ports, each ESTABLISHED row accounted
for (see :class:`~keepconn.SocketAudit`).

The table is read in a worker thread and filtered to the server's ports by the kernel (netlink,
see :mod:`keepconn.tcp._diag`). That thread still runs Python, holding the interpreter lock the
event loop needs at every turn: what it does per row is kept small (no address parsing per row).
The event loop itself only classifies the server's own rows, in batches with a checkpoint
between them.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from .._core.events import SocketAudit

if TYPE_CHECKING:
    from ..tcp import CensusRow
    from .life import Lifecycle

__all__ = ["audit_sockets"]

#: Rows an audit classifies between two checkpoints (about a millisecond's work).
_AUDIT_BATCH = 1000

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


async def audit_sockets(
    addresses: tuple[tuple[str, int], ...], lives: Lifecycle[Any]
) -> SocketAudit:
    """Account for every ESTABLISHED socket on the listening ``addresses`` against the
    connections ``lives`` holds."""
    # The table is read while connections come and go: a connection known before the read,
    # after it, or closed during it owns its row (counted as closing if it is gone). The
    # last kind matters: one that opened and closed within the read is in neither snapshot,
    # and would otherwise pass for a phantom.
    connections = lives.connections
    closed = lives.watch_closes()
    try:
        before = {conn.inode: conn for conn in connections}
        rows = await anyio.to_thread.run_sync(own_rows, addresses)
    finally:
        lives.unwatch_closes(closed)
    owners = {conn.inode: conn for conn in connections}
    for known in (*before.values(), *closed):
        owners.setdefault(known.inode, known)
    counts: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    for n, row in enumerate(rows, 1):
        if n % _AUDIT_BATCH == 0:
            # Other tasks run between batches; a connection that closes meanwhile is
            # counted as closing, which it is.
            await anyio.lowlevel.checkpoint()
        counts[row.state] += 1
        if row.state != "ESTABLISHED":
            continue
        owner = owners.get(row.inode) if row.inode else None
        if row.inode == 0:
            buckets["unaccepted"] += 1
        elif owner is None:
            buckets["phantoms"] += 1
        elif owner.reason is not None or owner not in connections:
            buckets["closing"] += 1
        elif owner.session is None:
            buckets["in_hello"] += 1
        else:
            buckets["with_session"] += 1
    return SocketAudit(
        established=counts["ESTABLISHED"],
        with_session=buckets["with_session"],
        in_hello=buckets["in_hello"],
        closing=buckets["closing"],
        unaccepted=buckets["unaccepted"],
        phantoms=buckets["phantoms"],
        close_wait=counts["CLOSE_WAIT"],
        counts=dict(counts),
    )


def own_rows(addresses: tuple[tuple[str, int], ...]) -> tuple[CensusRow, ...]:
    """The kernel's TCP table, only the rows of the server's listening ``addresses`` (runs in
    a worker thread). By address too, not only by port: another process may listen on the
    same port number on another address (every test device here is on loopback), and its
    sockets are none of this server's."""
    from ..tcp import census

    ports = {port for _, port in addresses}
    # With one port the kernel lists only its sockets; else every socket, filtered here.
    found = census(next(iter(ports))).sockets if len(ports) == 1 else census().sockets
    wanted = [(_ip(host), port) for host, port in addresses]
    # A server's rows have a handful of distinct local addresses: each is parsed once.
    parsed: dict[str, IP] = {}

    def ip_of(text: str) -> IP:
        ip = parsed.get(text)
        if ip is None:
            ip = parsed[text] = _ip(text)
        return ip

    return tuple(
        row
        for row in found
        if any(
            port == row.local_port and (ip.is_unspecified or ip == ip_of(row.local_address))
            for ip, port in wanted
        )
    )


def _ip(text: str) -> IP:
    address = ipaddress.ip_address(text.split("%", 1)[0])  # no zone index (fe80::1%eth0)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # an IPv4 peer on a dual-stack socket
    return address

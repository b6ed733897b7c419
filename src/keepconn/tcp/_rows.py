"""One row of the kernel's TCP table, whichever way it was read (netlink or /proc)."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["TIMERS", "CensusRow"]

#: The kernel's numbers for the timer pending on a socket (/proc/net/tcp's "tr" column, the
#: netlink record's timer): their names in :attr:`CensusRow.timer`.
TIMERS = {0: "off", 1: "retransmit", 2: "keepalive", 3: "timewait", 4: "probe"}


class CensusRow(NamedTuple):
    """One TCP socket as the kernel lists it (a NamedTuple: cheap at tens of thousands)."""

    #: 4 or 6.
    family: int
    #: The socket's own address (the server's, for a server-side socket), as text.
    local_address: str
    #: The socket's own port.
    local_port: int
    #: The peer's address ("0.0.0.0" or "::" for a listener).
    remote_address: str
    #: The peer's port (0 for a listener).
    remote_port: int
    #: Kernel state name: "ESTABLISHED", "CLOSE_WAIT", "LISTEN", ...
    state: str
    #: Bytes in the send queue (not yet acknowledged); 0 for LISTEN.
    tx_queue: int
    #: Bytes received but not read by the application or, for LISTEN, the connections
    #: waiting in its accept queue.
    rx_queue: int
    #: Pending timer: "off", "retransmit", "keepalive", "timewait" or "probe" (zero window).
    timer: str
    #: Seconds until that timer fires (0 when off).
    timer_expires: float
    #: Unanswered retransmissions or probes.
    retransmits: int
    #: The user id that owns the socket.
    uid: int
    #: Socket inode (0 for sockets no process owns, such as TIME_WAIT).
    inode: int

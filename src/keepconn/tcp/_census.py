"""The kernel's census of TCP sockets, over netlink (sock_diag) or from /proc/net/tcp (Linux).

This is what ``netstat -nat`` and ``ss -tan`` show, read without spawning them, and it includes
sockets no process holds any more (TIME_WAIT, orphaned FIN_WAIT) that the application cannot
see. A phantom audit compares it with the registry: ESTABLISHED sockets with no live session,
or CLOSE_WAIT sockets (the peer closed, the server never did) that last more than a moment.

/proc/net shows the network namespace of the process reading it; ``pid=`` reads another
process's namespace through /proc/PID/net instead, which is how a tool in the root namespace
audits a server running in a container. The census of one's own namespace asks netlink first
(:mod:`keepconn.tcp._diag`): the same rows, filtered by port in the kernel, several times
cheaper to read than /proc's text.
"""

from __future__ import annotations

import os
import socket
import sys
from collections import Counter
from collections.abc import Iterable, Mapping

import attrs

from ._info import state_name
from ._rows import TIMERS, CensusRow

__all__ = ["Census", "CensusRow", "census"]

#: /proc reports timer expiry in USER_HZ ticks, which is 100 on every Linux architecture.
_USER_HZ = 100


@attrs.frozen
class Census:
    """The result of :func:`census`: ``counts`` by state name and the ``sockets`` themselves."""

    #: State name -> how many sockets are in it (states with none are absent).
    counts: Mapping[str, int]
    #: Every socket listed, one row each.
    sockets: tuple[CensusRow, ...]
    #: The port asked for (None: every socket).
    port: int | None = None
    #: Rows the kernel listed more than once, dropped from ``sockets``: /proc/net/tcp is read
    #: in chunks, and a table that changes between two chunks can repeat sockets (or skip
    #: some, which no reader can see). A netlink dump is read in chunks too.
    duplicates: int = 0
    #: Where the rows came from: "netlink" (sock_diag) or "proc" (/proc/net/tcp and tcp6).
    source: str = "proc"

    def count(self, state: str) -> int:
        """How many sockets are in ``state`` (0 when none)."""
        return self.counts.get(state, 0)

    def __len__(self) -> int:
        return len(self.sockets)


def census(
    port: int | None = None, *, pid: int | None = None, proc: str = "/proc", source: str = "auto"
) -> Census:
    """List the TCP sockets whose local port is ``port`` (all sockets when None).

    Asks the kernel over netlink (sock_diag, as ``ss`` does) for this process's own network
    namespace; reads /proc/net/tcp and /proc/net/tcp6 for process ``pid`` (which may sit in
    another network namespace), for another procfs mount, or when netlink cannot be asked. A
    file that does not exist (no IPv6, not Linux) is skipped; if neither exists,
    FileNotFoundError is raised, since an empty census would be a lie.

    :param port: the local port to list (a server's port lists its listener and every
        server-side connection, not its clients' own sockets); None for every socket.
    :param pid: read the table of this process's network namespace instead of ours.
    :param proc: where procfs is mounted.
    :param source: "auto" (netlink, else /proc), "netlink" (no fallback: its OSError is
        raised) or "proc".
    :raises FileNotFoundError: neither table exists (not Linux, or no procfs).
    :raises ValueError: an unknown ``source``, or "netlink" with ``pid`` or ``proc``.

    >>> import socket
    >>> listener = socket.create_server(("127.0.0.1", 0))
    >>> port = listener.getsockname()[1]
    >>> client = socket.create_connection(("127.0.0.1", port))
    >>> served, _ = listener.accept()
    >>> census(port).counts                  # the client's own socket has another local port
    {'LISTEN': 1, 'ESTABLISHED': 1}
    >>> client.close()                       # the peer's FIN, not yet answered:
    >>> census(port).count("CLOSE_WAIT")
    1
    >>> served.close(); listener.close()
    """
    if source not in ("auto", "netlink", "proc"):
        raise ValueError(f"source must be 'auto', 'netlink' or 'proc', got {source!r}")
    own = pid is None and proc == "/proc"
    if source == "netlink" and not own:
        raise ValueError("netlink reads this process's own namespace: no pid= or proc= with it")
    if own and source != "proc":
        try:
            return _counted(_netlink_rows(port), port, "netlink")
        except OSError:
            if source == "netlink":
                raise
            # No sock_diag here (a sandbox, the module not loaded): /proc has the same rows.
    base = f"{proc}/net" if pid is None else f"{proc}/{pid}/net"
    rows: list[CensusRow] = []
    found = False
    for name, family in (("tcp", 4), ("tcp6", 6)):
        try:
            with open(f"{base}/{name}", encoding="ascii") as f:
                text = f.read()
        except FileNotFoundError:
            continue
        found = True
        rows.extend(parse_proc_net_tcp(text.splitlines()[1:], family, port))
    if not found:
        raise FileNotFoundError(f"{base}/tcp: no TCP census on this system")
    return _counted(rows, port, "proc")


def _netlink_rows(port: int | None) -> list[CensusRow]:
    from ._diag import diag_rows  # Linux only, imported when first asked

    rows = diag_rows(4, port)
    try:
        rows.extend(diag_rows(6, port))
    except OSError:
        # A kernel without IPv6 has no tcp6 table to list either; anything else is a failure.
        if os.path.exists("/proc/net/tcp6"):
            raise
    return rows


def _counted(rows: list[CensusRow], port: int | None, source: str) -> Census:
    unique = _unique(rows)
    counts = Counter(row.state for row in unique)
    return Census(
        counts=dict(counts),
        sockets=tuple(unique),
        port=port,
        duplicates=len(rows) - len(unique),
        source=source,
    )


def _unique(rows: list[CensusRow]) -> list[CensusRow]:
    """``rows`` without the repeats of a read that raced with the table: one socket (its inode,
    or for sockets no process owns its addresses and state) is listed once."""
    seen: set[tuple[object, ...]] = set()
    out = []
    for row in rows:
        key = (
            row.family,
            row.local_address,
            row.local_port,
            row.remote_address,
            row.remote_port,
            row.state,
            row.inode,
        )
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def parse_proc_net_tcp(
    lines: Iterable[str], family: int, port: int | None = None
) -> list[CensusRow]:
    """Parse the data lines of /proc/net/tcp (family 4) or tcp6 (family 6).

    With ``port``, lines for other local ports are skipped before the costly parts of parsing.
    """
    want = None if port is None else f"{port:04X}"
    decode = _decode4 if family == 4 else _decode6
    cache: dict[str, str] = {}
    out: list[CensusRow] = []
    append = out.append
    for line in lines:
        parts = line.split()
        if len(parts) < 10:
            continue
        local, remote = parts[1], parts[2]
        laddr, _, lport = local.rpartition(":")
        if want is not None and lport != want:
            continue
        raddr, _, rport = remote.rpartition(":")
        la = cache.get(laddr)
        if la is None:
            la = cache[laddr] = decode(laddr)
        ra = cache.get(raddr)
        if ra is None:
            ra = cache[raddr] = decode(raddr)
        tx, _, rx = parts[4].partition(":")
        tr, _, when = parts[5].partition(":")
        timer = int(tr, 16)
        ticks = int(when, 16)
        # The kernel prints a negative tick count (a timer already overdue) as unsigned.
        if ticks >= 1 << 31:
            ticks = 0
        append(
            CensusRow(
                family,
                la,
                int(lport, 16),
                ra,
                int(rport, 16),
                state_name(int(parts[3], 16)),
                int(tx, 16),
                int(rx, 16),
                TIMERS.get(timer, str(timer)),
                ticks / _USER_HZ if timer else 0.0,
                int(parts[6], 16),
                int(parts[7]),
                int(parts[9]),
            )
        )
    return out


# The kernel prints each 32-bit word of the address as a host-order integer, so the bytes of each
# word come out reversed on little-endian machines.
def _decode4(text: str) -> str:
    return socket.inet_ntop(socket.AF_INET, int(text, 16).to_bytes(4, sys.byteorder))


def _decode6(text: str) -> str:
    raw = b"".join(int(text[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, 32, 8))
    return socket.inet_ntop(socket.AF_INET6, raw)

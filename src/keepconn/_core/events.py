"""What the server tells the application: events as they happen, and frozen snapshots."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import attrs

from .admission import AdmissionStats
from .flapping import FlappingStats
from .gcpacing import GcPacingStats
from .ownership import ClusterStats
from .reasons import CloseReason
from .registry import RegistryStats

__all__ = [
    "ConnectionClosed",
    "ConnectionOpened",
    "RoundTrip",
    "ServerEvent",
    "ServerStats",
    "SessionReaped",
    "SessionTakenOver",
    "SocketAudit",
]


@attrs.frozen
class ConnectionOpened:
    """A hello succeeded and a session is live."""

    #: The identity the hello returned (``Hello.identity``).
    identity: Hashable
    #: The peer's address, as the socket reports it (``(host, port)`` for TCP).
    peer: Any
    #: True when the session replaced a live one of the same identity (TAKEN_OVER).
    took_over: bool


@attrs.frozen
class ConnectionClosed:
    """A connection ended. ``identity`` is None when it never completed its hello."""

    #: The session's identity, or None for a connection that never completed its hello.
    identity: Hashable | None
    #: The peer's address, as the socket reports it.
    peer: Any
    #: Why it ended: exactly one reason per connection, the first one given.
    reason: CloseReason
    #: Seconds from accept to close.
    duration: float
    #: Free text for logs (the exception, the TLS alert), not for matching on.
    detail: str = ""


@attrs.frozen
class SessionTakenOver:
    """A newer authenticated connection replaced a live one for the same identity."""

    #: The identity both connections authenticated as.
    identity: Hashable
    #: The address of the connection that was closed with TAKEN_OVER.
    old_peer: Any
    #: The address of the connection that now holds the session.
    new_peer: Any


@attrs.frozen
class RoundTrip:
    """A server ping was answered after ``rtt`` seconds."""

    #: The session's identity.
    identity: Hashable
    #: Seconds from the ping's send to its answer.
    rtt: float


@attrs.frozen
class SessionReaped:
    """The reaper found a session past its deadline and is closing its connection now (a
    ConnectionClosed follows, with IDLE_TIMEOUT unless another reason got there first).

    ``lateness`` is the reaper's time minus the session's deadline (last activity + timeout):
    the registry promises it is never negative and, while the event loop keeps up, at most one
    reap resolution. With ``timeout_close="graceful"`` the socket closes ``close_grace`` later.
    """

    #: The reaped session's identity.
    identity: Hashable
    #: The peer's address.
    peer: Any
    #: Seconds after the session's deadline that the reaper got to it (>= 0).
    lateness: float


#: Every event a server emits, to ``on_event`` and to each ``Server.add_listener`` callback:
#: one of these classes, told apart by type (``isinstance`` or ``match``).
ServerEvent = ConnectionOpened | ConnectionClosed | SessionTakenOver | RoundTrip | SessionReaped


@attrs.frozen
class SocketAudit:
    """The kernel's table of the server's port(s), set against what the server knows.

    Every server-side ESTABLISHED socket falls in exactly one bucket, matched by socket inode:
    ``established == with_session + in_hello + closing + unaccepted + phantoms``.
    """

    #: Server-side ESTABLISHED sockets on the listening ports.
    established: int
    #: ... held by a connection with a live session.
    with_session: int
    #: ... held by a connection still in its hello.
    in_hello: int
    #: ... held by a connection the server is closing right now (a transient state).
    closing: int
    #: ... completed by the kernel but still in the accept queue (no process owns them yet).
    unaccepted: int
    #: ... owned by a process but by none of this server's connections: what must stay 0.
    phantoms: int
    #: CLOSE_WAIT sockets on the ports: a peer's FIN not yet answered.
    close_wait: int
    #: Every kernel state on the ports, by name.
    counts: dict[str, int]


@attrs.frozen
class ServerStats:
    """A snapshot of a server's counters."""

    #: Open sockets, including those still in their hello.
    connections: int
    #: Connections in their hello phase.
    pending_hellos: int
    #: Connections accepted since start (admitted or not).
    accepted: int
    #: accept() failures for lack of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM).
    accept_errors: int
    #: Connection closes by reason (hello-phase closes included, unlike the registry's).
    closed: dict[CloseReason, int]
    #: Takeovers since start.
    takeovers: int
    #: Due sessions kept open because their peer's bytes were waiting unread (server behind).
    spared: int
    #: The session registry's own snapshot.
    registry: RegistryStats
    #: Admission control's counters (None when it is off).
    admission: AdmissionStats | None = None
    #: Flapping and duplicate-identity counters, bans included (None when off).
    flapping: FlappingStats | None = None
    #: The node's cluster state (None without a cluster).
    cluster: ClusterStats | None = None
    #: What the pacing of full garbage collections did (None when it is off).
    gc_pacing: GcPacingStats | None = None

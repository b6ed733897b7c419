"""The verdicts on a connection before its session opens: admission, bans, takeover.

Sans-I/O, like the rest of the core: every method takes ``now`` and returns a decision; the
adapter does what it says (sends a refusal, closes a socket, logs). Keeping the rules here, in
one synchronous step, gives two guarantees that do not depend on the adapter's scheduling:

* Of any number of concurrent hellos for one identity exactly one session is live afterwards,
  because nothing can interleave between looking up the incumbent and opening the new session.
* Authentication comes first: the adapter asks only once ``identify`` has accepted the peer,
  so a failed hello never reaches :meth:`Gatekeeper.open_session` and never disturbs a live
  session.

The order of the checks in :meth:`Gatekeeper.open_session`, and why:

0. a stale hello: one read on a connection accepted *before* the connection that holds the
   identity's session never takes that session over. The device opened the newer connection
   after giving up on the older one (the server was behind in a storm and read the older
   CONNECT late); the kernel cannot tell, since the older socket may still be ESTABLISHED.
   Accept order is what the server knows for certain, so it decides. It is not the order the
   device connected in, though, when the listen queue overflowed: a connection the kernel
   completed late (from a SYN cookie, or when a retransmitted ACK found room) is accepted after
   newer ones. So before a takeover the adapter first sends the new connection its welcome
   and waits for the peer's kernel to acknowledge it (:meth:`Gatekeeper.takes_over` says
   when): a peer that had given up on the connection answers with a reset, and its hello is
   refused as stale too (:meth:`Gatekeeper.refuse_stale`);
1. the session cap (admission): a takeover is never refused, since it adds no session and
   refusing it would keep a phantom alive;
2. the identity's flapping ban, then duplicate detection (two live devices taking one identity
   from each other): the incumbent stays, the newcomer is refused;
3. the takeover itself: the registry ends the incumbent with TAKEN_OVER and the adapter resets
   its connection.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol

import attrs

from .admission import AdmissionController
from .flapping import AddressFlappingDetector, FlappingDetector, Verdict, VerdictKind
from .reasons import CloseReason
from .registry import Session, SessionRegistry

__all__ = ["Candidate", "Gatekeeper", "Opening", "Refusal"]


class Candidate(Protocol):
    """What the gatekeeper needs to know of a connection (the adapter's connection object)."""

    @property
    def host(self) -> Hashable:
        """The peer's host (its address without the port), for bans and duplicate detection."""
        ...

    @property
    def order(self) -> int:
        """When the connection was accepted, as a count: a later accept has a larger order."""
        ...


@attrs.frozen
class Refusal:
    """The connection may not proceed: close it with ``reason``."""

    reason: CloseReason
    #: Words for the close's detail (which limit, how long a ban lasts).
    detail: str = ""
    #: Seconds the peer should wait before it retries (admission only), already jittered.
    retry_after: float | None = None
    #: For a duplicate identity: the detector's verdict, whose hosts the adapter logs.
    duplicate: Verdict | None = None


@attrs.frozen
class Opening:
    """The session is open; ``displaced`` is the incumbent it took over, if any (already ended
    with TAKEN_OVER in the registry: the adapter must reset its connection)."""

    session: Session
    displaced: Session | None = None


class Gatekeeper:
    """Every verdict on a connection from its accept to its session's open, for one server.

    Any of the detectors may be None (that check is off). The registry is the server's own:
    opening a session here is the one place sessions are opened.
    """

    __slots__ = ("registry", "admission", "flapping", "address_flapping", "takeovers", "stale")

    def __init__(
        self,
        registry: SessionRegistry,
        admission: AdmissionController | None = None,
        flapping: FlappingDetector | None = None,
        address_flapping: AddressFlappingDetector | None = None,
    ) -> None:
        self.registry = registry
        self.admission = admission
        self.flapping = flapping
        self.address_flapping = address_flapping
        #: Sessions taken over since start.
        self.takeovers = 0
        #: Stale hellos refused since start (see STALE_HELLO).
        self.stale = 0

    def admit_connection(self, now: float, host: Hashable) -> Refusal | None:
        """At accept, before any byte is read: None to go on to the hello, else a refusal.

        A refused connection costs no hello parsing; that is the point of deciding here.
        """
        if self.address_flapping is not None:
            if self.address_flapping.banned_until(host, now) is not None:
                return Refusal(CloseReason.FLAPPING, "address banned")
        if self.admission is None:
            return None
        decision = self.admission.admit(now)
        if decision.admitted:
            return None
        return Refusal(CloseReason.OVERLOADED, decision.limit or "", decision.retry_after)

    def takes_over(self, identity: Hashable, conn: Candidate) -> bool:
        """Whether a hello for ``identity`` on ``conn`` would displace a live session (rather
        than open the first one, or be refused as stale by accept order)."""
        old = self.registry.get(identity)
        return old is not None and conn.order >= old.conn.order

    def refuse_stale(self, detail: str) -> Refusal:
        """Refuse, as STALE_HELLO, a hello the adapter found stale by the peer's own answer
        (a reset instead of an acknowledgement of its welcome); counted with the others."""
        self.stale += 1
        return Refusal(CloseReason.STALE_HELLO, detail)

    def open_session(
        self,
        now: float,
        identity: Hashable,
        conn: Candidate,
        *,
        timeout: float | None = None,
    ) -> Opening | Refusal:
        """After an authenticated hello: open ``identity``'s session for ``conn``, or refuse.

        ``timeout`` is the session's own idle timeout (None: the registry's default). The
        same as :meth:`verdict` then :meth:`open`, for a server with nothing to ask between.
        """
        refusal = self.verdict(now, identity, conn)
        if refusal is not None:
            return refusal
        return self.open(now, identity, conn, timeout=timeout)

    def verdict(self, now: float, identity: Hashable, conn: Candidate) -> Refusal | None:
        """After an authenticated hello: the refusal of ``conn``'s hello for ``identity``, or
        None if its session may open (the hello is counted for flapping either way). A server
        in a cluster asks the store between this and :meth:`open`."""
        old = self.registry.get(identity)
        if old is not None:
            incumbent: Candidate = old.conn
            if conn.order < incumbent.order:
                self.stale += 1
                return Refusal(
                    CloseReason.STALE_HELLO, f"a newer connection holds {identity!r}'s session"
                )
        if self.admission is not None:
            decision = self.admission.admit_session(
                now, len(self.registry), takeover=old is not None
            )
            if not decision.admitted:
                return Refusal(CloseReason.OVERLOADED, decision.limit or "", decision.retry_after)
        if self.flapping is not None:
            verdict = self.flapping.record_hello(identity, now)
            if verdict.ok and old is not None:
                verdict = self.flapping.record_takeover(identity, old.conn.host, conn.host, now)
            if not verdict.ok:
                until = verdict.until if verdict.until is not None else now
                detail = f"{verdict.kind.value} for {until - now:.0f} s more"
                duplicate = verdict if verdict.kind is VerdictKind.DUPLICATE else None
                return Refusal(CloseReason.FLAPPING, detail, duplicate=duplicate)
        return None

    def open(
        self, now: float, identity: Hashable, conn: Candidate, *, timeout: float | None = None
    ) -> Opening:
        """Open ``identity``'s session for ``conn`` (its hello passed :meth:`verdict`),
        displacing the live one if any."""
        registry = self.registry
        old = registry.get(identity)
        session = registry.open(identity, now=now, timeout=timeout, conn=conn)
        if old is not None:
            self.takeovers += 1
        return Opening(session, old)

    def record_hello_aborted(self, host: Hashable, now: float, reason: CloseReason) -> None:
        """A connection ended before its hello completed. Counted against its address only
        when it was the peer's doing (what a scanner or a broken device does): hellos the
        server shed or cut short do not count."""
        if self.address_flapping is not None and reason in PEER_ABORTS:
            self.address_flapping.record_aborted(host, now)


#: Hello-phase ends that are the peer's doing, counted by the per-address flapping detector.
PEER_ABORTS = frozenset(
    {
        CloseReason.HELLO_TIMEOUT,
        CloseReason.AUTH_FAILED,
        CloseReason.PROTOCOL_ERROR,
        CloseReason.TLS_FAILED,
        CloseReason.PEER_CLOSED,
        CloseReason.PEER_RESET,
    }
)

"""A connection's life on the server, from accept to the close with its one reason::

    accept ── admission ── hello: [TLS handshake] + identify ── session open / takeover
          └─ refused: OVERLOADED   │  (one hello_timeout for both)  └─ handler runs; every
                                   └─ HELLO_TIMEOUT, TLS_FAILED,       complete frame touches
                                      AUTH_FAILED
    ... ── close with exactly one CloseReason ── socket closed: RST for a dead or displaced peer,
                                                 FIN otherwise; registry, stats, event, log line

The verdicts (admission, bans, takeover) are the core's :class:`Gatekeeper`; this module does
what they say and keeps the server's per-connection counters.

Under TLS the handshake is part of the hello: it counts as a pending hello for admission (a
peer that connects and never finishes its handshake is shed or closed HELLO_TIMEOUT like one
that never says hello), and a failed handshake closes that connection alone, before anything
could reach a live session.
"""

from __future__ import annotations

import logging
import random
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import anyio
import anyio.abc

from .._core.backoff import jitter
from .._core.config import Hello, ServerConfig
from .._core.events import ConnectionClosed, ConnectionOpened, ServerEvent, SessionTakenOver
from .._core.framing import Framer
from .._core.heartbeat import Pinger, PingPolicer
from .._core.opening import Gatekeeper, Refusal
from .._core.reasons import CloseReason
from .._core.registry import Session
from .cluster import ClusterNode
from .connection import Connection
from .failures import Failure, errors_in, first_failure
from .takeover import welcome_answered

__all__ = ["Lifecycle"]

logger = logging.getLogger("keepconn.server")

F = TypeVar("F")

Callback = Callable[[Connection[F]], Awaitable[None]]
#: The refuse callback: ``(stream, retry_after)``.
Refuse = Callable[[anyio.abc.ByteStream, float], Awaitable[None]]


class Lifecycle(Generic[F]):
    """Runs each accepted connection of one server and keeps count of them."""

    def __init__(
        self,
        *,
        config: ServerConfig,
        gate: Gatekeeper,
        identify: Callable[[Connection[F]], Awaitable[Hello]],
        handler: Callback[F],
        framer: Callable[[], Framer[F]],
        send_ping: Callback[F] | None,
        refuse: Refuse | None,
        emit: Callable[[ServerEvent], None],
        stopping: anyio.Event,
        rng: random.Random,
        cluster: ClusterNode | None = None,
        on_frame: Callable[[Connection[F], F], bool] | None = None,
    ) -> None:
        self._config = config
        # Server(on_frame=...): offered frames by the native transports only (see Server).
        self._on_frame = on_frame
        self._gate = gate
        self._registry = gate.registry
        self._identify = identify
        self._handler = handler
        self._framer = framer
        self._send_ping = send_ping
        self._refuse = refuse
        self._emit = emit
        self._stopping = stopping
        self._rng = rng
        self._cluster = cluster
        #: The open connections, hello phase included.
        self.connections: set[Connection[F]] = set()
        #: Set whenever no connection is open (shutdown waits on it).
        self.idle = anyio.Event()
        self.idle.set()
        #: Connections in their hello now.
        self.pending_hellos = 0
        #: Closes by reason, hello-phase closes included.
        self.closed: Counter[CloseReason] = Counter()
        #: Due sessions kept open because their peer's bytes waited unread in the kernel.
        self.spared = 0
        # Sets being filled with the connections that close, one per audit reading the kernel's
        # table (see Server.audit); a tuple replaced whole, empty (free) between audits.
        self._close_watchers: tuple[set[Connection[F]], ...] = ()

    def watch_closes(self) -> set[Connection[F]]:
        """A set that every connection closing from now on is added to, until
        :meth:`unwatch_closes`: what a socket audit needs to recognise a connection whose whole
        life fell within its read of the kernel's table."""
        watched: set[Connection[F]] = set()
        self._close_watchers = (*self._close_watchers, watched)
        return watched

    def unwatch_closes(self, watched: set[Connection[F]]) -> None:
        """Stop filling a set from :meth:`watch_closes`."""
        self._close_watchers = tuple(w for w in self._close_watchers if w is not watched)

    # -- one connection

    async def run(
        self, stream: anyio.abc.SocketStream, order: int, tls: ssl.SSLContext | None = None
    ) -> None:
        """Serve one accepted stream until it closes; ``order`` is its place in the accept
        order (counted when accepted: tasks need not start in the order they were spawned).
        With ``tls`` the connection's hello begins with a TLS handshake in that context."""
        try:
            framer = self._framer()
        except Exception:
            logger.exception("framer factory failed; closing the new connection")
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            return
        conn = Connection(
            stream,
            framer,
            receive_size=self._config.receive_size,
            on_event=self._emit,
            order=order,
        )
        self._opened(conn)
        try:
            with conn._scope:
                try:
                    if await self._prelude(conn, tls):
                        await self._session(conn)
                except BaseException as exc:
                    if self._failed(conn, exc):
                        raise
        finally:
            with anyio.CancelScope(shield=True):
                await self._finish(conn)

    def _opened(self, conn: Connection[F]) -> None:
        if not self.connections:
            self.idle = anyio.Event()
        self.connections.add(conn)

    async def _prelude(self, conn: Connection[F], tls: ssl.SSLContext | None) -> bool:
        """Admission, hello, the session's opening and its welcome: True if the handler is to
        run. (A coroutine of its own, finished before the handler starts, so that an idle
        connection's task holds no frame of it.)"""
        in_hello = False
        try:
            if not await self._admit(conn, tls is not None):
                return False
            self._apply_keepalive(conn)
            in_hello = True
            self._hello_started(conn)
            hello = await self._hello(conn, tls)
            self._hello_ended(conn)
            in_hello = False
            if hello is None:
                self._hello_aborted(conn)  # timed out, refused by identify, a failed handshake
                return False
            opened, welcomed = await self._open_session(conn, hello)
            if not opened:
                # One answer to a hello: none more once the welcome went out. A hello that
                # lost a cluster claim is a takeover, not a refusal.
                lost = conn.reason is CloseReason.TAKEN_OVER
                if hello.refusal is not None and not welcomed and not lost:
                    with anyio.move_on_after(1.0):
                        await conn.send(hello.refusal)
                return False
            welcome, hello = hello.welcome, None  # not kept for the connection's life
            if welcome is not None and not welcomed:
                await conn.send(welcome)
            return True
        finally:
            if in_hello:
                self._hello_ended(conn)
                self._hello_aborted(conn)

    def _hello_aborted(self, conn: Connection[F]) -> None:
        # Counted against the peer's address when the end was its doing (the Gatekeeper
        # tells): what a scanner or a slowloris does, address after address.
        reason = conn.reason
        if reason is not None:
            self._gate.record_hello_aborted(conn.host, anyio.current_time(), reason)

    def _failed(self, conn: Connection[F], exc: BaseException) -> bool:
        """Give the connection the reason ``exc`` stands for; True if ``exc`` is not ours
        and must travel on. (The caller re-raises it with a bare ``raise``: raised here, the
        traceback would hold this frame, which holds ``exc``, a cycle per cancelled
        connection left for the cyclic collector.)"""
        errors = errors_in(exc)
        if errors is None:
            return True  # KeyboardInterrupt, SystemExit and the like are not ours
        if not errors:
            # Only cancellation. From outside (the task running serve(), Ctrl-C) it means the
            # server is going away; this connection's own scope (close, max_age) has its reason
            # already or gets it when it settles.
            if conn.reason is None and not conn._cancel_requested():
                conn._record(CloseReason.SHUTDOWN)
            return True
        # Errors, perhaps beside a cancellation in one group (trio reports a reset seen by the
        # handler together with the cancel of its ping task). The task ends either way, so the
        # cancellation need not travel further.
        failure, detail = first_failure(errors)
        conn._record_failure(failure, detail)
        if failure is Failure.OTHER:
            logger.error("handler for %r failed", conn, exc_info=errors[0])
        return False

    def _hello_started(self, conn: Connection[F]) -> None:
        self.pending_hellos += 1
        admission = self._gate.admission
        if admission is not None:
            victim = admission.hello_started(conn)
            if victim is not None:
                # At the hello cap the oldest pending hello goes, not the newcomer: see
                # AdmissionConfig for why.
                assert isinstance(victim, Connection)
                victim.close(CloseReason.OVERLOADED, "shed: oldest pending hello")

    def _hello_ended(self, conn: Connection[F]) -> None:
        self.pending_hellos -= 1
        if self._gate.admission is not None:
            self._gate.admission.hello_finished(conn)

    async def _admit(self, conn: Connection[F], tls: bool) -> bool:
        """Admission at accept time: refused connections cost no hello parsing (nor, under
        TLS, a handshake)."""
        if self._stopping.is_set():
            conn._record(CloseReason.SHUTDOWN)
            return False
        gone, waited = conn._accept_wait()
        if gone:
            # Its client gave up while it waited in the listen queue (a storm): serving it
            # would cost a handshake and a hello for no one.
            conn._record(CloseReason.PEER_CLOSED, "gone before it was accepted")
            return False
        refusal = self._gate.admit_connection(anyio.current_time(), conn.host, waited)
        if refusal is None:
            return True
        # Under TLS a refusal could only be said after a handshake, the very work admission
        # is there to save in a storm: the connection is closed without one.
        await self._refuse_connection(conn, refusal, None if tls else refusal.retry_after)
        return False

    async def _refuse_connection(
        self, conn: Connection[F], refusal: Refusal, retry_after: float | None
    ) -> None:
        conn._record(refusal.reason, refusal.detail)
        if self._refuse is not None and retry_after is not None:
            with anyio.move_on_after(1.0):
                try:
                    await self._refuse(conn.stream, retry_after)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass

    def _apply_keepalive(self, conn: Connection[F]) -> None:
        keepalive = self._config.keepalive
        if keepalive is None:
            return
        try:
            keepalive.apply(conn.raw_socket())
        except OSError as exc:
            # The peer may already be gone; the hello will find out.
            logger.debug("keepalive not applied to %r: %s", conn, exc)

    async def _hello(self, conn: Connection[F], tls: ssl.SSLContext | None) -> Hello | None:
        # One timeout for the handshake and the hello together: what a device must do before
        # it has a session, and what a connection may cost the server before it proves itself.
        with anyio.move_on_after(self._config.hello_timeout) as timer:
            if tls is not None and not await conn._handshake(tls, server_side=True):
                return None
            hello = await self._identify(conn)
        if timer.cancelled_caught:
            stalled = tls is not None and conn.tls_version is None
            conn._record(CloseReason.HELLO_TIMEOUT, "in the TLS handshake" if stalled else "")
            return None
        if not isinstance(hello, Hello):
            raise TypeError(f"identify must return a Hello, got {hello!r}")
        return hello

    async def _open_session(self, conn: Connection[F], hello: Hello) -> tuple[bool, bool]:
        """Open the hello's session (or refuse it): (opened, whether the welcome went out)."""
        if self._stopping.is_set() or conn.reason is not None:
            # A hello that completes while the server shuts down (or while this connection is
            # being closed) must not open a session, let alone take over a live one.
            conn._record(CloseReason.SHUTDOWN)
            return False, False
        if conn._peer_gone():
            # A hello read long after it was sent (the server was behind in a storm) from a
            # peer that has since given up: it must not open a session, and above all not take
            # over the live session that same device has opened on a newer connection.
            conn._record(CloseReason.PEER_CLOSED, "gone before its hello was read")
            return False, False
        identity = hello.identity
        cluster = self._cluster
        if cluster is not None:
            hint = cluster.admit()
            if hint is not None:
                # Without the store no node can prove it owns the identity: refuse at once,
                # before the welcome a takeover sends first.
                refused = Refusal(CloseReason.OVERLOADED, "cluster store unreachable", hint)
                await self._refuse_connection(conn, refused, None if hello.refusal else hint)
                return False, False
        # The verdict before any answer: a refused hello is told so (hello.refusal), never
        # welcomed first.
        refusal = self._verdict(conn, identity)
        welcomed = False
        if refusal is None and hello.welcome is not None and self._gate.takes_over(identity, conn):
            # A takeover resets a live session, so first make sure this peer is still there.
            welcomed = True
            if not await welcome_answered(conn, hello.welcome):
                stale = self._gate.refuse_stale(
                    "the peer reset the connection on its welcome: it had given up on it"
                )
                conn._record(stale.reason, stale.detail)
                return False, True
            if self._stopping.is_set() or conn.reason is not None:
                conn._record(CloseReason.SHUTDOWN)
                return False, True
            # A newer connection may have opened the session while the welcome was out.
            refusal = self._gate.stale_hello(identity, conn)
        if refusal is None and cluster is not None:
            # One hello per identity at a time on this node, from here through the claim to
            # the open: only a claim that won displaces the local session. A newer connection
            # may have opened the session while this one waited for its turn.
            key = str(identity)
            async with cluster.turn(key):
                refusal = self._gate.stale_hello(identity, conn)
                if refusal is None:
                    return await self._claim_and_open(conn, hello, cluster, key), welcomed
        elif refusal is None:
            # Synchronous from the last check to the open: no other task can interleave, so
            # of any number of concurrent hellos for one identity exactly one is live.
            self._open(conn, hello, identity)
            return True, welcomed
        # The application's own refusal (hello.refusal) speaks its protocol; the generic
        # refuse callback is for connections refused before their hello was read.
        hint = None if hello.refusal is not None or welcomed else refusal.retry_after
        await self._refuse_connection(conn, refusal, hint)
        return False, welcomed

    async def _claim_and_open(
        self, conn: Connection[F], hello: Hello, cluster: ClusterNode, key: str
    ) -> bool:
        """In the node's turn for the identity, after the checks: True if the claim won and
        the session opened (displacing the local one); a claim refused cluster-wide or failed
        leaves the local session serving."""
        lost = await cluster.claim(key, conn)
        if lost is not None:
            conn._record(*lost)
            return False
        self._open(conn, hello, hello.identity)
        # Closed while its claim was in flight (shutdown, the store's reassert lost)? Its
        # session is open now, so its close releases the claim.
        return conn.reason is None

    def _verdict(self, conn: Connection[F], identity: Hashable) -> Refusal | None:
        """The gatekeeper's verdict on an authenticated hello: None if it may open."""
        now = anyio.current_time()
        verdict = self._gate.verdict(now, identity, conn)
        if verdict is not None and verdict.duplicate is not None:
            # Two live devices share an identity: keep the incumbent, refuse the newcomer,
            # and say so loudly instead of looping on takeovers.
            until = verdict.duplicate.until if verdict.duplicate.until is not None else now
            logger.warning(
                "duplicate identity %r: hosts %s keep taking it from each other; "
                "refusing newcomers for %.0f s",
                identity,
                " and ".join(map(str, verdict.duplicate.peers)),
                until - now,
            )
        return verdict

    def _open(self, conn: Connection[F], hello: Hello, identity: Hashable) -> None:
        """Open the session (displacing the identity's live one): synchronous."""
        now = anyio.current_time()
        opening = self._gate.open(now, identity, conn, timeout=hello.timeout)
        config = self._config
        pinger = Pinger(config.heartbeat, now) if config.heartbeat is not None else None
        policer = PingPolicer(config.ping_rate) if config.ping_rate is not None else None
        conn._attach(opening.session, pinger, policer)
        old = opening.displaced
        if old is not None:
            old_conn: Connection[F] = old.conn
            old_conn.close(CloseReason.TAKEN_OVER, f"by {conn.peer!r}")
            self._emit(SessionTakenOver(identity, old_conn.peer, conn.peer))
        self._emit(ConnectionOpened(identity, conn.peer, old is not None))

    def _session(self, conn: Connection[F]) -> Awaitable[None]:
        """What serves the open session: the handler (with the ping loop beside it under a
        heartbeat), returned to be awaited by the connection's own frame, one level less."""
        config = self._config
        if config.max_age is not None:
            # Spread the ends of connections that started together (gRPC does the same).
            conn._end_life_by(
                conn.opened_at + jitter(config.max_age, config.max_age_jitter, self._rng)
            )
        send_ping = self._send_ping
        if conn._pinger is None or send_ping is None:
            return self._handler(conn)
        return self._handle_with_pings(conn, send_ping)

    async def _handle_with_pings(self, conn: Connection[F], send_ping: Callback[F]) -> None:
        """The handler, with the connection's ping loop beside it."""
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(conn._ping_loop, send_ping, self._dead, self._spare_silent)
            await self._handler(conn)
            tasks.cancel_scope.cancel()

    def _dead(self, conn: Connection[F], detail: str) -> None:
        self.timed_out(conn, CloseReason.HEARTBEAT_TIMEOUT, detail)

    def timed_out(self, conn: Connection[F], reason: CloseReason, detail: str) -> None:
        """Close a peer believed dead (idle or heartbeat timeout), as the config says."""
        if self._config.timeout_close == "graceful":
            # The peer is declared dead now: its session ends now, so a reconnect during the
            # grace is a fresh session (not a takeover) and it stops counting as live.
            session = conn.session
            if session is not None and session.reason is None:
                self._registry.close(session, reason)
            conn._close_gracefully(reason, self._config.close_grace, detail)
        else:
            conn.close(reason, detail)

    def spare(self, session: Session) -> bool:
        """The reaper's question for a due session: keep it (its bytes wait unread)?"""
        return self._spare_silent(session.conn)

    def _spare_silent(self, conn: Connection[F]) -> bool:
        """Keep a peer that seems silent (due to be reaped, or its pings unanswered) because
        its bytes wait unread in the kernel: the server is behind, not the peer."""
        if not conn._spared():
            return False
        self.spared += 1
        logger.debug("spared %r: unread bytes wait in the kernel", conn)
        return True

    async def _finish(self, conn: Connection[F]) -> None:
        """Close the socket and account for the close, exactly once per connection."""
        reason = self._settled(conn)
        await conn._close_socket()
        self._account(conn, reason)

    def _settled(self, conn: Connection[F]) -> CloseReason:
        """The connection's final reason, its session closed with it."""
        reason = conn._settle(self._stopping.is_set())
        session = conn.session
        if session is not None:
            if session.reason is None:
                self._registry.close(session, reason)
            if self._cluster is not None:
                self._cluster.closed(conn)
            # The registry's wheel keeps a closed session until its slot comes up (up to its
            # timeout later); it must not keep this connection, its stream and its socket
            # alive all that time with it.
            session.conn = None
        return reason

    def _account(self, conn: Connection[F], reason: CloseReason) -> None:
        """Count, log and announce a close whose socket is closed."""
        session = conn.session
        self.connections.discard(conn)
        if not self.connections:
            self.idle.set()
        for watched in self._close_watchers:
            watched.add(conn)
        self.closed[reason] += 1
        duration = anyio.current_time() - conn.opened_at
        identity = None if session is None else session.key
        if reason is not CloseReason.OVERLOADED or logger.isEnabledFor(logging.DEBUG):
            logger.log(
                logging.INFO if reason is not CloseReason.OVERLOADED else logging.DEBUG,
                "closed peer=%s identity=%r reason=%s after %.3f s%s",
                conn.peer,
                identity,
                reason.name,
                duration,
                f" ({conn.detail})" if conn.detail else "",
            )
        self._emit(ConnectionClosed(identity, conn.peer, reason, duration, conn.detail))
        conn._drop_references()

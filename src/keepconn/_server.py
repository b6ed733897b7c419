"""The anyio server runtime: accept, hello, heartbeats, reaping, takeover, and a clean close.

This adapter owns the sockets, tasks and the clock; every decision about time lives in the
sans-I/O core (:class:`SessionRegistry`, :class:`Pinger`, :class:`PingPolicer`). One code path
serves asyncio, uvloop and trio through anyio.

A connection's life::

    accept ── admission ── hello (identify, within hello_timeout) ── session open / takeover
          └─ refused: OVERLOADED   └─ HELLO_TIMEOUT, AUTH_FAILED    └─ handler runs; every
                                                                     complete frame touches
    ... ── close with exactly one CloseReason ── socket closed: RST for a dead or displaced peer,
                                                 FIN otherwise; registry, stats, event, log line
"""

from __future__ import annotations

import errno
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Any, Generic, TypeVar, cast

import anyio
import anyio.abc
import anyio.lowlevel
import attrs
from anyio.abc import SocketAttribute

from ._admission import AdmissionConfig, AdmissionController
from ._backoff import jitter
from ._connection import Connection
from ._errors import ConfigError, SessionClosed
from ._events import (
    ConnectionClosed,
    ConnectionOpened,
    ServerEvent,
    ServerStats,
    SessionTakenOver,
    SocketAudit,
)
from ._failures import errno_of, errors_in, reason_for_all
from ._flapping import (
    AddressFlappingConfig,
    AddressFlappingDetector,
    FlappingConfig,
    FlappingDetector,
    VerdictKind,
)
from ._framing import Framer
from ._heartbeat import ActiveHeartbeat, PingAction, Pinger, PingPolicer, PingRateLimit
from ._kernel import abort_on_close, peer_gone, unread_bytes
from ._reasons import CloseReason
from ._registry import Session, SessionRegistry
from ._validate import number

__all__ = ["Hello", "Server", "ServerConfig"]

logger = logging.getLogger("keepconn.server")

F = TypeVar("F")

#: accept() errors that mean "the process or system is short of a resource right now": the
#: listening socket stays readable, so without a pause the loop would spin (trio's
#: serve_listeners does the same; anyio's Listener.serve does not).
_ACCEPT_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_PAUSE = 0.1

#: Reasons after which the peer is gone or displaced: close with RST (SO_LINGER 0) so the socket
#: does not sit in FIN_WAIT1 retransmitting a FIN nobody will acknowledge.
_ABORTIVE = frozenset(
    {
        CloseReason.IDLE_TIMEOUT,
        CloseReason.HEARTBEAT_TIMEOUT,
        CloseReason.KEEPALIVE_TIMEOUT,
        CloseReason.PEER_RESET,
        CloseReason.TAKEN_OVER,
        CloseReason.HELLO_TIMEOUT,
    }
)
#: Hello-phase ends that are the peer's doing, counted by the per-address flapping detector.
_PEER_ABORTS = frozenset(
    {
        CloseReason.HELLO_TIMEOUT,
        CloseReason.AUTH_FAILED,
        CloseReason.PROTOCOL_ERROR,
        CloseReason.PEER_CLOSED,
        CloseReason.PEER_RESET,
    }
)


@attrs.frozen
class Hello:
    """What an identify callback returns for an authenticated peer.

    ``timeout`` overrides the server's idle timeout for this session (an MQTT gateway passes
    1.5 x the client's keepalive).
    """

    identity: Hashable
    timeout: float | None = attrs.field(default=None, validator=number(optional=True))
    #: Bytes sent once the session is open (an MQTT CONNACK 0, say). Sending the welcome here
    #: rather than inside identify means a peer is never welcomed and then refused.
    welcome: bytes | None = None
    #: Bytes sent if the server refuses the session after authentication (admission's session
    #: cap, a flapping ban, a duplicate identity), e.g. MQTT CONNACK 3 "server unavailable".
    refusal: bytes | None = None


@attrs.frozen
class ServerConfig:
    """Validated server settings; a bad value fails here, naming the field."""

    #: Seconds a session may stay silent (no complete frame) before it is reaped.
    idle_timeout: float = attrs.field(default=60.0, validator=number())
    #: Reaping granularity for every session, including those with a shorter timeout of their
    #: own. Defaults to min(0.25 s, idle_timeout / 10): a reaper wake-up with nothing due costs
    #: O(1), so waking four times a second is cheap and keeps short MQTT keepalives precise.
    resolution: float | None = attrs.field(default=None, validator=number(optional=True))
    #: Seconds a new connection has to complete its hello.
    hello_timeout: float = attrs.field(default=10.0, validator=number())
    #: Server pings (None: rely on the peer's own traffic and the idle timeout).
    heartbeat: ActiveHeartbeat | None = None
    #: Enforced limit on the peer's pings (None: not enforced).
    ping_rate: PingRateLimit | None = None
    #: A keepconn.tcp.TcpKeepalive applied to every accepted socket (None: leave the kernel's).
    keepalive: Any = None
    #: Most sessions one reap call may close, so the event loop never stalls on a mass expiry.
    reap_batch: int = attrs.field(default=1000, validator=number(integer=True))
    #: On shutdown: how long peers get to leave after being told, before they are aborted.
    shutdown_grace: float = attrs.field(default=5.0, validator=number(min_inclusive=True))
    #: The reconnect hint given to peers on shutdown, jittered by +/- shutdown_jitter.
    shutdown_retry_after: float = attrs.field(default=5.0, validator=number(min_inclusive=True))
    shutdown_jitter: float = attrs.field(
        default=0.1, validator=number(min_inclusive=True, maximum=1.0)
    )
    #: Maximum connection age in seconds (closed with MAX_AGE, jittered by max_age_jitter).
    max_age: float | None = attrs.field(default=None, validator=number(optional=True))
    max_age_jitter: float = attrs.field(
        default=0.1, validator=number(min_inclusive=True, maximum=1.0)
    )
    #: How timeouts (idle, heartbeat) close a peer that may still be alive behind a slow link:
    #: "abort" sends a RST at once; "graceful" sends FIN, keeps reading (and handing frames to
    #: the handler) for close_grace seconds so nothing in flight is lost, then aborts.
    timeout_close: str = attrs.field(
        default="abort", validator=attrs.validators.in_(("abort", "graceful"))
    )
    close_grace: float = attrs.field(default=2.0, validator=number())
    #: Admission control (None: admit everything). See AdmissionConfig for the defaults.
    admission: AdmissionConfig | None = attrs.field(factory=AdmissionConfig)
    #: Flapping detection (None: off).
    flapping: FlappingConfig | None = attrs.field(factory=FlappingConfig)
    #: Per-source-address detection of connections that never complete a hello (off by
    #: default: carrier-grade NAT puts thousands of devices behind one address).
    address_flapping: AddressFlappingConfig | None = None
    #: Bytes asked of the socket per receive.
    receive_size: int = attrs.field(default=65536, validator=number(integer=True))

    def __attrs_post_init__(self) -> None:
        if self.resolution is not None and self.resolution > self.idle_timeout:
            raise ConfigError(
                f"resolution ({self.resolution}) must not exceed idle_timeout ({self.idle_timeout})"
            )


# -- the server -------------------------------------------------------------------------------


class Server(Generic[F]):
    """Serves connections with liveness tracking. Runs on asyncio, uvloop and trio.

    :param identify: ``async (conn) -> Hello``: read the peer's first frame(s) with
        ``conn.receive()``, authenticate, and return its identity; raise HelloRejected (after
        sending any refusal) to close it with AUTH_FAILED.
    :param handler: ``async (conn) -> None``: serve the session; read with ``conn.receive()``.
        Returning closes the connection (APPLICATION, unless a reason was set).
    :param framer: ``() -> Framer``: a new framer for each connection.
    :param send_ping: ``async (conn) -> None``: send one application ping (active heartbeat).
    :param goodbye: ``async (conn, retry_after) -> None``: tell a peer the server is going
        away and when to come back (shutdown).
    :param refuse: ``async (stream, retry_after) -> None``: say "come back later" to a
        connection refused by admission control, before it is closed with OVERLOADED.
    :param on_event: called with every ServerEvent (keep it quick; it runs inline).
    """

    def __init__(
        self,
        *,
        identify: Callable[[Connection[F]], Awaitable[Hello]],
        handler: Callable[[Connection[F]], Awaitable[None]],
        framer: Callable[[], Framer[F]],
        config: ServerConfig | None = None,
        send_ping: Callable[[Connection[F]], Awaitable[None]] | None = None,
        goodbye: Callable[[Connection[F], float], Awaitable[None]] | None = None,
        refuse: Callable[[anyio.abc.SocketStream, float], Awaitable[None]] | None = None,
        on_event: Callable[[ServerEvent], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config = config if config is not None else ServerConfig()
        if config.heartbeat is not None and send_ping is None:
            raise ConfigError("heartbeat (active) needs a send_ping callback")
        self._identify = identify
        self._handler = handler
        self._framer = framer
        self._send_ping = send_ping
        self._goodbye = goodbye
        self._refuse = refuse
        self._on_event = on_event
        self._rng = rng if rng is not None else random.Random()
        resolution = config.resolution
        if resolution is None:
            resolution = min(0.25, config.idle_timeout / 10)
        self.registry = SessionRegistry(timeout=config.idle_timeout, resolution=resolution)
        self.admission = (
            AdmissionController(config.admission, rng=self._rng)
            if config.admission is not None
            else None
        )
        self.flapping = FlappingDetector(config.flapping) if config.flapping is not None else None
        self.address_flapping = (
            AddressFlappingDetector(config.address_flapping)
            if config.address_flapping is not None
            else None
        )
        self._connections: set[Connection[F]] = set()
        self._pending_hellos = 0
        self._accepted = 0
        self._accept_errors = 0
        self._closed: Counter[CloseReason] = Counter()
        self._takeovers = 0
        self._spared = 0
        self._listeners: list[anyio.abc.SocketListener] = []
        self._stopping = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self._serving = False
        self._stopped = anyio.Event()
        self._started = anyio.Event()
        #: The bound (host, port) pairs once serving; empty before.
        self.addresses: list[tuple[str, int]] = []
        self._tasks: anyio.abc.TaskGroup | None = None

    # -- running

    async def serve_tcp(
        self,
        host: str | Sequence[str] | None = "127.0.0.1",
        port: int = 0,
        *,
        backlog: int = 4096,
        task_status: anyio.abc.TaskStatus[list[tuple[str, int]]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host``:``port`` (IPv4 and/or IPv6; None means all interfaces) and serve
        until :meth:`shutdown`. ``task_status.started`` receives the bound addresses."""
        hosts: list[str | None] = [host] if host is None or isinstance(host, str) else list(host)
        listeners: list[anyio.abc.SocketListener] = []
        try:
            for one in hosts:
                multi = await anyio.create_tcp_listener(
                    local_host=one, local_port=port, backlog=backlog
                )
                listeners.extend(cast("list[anyio.abc.SocketListener]", multi.listeners))
                if port == 0 and len(hosts) > 1:
                    # Serve every host on the port the first one was given.
                    port = listeners[0].extra(SocketAttribute.local_port)
        except BaseException:
            for listener in listeners:
                await listener.aclose()
            raise
        await self.serve(listeners, task_status=task_status)

    async def serve(
        self,
        listeners: anyio.abc.Listener[Any] | Iterable[anyio.abc.SocketListener],
        *,
        task_status: anyio.abc.TaskStatus[list[tuple[str, int]]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve existing listeners until :meth:`shutdown` (which closes them)."""
        if self._serving or self._started.is_set():
            raise RuntimeError("a Server serves once; make a new one to serve again")
        # One listener, anyio's MultiListener (what create_tcp_listener returns), or several.
        given: Iterable[Any] = (
            [listeners] if isinstance(listeners, anyio.abc.Listener) else listeners
        )
        found: list[anyio.abc.SocketListener] = []
        for listener in given:
            found.extend(getattr(listener, "listeners", [listener]))
        self._listeners = found
        self._serving = True
        try:
            async with anyio.create_task_group() as tasks:
                self._tasks = tasks
                tasks.start_soon(self._reaper, name="keepconn reaper")
                for listener in self._listeners:
                    tasks.start_soon(self._accept_loop, listener, name="keepconn accept")
                self.addresses = [
                    tuple(ln.extra(SocketAttribute.local_address))[:2]  # type: ignore[misc]
                    for ln in found
                ]
                self._started.set()
                task_status.started(self.addresses)
                await self._stopping.wait()
                await self._drain()
                tasks.cancel_scope.cancel()
        finally:
            self._serving = False
            with anyio.CancelScope(shield=True):
                for listener in self._listeners:
                    await listener.aclose()
            self._stopped.set()

    async def wait_serving(self) -> list[tuple[str, int]]:
        """Wait until the server is accepting; returns the bound addresses.

        For programs that start :meth:`serve_tcp` as a plain task (``asyncio.create_task``)
        rather than with anyio's ``TaskGroup.start``.
        """
        await self._started.wait()
        return self.addresses

    async def shutdown(self) -> None:
        """Stop accepting, tell every peer it is going away (with a jittered reconnect hint),
        give them ``shutdown_grace`` seconds, then abort the stragglers. Returns when done."""
        self._stopping.set()
        if self._serving:
            await self._stopped.wait()

    async def _drain(self) -> None:
        config = self.config
        for listener in self._listeners:
            await listener.aclose()
        # Every peer is told at once: one dead peer with a full send buffer must not hold up
        # the goodbyes of thousands of live ones.
        async with anyio.create_task_group() as tasks:
            for conn in list(self._connections):
                tasks.start_soon(self._say_goodbye, conn)
        with anyio.move_on_after(config.shutdown_grace + 0.5):
            await self._idle.wait()
        for conn in list(self._connections):
            conn.close(CloseReason.SHUTDOWN, "aborted after grace")
        with anyio.move_on_after(1.0):
            await self._idle.wait()

    async def _say_goodbye(self, conn: Connection[F]) -> None:
        config = self.config
        if self._goodbye is not None and conn.session is not None:
            retry_after = jitter(config.shutdown_retry_after, config.shutdown_jitter, self._rng)
            with anyio.move_on_after(min(1.0, config.shutdown_grace)):
                try:
                    await self._goodbye(conn, retry_after)
                except Exception:  # a peer that cannot be told is aborted after the grace
                    logger.debug("goodbye to %r failed", conn, exc_info=True)
        await conn.shutdown(CloseReason.SHUTDOWN, config.shutdown_grace)

    # -- accepting

    async def _accept_loop(self, listener: anyio.abc.SocketListener) -> None:
        tasks = self._tasks
        assert tasks is not None
        while True:
            try:
                stream = await listener.accept()
            except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError) as exc:
                code = errno_of(exc)
                if isinstance(exc, anyio.ClosedResourceError) or self._stopping.is_set():
                    return
                if code in _ACCEPT_RESOURCE_ERRNOS:
                    # Out of descriptors or buffers: keep serving the live sessions and try
                    # again shortly; closes elsewhere will free what accept needs.
                    self._accept_errors += 1
                    logger.warning(
                        "accept failed (%s); pausing %.0f ms",
                        errno.errorcode.get(code or 0, code),
                        _ACCEPT_PAUSE * 1000,
                    )
                    await anyio.sleep(_ACCEPT_PAUSE)
                    continue
                if code in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # the peer gave up before we accepted; nothing to serve
                # Anything else: keep the live sessions, say so, and try again shortly.
                self._accept_errors += 1
                logger.error("accept failed unexpectedly: %r; pausing", exc)
                await anyio.sleep(_ACCEPT_PAUSE)
                continue
            self._accepted += 1
            tasks.start_soon(self._run, stream)

    # -- one connection

    async def _run(self, stream: anyio.abc.SocketStream) -> None:
        try:
            framer = self._framer()
        except Exception:
            logger.exception("framer factory failed; closing the new connection")
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            return
        conn = Connection(self, stream, framer)
        if not self._connections:
            self._idle = anyio.Event()
        self._connections.add(conn)
        in_hello = False
        admission = self.admission
        try:
            with conn._scope:
                try:
                    if not await self._admit(conn):
                        return
                    self._apply_keepalive(conn)
                    in_hello = True
                    self._pending_hellos += 1
                    if admission is not None:
                        victim = admission.hello_started(conn)
                        if victim is not None:
                            # At the hello cap the oldest pending hello goes, not the newcomer:
                            # see AdmissionConfig for why.
                            assert isinstance(victim, Connection)
                            victim.close(CloseReason.OVERLOADED, "shed: oldest pending hello")
                    hello = await self._hello(conn)
                    self._end_hello(conn)
                    in_hello = False
                    if hello is None:
                        return
                    if not await self._open_session(conn, hello):
                        if hello.refusal is not None:
                            with anyio.move_on_after(1.0):
                                await conn.send(hello.refusal)
                        return
                    if hello.welcome is not None:
                        await conn.send(hello.welcome)
                    await self._serve_session(conn)
                except BaseException as exc:
                    errors = errors_in(exc)
                    if errors is None:
                        raise  # KeyboardInterrupt, SystemExit and the like are not ours
                    if not errors:
                        # Only cancellation. From outside (the task running serve(), Ctrl-C)
                        # it means the server is going away; this connection's own scope
                        # (close, max_age) has its reason already or gets it in _finish.
                        if conn._reason is None and not conn._scope.cancel_called:
                            conn._reason = CloseReason.SHUTDOWN
                        raise
                    # Errors, perhaps beside a cancellation in one group (trio reports a reset
                    # seen by the handler together with the cancel of its ping task). The
                    # task ends either way, so the cancellation need not travel further.
                    reason, detail = reason_for_all(errors)
                    if conn._reason is None:
                        conn._reason, conn._detail = reason, detail
                    if reason is CloseReason.APPLICATION and not any(
                        isinstance(error, SessionClosed) for error in errors
                    ):
                        logger.error("handler for %r failed", conn, exc_info=errors[0])
        finally:
            if in_hello:
                self._end_hello(conn)
                if self.address_flapping is not None and conn._reason in _PEER_ABORTS:
                    # Ended before its hello completed, by the peer's doing: what a scanner or
                    # a broken device does. Hellos the server shed or cut short do not count.
                    self.address_flapping.record_aborted(_host(conn.peer), anyio.current_time())
            with anyio.CancelScope(shield=True):
                await self._finish(conn)

    def _end_hello(self, conn: Connection[F]) -> None:
        self._pending_hellos -= 1
        if self.admission is not None:
            self.admission.hello_finished(conn)

    async def _admit(self, conn: Connection[F]) -> bool:
        """Admission at accept time: refused connections cost no hello parsing."""
        if self._stopping.is_set():
            conn._reason = CloseReason.SHUTDOWN
            return False
        if self.address_flapping is not None:
            until = self.address_flapping.banned_until(_host(conn.peer), anyio.current_time())
            if until is not None:
                conn._reason, conn._detail = CloseReason.FLAPPING, "address banned"
                return False
        if self.admission is None:
            return True
        decision = self.admission.admit(anyio.current_time())
        if decision.admitted:
            return True
        await self._refuse_connection(conn, decision.limit or "", decision.retry_after)
        return False

    async def _refuse_connection(
        self, conn: Connection[F], limit: str, retry_after: float | None
    ) -> None:
        conn._reason, conn._detail = CloseReason.OVERLOADED, limit
        if self._refuse is not None and retry_after is not None:
            with anyio.move_on_after(1.0):
                try:
                    await self._refuse(conn.stream, retry_after)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass

    def _apply_keepalive(self, conn: Connection[F]) -> None:
        if self.config.keepalive is None:
            return
        try:
            self.config.keepalive.apply(conn.raw_socket())
        except OSError as exc:
            # The peer may already be gone; the hello will find out.
            logger.debug("keepalive not applied to %r: %s", conn, exc)

    async def _hello(self, conn: Connection[F]) -> Hello | None:
        with anyio.move_on_after(self.config.hello_timeout) as timer:
            hello = await self._identify(conn)
        if timer.cancelled_caught:
            if conn._reason is None:
                conn._reason = CloseReason.HELLO_TIMEOUT
            return None
        if not isinstance(hello, Hello):
            raise TypeError(f"identify must return a Hello, got {hello!r}")
        return hello

    async def _open_session(self, conn: Connection[F], hello: Hello) -> bool:
        if self._stopping.is_set() or conn._reason is not None:
            # A hello that completes while the server shuts down (or while this connection is
            # being closed) must not open a session, let alone take over a live one.
            conn._reason = conn._reason or CloseReason.SHUTDOWN
            return False
        if _peer_gone(conn):
            # A hello read long after it was sent (the server was behind in a storm) from a
            # peer that has since given up: it must not open a session, and above all not take
            # over the live session that same device has opened on a newer connection.
            conn._reason, conn._detail = CloseReason.PEER_CLOSED, "gone before its hello was read"
            return False
        now = anyio.current_time()
        identity = hello.identity
        old = self.registry.get(identity)
        if self.admission is not None:
            decision = self.admission.admit_session(
                now, len(self.registry), takeover=old is not None
            )
            if not decision.admitted:
                # The application's own refusal (hello.refusal) speaks its protocol; the generic
                # refuse callback is for connections refused before their hello was read.
                hint = None if hello.refusal is not None else decision.retry_after
                await self._refuse_connection(conn, decision.limit or "", hint)
                return False
        if self.flapping is not None:
            verdict = self.flapping.record_hello(identity, now)
            if verdict.ok and old is not None:
                verdict = self.flapping.record_takeover(
                    identity, _host(old.conn.peer), _host(conn.peer), now
                )
            if not verdict.ok:
                until = verdict.until if verdict.until is not None else now
                conn._reason = CloseReason.FLAPPING
                conn._detail = f"{verdict.kind.value} for {until - now:.0f} s more"
                if verdict.kind is VerdictKind.DUPLICATE:
                    # Two live devices share an identity: keep the incumbent, refuse the
                    # newcomer, and say so loudly instead of looping on takeovers.
                    logger.warning(
                        "duplicate identity %r: hosts %s keep taking it from each other; "
                        "refusing newcomers for %.0f s",
                        identity,
                        " and ".join(map(str, verdict.peers)),
                        until - now,
                    )
                return False
        old = self.registry.get(identity)
        # Synchronous from here to open(): no other task can interleave, so of any number of
        # concurrent hellos for one identity exactly one session is live afterwards.
        conn._session = self.registry.open(identity, now=now, timeout=hello.timeout, conn=conn)
        if old is not None:
            self._takeovers += 1
            old_conn: Connection[F] = old.conn
            old_conn.close(CloseReason.TAKEN_OVER, f"by {conn.peer!r}")
            self._emit(SessionTakenOver(identity, old_conn.peer, conn.peer))
        if self.config.heartbeat is not None:
            conn._pinger = Pinger(self.config.heartbeat, now)
        if self.config.ping_rate is not None:
            conn._policer = PingPolicer(self.config.ping_rate)
        self._emit(ConnectionOpened(identity, conn.peer, old is not None))
        return True

    async def _serve_session(self, conn: Connection[F]) -> None:
        config = self.config
        if config.max_age is not None:
            # Spread the ends of connections that started together (gRPC does the same).
            age = jitter(config.max_age, config.max_age_jitter, self._rng)
            conn._scope.deadline = min(conn._scope.deadline, conn.opened_at + age)
        if conn._pinger is None:
            await self._handler(conn)
            return
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._ping_loop, conn)
            await self._handler(conn)
            tasks.cancel_scope.cancel()

    async def _ping_loop(self, conn: Connection[F]) -> None:
        pinger = conn._pinger
        send_ping = self._send_ping
        assert pinger is not None and send_ping is not None
        while True:
            await anyio.sleep(max(0.0, pinger.next_deadline() - anyio.current_time()))
            action = pinger.poll(anyio.current_time())
            if action is PingAction.DEAD:
                detail = f"{pinger.misses} pings unanswered"
                self._timed_out(conn, CloseReason.HEARTBEAT_TIMEOUT, detail)
                return
            if action is PingAction.SEND_PING:
                # The ping counts as sent now, and its send gets no longer than its answer
                # would: a peer whose buffers are full (stopped, or gone with data in flight)
                # must still be declared dead on time, not when the send gives up.
                now = anyio.current_time()
                pinger.ping_sent(now)
                with anyio.move_on_after(max(0.0, pinger.next_deadline() - now)):
                    await send_ping(conn)

    def _default_reason(self, conn: Connection[F]) -> CloseReason:
        """The reason for a connection that ended without one being set explicitly."""
        if self._stopping.is_set():
            return CloseReason.SHUTDOWN
        if conn._peer_closed:
            return CloseReason.PEER_CLOSED
        if conn._scope.cancelled_caught:
            # Nothing but max_age puts a deadline on a connection's scope outside shutdown.
            return CloseReason.MAX_AGE
        return CloseReason.APPLICATION

    def _timed_out(self, conn: Connection[F], reason: CloseReason, detail: str) -> None:
        if self.config.timeout_close == "graceful":
            # The peer is declared dead now: its session ends now, so a reconnect during the
            # grace is a fresh session (not a takeover) and it stops counting as live.
            if conn._session is not None and conn._session.reason is None:
                self.registry.close(conn._session, reason)
            conn._close_gracefully(reason, self.config.close_grace, detail)
        else:
            conn.close(reason, detail)

    async def _finish(self, conn: Connection[F]) -> None:
        """Close the socket and account for the close, exactly once per connection."""
        if conn._reason is None:
            conn._reason = self._default_reason(conn)
        reason = conn._reason
        session = conn._session
        if session is not None:
            if session.reason is None:
                self.registry.close(session, reason)
            elif session.reason is not reason and reason is not CloseReason.TAKEN_OVER:
                # The registry decided first (reaped or taken over): its reason is the one.
                reason = conn._reason = session.reason
        if (reason in _ABORTIVE or conn._graceful) and not (conn._graceful and conn._peer_closed):
            # Dead and displaced peers get a RST; so does a graceful close whose grace ran out
            # without the peer's FIN (a shutdown straggler): a FIN would sit in FIN_WAIT1.
            try:
                abort_on_close(conn.raw_socket())
            except (OSError, ValueError, anyio.TypedAttributeLookupError):
                pass  # already closed underneath us (uvloop reports a negative descriptor)
        try:
            await conn.stream.aclose()
        except (OSError, anyio.BrokenResourceError):
            pass
        self._connections.discard(conn)
        if not self._connections:
            self._idle.set()
        self._closed[reason] += 1
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
                f" ({conn._detail})" if conn._detail else "",
            )
        self._emit(ConnectionClosed(identity, conn.peer, reason, duration, conn._detail))

    # -- reaping

    async def _reaper(self) -> None:
        registry = self.registry
        batch = self.config.reap_batch
        while True:
            now = anyio.current_time()
            for session in registry.reap(now, limit=batch, spare=self._behind_on):
                conn: Connection[F] = session.conn
                self._timed_out(
                    conn, CloseReason.IDLE_TIMEOUT, f"silent for {now - session.last_seen:.2f} s"
                )
            wake = registry.next_deadline()
            if wake is not None and wake <= now:
                # A mass expiry: let other tasks run between batches.
                await anyio.lowlevel.checkpoint()
                continue
            delay = registry.resolution if wake is None else min(registry.resolution, wake - now)
            await anyio.sleep(max(delay, 0.001))

    def _behind_on(self, session: Session) -> bool:
        """Whether a session that is due has in fact sent bytes we have not read yet.

        Then the peer is alive and the server is behind (an event loop stalled in a storm):
        reaping it would be a false reap. Asked of the kernel (FIONREAD) only for sessions
        that are due, so it costs nothing on the hot path.

        Unread bytes are not a complete frame, though. Once spared, a session is spared again
        only while the server has still read nothing from it: if it did read and no frame
        completed, the peer is trickling partial frames (slowloris), not waiting on us.
        """
        conn: Connection[F] = session.conn
        mark = conn._spare_mark
        if mark is not None and mark != conn._bytes_in:
            return False
        if _unread_bytes(conn) <= 0:
            return False
        conn._spare_mark = conn._bytes_in
        self._spared += 1
        logger.debug("spared %r: unread bytes wait in the kernel", conn)
        return True

    # -- observability

    async def audit(self) -> SocketAudit:
        """Read the kernel's socket table for the server's ports and account for every
        ESTABLISHED socket (see :class:`SocketAudit`). Linux only; the table is read in a
        worker thread because it can be megabytes with a large fleet."""
        from .tcp import census

        ports = {port for _, port in self.addresses}
        # The table is read while connections come and go: a connection known before the read
        # or after it owns its row (one that finished in between is counted as closing).
        before = {conn._inode: conn for conn in self._connections}
        table = await anyio.to_thread.run_sync(census)
        owners = {conn._inode: conn for conn in self._connections}
        for inode, known in before.items():
            owners.setdefault(inode, known)
        counts: Counter[str] = Counter()
        buckets: Counter[str] = Counter()
        for row in table.sockets:
            if row.local_port not in ports:
                continue
            counts[row.state] += 1
            if row.state != "ESTABLISHED":
                continue
            owner = owners.get(row.inode) if row.inode else None
            if row.inode == 0:
                buckets["unaccepted"] += 1
            elif owner is None:
                buckets["phantoms"] += 1
            elif owner._reason is not None or owner not in self._connections:
                buckets["closing"] += 1
            elif owner._session is None:
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

    def _emit(self, event: ServerEvent) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                logger.exception("on_event callback failed for %r", event)

    @property
    def connections(self) -> tuple[Connection[F], ...]:
        """A snapshot of the open connections (hello phase included)."""
        return tuple(self._connections)

    def stats(self) -> ServerStats:
        """A frozen snapshot of the server's counters."""
        now = anyio.current_time()
        return ServerStats(
            connections=len(self._connections),
            pending_hellos=self._pending_hellos,
            accepted=self._accepted,
            accept_errors=self._accept_errors,
            closed={reason: self._closed[reason] for reason in CloseReason},
            takeovers=self._takeovers,
            spared=self._spared,
            registry=self.registry.stats(),
            admission=None if self.admission is None else self.admission.stats(now),
            flapping=None if self.flapping is None else self.flapping.stats(now),
        )


def _host(peer: Any) -> Any:
    """The host part of a socket address (the whole thing if it is not a tuple)."""
    return peer[0] if isinstance(peer, tuple) and peer else peer


def _peer_gone(conn: Connection[Any]) -> bool:
    try:
        return peer_gone(conn.raw_socket())
    except (anyio.TypedAttributeLookupError, OSError, ValueError):
        return True


def _unread_bytes(conn: Connection[Any]) -> int:
    try:
        return unread_bytes(conn.raw_socket())
    except (anyio.TypedAttributeLookupError, OSError, ValueError):
        return 0

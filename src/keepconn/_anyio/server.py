"""The server: listeners, the tasks that serve them, shutdown, and what it reports.

This adapter owns the sockets, tasks and the clock; every decision about time and admission
lives in the sans-I/O core (:class:`SessionRegistry`, :class:`Gatekeeper`, :class:`Pinger`,
:class:`PingPolicer`). One code path serves asyncio, uvloop and trio through anyio. The jobs are
split by module: :mod:`.accept` (the accept loop and its errno policy), :mod:`.life` (one
connection from accept to close), :mod:`.upkeep` (the one timer of the reaper, the loop-lag
probe and GC pacing), :mod:`.shutdown`; this one wires them.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar, cast

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import sniffio
from anyio.abc import SocketAttribute

from .._asyncio.life import NativeLifecycle
from .._asyncio.listener import NativeListener, native_listener
from .._core.admission import AdmissionController
from .._core.config import Hello, ServerConfig
from .._core.errors import ConfigError
from .._core.events import ServerEvent, ServerStats, SessionReaped, SocketAudit
from .._core.flapping import AddressFlappingDetector, FlappingDetector
from .._core.framing import Framer
from .._core.gcpacing import CollectionPacer
from .._core.opening import Gatekeeper
from .._core.reasons import CloseReason
from .._core.registry import Session, SessionRegistry
from .._core.upkeep import Upkeep
from .accept import accept_forever, connection_tasks
from .audit import audit_sockets
from .cluster import ClusterNode, ClusterStore
from .connection import Connection
from .life import Refuse
from .shutdown import drain
from .tls import check_server_context
from .upkeep import upkeep_forever

__all__ = ["Server"]

logger = logging.getLogger("keepconn.server")

F = TypeVar("F")


class Server(Generic[F]):
    """Serves connections with liveness tracking. Runs on asyncio, uvloop and trio.

    :param identify: ``async (conn) -> Hello``: read the peer's first frame(s) with
        ``conn.receive()``, authenticate, and return its identity; raise HelloRejected (after
        sending any refusal) to close it with AUTH_FAILED.
    :param handler: ``async (conn) -> None``: serve the session; read with ``conn.receive()``.
        Returning closes the connection (APPLICATION, unless a reason was set).
    :param framer: ``() -> Framer``: a new framer for each connection.
    :param config: the server's settings (:class:`ServerConfig`; its defaults when None).
    :param rng: the random source of every jitter (shutdown hints, maximum age); pass
        ``random.Random(seed)`` to replay a run.
    :raises keepconn.ConfigError: ``config.heartbeat`` is set without a ``send_ping``.
    :param send_ping: ``async (conn) -> None``: send one application ping (active heartbeat).
    :param goodbye: ``async (conn, retry_after) -> None``: tell a peer the server is going
        away and when to come back (shutdown).
    :param refuse: ``async (stream, retry_after) -> None``: say "come back later" to a
        connection refused by admission control, before it is closed with OVERLOADED. Under
        TLS it is called only for refusals after the handshake (``stream`` is then the TLS
        stream): one refused at accept time is closed without a word, since saying it would
        take the handshake that admission control is there to spare. Not called for a
        connection whose ``identify`` returned a :class:`Hello` with ``refusal``: those bytes
        are its answer.
    :param on_event: called with every ServerEvent (keep it quick; it runs inline). More
        listeners can attach later with :meth:`add_listener`.
    :param cluster: a cluster store (``keepconn.cluster.RedisCluster``): this server is then
        one node of a cluster with one live session per identity cluster-wide. The server
        runs it (lease, notices, reconciliation) while it serves; see docs/topics/cluster.md.
    :param on_frame: ``(conn, frame) -> bool``, a synchronous shortcut past the handler for
        frames whose answer needs no waiting (an MQTT PINGREQ): on the native transport
        (asyncio, uvloop) a session's frame is offered to it, right where it is framed,
        whenever the handler waits for one and no frame is queued before it; True means it
        took the frame (answered with ``conn.send_nowait()``), False hands it to the handler
        as usual, and what it raises the handler's ``receive()`` raises. Frames it is not
        offered (the hello, a busy handler's, every frame on trio and TLS) go to the handler,
        which must handle every kind of frame itself: this only saves a task step per frame.
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
        refuse: Refuse | None = None,
        on_event: Callable[[ServerEvent], None] | None = None,
        rng: random.Random | None = None,
        cluster: ClusterStore | None = None,
        on_frame: Callable[[Connection[F], F], bool] | None = None,
    ) -> None:
        self.config = config = config if config is not None else ServerConfig()
        if config.heartbeat is not None and send_ping is None:
            raise ConfigError("heartbeat (active) needs a send_ping callback")
        self._goodbye = goodbye
        self._on_event = on_event
        # A tuple, replaced whole: an emit walks the one it started with, so a listener may
        # detach (itself or another) during an event, from any thread.
        self._subscribers: tuple[Callable[[ServerEvent], None], ...] = ()
        # The serving thread and its anyio token, so stats() can be asked from other threads.
        self._loop: tuple[int, anyio.lowlevel.EventLoopToken] | None = None
        self._rng = rng if rng is not None else random.Random()
        self.registry = SessionRegistry(
            timeout=config.idle_timeout, resolution=config.reap_resolution
        )
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
        self._gate = Gatekeeper(self.registry, self.admission, self.flapping, self.address_flapping)
        self._stopping = anyio.Event()
        self._cluster = (
            None if cluster is None else ClusterNode(cluster, self._emit, config.flapping)
        )
        self._lives = NativeLifecycle(
            config=config,
            gate=self._gate,
            identify=identify,
            handler=handler,
            framer=framer,
            send_ping=send_ping,
            refuse=refuse,
            emit=self._emit,
            stopping=self._stopping,
            rng=self._rng,
            cluster=self._cluster,
            on_frame=on_frame,
        )
        self._accepted = 0
        pacing = config.gc_pacing
        self._gc_pacer = None if pacing is None else CollectionPacer(pacing)
        self._accept_errors = 0
        self._listeners: list[anyio.abc.SocketListener] = []
        self._serving = False
        self._stopped = anyio.Event()
        self._started = anyio.Event()
        #: The bound (host, port) pairs once serving; empty before.
        self.addresses: list[tuple[str, int]] = []

    # -- running

    async def serve_tcp(
        self,
        host: str | Sequence[str] | None = "127.0.0.1",
        port: int = 0,
        *,
        backlog: int = 4096,
        ssl_context: ssl.SSLContext | None = None,
        task_status: anyio.abc.TaskStatus[list[tuple[str, int]]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host``:``port`` (IPv4 and/or IPv6; None means all interfaces) and serve
        until :meth:`shutdown`. ``task_status.started`` receives the bound addresses.

        With ``ssl_context`` (a server context: ``ssl.create_default_context(
        ssl.Purpose.CLIENT_AUTH)`` with a certificate chain loaded) every connection speaks TLS;
        see :meth:`serve`.
        """
        if ssl_context is not None:
            check_server_context(ssl_context)  # before binding anything
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
        await self.serve(listeners, ssl_context=ssl_context, task_status=task_status)

    async def serve(
        self,
        listeners: anyio.abc.Listener[Any] | Iterable[anyio.abc.SocketListener],
        *,
        ssl_context: ssl.SSLContext | None = None,
        task_status: anyio.abc.TaskStatus[list[tuple[str, int]]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve existing listeners until :meth:`shutdown` (which closes them).

        With ``ssl_context`` every accepted connection begins with a TLS handshake, as part of
        its hello: within ``hello_timeout`` together with ``identify``, and counted as a
        pending hello for admission. A handshake that fails closes that connection alone with
        TLS_FAILED (the detail says why); ``identify`` then reads decrypted frames and finds
        the peer's certificate in ``conn.peer_certificate``. Keepalive, TCP_USER_TIMEOUT, the
        RST of a dead peer's close, sparing and :meth:`audit` work on the TCP socket beneath.
        Listeners must be plain TCP ones: the server does the TLS.
        """
        if self._serving or self._started.is_set():
            raise RuntimeError("a Server serves once; make a new one to serve again")
        tls = None if ssl_context is None else check_server_context(ssl_context)
        # One listener, anyio's MultiListener (what create_tcp_listener returns), or several.
        given: Iterable[Any] = (
            [listeners] if isinstance(listeners, anyio.abc.Listener) else listeners
        )
        found: list[anyio.abc.SocketListener] = []
        for listener in given:
            found.extend(getattr(listener, "listeners", [listener]))
        # Plain TCP is carried by a native transport: keepconn._asyncio's on asyncio and
        # uvloop, keepconn._trio's streams on trio (unless config.transport says "anyio").
        self._listeners = [_carrier(listener, self.config, tls) for listener in found]
        self._serving = True
        self._loop = (threading.get_ident(), anyio.lowlevel.current_token())
        config = self.config
        try:
            async with anyio.create_task_group() as tasks:
                # The reaper, the loop-lag probe and the GC pacer share one timer.
                tasks.start_soon(self._upkeep, name="keepconn upkeep")
                if self._cluster is not None:
                    await tasks.start(self._cluster.run, name="keepconn cluster")
                for listener in self._listeners:
                    tasks.start_soon(self._accept, listener, tasks, tls, name="keepconn accept")
                self.addresses = [
                    tuple(ln.extra(SocketAttribute.local_address))[:2]  # type: ignore[misc]
                    for ln in found
                ]
                self._started.set()
                task_status.started(self.addresses)
                await self._stopping.wait()
                await drain(self._listeners, self._lives, config, self._goodbye, self._rng)
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

    # -- the server's tasks

    async def _accept(
        self,
        listener: anyio.abc.SocketListener,
        tasks: anyio.abc.TaskGroup,
        tls: ssl.SSLContext | None,
    ) -> None:
        def failed() -> None:
            self._accept_errors += 1

        if not isinstance(listener, NativeListener):
            async with connection_tasks(tasks) as start_soon:

                def spawn(stream: anyio.abc.SocketStream) -> None:
                    self._accepted += 1
                    start_soon(self._lives.run, stream, self._accepted, tls)

                await accept_forever(listener.accept, spawn, stopping=self._stopping, failed=failed)
            return

        def start(sock: socket.socket) -> None:
            self._accepted += 1
            self._lives.start(sock, self._accepted)

        try:
            await listener.serve_sockets(start, failed)
        except anyio.get_cancelled_exc_class():
            # Native connections run outside the task group: when the server is cancelled
            # rather than drained, they are ended here, and given a moment to close.
            self._lives.abort_native()
            with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                await self._lives.idle.wait()
            raise

    async def _upkeep(self) -> None:
        lives = self._lives

        def expired(session: Session, now: float) -> None:
            conn = session.conn
            detail = f"silent for {now - session.last_seen:.2f} s"
            lives.timed_out(conn, CloseReason.IDLE_TIMEOUT, detail)
            # Measured here, where the registry's promise is kept or broken, not when the
            # socket is closed (which a graceful timeout_close puts off by close_grace).
            self._emit(SessionReaped(session.key, conn.peer, now - session.deadline))

        gauge = None if self.admission is None else self.admission.lag_gauge
        upkeep = Upkeep(self.registry, gauge, self._gc_pacer)
        await upkeep_forever(
            upkeep,
            self.config.reap_batch,
            spare=lives.spare,
            expired=expired,
            accepted=self._accepts,
        )

    # -- observability

    async def audit(self) -> SocketAudit:
        """Read the kernel's socket table for the server's ports and account for every
        ESTABLISHED socket (see :class:`SocketAudit`). Linux only; the table is read in a
        worker thread, filtered to the server's ports by the kernel itself (see
        :func:`keepconn._anyio.audit.audit_sockets`)."""
        return await audit_sockets(tuple(self.addresses), self._lives)

    def add_listener(self, callback: Callable[[ServerEvent], None]) -> None:
        """Call ``callback`` with every ServerEvent from now on, after ``on_event``.

        For observers that attach to a running server (``keepconn.metrics`` does). Like
        ``on_event`` it runs inline on the event loop, so keep it quick; an exception it raises
        is logged and does not keep the event from the other listeners.
        """
        self._subscribers = (*self._subscribers, callback)

    def remove_listener(self, callback: Callable[[ServerEvent], None]) -> None:
        """Stop calling ``callback`` (given to :meth:`add_listener`; ValueError if it was not)."""
        subscribers = list(self._subscribers)
        subscribers.remove(callback)
        self._subscribers = tuple(subscribers)

    def _emit(self, event: ServerEvent) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                logger.exception("on_event callback failed for %r", event)
        for listener in self._subscribers:
            try:
                listener(event)
            except Exception:
                logger.exception("event listener %r failed for %r", listener, event)

    @property
    def connections(self) -> tuple[Connection[F], ...]:
        """A snapshot of the open connections (hello phase included)."""
        return tuple(self._lives.connections)

    def stats(self) -> ServerStats:
        """A frozen snapshot of the server's counters.

        Any thread may ask, before, while and after the server serves. From a thread other
        than the event loop's while it serves (a Prometheus scrape in prometheus_client's HTTP
        thread, say) the snapshot is taken on the event loop, between two of its steps, and
        the call waits for it.
        """
        loop = self._loop
        if loop is not None and loop[0] != threading.get_ident():
            return anyio.from_thread.run_sync(self._snapshot, token=loop[1])
        return self._snapshot()

    def _snapshot(self) -> ServerStats:
        try:
            now = anyio.current_time()
        except anyio.NoEventLoopError:
            # Asked before serve() or after it, off any event loop: the counters stand still
            # and only the rate windows need a time (asyncio's clock is this one).
            now = time.monotonic()
        lives = self._lives
        return ServerStats(
            connections=len(lives.connections),
            pending_hellos=lives.pending_hellos,
            accepted=self._accepted,
            accept_errors=self._accept_errors,
            closed={reason: lives.closed[reason] for reason in CloseReason},
            takeovers=self._gate.takeovers,
            spared=lives.spared,
            registry=self.registry.stats(),
            admission=None if self.admission is None else self.admission.stats(now),
            flapping=None if self.flapping is None else self.flapping.stats(now),
            cluster=None if self._cluster is None else self._cluster.stats(),
            gc_pacing=None if self._gc_pacer is None else self._gc_pacer.stats(now),
        )

    def _accepts(self) -> int:
        return self._accepted


def _carrier(
    listener: anyio.abc.SocketListener, config: ServerConfig, tls: ssl.SSLContext | None
) -> anyio.abc.SocketListener:
    """``listener`` as it is served: wrapped for this event loop's native transport when it
    can be, else itself."""
    if sniffio.current_async_library() == "trio":
        from .._trio.listener import trio_listener  # only on trio: an optional dependency

        return trio_listener(listener, config, tls)
    return native_listener(listener, config, tls)

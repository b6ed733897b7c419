"""The reconnect loop: connect, hello, serve, back off, again. Runs on asyncio and trio.

One attempt's life::

    connect (connect_timeout) ── [TLS] + hello (hello_timeout) ── session: handler + pings
      └─ CONNECT_FAILED/TIMEOUT   └─ HELLO_TIMEOUT, TLS_FAILED,  └─ SERVER_CLOSED, RESET,
                                     REJECTED, REFUSED              SERVER_SILENT,
                                                                    KEEPALIVE_TIMEOUT,
                                                                    PROTOCOL_ERROR, CLOSED_BY_APP
    ... ── socket closed ── Disconnect(reason, delay) reported ── sleep(delay) ── next attempt

The backoff starts over only after a session stayed up for ``healthy_after`` seconds, so a
server that accepts and drops at once (before or after the hello) sees a device back off
exactly as if it had refused the connection.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, NoReturn, TypeVar

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream

from .._core.errors import ConfigError
from .._core.framing import Framer
from .._core.heartbeat import Pinger
from ._connection import ClientConnection, classify
from ._records import ClientConfig, ConnectorStats, Disconnect, DisconnectReason

__all__ = ["Connector"]

logger = logging.getLogger("keepconn.client")

F = TypeVar("F")

Callback = Callable[[ClientConnection[F]], Awaitable[None]]


class Connector(Generic[F]):
    """Keeps one connection to ``host``:``port`` alive, reconnecting with jittered backoff.

    :param framer: ``() -> Framer``: a new framer for each connection.
    :param hello: ``async (conn) -> None``: open the session (send credentials, read the
        answer). Raise :class:`~keepconn.HelloRejected` when the server refuses us; call
        ``conn.retry_after(s)`` first when it said when to come back. None: the session
        starts at TCP connect.
    :param send_ping: ``async (conn) -> None``: send one application ping; needed when
        ``config.heartbeat`` is set. The application reports the answer with
        ``conn.pong_received()``.
    :param config: timeouts, backoff, heartbeat and TCP keepalive (:class:`ClientConfig`).
    :param on_disconnect: called with a :class:`Disconnect` after every attempt ends, before
        the connector sleeps (keep it quick; it runs inline).
    :param rng: the random source for the backoff's jitter (seed it to replay a run).

    Run it with ``await connector.run(handler)`` or ``async with connector.sessions() as
    sessions: async for conn in sessions: ...``. Both run until cancelled.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        framer: Callable[[], Framer[F]],
        hello: Callback[F] | None = None,
        send_ping: Callback[F] | None = None,
        config: ClientConfig | None = None,
        on_disconnect: Callable[[Disconnect], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config = config if config is not None else ClientConfig()
        if config.heartbeat is not None and send_ping is None:
            raise ConfigError("heartbeat needs a send_ping callback")
        self.host = host
        self.port = port
        self._framer = framer
        self._hello = hello
        self._send_ping = send_ping
        self._on_disconnect = on_disconnect
        self._backoff = config.backoff.delays(rng)
        # Made once: a default context loads the system's CA store, which takes milliseconds.
        self._tls = config.ssl_context()
        self._running = False
        self._conn: ClientConnection[F] | None = None
        self._attempts = 0
        self._connected = 0
        self._established = 0
        self._disconnects: Counter[DisconnectReason] = Counter()
        self._last: Disconnect | None = None

    # -- running

    async def run(self, handler: Callback[F]) -> NoReturn:
        """Connect, hello, run ``handler(conn)`` for the session, and start over, forever.

        The session ends when the handler returns (CLOSED_BY_APP), when the connection fails
        or the heartbeat finds the server silent (the handler is then cancelled), or on
        ``conn.close()``. An exception from a callback that is not about the connection (a
        bug, not a network failure) closes the socket and propagates. Cancel to stop: the
        socket is closed and nothing is left running.
        """
        if self._running:
            raise RuntimeError("this Connector is already running")
        self._running = True
        try:
            while True:
                conn = await self._attempt(handler)
                delay = self._after(conn)
                await anyio.sleep(delay)
        finally:
            self._running = False

    @contextlib.asynccontextmanager
    async def sessions(self) -> AsyncIterator[MemoryObjectReceiveStream[ClientConnection[F]]]:
        """Run the connector in the background and hand over each new session.

        ``async for conn in sessions`` (or ``await sessions.receive()``) yields a live,
        hello-complete connection; the connector waits for it to end (read to the end, or
        ``conn.close()``) before it backs off and connects again. Leaving the block stops the
        connector and closes the connection.
        """
        send, receive = anyio.create_memory_object_stream[ClientConnection[F]]()

        async def hand_over(conn: ClientConnection[F]) -> None:
            await send.send(conn)
            # The session lasts until the application or the network ends it; either
            # cancels this through the connection's scope.
            await anyio.sleep_forever()

        crash: BaseException | None = None

        async def background() -> None:
            nonlocal crash
            try:
                await self.run(hand_over)
            except Exception as exc:
                # Re-raised below as itself, not wrapped in an exception group, so callers
                # see the same exception on asyncio and trio.
                crash = exc
                tasks.cancel_scope.cancel()

        body_error: Exception | None = None
        with send, receive:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(background, name=f"keepconn connector {self.host}:{self.port}")
                try:
                    yield receive
                except Exception as exc:
                    # Trio would wrap an error from the body in an exception group; keep it
                    # bare, as asyncio does, and raise it once the connector has stopped.
                    body_error = exc
                finally:
                    tasks.cancel_scope.cancel()
        if body_error is not None:
            raise body_error
        if crash is not None:
            raise crash

    # -- one attempt

    async def _attempt(self, handler: Callback[F]) -> ClientConnection[F] | Disconnect:
        """Make one attempt; returns the connection it made (now closed), or, when TCP
        connect failed, the Disconnect to report (without its delay yet)."""
        self._attempts += 1
        attempt = self._attempts
        config = self.config
        stream: anyio.abc.SocketStream | None = None
        with anyio.move_on_after(config.connect_timeout):
            try:
                stream = await anyio.connect_tcp(self.host, self.port)
            except OSError as exc:
                return self._failed(attempt, DisconnectReason.CONNECT_FAILED, _describe(exc))
        if stream is None:
            return self._failed(
                attempt,
                DisconnectReason.CONNECT_TIMEOUT,
                f"no answer within {config.connect_timeout:g} s",
            )
        self._connected += 1
        conn = ClientConnection(stream, self._framer(), attempt, config.receive_size)
        self._conn = conn
        try:
            with conn._scope:
                await self._live(conn, handler)
        finally:
            self._conn = None
            # Only cancellation from outside gets here without a reason.
            conn._record(DisconnectReason.CLOSED_BY_APP)
            with anyio.CancelScope(shield=True):
                await conn._close_socket()
        if conn._crash is not None:
            raise conn._crash
        return conn

    def _failed(self, attempt: int, reason: DisconnectReason, error: str) -> Disconnect:
        # The delay and backoff step are filled in by _after, like every other disconnect.
        return Disconnect(reason, attempt, backoff_attempt=0, delay=0.0, error=error)

    async def _live(self, conn: ClientConnection[F], handler: Callback[F]) -> None:
        config = self.config
        if config.keepalive is not None:
            config.keepalive.apply(conn.raw_socket())
        if self._hello is not None or self._tls is not None:
            # One timeout for the handshake and the hello, as on the server: a server that
            # accepts and then says nothing must not hold a device, whichever step it stalls.
            with anyio.move_on_after(config.hello_timeout) as timer:
                if self._tls is None or await conn._handshake(
                    self._tls, server_side=False, hostname=self.config.server_hostname or self.host
                ):
                    if self._hello is not None:
                        await self._guard(conn, self._hello)
            if timer.cancelled_caught:
                step = "TLS handshake" if conn.tls_version is None else "hello"
                conn._end(
                    DisconnectReason.HELLO_TIMEOUT,
                    f"no {step} within {config.hello_timeout:g} s",
                )
            if conn.reason is not None:
                return
        now = anyio.current_time()
        heartbeat = config.heartbeat
        conn._establish(now, Pinger(heartbeat, now) if heartbeat is not None else None)
        self._established += 1
        async with anyio.create_task_group() as tasks:
            if heartbeat is not None:
                tasks.start_soon(self._guard, conn, self._ping_loop)
            await self._guard(conn, handler)
            conn._end(DisconnectReason.CLOSED_BY_APP)

    async def _guard(self, conn: ClientConnection[F], callback: Callback[F]) -> None:
        """Run a callback; turn a connection failure into the connection's reason."""
        try:
            await callback(conn)
        except Exception as exc:
            found = classify(exc)
            if found is None:
                conn._crashed(exc)
            else:
                conn._end(*found)

    async def _ping_loop(self, conn: ClientConnection[F]) -> None:
        send_ping = self._send_ping
        assert send_ping is not None
        await conn._ping_loop(send_ping, _server_silent)

    # -- after an attempt

    def _after(self, ended: ClientConnection[F] | Disconnect) -> float:
        """Choose the delay before the next attempt, record and report the disconnect."""
        backoff = self._backoff
        if isinstance(ended, Disconnect):
            hint = None
            partial = ended
        else:
            conn = ended
            hint = conn.retry_hint
            now = anyio.current_time()
            established_at = conn.established_at
            if established_at is not None and now - established_at >= self.config.healthy_after:
                backoff.reset()
            reason = conn.reason
            assert reason is not None
            if established_at is None and hint is not None:
                # Turned away with "come back later" before the session began: that is
                # admission control, whatever the transport did next.
                reason = DisconnectReason.REFUSED
            partial = Disconnect(
                reason,
                conn.attempt,
                backoff_attempt=0,
                delay=0.0,
                error=conn.detail,
                established=established_at is not None,
                connected_for=now - conn.opened_at,
            )
        step = backoff.attempt
        delay = backoff.next_delay(hint)
        record = Disconnect(
            partial.reason,
            partial.attempt,
            backoff_attempt=step,
            delay=delay,
            retry_after=hint,
            error=partial.error,
            established=partial.established,
            connected_for=partial.connected_for,
        )
        self._disconnects[record.reason] += 1
        self._last = record
        _log(record, self.host, self.port)
        if self._on_disconnect is not None:
            try:
                self._on_disconnect(record)
            except Exception:
                logger.exception("on_disconnect callback failed for %r", record)
        return delay

    # -- observability

    @property
    def connection(self) -> ClientConnection[F] | None:
        """The open connection (hello phase included), or None between attempts."""
        return self._conn

    def stats(self) -> ConnectorStats:
        """A frozen snapshot of the connector's counters."""
        return ConnectorStats(
            attempts=self._attempts,
            connected=self._connected,
            established=self._established,
            disconnects={reason: self._disconnects[reason] for reason in DisconnectReason},
            last_disconnect=self._last,
            connected_now=self._conn is not None,
        )

    def __repr__(self) -> str:
        return f"<Connector {self.host}:{self.port} attempts={self._attempts}>"


def _server_silent(conn: ClientConnection[F], detail: str) -> None:
    conn._end(DisconnectReason.SERVER_SILENT, detail)


def _describe(exc: OSError) -> str:
    """An errno name first (what a log search wants), then the words of the error behind it.

    anyio.connect_tcp raises a bare "All connection attempts failed" and keeps the real error
    (ECONNREFUSED, ENETUNREACH, ...) as its cause.
    """
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno is not None:
            name = errno.errorcode.get(seen.errno, str(seen.errno))
            return f"{name}: {seen}"
        seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__


def _log(record: Disconnect, host: str, port: int) -> None:
    # A device that cannot reach its server logs once per attempt; the reasons that are
    # expected in a fleet's normal life stay at INFO, the rest are warnings.
    level = (
        logging.INFO
        if record.reason
        in (
            DisconnectReason.CONNECT_FAILED,
            DisconnectReason.REFUSED,
            DisconnectReason.SERVER_CLOSED,
            DisconnectReason.CLOSED_BY_APP,
        )
        else logging.WARNING
    )
    logger.log(
        level,
        "%s:%d attempt %d ended: %s%s; next attempt in %.3f s",
        host,
        port,
        record.attempt,
        record.reason.name,
        f" ({record.error})" if record.error else "",
        record.delay,
    )

"""One accepted connection, as the application's identify and handler callbacks see it."""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, ClassVar, TypeVar

import anyio
import anyio.abc

from .._core.errors import SessionClosed
from .._core.events import RoundTrip, ServerEvent
from .._core.framing import Framer
from .._core.heartbeat import Pinger, PingPolicer
from .._core.reasons import ABORTIVE, CloseReason
from .._core.registry import Session
from ..tcp._socket import half_close, peer_gone, unacknowledged_bytes, unread_bytes
from .base import StreamConnection
from .failures import Failure

__all__ = ["Connection"]

F = TypeVar("F")

_LOOKUP_ERRORS = (anyio.TypedAttributeLookupError, OSError, ValueError)


class Connection(StreamConnection[F, CloseReason]):
    """One accepted connection, handed to the application's identify and handler callbacks.

    Read frames with :meth:`receive` (or ``async for frame in conn``): each complete frame
    touches the session, so an application using it cannot forget to. Close with
    :meth:`close` (immediate) or :meth:`shutdown` (graceful).
    """

    __slots__ = (
        "_emit",
        "_eof_sent",
        "_inode",
        "_order",
        "_peer_closed",
        "_policer",
        "_session",
        "_spare_mark",
    )

    REASONS: ClassVar[dict[Failure, CloseReason]] = {
        Failure.EOF: CloseReason.PEER_CLOSED,
        Failure.PROTOCOL: CloseReason.PROTOCOL_ERROR,
        Failure.REJECTED: CloseReason.AUTH_FAILED,
        Failure.CLOSED: CloseReason.APPLICATION,
        Failure.TIMED_OUT: CloseReason.KEEPALIVE_TIMEOUT,
        Failure.BROKEN: CloseReason.PEER_RESET,
        Failure.TLS: CloseReason.TLS_FAILED,
        Failure.OTHER: CloseReason.APPLICATION,
    }
    ABORTIVE: ClassVar[frozenset[CloseReason]] = ABORTIVE

    def __init__(
        self,
        stream: anyio.abc.SocketStream,
        framer: Framer[F],
        *,
        receive_size: int,
        on_event: Callable[[ServerEvent], None],
        order: int = 0,
    ):
        super().__init__(stream, framer, receive_size)
        self._emit = on_event
        self._order = order
        self._session: Session | None = None
        self._policer: PingPolicer | None = None
        self._peer_closed = False
        # The byte count when the reaper last spared this session for unread bytes (None once
        # a complete frame has touched it since): see spared().
        self._spare_mark: int | None = None
        self._eof_sent = False
        try:
            # The socket's inode ties the kernel's table (keepconn.tcp.census) to this object.
            self._inode = os.fstat(self.raw_socket().fileno()).st_ino
        except _LOOKUP_ERRORS:
            self._inode = 0

    # -- identity and state

    @property
    def session(self) -> Session | None:
        """The registry session, once the hello has succeeded."""
        return self._session

    @property
    def identity(self) -> Hashable | None:
        """The identity from the hello, or None before it."""
        return None if self._session is None else self._session.key

    @property
    def host(self) -> Hashable:
        """The peer's host: its address without the port."""
        peer = self.peer
        host: Hashable = peer[0] if isinstance(peer, tuple) and peer else peer
        return host

    @property
    def order(self) -> int:
        """The connection's place in its server's accept order (1 for the first)."""
        return self._order

    @property
    def inode(self) -> int:
        """The socket's inode (0 if unknown): what the kernel's socket table calls it."""
        return self._inode

    @property
    def peer_closed(self) -> bool:
        """True once the peer's EOF has been read."""
        return self._peer_closed

    # -- I/O

    def __anext__(self) -> Coroutine[Any, Any, F]:
        return self._next_frame(StopAsyncIteration)

    def _at_eof(self) -> None:
        # Only remembered: a handler that simply returns at EOF closes as PEER_CLOSED, and one
        # that was closing gracefully has had the answer it waited for.
        self._peer_closed = True

    def _showed_life(self) -> None:
        if self._session is not None:
            self._session.touch(anyio.current_time())
            self._spare_mark = None

    def _check_writable(self) -> None:
        if self._eof_sent:
            raise SessionClosed(f"connection is closing ({self._reason})")

    # -- heartbeats

    def ping_received(self) -> None:
        """Tell the server that the peer pinged: enforces the ping rate limit if configured."""
        if self._policer is not None and not self._policer.ping(anyio.current_time()):
            self.close(CloseReason.TOO_MANY_PINGS, f"{self._policer.strikes} early pings")

    def pong_received(self) -> None:
        """Tell the server that the peer answered a server ping (active heartbeat)."""
        if self._pinger is None:
            return
        rtt = self._pinger.pong_received(anyio.current_time())
        if rtt is not None and self._session is not None:
            self._emit(RoundTrip(self._session.key, rtt))

    # -- closing

    def close(self, reason: CloseReason = CloseReason.APPLICATION, detail: str = "") -> None:
        """Close now with ``reason`` (the first reason given wins). Safe from any task."""
        self._end(reason, detail)

    async def shutdown(
        self, reason: CloseReason = CloseReason.APPLICATION, grace: float = 2.0
    ) -> None:
        """Close gracefully: send FIN, keep reading for up to ``grace`` seconds so nothing the
        peer was still sending is lost (the handler keeps receiving), then close."""
        if not self._begin_graceful(reason, grace):
            return  # already closing; the first decision stands
        try:
            await self._stream.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, RuntimeError):
            # (uvloop raises RuntimeError for a transport that closed underneath us.)
            self._scope.cancel()

    def _close_gracefully(self, reason: CloseReason, grace: float, detail: str = "") -> None:
        """Send FIN now and close for good after ``grace`` s; synchronous, for the reaper."""
        if not self._begin_graceful(reason, grace, detail):
            return
        try:
            # Half-close on the socket itself: the stream API is async, and the reaper must not
            # wait on one peer. Later writes by the handler then fail, which ends it.
            half_close(self.raw_socket())
        except _LOOKUP_ERRORS:
            self._scope.cancel()

    def _begin_graceful(self, reason: CloseReason, grace: float, detail: str = "") -> bool:
        if not self._record(reason, detail):
            return False
        self._graceful = self._eof_sent = True
        self._scope.deadline = min(self._scope.deadline, anyio.current_time() + grace)
        return True

    def _may_notify_close(self) -> bool:
        # After a graceful close's FIN there is nothing more to send: shutdown() said
        # close_notify before it, the reaper's synchronous half-close could not.
        return not self._eof_sent

    def _resets(self) -> bool:
        # Dead and displaced peers get a RST; so does a graceful close whose grace ran out
        # without the peer's FIN (a shutdown straggler): a FIN would sit in FIN_WAIT1.
        if self._graceful:
            return not self._peer_closed
        return self._reason in ABORTIVE

    # -- what the server runtime asks of its connection

    def _attach(self, session: Session, pinger: Pinger | None, policer: PingPolicer | None) -> None:
        """The hello succeeded: this connection now serves ``session``."""
        self._session = session
        self._pinger = pinger
        self._policer = policer

    def _end_life_by(self, deadline: float) -> None:
        """Close (MAX_AGE) at ``deadline`` at the latest."""
        self._scope.deadline = min(self._scope.deadline, deadline)

    def _settle(self, stopping: bool) -> CloseReason:
        """The connection's final reason, once its task is ending: the one recorded, or, for a
        connection that ended without one, what its end means."""
        if self._reason is None:
            if stopping:
                reason = CloseReason.SHUTDOWN
            elif self._peer_closed:
                reason = CloseReason.PEER_CLOSED
            elif self._aged_out():
                # Nothing but max_age puts a deadline on a connection's scope outside shutdown.
                reason = CloseReason.MAX_AGE
            else:
                reason = CloseReason.APPLICATION
            self._record(reason)
        assert self._reason is not None
        return self._reason

    def _aged_out(self) -> bool:
        """Whether the connection's own scope ended it (max_age) without a reason."""
        return self._scope.cancelled_caught

    def _cancel_requested(self) -> bool:
        """Whether something already asked this connection to end (close, a deadline)."""
        return self._scope.cancel_called

    def _peer_gone(self) -> bool:
        """Whether the kernel already knows the peer closed or reset the connection."""
        try:
            return peer_gone(self.raw_socket())
        except _LOOKUP_ERRORS:
            return True

    def _unacknowledged(self) -> int | None:
        """Bytes sent that the peer's kernel has not acknowledged (None: cannot tell)."""
        try:
            return unacknowledged_bytes(self.raw_socket())
        except _LOOKUP_ERRORS:
            return None

    def _spared(self) -> bool:
        """Whether this session, due to be reaped, has in fact sent bytes not read yet.

        Then the peer is alive and the server is behind (an event loop stalled in a storm):
        reaping it would be a false reap. Asked of the kernel (FIONREAD) only for sessions
        that are due, so it costs nothing on the hot path.

        Under TLS the kernel's unread bytes are ciphertext, and TLS may hold bytes it took from
        the kernel but nobody has read: either way the peer sent them, so it is alive. So are
        complete frames read but not yet taken by a busy handler (a pong among them, say).

        Unread bytes are not a complete frame, though. Once spared, a session is spared again
        only while the server has still read nothing from it: if it did read and no frame
        completed, the peer is trickling partial frames (slowloris), not waiting on us.
        """
        mark = self._spare_mark
        if mark is not None and mark != self._bytes_in:
            return False
        try:
            waiting = (
                unread_bytes(self.raw_socket()) + self._tls_buffered() + self._frames_waiting()
            )
        except _LOOKUP_ERRORS:
            return False
        if waiting <= 0:
            return False
        self._spare_mark = self._bytes_in
        return True

    def __repr__(self) -> str:
        who = "hello" if self._session is None else repr(self._session.key)
        return f"<Connection {who} peer={self.peer!r} reason={self._reason}>"

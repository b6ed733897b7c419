"""One accepted connection, as the application's identify and handler callbacks see it."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from ._errors import SessionClosed
from ._events import RoundTrip
from ._framing import Framer
from ._heartbeat import Pinger, PingPolicer
from ._kernel import half_close
from ._reasons import CloseReason
from ._registry import Session

if TYPE_CHECKING:
    import socket

    from ._server import Server

__all__ = ["Connection"]

F = TypeVar("F")


class Connection(Generic[F]):
    """One accepted connection, handed to the application's identify and handler callbacks.

    Read frames with :meth:`receive` (or ``async for frame in conn``): each complete frame
    touches the session, so an application using it cannot forget to. Close with
    :meth:`close` (immediate) or :meth:`shutdown` (graceful).
    """

    def __init__(self, server: Server[F], stream: anyio.abc.SocketStream, framer: Framer[F]):
        self._server = server
        self._stream = stream
        self._framer = framer
        self._frames: deque[F] = deque()
        self._scope = anyio.CancelScope()
        self._reason: CloseReason | None = None
        self._detail = ""
        self._session: Session | None = None
        self._pinger: Pinger | None = None
        self._policer: PingPolicer | None = None
        self._peer_closed = False
        # Bytes read so far, and their count when the reaper last spared this session for
        # unread bytes (None once a complete frame has touched it since): see Server._behind_on.
        self._bytes_in = 0
        self._spare_mark: int | None = None
        self._graceful = False
        self._eof_sent = False
        self._send_lock = anyio.Lock()
        self.opened_at = anyio.current_time()
        try:
            # The socket's inode ties the kernel's table (keepconn.tcp.census) to this object.
            self._inode = os.fstat(self.raw_socket().fileno()).st_ino
        except (OSError, ValueError, anyio.TypedAttributeLookupError):
            self._inode = 0
        #: The peer's address as the socket reports it, e.g. ("127.0.0.1", 50312).
        self.peer: Any = _extra(stream, SocketAttribute.remote_address)
        #: Free for the application (protocol state, the device record, ...).
        self.context: Any = None

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
    def reason(self) -> CloseReason | None:
        """Why this connection is closing or closed, or None while it is open."""
        return self._reason

    @property
    def rtt(self) -> float | None:
        """The last round-trip time of a server ping (active heartbeat only)."""
        return None if self._pinger is None else self._pinger.rtt

    @property
    def stream(self) -> anyio.abc.SocketStream:
        """The underlying anyio stream (for extras; read through :meth:`receive`)."""
        return self._stream

    def raw_socket(self) -> socket.socket:
        """The connection's socket, for options and TCP_INFO."""
        sock: socket.socket = self._stream.extra(SocketAttribute.raw_socket)
        return sock

    # -- I/O

    async def receive(self) -> F:
        """The next complete frame. Touches the session when a frame completes.

        Raises anyio.EndOfStream when the peer has closed, ProtocolError when its bytes
        cannot be framed, and SessionClosed once the connection is closing.
        """
        frames = self._frames
        while not frames:
            if self._reason is not None and not self._graceful:
                raise SessionClosed(f"connection is closing ({self._reason.name})")
            try:
                data = await self._stream.receive(self._server.config.receive_size)
            except anyio.EndOfStream:
                # Remembered so a handler that simply returns at EOF closes as PEER_CLOSED.
                self._peer_closed = True
                raise
            frames.extend(self._framer.feed(data))
            self._bytes_in += len(data)
            if frames and self._session is not None:
                self._session.touch(anyio.current_time())
                self._spare_mark = None
        return frames.popleft()

    def __aiter__(self) -> Connection[F]:
        return self

    async def __anext__(self) -> F:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def send(self, data: bytes) -> None:
        """Send bytes to the peer. Callbacks must write through this method, never through
        ``stream`` directly: the handler and the ping task may send at the same time, and
        the lock keeps their frames whole."""
        if self._eof_sent:
            raise SessionClosed(f"connection is closing ({self._reason})")
        async with self._send_lock:
            await self._stream.send(data)

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
            self._server._emit(RoundTrip(self._session.key, rtt))

    # -- closing

    def close(self, reason: CloseReason = CloseReason.APPLICATION, detail: str = "") -> None:
        """Close now with ``reason`` (the first reason given wins). Safe from any task."""
        if self._reason is None:
            self._reason = reason
            self._detail = detail
        self._scope.cancel()

    async def shutdown(
        self, reason: CloseReason = CloseReason.APPLICATION, grace: float = 2.0
    ) -> None:
        """Close gracefully: send FIN, keep reading for up to ``grace`` seconds so nothing the
        peer was still sending is lost (the handler keeps receiving), then close."""
        if self._reason is not None:
            return  # already closing; the first decision stands
        self._reason, self._graceful = reason, True
        self._scope.deadline = min(self._scope.deadline, anyio.current_time() + grace)
        self._eof_sent = True
        try:
            await self._stream.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, RuntimeError):
            # (uvloop raises RuntimeError for a transport that closed underneath us.)
            self._scope.cancel()

    def _close_gracefully(self, reason: CloseReason, grace: float, detail: str = "") -> None:
        """Send FIN now and close for good after ``grace`` s; synchronous, for the reaper."""
        if self._reason is not None:
            return
        self._reason, self._detail, self._graceful = reason, detail, True
        self._eof_sent = True
        self._scope.deadline = min(self._scope.deadline, anyio.current_time() + grace)
        try:
            # Half-close on the socket itself: the stream API is async, and the reaper must not
            # wait on one peer. Later writes by the handler then fail, which ends it.
            half_close(self.raw_socket())
        except (OSError, ValueError, anyio.TypedAttributeLookupError):
            self._scope.cancel()

    def __repr__(self) -> str:
        who = "hello" if self._session is None else repr(self._session.key)
        return f"<Connection {who} peer={self.peer!r} reason={self._reason}>"


def _extra(stream: anyio.abc.SocketStream, attribute: Any) -> Any:
    try:
        return stream.extra(attribute)
    except (anyio.TypedAttributeLookupError, OSError):
        return None

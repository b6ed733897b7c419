"""One live client connection, as the application sees it."""

from __future__ import annotations

import errno
import socket
from collections import deque
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from .._errors import HelloRejected, ProtocolError, SessionClosed
from .._failures import errno_of
from .._framing import Framer
from .._heartbeat import Pinger
from .._kernel import abort_on_close
from .._validate import check_number
from ._records import DisconnectReason

__all__ = ["ClientConnection"]

F = TypeVar("F")

#: Reasons after which the server is believed gone: close with RST (SO_LINGER 0), so our FIN
#: does not sit in FIN_WAIT1 being retransmitted to nobody for minutes.
_ABORTIVE = frozenset(
    {
        DisconnectReason.SERVER_SILENT,
        DisconnectReason.KEEPALIVE_TIMEOUT,
        DisconnectReason.HELLO_TIMEOUT,
    }
)


class ClientConnection(Generic[F]):
    """A connection made by a :class:`~keepconn.client.Connector`, from TCP connect to close.

    The hello callback receives it first, then the session handler (or the ``sessions()``
    iterator). Read frames with :meth:`receive` or ``async for frame in conn`` (which simply
    stops when the connection ends, whatever the reason); write with :meth:`send`. Report
    heartbeat answers with :meth:`pong_received` and a server's "come back in N seconds" with
    :meth:`retry_after`. Once it has ended, :attr:`reason` says why.
    """

    def __init__(
        self,
        stream: anyio.abc.SocketStream,
        framer: Framer[F],
        attempt: int,
        receive_size: int,
    ) -> None:
        self._stream = stream
        self._framer = framer
        self._receive_size = receive_size
        self._frames: deque[F] = deque()
        # Covers the whole life of the connection (hello, handler, pings) in the connector's
        # task: cancelling it is how any task ends the connection.
        self._scope = anyio.CancelScope()
        self._closed = anyio.Event()
        self._reason: DisconnectReason | None = None
        self._detail = ""
        self._hint: float | None = None
        self._crash: Exception | None = None
        self._pinger: Pinger | None = None
        self._established_at: float | None = None
        self.opened_at = anyio.current_time()
        #: The attempt number (from 1) that made this connection.
        self.attempt = attempt
        #: The server's address as the socket reports it.
        self.peer: Any = _extra(stream, SocketAttribute.remote_address)
        #: Free for the application (protocol state, a session token, ...).
        self.context: Any = None

    # -- state

    @property
    def reason(self) -> DisconnectReason | None:
        """Why the connection is ending or has ended; None while it is open."""
        return self._reason

    @property
    def detail(self) -> str:
        """Words to go with :attr:`reason` (an errno name, an exception text)."""
        return self._detail

    @property
    def established(self) -> bool:
        """True once the hello has completed."""
        return self._established_at is not None

    @property
    def rtt(self) -> float | None:
        """The last measured round-trip time of a client ping (heartbeat only)."""
        return None if self._pinger is None else self._pinger.rtt

    @property
    def retry_hint(self) -> float | None:
        """The largest retry-after hint reported on this connection, if any."""
        return self._hint

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
        """The next complete frame from the server.

        Raises anyio.EndOfStream when the server closed, ProtocolError when its bytes cannot
        be framed, and SessionClosed when the connection ended any other way (reset, no
        heartbeat answer, closed by the application). Each of these ends the connection.
        """
        frames = self._frames
        while not frames:
            if self._reason is not None:
                raise SessionClosed(f"connection ended ({self._reason.name})")
            try:
                data = await self._stream.receive(self._receive_size)
            except anyio.EndOfStream:
                self._end(DisconnectReason.SERVER_CLOSED)
                raise
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self._end(*transport_reason(exc))
                raise SessionClosed(f"connection ended ({self._reason})") from exc
            try:
                frames.extend(self._framer.feed(data))
            except ProtocolError as exc:
                self._end(DisconnectReason.PROTOCOL_ERROR, str(exc))
                raise
        return frames.popleft()

    def __aiter__(self) -> ClientConnection[F]:
        return self

    async def __anext__(self) -> F:
        try:
            return await self.receive()
        except (anyio.EndOfStream, SessionClosed):
            # The reason is recorded and reported; a reading loop has nothing left to do.
            raise StopAsyncIteration from None

    async def send(self, data: bytes) -> None:
        """Send bytes to the server. Raises SessionClosed once the connection has ended."""
        if self._reason is not None:
            raise SessionClosed(f"connection ended ({self._reason.name})")
        try:
            await self._stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._end(*transport_reason(exc))
            raise SessionClosed(f"connection ended ({self._reason})") from exc

    # -- what the application tells the connector

    def pong_received(self) -> float | None:
        """The server answered a client ping; returns the round-trip time (None if no ping
        was outstanding, or there is no heartbeat)."""
        if self._pinger is None:
            return None
        return self._pinger.pong_received(anyio.current_time())

    def retry_after(self, seconds: float) -> None:
        """The server asked us to come back no sooner than ``seconds`` from now.

        The next attempt honours it (capped at the backoff's ``max_delay``). Reported before
        the hello completes, it also makes the disconnect REFUSED rather than, say,
        SERVER_CLOSED. Does not close the connection: the server will, or the application does.
        """
        check_number("seconds", seconds, min_inclusive=True)
        self._hint = seconds if self._hint is None else max(self._hint, seconds)

    def close(
        self, reason: DisconnectReason = DisconnectReason.CLOSED_BY_APP, detail: str = ""
    ) -> None:
        """End the connection now (the connector then backs off and reconnects).

        The first reason given wins. Safe to call from any task, and more than once.
        """
        self._end(reason, detail)

    async def wait_closed(self) -> None:
        """Return once the connection's socket is closed."""
        await self._closed.wait()

    # -- internals shared with the connector

    def _end(self, reason: DisconnectReason, detail: str = "") -> None:
        if self._reason is None:
            self._reason = reason
            self._detail = detail
        self._scope.cancel()

    async def _close_socket(self) -> None:
        """Close the socket, abortively when the server is believed gone. Shield the call."""
        if self._reason in _ABORTIVE:
            try:
                abort_on_close(self.raw_socket())
            except (OSError, ValueError, anyio.TypedAttributeLookupError):
                pass  # already closed underneath us (uvloop reports a negative descriptor)
        try:
            await self._stream.aclose()
        except (OSError, anyio.BrokenResourceError):
            pass
        self._closed.set()

    def __repr__(self) -> str:
        state = "session" if self.established else "hello"
        return (
            f"<ClientConnection #{self.attempt} {state} peer={self.peer!r} reason={self._reason}>"
        )


def _extra(stream: anyio.abc.SocketStream, attribute: Any) -> Any:
    try:
        return stream.extra(attribute)
    except (anyio.TypedAttributeLookupError, OSError):
        return None


def transport_reason(exc: BaseException) -> tuple[DisconnectReason, str]:
    """The reason for a failed read or write on an open connection."""
    if isinstance(exc, anyio.ClosedResourceError):
        # Only our own side closes the stream, and it records a reason first; this is the
        # fallback for an application that closed the stream behind the connector's back.
        return DisconnectReason.CLOSED_BY_APP, "stream closed"
    code = errno_of(exc)
    if code == errno.ETIMEDOUT:
        return DisconnectReason.KEEPALIVE_TIMEOUT, "ETIMEDOUT"
    name = errno.errorcode.get(code, str(code)) if code is not None else "broken"
    return DisconnectReason.RESET, name


def classify(exc: Exception) -> tuple[DisconnectReason, str] | None:
    """The reason for an exception that ended a callback, or None for an application bug
    (which the connector lets propagate rather than retry forever)."""
    if isinstance(exc, anyio.EndOfStream):
        return DisconnectReason.SERVER_CLOSED, ""
    if isinstance(exc, ProtocolError):
        return DisconnectReason.PROTOCOL_ERROR, str(exc)
    if isinstance(exc, HelloRejected):
        return DisconnectReason.REJECTED, str(exc)
    if isinstance(exc, SessionClosed):
        # receive() and send() record the real reason before raising this.
        return DisconnectReason.CLOSED_BY_APP, str(exc)
    if isinstance(exc, (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)):
        return transport_reason(exc)
    return None

"""One live client connection, as the application sees it."""

from __future__ import annotations

from typing import ClassVar, TypeVar

import anyio
import anyio.abc

from .._anyio.base import StreamConnection
from .._anyio.failures import Failure, failure_of
from .._core.errors import SessionClosed
from .._core.framing import Framer
from .._core.heartbeat import Pinger
from .._core.validate import check_number
from ._records import DisconnectReason

__all__ = ["ClientConnection"]

F = TypeVar("F")


class ClientConnection(StreamConnection[F, DisconnectReason]):
    """A connection made by a :class:`~keepconn.client.Connector`, from TCP connect to close.

    The hello callback receives it first, then the session handler (or the ``sessions()``
    iterator). Read frames with :meth:`receive` or ``async for frame in conn`` (which simply
    stops when the connection ends, whatever the reason); write with :meth:`send`. Report
    heartbeat answers with :meth:`pong_received` and a server's "come back in N seconds" with
    :meth:`retry_after`. Once it has ended, :attr:`reason` says why.
    """

    __slots__ = ("_closed", "_crash", "_established_at", "_hint", "attempt")

    REASONS: ClassVar[dict[Failure, DisconnectReason | None]] = {
        Failure.EOF: DisconnectReason.SERVER_CLOSED,
        Failure.PROTOCOL: DisconnectReason.PROTOCOL_ERROR,
        Failure.REJECTED: DisconnectReason.REJECTED,
        Failure.CLOSED: DisconnectReason.CLOSED_BY_APP,
        Failure.TIMED_OUT: DisconnectReason.KEEPALIVE_TIMEOUT,
        Failure.BROKEN: DisconnectReason.RESET,
        Failure.TLS: DisconnectReason.TLS_FAILED,
        # An application bug: the connector lets it propagate rather than retry forever.
        Failure.OTHER: None,
    }
    #: Reasons after which the server is believed gone: close with RST (SO_LINGER 0), so our
    #: FIN does not sit in FIN_WAIT1 being retransmitted to nobody for minutes.
    ABORTIVE: ClassVar[frozenset[DisconnectReason]] = frozenset(
        {
            DisconnectReason.SERVER_SILENT,
            DisconnectReason.KEEPALIVE_TIMEOUT,
            DisconnectReason.HELLO_TIMEOUT,
        }
    )

    def __init__(
        self,
        stream: anyio.abc.SocketStream,
        framer: Framer[F],
        attempt: int,
        receive_size: int,
    ) -> None:
        super().__init__(stream, framer, receive_size)
        self._closed = anyio.Event()
        self._hint: float | None = None
        self._crash: Exception | None = None
        self._established_at: float | None = None
        #: The attempt number (from 1) that made this connection.
        self.attempt = attempt

    # -- state

    @property
    def established(self) -> bool:
        """True once the hello has completed."""
        return self._established_at is not None

    @property
    def established_at(self) -> float | None:
        """When the hello completed (the event loop's clock), or None before."""
        return self._established_at

    @property
    def retry_hint(self) -> float | None:
        """The largest retry-after hint reported on this connection, if any."""
        return self._hint

    # -- I/O

    async def __anext__(self) -> F:
        try:
            return await self.receive()
        except (anyio.EndOfStream, SessionClosed):
            # The reason is recorded and reported; a reading loop has nothing left to do.
            raise StopAsyncIteration from None

    def _record_failure(self, failure: Failure, detail: str) -> None:
        # Any failure ends the connection at once (the ping task and the handler with it).
        reason = self.REASONS[failure]
        if reason is not None:
            self._end(reason, detail)

    def _transport_failed(self, exc: BaseException) -> None:
        super()._transport_failed(exc)
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

    # -- what the connector asks of its connection

    def _establish(self, now: float, pinger: Pinger | None) -> None:
        """The hello completed at ``now``: the session begins (with client pings, if any)."""
        self._established_at = now
        self._pinger = pinger

    def _crashed(self, exc: Exception) -> None:
        """A callback failed with an application bug: end, and let the connector re-raise it."""
        self._crash = exc
        self._end(DisconnectReason.CLOSED_BY_APP, f"{type(exc).__name__}: {exc}")

    async def _close_socket(self) -> None:
        await super()._close_socket()
        self._closed.set()

    def __repr__(self) -> str:
        state = "session" if self.established else "hello"
        return (
            f"<ClientConnection #{self.attempt} {state} peer={self.peer!r} reason={self._reason}>"
        )


def classify(exc: Exception) -> tuple[DisconnectReason, str] | None:
    """The reason for an exception that ended a callback, or None for an application bug
    (which the connector lets propagate rather than retry forever)."""
    failure, detail = failure_of(exc)
    reason = ClientConnection.REASONS[failure]
    return None if reason is None else (reason, detail)

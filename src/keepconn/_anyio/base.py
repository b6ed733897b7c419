"""What the server's and the client's connections share: reading frames, writing, pinging,
the first-wins close reason, the RST-or-FIN close, and TLS over the connection's TCP stream.

A connection owns its own state: the server and the connector call its methods and read its
properties, they never write its fields. The two sides differ only in their reason enums and
in a few hooks (what EOF means, whether a closing connection may still be written to), which
the subclasses in :mod:`keepconn._anyio.connection` and :mod:`keepconn.client` fill in.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, cast

import anyio
import anyio.abc
import sniffio
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSAttribute

from .._core.errors import ProtocolError, SessionClosed
from .._core.framing import Framer
from .._core.heartbeat import PingAction, Pinger
from ..tcp._socket import abort_on_close
from .failures import TRANSPORT_ERRORS, Failure, failure_of
from .tls import FLUSH_WAIT, Tls, handshake_failure, start_tls

if TYPE_CHECKING:
    import socket
    import ssl

__all__ = ["StreamConnection"]

F = TypeVar("F")
R = TypeVar("R", bound=enum.Enum)
C = TypeVar("C", bound="StreamConnection[Any, Any]")


class StreamConnection(Generic[F, R]):
    """One TCP connection over an anyio stream, framed by a sans-I/O framer.

    Subclasses set :attr:`REASONS` (what each :class:`Failure` is called on their side) and
    :attr:`ABORTIVE` (the reasons whose close is a RST).
    """

    # Slots: a server holds one of these per connection, and a __dict__ would be its largest
    # part. Nothing is created before it is needed for the same reason: an idle connection
    # holds no frame queue and no send queue.
    __slots__ = (
        "__weakref__",
        "_bytes_in",
        "_detail",
        "_error",
        "_framer",
        "_frames",
        "_graceful",
        "_pinger",
        "_reason",
        "_receive_size",
        "_scope",
        "_send_waiters",
        "_sending",
        "_stream",
        "_tls",
        "_transport",
        "context",
        "opened_at",
        "peer",
    )

    #: The reason each kind of failure is recorded as.
    REASONS: ClassVar[Mapping[Failure, Any]]
    #: Reasons after which the peer is believed gone or displaced: close with RST.
    ABORTIVE: ClassVar[frozenset[Any]]

    def __init__(self, stream: anyio.abc.SocketStream, framer: Framer[F], receive_size: int):
        # The TCP stream stays the connection's for its socket (options, TCP_INFO, FIONREAD,
        # SO_LINGER) once TLS wraps it; _stream is what is read and written: the TCP stream
        # itself, or the TLS stream over it after the handshake (_start_tls).
        self._transport = stream
        self._stream: anyio.abc.ByteStream = stream
        self._tls: Tls | None = None
        self._framer = framer
        self._receive_size = receive_size
        # Frames read but not returned yet; None while there are none (the usual case).
        self._frames: deque[F] | None = None
        # A framer's error waits here until the frames it completed first have been read:
        # what a peer sent correctly reaches the application even when bad bytes follow it.
        self._error: ProtocolError | None = None
        # Covers the connection's whole life in the task that runs it: cancelling it is how
        # any other task ends the connection.
        self._scope = _cancel_scope()
        self._reason: R | None = None
        self._detail = ""
        # FIN sent, still reading for a grace period (the server's graceful close).
        self._graceful = False
        self._bytes_in = 0
        # The send lock, as a flag: True while a send is in progress. Tasks that find it taken
        # wait in _send_waiters, made only then (most connections never have two senders).
        self._sending = False
        self._send_waiters: deque[anyio.Event] | None = None
        self._pinger: Pinger | None = None
        self.opened_at = anyio.current_time()
        #: The peer's address as the socket reports it, e.g. ("127.0.0.1", 50312).
        self.peer: Any = _extra(stream, SocketAttribute.remote_address)
        #: Free for the application (protocol state, the device record, ...). Dropped (set
        #: to None) once the connection is finished, after its handler and its close event.
        self.context: Any = None

    # -- state

    @property
    def reason(self) -> R | None:
        """Why this connection is closing or closed, or None while it is open."""
        return self._reason

    @property
    def detail(self) -> str:
        """Words to go with :attr:`reason` (an errno name, an exception text)."""
        return self._detail

    @property
    def rtt(self) -> float | None:
        """The last measured round-trip time of a ping (heartbeat only)."""
        return None if self._pinger is None else self._pinger.rtt

    @property
    def bytes_received(self) -> int:
        """Bytes read from the socket so far."""
        return self._bytes_in

    @property
    def stream(self) -> anyio.abc.ByteStream:
        """The anyio stream the connection reads and writes: the TCP stream, or the TLS stream
        over it once the handshake is done (for extras; read through :meth:`receive`). Its
        extras include the socket's (``SocketAttribute``) either way."""
        return self._stream

    def raw_socket(self) -> socket.socket:
        """The connection's TCP socket, for options and TCP_INFO (under TLS too)."""
        sock: socket.socket = self._transport.extra(SocketAttribute.raw_socket)
        return sock

    @property
    def tls_version(self) -> str | None:
        """The TLS version in use (``"TLSv1.3"``), or None without TLS or before its handshake."""
        return None if self._tls is None else self._tls.extra(TLSAttribute.tls_version)

    @property
    def peer_certificate(self) -> dict[str, Any] | None:
        """The peer's certificate, decoded as :meth:`ssl.SSLSocket.getpeercert` does (``subject``,
        ``issuer``, ``subjectAltName``, ``notAfter``, ...), so that an identity can come from it.

        None without TLS, before the handshake, or when the peer sent no certificate; an empty
        dict when the context does not verify certificates (``verify_mode`` CERT_NONE), since
        an unverified certificate proves nothing.
        """
        if self._tls is None:
            return None
        return self._tls.extra(TLSAttribute.peer_certificate)

    # -- reading and writing

    def receive(self) -> Coroutine[Any, Any, F]:
        """The next complete frame.

        Raises anyio.EndOfStream when the peer has closed, ProtocolError when its bytes
        cannot be framed (only once every frame before the bad bytes has been returned), and
        SessionClosed once the connection is closing.
        """
        return self._next_frame(anyio.EndOfStream)

    async def _next_frame(self, at_eof: type[Exception]) -> F:
        # receive() and __anext__ both return this coroutine directly, rather than awaiting
        # it in one of their own: one suspended frame less per idle connection. At EOF it
        # raises ``at_eof`` (StopAsyncIteration for ``async for``).
        while True:
            frames = self._frames
            if frames:
                frame = frames.popleft()
                if not frames:
                    self._frames = None
                return frame
            if self._error is not None:
                self._record_failure(Failure.PROTOCOL, str(self._error))
                raise self._error
            if self._reason is not None and not self._graceful:
                raise SessionClosed(f"connection is closing ({self._reason.name})")
            try:
                data = await self._stream.receive(self._receive_size)
            except anyio.EndOfStream:
                self._at_eof()
                if at_eof is anyio.EndOfStream:
                    raise
                raise at_eof from None
            except TRANSPORT_ERRORS as exc:
                self._transport_failed(exc)
                raise
            self._bytes_in += len(data)
            self._feed(data)
            if self._frames:
                self._showed_life()

    def _feed(self, data: bytes) -> None:
        frames = self._frames
        if frames is None:
            frames = self._frames = deque()
        try:
            # Extending one frame at a time keeps the frames a generator framer yielded before
            # it raised; a list-returning framer hands those over on the error (its .frames).
            frames.extend(self._framer.feed(data))
        except ProtocolError as exc:
            frames.extend(exc.frames)
            self._error = exc

    def __aiter__(self: C) -> C:
        return self

    def send_nowait(self, data: bytes) -> bool:
        """Send bytes to the peer now, without waiting, if this transport can (the native
        one on asyncio and uvloop can); False if nothing was sent: on an anyio stream, or
        once the connection is closing. For ``on_frame`` (see :class:`~keepconn.Server`)."""
        return False

    async def send(self, data: bytes) -> None:
        """Send bytes to the peer. Callbacks must write through this method, never through
        ``stream`` directly: the handler and the ping task may send at the same time, and
        the lock keeps their frames whole."""
        self._check_writable()
        if self._sending:
            await self._wait_to_send()
        else:
            self._sending = True
        try:
            await self._stream.send(data)
        except TRANSPORT_ERRORS as exc:
            self._transport_failed(exc)
            raise
        finally:
            self._done_sending()

    async def _wait_to_send(self) -> None:
        """Wait until the send in progress (and those queued before ours) is done; the turn
        is then ours (``_sending`` stays True, handed over by :meth:`_done_sending`)."""
        turn = anyio.Event()
        waiters = self._send_waiters
        if waiters is None:
            waiters = self._send_waiters = deque()
        waiters.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():
                self._done_sending()  # handed the turn as we were cancelled: pass it on
            else:
                waiters.remove(turn)
            raise

    def _done_sending(self) -> None:
        waiters = self._send_waiters
        if waiters:
            waiters.popleft().set()  # first come, first served, as anyio.Lock does
        else:
            self._sending = False
            self._send_waiters = None

    # -- TLS

    async def _start_tls(
        self, context: ssl.SSLContext, *, server_side: bool, hostname: str | None = None
    ) -> None:
        """Run the TLS handshake; from then on the connection reads and writes through TLS.

        The caller bounds it (the hello timeout) and turns its exceptions into a reason:
        ssl.SSLError for a failed handshake, anyio.EndOfStream or a transport error otherwise.
        """
        self._tls = await start_tls(
            self._transport, context, server_side=server_side, hostname=hostname
        )
        self._stream = self._tls

    async def _handshake(
        self, context: ssl.SSLContext, *, server_side: bool, hostname: str | None = None
    ) -> bool:
        """The TLS handshake (:meth:`_start_tls`); False, with the connection's reason
        recorded, if it failed. The caller bounds it (the hello timeout)."""
        try:
            await self._start_tls(context, server_side=server_side, hostname=hostname)
        except anyio.EndOfStream:
            self._record_failure(Failure.EOF, "during the TLS handshake")
        except TRANSPORT_ERRORS as exc:  # ssl.SSLError is an OSError
            words = handshake_failure(exc)
            if words is not None:
                self._record_failure(Failure.TLS, words)
            else:
                failure, detail = failure_of(exc)
                if self.REASONS[failure] is None:
                    # Not an application bug, whatever the exception: the transport broke.
                    failure = Failure.BROKEN
                self._record_failure(failure, f"{detail} during the TLS handshake")
        else:
            return True
        return False

    def _frames_waiting(self) -> int:
        """Complete frames read from the peer that the handler has not taken yet."""
        frames = self._frames
        return len(frames) if frames else 0

    def _tls_buffered(self) -> int:
        """Bytes TLS has taken from the kernel that were not read yet (0 without TLS)."""
        return 0 if self._tls is None else self._tls.buffered()

    # -- closing

    def _record(self, reason: R, detail: str = "") -> bool:
        """The one place a reason is set: the first one given wins. True if this one did."""
        if self._reason is not None:
            return False
        self._reason = reason
        self._detail = detail
        return True

    def _record_failure(self, failure: Failure, detail: str) -> None:
        reason = self.REASONS[failure]
        if reason is not None:
            self._record(reason, detail)

    def _end(self, reason: R, detail: str = "") -> None:
        """Record ``reason`` (first wins) and end the connection's life now."""
        self._record(reason, detail)
        self._scope.cancel()

    def _resets(self) -> bool:
        """Whether the coming close is a RST rather than a FIN."""
        return self._reason in self.ABORTIVE

    async def _close_socket(self) -> None:
        """Close the socket, abortively when :meth:`_resets` says so. Shield the call."""
        if self._resets():
            # No close_notify before a RST: the peer is gone or displaced, and the RST drops
            # whatever was still queued anyway.
            try:
                abort_on_close(self.raw_socket())
            except (OSError, ValueError, anyio.TypedAttributeLookupError):
                pass  # already closed underneath us (uvloop reports a negative descriptor)
        elif self._tls is not None and self._may_notify_close():
            # A FIN under TLS goes after close_notify, so the peer's TLS library reads a clean
            # end rather than a truncation. Handed to the kernel, never waited on.
            with anyio.move_on_after(FLUSH_WAIT):
                try:
                    await self._tls.say_close_notify()
                except TRANSPORT_ERRORS:
                    pass
        try:
            await self._stream.aclose()
        except (OSError, anyio.BrokenResourceError):
            pass

    # -- heartbeat

    async def _ping_loop(
        self: C,
        send_ping: Callable[[C], Awaitable[None]],
        on_dead: Callable[[C, str], None],
        spare: Callable[[C], bool] | None = None,
    ) -> None:
        """Send pings as the connection's :class:`Pinger` says, until it declares the peer
        dead (then ``on_dead(conn, detail)`` and return). ``spare(conn)``, asked of a peer
        whose pings went unanswered: True keeps it for one more answer's wait."""
        pinger = self._pinger
        assert pinger is not None
        while True:
            await anyio.sleep(max(0.0, pinger.next_deadline() - anyio.current_time()))
            now = anyio.current_time()
            action = pinger.poll(now)
            if action is PingAction.DEAD:
                if spare is not None and spare(self):
                    pinger.spared(now)
                    continue
                on_dead(self, f"{pinger.misses} pings unanswered")
                return
            if action is PingAction.SEND_PING:
                # The ping counts as sent now, and its send gets no longer than its answer
                # would: a peer whose buffers are full (stopped, or gone with data in flight)
                # is declared dead on time, not whenever the send gives up. A send cut off
                # may have left half a frame on the wire, so the connection cannot go on.
                pinger.ping_sent(now)
                with anyio.move_on_after(max(0.0, pinger.next_deadline() - now)) as stuck:
                    await send_ping(self)
                if stuck.cancelled_caught:
                    on_dead(self, "ping could not be sent")
                    return

    # -- hooks for the two sides

    def _at_eof(self) -> None:
        """The peer closed its side (EOF was read)."""
        self._record_failure(Failure.EOF, "")

    def _transport_failed(self, exc: BaseException) -> None:
        """A read or write failed (the exception propagates after this)."""
        self._record_failure(*failure_of(exc))

    def _showed_life(self) -> None:
        """At least one complete frame arrived."""

    def _drop_references(self) -> None:
        # Once the connection is finished. The application's record of it often refers back
        # to it (the gateway's device keeps it for deliveries), and so does the framer's error
        # it keeps to raise again (raised into the handler, it holds the frames that refer to
        # the connection): kept, either would be a reference cycle, freed only by a full
        # collection, which after a storm of closes is what stalls the loop.
        self.context = None
        self._error = None

    def _may_notify_close(self) -> bool:
        """Whether a FIN close under TLS may still send close_notify first (not when a FIN is
        out already)."""
        return True

    def _check_writable(self) -> None:
        """Raise SessionClosed if nothing may be sent any more."""
        if self._reason is not None:
            raise SessionClosed(f"connection ended ({self._reason.name})")


def _cancel_scope() -> anyio.CancelScope:
    """A new cancel scope. On trio, trio's own: anyio's is a wrapper around one there, an
    object more per connection, and what a connection asks of its scope (``with``,
    ``cancel()``, ``deadline``, ``cancel_called``, ``cancelled_caught``) is the same on both."""
    if sniffio.current_async_library() == "trio":
        import trio  # only on trio: it is an optional dependency

        return cast("anyio.CancelScope", trio.CancelScope())
    return anyio.CancelScope()


def _extra(stream: anyio.abc.SocketStream, attribute: Any) -> Any:
    try:
        return stream.extra(attribute)
    except (anyio.TypedAttributeLookupError, OSError):
        return None

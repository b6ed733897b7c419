"""The server's connection as an asyncio Protocol: the event loop hands it bytes, it frames them.

A :class:`NativeConnection` is a :class:`~keepconn.Connection` (same methods, same reasons,
same close rules) whose bytes come from ``data_received`` instead of an anyio stream. What an
idle connection holds is the transport, this object, its framer and session, and the one
suspended ``receive()`` future of its handler: no stream protocol with its queues and events,
no send lock, no cancel scope. Reading pauses while complete frames wait for a busy
handler, as anyio's stream reads only when asked: the kernel holds the rest, and the reaper's
FIONREAD question still finds them.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio
import anyio.abc

from .._anyio.connection import Connection
from .._anyio.failures import Failure
from .._core.errors import ProtocolError, SessionClosed
from .._core.events import ServerEvent
from .._core.framing import Framer
from .._core.reasons import CloseReason
from .._core.registry import Session
from .gate import HelloGate
from .stream import NativeStream
from .transport import break_transport_cycle, close_transport

if TYPE_CHECKING:
    import socket

__all__ = ["NativeConnection"]

F = TypeVar("F")


class NativeConnection(Connection[F], asyncio.Protocol):
    """A server connection fed by asyncio's ``data_received`` (asyncio and uvloop, plain TCP).

    ``receive()`` returns a future rather than a coroutine (await it the same way): the
    handler suspended on it costs one future, not a chain of coroutine frames.
    """

    # The native fields in slots: with the inherited ones they would pass the 30 keys an
    # instance dictionary can share with its class, and every connection would get its own.
    __slots__ = (
        "_adapter",
        "_cancelling",
        "_drained",
        "_early",
        "_end_kind",
        "_gate",
        "_gated",
        "_gone",
        "_loop",
        "_lost",
        "_on_frame",
        "_on_served",
        "_paused",
        "_queued",
        "_task",
        "_timer",
        "_turned",
        "_waiter",
        "_wire",
    )

    def __init__(
        self,
        framer: Framer[F],
        *,
        on_event: Callable[[ServerEvent], None],
        order: int,
        loop: asyncio.AbstractEventLoop,
        gate: HelloGate | None = None,
        on_frame: Callable[[NativeConnection[F], F], bool] | None = None,
        early: bytes | OSError | None = None,
    ) -> None:
        # Not Connection.__init__: that one wraps an anyio stream. The fields its inherited
        # methods read are set here; the anyio ones (stream, send lock, scope) do not exist.
        self._loop = loop
        self._wire: asyncio.Transport | None = None
        self._task: asyncio.Future[None] | None = None
        self._on_served: Callable[[NativeConnection[F], asyncio.Future[None]], None] | None = None
        self._tls = None
        self._framer = framer
        self._queued: deque[F] | None = None
        self._error: ProtocolError | None = None
        self._reason: CloseReason | None = None
        self._detail = ""
        self._graceful = False
        self._bytes_in = 0
        self._pinger = None
        self.opened_at = loop.time()
        self.peer: Any = None
        self.context: Any = None
        self._emit = on_event
        self._order = order
        self._session: Session | None = None
        self._policer = None
        self._peer_closed = False
        self._spare_mark: int | None = None
        self._eof_sent = False
        self._inode = 0
        # The handler's pending receive(), the senders' wait for the write buffer to drain.
        self._waiter: asyncio.Future[F] | None = None
        self._end_kind: type[Exception] = anyio.EndOfStream
        self._drained: asyncio.Future[None] | None = None
        self._paused = False
        # What connection_lost reported: an OSError, or None for a clean close.
        self._lost: BaseException | None = None
        self._gone = False
        # Set when this connection cancels its own task (close, timeouts): swallowed then.
        self._cancelling = False
        self._timer: asyncio.TimerHandle | None = None
        self._adapter: NativeStream | None = None
        # The gate that rations hellos per loop turn, until this connection's first frames
        # have passed it (None then); _gated while they wait in it.
        self._gate = gate
        self._gated = False
        # Whether the task has waited in a receive since its last send (see send).
        self._turned = False
        self._on_frame = on_frame  # Server(on_frame=...), see _offer
        # What a read before the transport existed found (keepconn._asyncio.life): bytes
        # to feed once it does, or the socket's error. None once connection_made took it.
        self._early = early

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, but quack alike.)
        self._wire = wire = cast("asyncio.Transport", transport)
        # As anyio's streams: a send waits until its bytes are in the kernel, so that nothing
        # queues in the process behind a slow peer (a ping stays one kernel buffer from it).
        wire.set_write_buffer_limits(0)
        self.peer = transport.get_extra_info("peername")
        try:
            self._inode = os.fstat(transport.get_extra_info("socket").fileno()).st_ino
        except (OSError, ValueError, AttributeError):
            self._inode = 0
        early, self._early = self._early, None
        if isinstance(early, OSError):
            # The read took the socket's error (a reset): reported as the transport's own
            # read would have (connection_lost keeps it).
            self._lost = early
            wire.abort()
        elif early:
            self.data_received(early)

    def data_received(self, data: bytes) -> None:
        self._bytes_in += len(data)
        frames: list[F] = []
        try:
            # Extended one frame at a time: a generator framer's frames before its error stay.
            frames.extend(self._framer.feed(data))
        except ProtocolError as exc:
            frames.extend(exc.frames)
            self._error = exc
            # The framer is finished: nothing more is read.
            self._pause()
        if frames:
            self._showed_life()
            gate = self._gate
            if gate is not None:
                self._gate = None
                self._gated = not gate.admit(self)
            queued = self._queued
            waiter = self._waiter
            # (Frames of a connection waiting in the gate are queued: reading pauses below.)
            if not self._gated and queued is None and waiter is not None and not waiter.done():
                # The usual case (a ping): the handler waits, nothing is queued before these:
                # the first frame on_frame declines goes to it at once, the rest to a queue.
                first = 0
                if self._on_frame is not None and self._session is not None:
                    first = self._offer(frames, waiter)
                # (on_frame may have closed the connection: the waiter has its end then.)
                if first < len(frames) and not waiter.done():
                    self._waiter = None
                    waiter.set_result(frames[first])
                    first += 1
                if first < len(frames):
                    self._queued = deque(frames[first:] if first else frames)
            elif queued is None:
                self._queued = deque(frames)
            else:
                queued.extend(frames)
        self._wake()
        if self._queued:
            # Frames wait for a handler that is busy: read no more until it takes them, so
            # the peer's further bytes wait in the kernel (TCP's own backpressure), where the
            # reaper's FIONREAD question finds them if the handler stays busy past a deadline.
            self._pause()

    def _offer(self, frames: list[F], waiter: asyncio.Future[F]) -> int:
        """Offer ``frames`` to on_frame in order; the index of the first it declines. What it
        raises goes to the waiting handler, as the handler's own code raising would."""
        on_frame = cast("Callable[[NativeConnection[F], F], bool]", self._on_frame)
        for i, frame in enumerate(frames):
            try:
                if not on_frame(self, frame):
                    return i
            except Exception as exc:
                if not waiter.done():  # else the connection is closing already
                    self._waiter = None
                    waiter.set_exception(exc)
                return len(frames)
        return len(frames)

    def eof_received(self) -> bool:
        self._peer_closed = True
        self._wake()
        # Keep the transport open for writing: the handler may still answer the frames before
        # the FIN; it closes as soon as the handler sees the end.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        if exc is not None:  # (else what an early read found, if anything, stays)
            self._lost = exc
        break_transport_cycle(self._wire)
        self._wake()
        self.resume_writing()  # a sender waiting for the buffer to drain sees the end

    def pause_writing(self) -> None:
        if self._drained is None or self._drained.done():
            self._drained = self._loop.create_future()

    def resume_writing(self) -> None:
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    # -- reading

    def receive(self) -> asyncio.Future[F]:  # type: ignore[override]
        """The next complete frame (await it), as :meth:`Connection.receive`."""
        return self._next(anyio.EndOfStream)

    def __anext__(self) -> asyncio.Future[F]:  # type: ignore[override]
        return self._next(StopAsyncIteration)

    def _next(self, end: type[Exception]) -> asyncio.Future[F]:
        waiter: asyncio.Future[F] = self._loop.create_future()
        if self._gated or not self._settle_waiter(waiter, end):
            self._waiter = waiter
            self._end_kind = end
            self._turned = True
        return waiter

    def _gate_opened(self) -> None:
        """The hello gate lets this connection's first frames on (a later loop turn)."""
        self._gated = False
        self._wake()

    def _wake(self) -> None:
        if self._gated:
            return  # the frames wait for the hello gate; so does what follows them
        waiter = self._waiter
        if waiter is not None and (waiter.done() or self._settle_waiter(waiter, self._end_kind)):
            self._waiter = None

    def _settle_waiter(self, waiter: asyncio.Future[F], end: type[Exception]) -> bool:
        """Give ``waiter`` what a receive() would return or raise now; False if it must wait."""
        frames = self._queued
        if frames:
            waiter.set_result(frames.popleft())
            if not frames:
                self._queued = None
                if self._paused and self._error is None:
                    self._paused = False
                    if self._wire is not None and not self._gone:
                        self._wire.resume_reading()
            return True
        if self._error is not None:
            self._record_failure(Failure.PROTOCOL, str(self._error))
            waiter.set_exception(self._error)
        elif self._reason is not None and not self._graceful:
            waiter.set_exception(SessionClosed(f"connection is closing ({self._reason.name})"))
        elif self._lost is not None:
            self._transport_failed(self._lost)
            broken = anyio.BrokenResourceError()
            broken.__cause__ = self._lost
            waiter.set_exception(broken)
        elif self._peer_closed or self._gone:
            self._at_eof()
            # EndOfStream for receive(), StopAsyncIteration for ``async for``.
            waiter.set_exception(end())
        else:
            return False
        return True

    def _frames_waiting(self) -> int:
        queued = self._queued
        return len(queued) if queued else 0

    def _pause(self) -> None:
        if not self._paused and self._wire is not None and not self._gone:
            self._paused = True
            self._wire.pause_reading()

    # -- writing

    def send_nowait(self, data: bytes) -> bool:
        """Send bytes now (to the kernel, or behind what the transport still buffers); False,
        nothing sent, once the connection is closing."""
        wire = self._wire
        if self._eof_sent or self._reason is not None or wire is None or wire.is_closing():
            return False
        wire.write(data)
        return True

    def ping_received(self) -> None:
        """:meth:`Connection.ping_received` on the loop's clock (on_frame runs outside tasks)."""
        policer = self._policer
        if policer is not None and not policer.ping(self._loop.time()):
            self.close(CloseReason.TOO_MANY_PINGS, f"{policer.strikes} early pings")

    async def send(self, data: bytes) -> None:
        """Send bytes to the peer; waits while the kernel cannot take them all yet."""
        self._check_writable()
        wire = self._wire
        if wire is None or wire.is_closing():
            raise self._broken()
        wire.write(data)
        drained = self._drained
        if drained is not None and not drained.done():
            await asyncio.shield(drained)
            if self._gone:
                raise self._broken()
        elif self._turned and asyncio.current_task(self._loop) is self._task:
            # The answer to a frame the task waited for (a PINGRESP): the loop has run since
            # its last send, so this one need not yield: a task step less per ping. (Without
            # the loop, current_task() makes a getpid() system call to find it.)
            self._turned = False
        else:
            # The kernel took it all at once: still let the other tasks run (anyio's send is
            # a checkpoint too), or a task sending in a loop (a second send in a row, another
            # task's) would hold the event loop until the kernel's buffer is full.
            await asyncio.sleep(0)

    def _broken(self) -> Exception:
        if self._lost is not None:
            self._transport_failed(self._lost)
            broken = anyio.BrokenResourceError()
            broken.__cause__ = self._lost
            return broken
        return anyio.ClosedResourceError()

    @property
    def stream(self) -> anyio.abc.ByteStream:
        """A write-only anyio stream over this connection, for the ``refuse`` callback and as
        a stable key; frames are read through :meth:`receive`."""
        if self._adapter is None:
            self._adapter = NativeStream(self)
        return self._adapter

    def raw_socket(self) -> socket.socket:
        """The connection's TCP socket (asyncio's TransportSocket, uvloop's pseudo-socket)."""
        if self._wire is None:
            raise ValueError("not connected")
        sock: socket.socket = self._wire.get_extra_info("socket")
        if sock is None:
            raise ValueError("transport closed")
        return sock

    # -- the runtime's hooks

    def _showed_life(self) -> None:
        if self._session is not None:
            self._session.touch(self._loop.time())
            self._spare_mark = None

    def _start(
        self,
        task: asyncio.Future[None],
        served: Callable[[NativeConnection[F], asyncio.Future[None]], None] | None = None,
    ) -> None:
        """The task that runs this connection's life now (cancelled by :meth:`_end`), and
        what to call when it is done, for the session's task (see :meth:`_served`)."""
        pending = self._cancelling
        self._task = task
        self._cancelling = False
        self._on_served = served
        if pending:
            self._cancel_task()  # a close that came while the task was being handed over

    def _served(self, task: asyncio.Future[None]) -> None:
        # The session task's done callback (its one object is this bound method).
        if self._on_served is not None:
            self._on_served(self, task)

    def _end(self, reason: CloseReason, detail: str = "") -> None:
        self._record(reason, detail)
        self._cancel_task()
        self._wake()

    def _cancel_task(self) -> None:
        task = self._task
        if task is not None and not task.done() and not self._cancelling:
            self._cancelling = True
            task.cancel()

    def _own_cancel(self) -> bool:
        """Whether the task's cancellation came from this connection (then it is swallowed)."""
        if not self._cancelling:
            return False
        self._cancelling = False
        # Python 3.11 counts cancellations; one swallowed must be uncounted (3.10 has none).
        uncancel = getattr(self._task, "uncancel", None)
        if uncancel is not None:
            uncancel()
        return True

    def _cancel_requested(self) -> bool:
        return self._cancelling

    def _end_at(self, when: float, reason: CloseReason) -> None:
        """Close with ``reason`` at loop time ``when``, unless another deadline comes first."""
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._timer = self._loop.call_at(when, self._deadline_passed, reason)

    def _deadline_passed(self, reason: CloseReason) -> None:
        self._timer = None
        self._end(reason)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _end_life_by(self, deadline: float) -> None:
        self._end_at(deadline, CloseReason.MAX_AGE)

    def _begin_graceful(self, reason: CloseReason, grace: float, detail: str = "") -> bool:
        if not self._record(reason, detail):
            return False
        self._graceful = self._eof_sent = True
        # The reason is recorded already: the timer's own reason cannot replace it.
        self._end_at(self._loop.time() + grace, reason)
        return True

    async def shutdown(
        self, reason: CloseReason = CloseReason.APPLICATION, grace: float = 2.0
    ) -> None:
        """Close gracefully: FIN now, keep reading for up to ``grace`` s, then close."""
        self._close_gracefully(reason, grace)

    def _close_gracefully(self, reason: CloseReason, grace: float, detail: str = "") -> None:
        if not self._begin_graceful(reason, grace, detail):
            return
        if not self._write_eof():
            self._cancel_task()

    def _write_eof(self) -> bool:
        """Send FIN once the write buffer has gone out (nothing queued is cut off); False if
        the transport is closed already."""
        wire = self._wire
        if wire is None or wire.is_closing():
            return False
        try:
            wire.write_eof()
        except (OSError, RuntimeError):
            return False
        self._eof_sent = True
        return True

    def _close_now(self) -> None:
        """Close the transport: a RST for the dead and displaced (see ``_resets``), else a
        FIN after what is buffered (see :func:`close_transport`)."""
        self._cancel_timer()
        if self._wire is not None and not self._gone:
            close_transport(self._wire, self._loop, reset=self._resets())

    def _aged_out(self) -> bool:
        return False

    def _release(self) -> None:
        """The connection is finished: drop what refers back to it (its task, whose frames
        and exception hold it; its stream adapter), so that reference counting frees it at
        once: left to the cyclic collector after a storm, such garbage stalled the loop."""
        self._task = None
        self._on_served = None
        self._adapter = None
        self._waiter = None

    def __repr__(self) -> str:
        who = "hello" if self._session is None else repr(self._session.key)
        return f"<Connection {who} peer={self.peer!r} reason={self._reason} native>"

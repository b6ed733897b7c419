"""A native connection's life: the same steps as :class:`~keepconn._anyio.life.Lifecycle`
(admission, hello, session, handler, the one close), on a plain asyncio task.

What differs is only how time and ends are carried out: the hello timeout, max_age and a
graceful close's grace are loop timers that close the connection, a close cancels the task
(which its life swallows, as a cancel scope would), the ping loop is a task beside the
handler only while a heartbeat is configured, and the socket closes synchronously.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
import ssl
from collections.abc import Callable
from typing import TypeVar

import sniffio

from .._anyio.connection import Connection
from .._anyio.failures import Failure, failure_of
from .._anyio.life import Callback, Lifecycle
from .._core.config import Hello
from .._core.reasons import CloseReason
from .connection import NativeConnection
from .gate import HelloGate

__all__ = ["NativeLifecycle"]

logger = logging.getLogger("keepconn.server")

F = TypeVar("F")


class NativeLifecycle(Lifecycle[F]):
    """A :class:`Lifecycle` that also runs native connections (:meth:`run_socket`)."""

    #: The context the sessions' done callbacks run in: the server's, as its tasks' are.
    _context: contextvars.Context | None = None
    _on_served: Callable[[NativeConnection[F], asyncio.Future[None]], None] | None = None
    #: What rations the hellos each loop turn serves (see keepconn._asyncio.gate).
    _hello_gate: HelloGate | None = None

    def start(self, sock: socket.socket, order: int) -> None:
        """Serve an accepted socket on a task of its own."""
        loop = asyncio.get_running_loop()
        make = getattr(loop, "_make_socket_transport", None)
        early = None if make is None else _read_early(sock)
        try:
            framer = self._framer()
        except Exception:
            logger.exception("framer factory failed; closing the new connection")
            sock.close()
            return
        gate = self._hello_gate
        if gate is None:
            gate = self._hello_gate = HelloGate(loop)
        conn: NativeConnection[F] = NativeConnection(
            framer,
            on_event=self._emit,
            order=order,
            loop=loop,
            gate=gate,
            on_frame=self._on_frame,
            early=early,
        )
        if make is None:
            # uvloop: its own transport, from the public call on the connection's task.
            loop.create_task(self.run_socket(conn, sock))
            return
        # asyncio's selector loop: its transport made here, as connect_accepted_socket makes
        # it (CPython 3.8 to 3.13), without the future that call then waits on. In the next
        # turn the transport calls connection_made, which feeds what the early read found
        # (a device sends its hello right after its handshake), and the task's first step
        # comes right after it, with the hello there to read: CONNACK in the turn after the
        # accept, three turns sooner than through the public call. In a storm every turn is
        # as long as everything else the loop serves in it.
        try:
            make(sock, conn)
        except BaseException:
            sock.close()  # the peer may be gone already; nothing was opened
            raise
        loop.create_task(self.run_socket(conn, None))

    async def run_socket(self, conn: NativeConnection[F], sock: socket.socket | None) -> None:
        """Serve one accepted connection until it closes (see :meth:`Lifecycle.run`); ``sock``
        is its socket when its transport is still to be made."""
        if sock is not None:
            try:
                loop = asyncio.get_running_loop()
                await loop.connect_accepted_socket(_factory(conn), sock)
            except BaseException:
                sock.close()  # the peer may be gone already; nothing was opened
                raise
        task = asyncio.current_task()
        assert task is not None
        conn._start(task)
        # Not kept in this frame: a cancelled task's exception holds the frame, which would
        # hold the task (a cycle left to the cyclic collector, see NativeConnection._release).
        del task
        self._opened(conn)
        handed_over = False
        try:
            if await self._prelude(conn, None):
                # The session gets a task whose coroutine is the handler's own: an idle
                # connection then holds one suspended frame, not this one around it too.
                if self._context is None or self._on_served is None:
                    self._context = contextvars.copy_context()
                    self._on_served = self._served  # one bound method for all connections
                serving = asyncio.ensure_future(self._session(conn))
                conn._start(serving, self._on_served)
                serving.add_done_callback(conn._served, context=self._context)
                handed_over = True
        except BaseException as exc:
            if self._ended_by(conn, exc):
                raise
        finally:
            if not handed_over:
                self._finish_now(conn)

    def _ended_by(self, conn: NativeConnection[F], exc: BaseException) -> bool:
        """Account for ``exc`` ending the connection's task; True if it must travel on."""
        # A close (or timeout) of the connection's own cancels its task: that ends the life
        # like a cancel scope's end would, and goes no further.
        if isinstance(exc, asyncio.CancelledError) and conn._own_cancel():
            return False
        return self._failed(conn, exc)

    def _served(self, conn: NativeConnection[F], task: asyncio.Future[None]) -> None:
        """The session's task is done (a done callback, outside any task): account for its
        end as the task would have."""
        previous = sniffio.thread_local.name
        # anyio's clock and cancellation class are asked of the running library, which a
        # callback outside a task leaves sniffio unable to tell.
        sniffio.thread_local.name = "asyncio"
        try:
            if task.cancelled():
                # Cancelled from outside (the loop going away) it is recorded as SHUTDOWN,
                # and goes no further: there is no task here to cancel.
                self._ended_by(conn, asyncio.CancelledError())
            else:
                exc = task.exception()
                if exc is not None and self._ended_by(conn, exc):
                    raise exc  # KeyboardInterrupt and the like, to the event loop
        finally:
            try:
                self._finish_now(conn)
            finally:
                sniffio.thread_local.name = previous

    def _finish_now(self, conn: NativeConnection[F]) -> None:
        reason = self._settled(conn)
        conn._close_now()
        self._account(conn, reason)
        conn._release()

    def abort_native(self) -> None:
        """End every native connection now (the server is going away without a drain)."""
        for conn in list(self.connections):
            if isinstance(conn, NativeConnection):
                conn.close(CloseReason.SHUTDOWN)

    # -- the steps that differ

    async def _hello(self, conn: Connection[F], tls: ssl.SSLContext | None) -> Hello | None:
        if not isinstance(conn, NativeConnection):
            return await super()._hello(conn, tls)
        conn._end_at(conn._loop.time() + self._config.hello_timeout, CloseReason.HELLO_TIMEOUT)
        try:
            hello = await self._identify(conn)
        except asyncio.CancelledError:
            if conn.reason is CloseReason.HELLO_TIMEOUT and conn._own_cancel():
                return None
            raise
        finally:
            conn._cancel_timer()
        if not isinstance(hello, Hello):
            raise TypeError(f"identify must return a Hello, got {hello!r}")
        return hello

    async def _handle_with_pings(self, conn: Connection[F], send_ping: Callback[F]) -> None:
        if not isinstance(conn, NativeConnection):
            await super()._handle_with_pings(conn, send_ping)
            return
        native: NativeConnection[F] = conn
        pings = asyncio.get_running_loop().create_task(
            conn._ping_loop(send_ping, self._dead, self._spare_silent)
        )

        def ended(task: asyncio.Task[None]) -> None:
            if task.cancelled() or task.exception() is None:
                return
            error = task.exception()
            assert error is not None
            failure, detail = failure_of(error)
            if failure is Failure.OTHER:
                logger.error("ping for %r failed", native, exc_info=error)
            native._record_failure(failure, detail)
            native._cancel_task()

        pings.add_done_callback(ended)
        try:
            await self._handler(conn)
        finally:
            pings.cancel()


#: Bytes the read in the accept turn takes at most (what a hello needs, with room).
EARLY_READ = 65536


def _read_early(sock: socket.socket) -> bytes | OSError:
    """What the peer has sent by the time it is accepted (b"" for nothing yet, or an EOF),
    or the error its socket reports; the transport made next reads everything after."""
    try:
        return sock.recv(EARLY_READ)
    except (BlockingIOError, InterruptedError):
        return b""
    except OSError as exc:
        return exc


def _factory(conn: NativeConnection[F]) -> Callable[[], NativeConnection[F]]:
    # A closure of its own: a lambda in run_socket would keep a cell in the idle task's frame.
    return lambda: conn

"""A TCP listener whose accepted sockets become native connections rather than anyio streams."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable

import anyio
import anyio.abc
import sniffio
from anyio.abc import SocketAttribute

from .._anyio.accept import pause_after
from .._core.config import ServerConfig

__all__ = ["NativeListener", "native_listener"]

logger = logging.getLogger("keepconn.server")

#: Connections taken from the listen queue in one turn of the event loop. An accept that finds a
#: connection waiting does not wait, so in a reconnect storm the loop would otherwise take a
#: whole backlog (thousands) in one go, and every live session would wait behind all of their
#: hellos: seconds of loop lag. Sixteen hellos are a few milliseconds of work; accepting stays
#: far faster than serving what it accepts.
ACCEPT_BATCH = 16


class NativeListener(anyio.abc.SocketListener):
    """Wraps one of anyio's TCP listeners on asyncio: :meth:`serve_sockets` hands each
    accepted bare socket to the native transport. :meth:`accept` still returns an anyio
    stream, so the object stays a listener for anyone else."""

    def __init__(self, inner: anyio.abc.SocketListener, raw: socket.socket) -> None:
        self._inner = inner
        self._raw = raw
        self._loop = asyncio.get_running_loop()
        self._closed = False
        # While serve_sockets() runs: set by aclose(), which ends it.
        self._closing: anyio.Event | None = None
        # Whether the listening socket is in the loop's selector, and the timer that puts it
        # back after an accept that failed for want of a resource.
        self._reading = False
        self._paused: asyncio.TimerHandle | None = None

    @property
    def _raw_socket(self) -> socket.socket:
        return self._raw

    async def accept(self) -> anyio.abc.SocketStream:
        return await self._inner.accept()

    async def serve_sockets(
        self, start: Callable[[socket.socket], None], failed: Callable[[], None]
    ) -> None:
        """Accept connections until the listener closes, and ``start`` each (TCP_NODELAY set,
        as anyio does) in the loop turn whose poll found it.

        Why a reader callback rather than an accept task: an awaited accept is done in one
        turn and seen by its task in the next, two changes to the selector for every wait,
        and one turn more before every takeover's welcome; in a storm each turn is as long as
        everything else the loop serves then. ``failed()`` counts each accept() that failed
        for a reason other than a vanished peer (see :func:`keepconn._anyio.accept.pause_after`).
        """
        if self._closed:
            return
        closing = self._closing = anyio.Event()
        self._resume(start, failed)
        try:
            await closing.wait()
        finally:
            self._stop_reading()
            self._closing = None

    def _readable(self, start: Callable[[socket.socket], None], failed: Callable[[], None]) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self._raw.accept()  # the listening socket is non-blocking
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                pause = pause_after(exc, failed)
                if pause is None:
                    continue
                self._stop_reading()
                self._paused = self._loop.call_later(pause, self._resume, start, failed)
                return
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                start(sock)
            except Exception:
                # The peer may be gone already; one connection, not the listener, is lost.
                logger.exception("could not start an accepted connection; closing it")
                sock.close()

    def _resume(self, start: Callable[[socket.socket], None], failed: Callable[[], None]) -> None:
        self._paused = None
        if self._closing is not None and not self._closed and not self._reading:
            self._loop.add_reader(self._raw.fileno(), self._readable, start, failed)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._raw.fileno())

    async def aclose(self) -> None:
        self._closed = True
        # Out of the loop's selector before the socket closes: its descriptor number is reused
        # by the next socket opened.
        self._stop_reading()
        if self._closing is not None:
            self._closing.set()
        await self._inner.aclose()


def native_listener(
    listener: anyio.abc.SocketListener, config: ServerConfig, tls: ssl.SSLContext | None
) -> anyio.abc.SocketListener:
    """``listener`` wrapped for the native transport when it can serve it (asyncio or uvloop,
    a plain TCP listener, no TLS, ``config.transport`` "auto"); else ``listener`` itself."""
    if config.transport != "auto" or tls is not None or isinstance(listener, NativeListener):
        return listener
    try:
        if sniffio.current_async_library() != "asyncio":
            return listener
        raw = listener.extra(SocketAttribute.raw_socket)
    except (sniffio.AsyncLibraryNotFoundError, anyio.TypedAttributeLookupError):
        return listener
    if raw.family not in (socket.AF_INET, socket.AF_INET6) or raw.type != socket.SOCK_STREAM:
        return listener
    return NativeListener(listener, raw)

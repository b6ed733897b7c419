"""A TCP listener whose accepted sockets become native connections rather than anyio streams."""

from __future__ import annotations

import asyncio
import socket
import ssl

import anyio
import anyio.abc
import sniffio
from anyio.abc import SocketAttribute

from .._core.config import ServerConfig

__all__ = ["NativeListener", "native_listener"]

#: Connections taken from the listen queue back to back before the accept loop lets the event
#: loop run. An accept that finds a connection waiting does not suspend, so in a reconnect
#: storm the loop would otherwise take a whole backlog (thousands) in one go, and every live
#: session would wait behind all of their hellos: seconds of loop lag. Sixteen hellos are a
#: few milliseconds of work; accepting stays far faster than serving what it accepts.
ACCEPT_BATCH = 16


class NativeListener(anyio.abc.SocketListener):
    """Wraps one of anyio's TCP listeners on asyncio: :meth:`accept_socket` hands over the
    bare accepted socket, for the native transport to wrap. :meth:`accept` still returns an
    anyio stream, so the object stays a listener for anyone else."""

    def __init__(self, inner: anyio.abc.SocketListener, raw: socket.socket) -> None:
        self._inner = inner
        self._raw = raw
        self._loop = asyncio.get_running_loop()
        self._accepting: anyio.CancelScope | None = None
        self._closed = False
        # Connections taken since the accept loop last let the event loop run.
        self._burst = 0

    @property
    def _raw_socket(self) -> socket.socket:
        return self._raw

    async def accept(self) -> anyio.abc.SocketStream:
        return await self._inner.accept()

    async def accept_socket(self) -> socket.socket:
        """The next accepted connection's socket (TCP_NODELAY set, as anyio does)."""
        if self._burst >= ACCEPT_BATCH:
            self._burst = 0
            await asyncio.sleep(0)  # see ACCEPT_BATCH
        if self._closed:
            raise anyio.ClosedResourceError
        try:
            sock, _ = self._raw.accept()  # the listening socket is non-blocking
        except (BlockingIOError, InterruptedError):
            sock = await self._wait_and_accept()
            self._burst = 0
        else:
            sock.setblocking(False)
            self._burst += 1
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    async def _wait_and_accept(self) -> socket.socket:
        # The queue is empty: wait for the next connection in the loop's selector.
        with anyio.CancelScope() as scope:
            self._accepting = scope
            try:
                sock, _ = await self._loop.sock_accept(self._raw)
            finally:
                self._accepting = None
        if scope.cancelled_caught:
            raise anyio.ClosedResourceError
        return sock

    async def aclose(self) -> None:
        self._closed = True
        scope = self._accepting
        if scope is not None:
            # A pending accept must leave the loop's selector before the socket closes: its
            # descriptor number is reused by the next socket opened.
            scope.cancel()
            await anyio.lowlevel.checkpoint()
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

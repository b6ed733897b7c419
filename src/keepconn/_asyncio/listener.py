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

    @property
    def _raw_socket(self) -> socket.socket:
        return self._raw

    async def accept(self) -> anyio.abc.SocketStream:
        return await self._inner.accept()

    async def accept_socket(self) -> socket.socket:
        """The next accepted connection's socket (TCP_NODELAY set, as anyio does)."""
        if self._closed:
            raise anyio.ClosedResourceError
        with anyio.CancelScope() as scope:
            self._accepting = scope
            try:
                sock, _ = await self._loop.sock_accept(self._raw)
            finally:
                self._accepting = None
        if scope.cancelled_caught:
            raise anyio.ClosedResourceError
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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

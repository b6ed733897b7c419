"""A TCP listener on trio whose accepted connections are :class:`TrioStream`\\ s.

anyio's trio listener wraps each accepted socket in a trio ``SocketType`` and that in anyio's
stream; this one accepts on the listening stdlib socket itself, so nothing but the stdlib
socket and one :class:`TrioStream` is made per connection.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.abc
import trio
from anyio.abc import SocketAttribute

from .._core.config import ServerConfig
from .stream import TrioStream

__all__ = ["TrioListener", "trio_listener"]


class TrioListener(anyio.abc.SocketListener):
    """Wraps one of anyio's TCP listeners on trio; :meth:`accept` returns a
    :class:`TrioStream`. Closing it closes the anyio listener (and with it the socket)."""

    def __init__(self, inner: anyio.abc.SocketListener, raw: socket.socket) -> None:
        self._inner = inner
        self._raw = raw
        self._closed = False

    @property
    def _raw_socket(self) -> socket.socket:
        return self._raw

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._inner.extra_attributes

    async def accept(self) -> TrioStream:
        """The next connection (TCP_NODELAY set, as anyio does). Errors as anyio's listener
        raises them: ClosedResourceError once closed, BrokenResourceError from the OSError
        of a failed accept (the accept loop reads its errno: EMFILE pauses, ECONNABORTED is
        skipped)."""
        # A checkpoint whether or not a connection waits, as trio's accept is: in a storm the
        # loop takes one connection and lets the live sessions run, never a backlog in one go.
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                sock, _ = self._raw.accept()
                break
            except BlockingIOError:
                pass  # waited on below, out of the except clause (as the stream does)
            except OSError as exc:
                if self._closed or self._raw.fileno() < 0:
                    raise anyio.ClosedResourceError from exc
                raise anyio.BrokenResourceError from exc
            waited = True
            try:
                await trio.lowlevel.wait_readable(self._raw)
            except trio.ClosedResourceError:
                raise anyio.ClosedResourceError from None  # closed while we waited
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            # Reset before we got to it: its stream reports that on the first read.
            pass
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return TrioStream(sock)

    async def aclose(self) -> None:
        # anyio's listener closes the socket and wakes a pending accept (notify_closing).
        self._closed = True
        await self._inner.aclose()


def trio_listener(
    listener: anyio.abc.SocketListener, config: ServerConfig, tls: ssl.SSLContext | None
) -> anyio.abc.SocketListener:
    """``listener`` wrapped for :class:`TrioStream` connections when it can be (a plain TCP
    listener, no TLS, ``config.transport`` "auto"); else ``listener`` itself. Call on trio."""
    if config.transport != "auto" or tls is not None or isinstance(listener, TrioListener):
        return listener
    try:
        raw = listener.extra(SocketAttribute.raw_socket)
    except anyio.TypedAttributeLookupError:
        return listener
    if raw.family not in (socket.AF_INET, socket.AF_INET6) or raw.type != socket.SOCK_STREAM:
        return listener
    # TLS stays on anyio's streams (its TLSStream wraps them), as it does on asyncio.
    return TrioListener(listener, raw)

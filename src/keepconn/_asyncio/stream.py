"""A native connection seen as an anyio byte stream: what ``refuse`` callbacks and extras get."""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

__all__ = ["NativeStream"]


class _Carrier(Protocol):
    """What the stream needs of its connection (a NativeConnection)."""

    peer: Any

    async def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def raw_socket(self) -> socket.socket: ...

    def _write_eof(self) -> bool: ...


class NativeStream(anyio.abc.ByteStream):
    """Writes go through the connection (so its close rules hold); reading is the connection's
    own business (its framer has the bytes), so :meth:`receive` refuses. Made on first use."""

    def __init__(self, conn: _Carrier) -> None:
        self._conn = conn

    async def send(self, item: bytes) -> None:
        await self._conn.send(item)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        raise anyio.BusyResourceError("reading: the connection's framer reads this socket")

    async def send_eof(self) -> None:
        # A half-close only, as anyio's: the connection's reason and life are its own.
        self._conn._write_eof()

    async def aclose(self) -> None:
        self._conn.close()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        conn = self._conn

        def sock() -> socket.socket:
            return conn.raw_socket()

        return {
            SocketAttribute.raw_socket: sock,
            SocketAttribute.family: lambda: sock().family,
            SocketAttribute.local_address: lambda: sock().getsockname(),
            SocketAttribute.remote_address: lambda: conn.peer,
            SocketAttribute.local_port: lambda: sock().getsockname()[1],
            SocketAttribute.remote_port: lambda: conn.peer[1],
        }

"""A tiny line protocol served by keepconn, used by the server tests.

Client -> server lines:  ``HELLO <id> <password> [timeout]``, ``PING``, ``PONG``, ``DATA <x>``,
``BYE``. Server -> client: ``OK``, ``DENIED``, ``PONG``, ``PING``, ``ACK <x>``, ``RETRY <s>``,
``GOAWAY <s>``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import anyio.abc

from keepconn import (
    CloseReason,
    Connection,
    Hello,
    HelloRejected,
    LineFramer,
    Server,
    ServerConfig,
    ServerEvent,
)
from tests.timing import slack

PASSWORD = b"secret"
#: How long the helpers below wait by default for what should come at once (a line, a close,
#: a condition): an allowance, so scaled like every other. A caller passing its own timeout
#: scales its allowance part, not a protocol time it may contain (``hello_timeout + slack(1)``).
WAIT = slack(5.0)
#: (identity, payload) of every DATA line any test server received, in order.
RECEIVED: list[tuple[object, bytes]] = []


async def identify(conn: Connection[bytes]) -> Hello:
    line = await conn.receive()
    parts = line.split()
    if len(parts) not in (3, 4) or parts[0] != b"HELLO":
        await conn.send(b"DENIED\n")
        raise HelloRejected("malformed hello")
    if parts[2] != PASSWORD:
        await conn.send(b"DENIED\n")
        raise HelloRejected("wrong password")
    timeout = float(parts[3]) if len(parts) == 4 else None
    return Hello(parts[1].decode(), timeout=timeout, welcome=b"OK\n", refusal=b"BUSY\n")


async def handler(conn: Connection[bytes]) -> None:
    async for line in conn:
        if line == b"PING":
            conn.ping_received()
            await conn.send(b"PONG\n")
        elif line == b"PONG":
            conn.pong_received()
        elif line.startswith(b"DATA "):
            RECEIVED.append((conn.identity, line[5:]))
            await conn.send(b"ACK " + line[5:] + b"\n")
        elif line == b"BYE":
            return


async def send_ping(conn: Connection[bytes]) -> None:
    await conn.send(b"PING\n")


async def goodbye(conn: Connection[bytes], retry_after: float) -> None:
    await conn.send(b"GOAWAY %.3f\n" % retry_after)


async def refuse(stream: anyio.abc.ByteStream, retry_after: float) -> None:
    await stream.send(b"RETRY %.3f\n" % retry_after)


def make_server(
    config: ServerConfig,
    events: list[ServerEvent] | None = None,
    on_event: Callable[[ServerEvent], None] | None = None,
    identify: Callable[[Connection[bytes]], Awaitable[Hello]] = identify,
) -> Server[bytes]:
    if on_event is None and events is not None:
        on_event = events.append
    return Server(
        identify=identify,
        handler=handler,
        framer=lambda: LineFramer(max_length=1024),
        config=config,
        send_ping=send_ping,
        goodbye=goodbye,
        refuse=refuse,
        on_event=on_event,
    )


@contextlib.asynccontextmanager
async def serving(
    config: ServerConfig,
    host: str = "127.0.0.1",
    events: list[ServerEvent] | None = None,
    on_event: Callable[[ServerEvent], None] | None = None,
    *,
    ssl_context: ssl.SSLContext | None = None,
    identify: Callable[[Connection[bytes]], Awaitable[Hello]] = identify,
) -> AsyncIterator[tuple[Server[bytes], int]]:
    """Run a line-protocol server for the duration of the block; yields (server, port). With
    ``ssl_context`` it serves TLS."""
    server = make_server(config, events, on_event, identify)
    async with anyio.create_task_group() as tasks:
        addresses = await tasks.start(
            lambda task_status: server.serve_tcp(
                host, 0, ssl_context=ssl_context, task_status=task_status
            )
        )
        try:
            yield server, addresses[0][1]
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(slack(15)):
                await server.shutdown()
            tasks.cancel_scope.cancel()


class Client:
    """A line client over an anyio stream (TCP, or TLS over it)."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self._buffer = b""

    @classmethod
    async def connect(
        cls,
        port: int,
        host: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
        *,
        strict: bool = False,
    ) -> Client:
        """Connect; with ``tls``, handshake in that client context (checking ``host``).

        ``strict`` TLS expects close_notify before every EOF (an EOF without one is then a
        BrokenResourceError) and waits for the server's on close; by default neither, so that
        closing a test client never waits on a server that has already gone.
        """
        if tls is None:
            return cls(await anyio.connect_tcp(host, port))
        stream = await anyio.connect_tcp(
            host, port, ssl_context=tls, tls_hostname=host, tls_standard_compatible=strict
        )
        return cls(stream)

    async def send(self, line: bytes) -> None:
        await self.stream.send(line + b"\n")

    async def line(self, timeout: float = WAIT) -> bytes:
        with anyio.fail_after(timeout):
            while b"\n" not in self._buffer:
                self._buffer += await self.stream.receive()
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    async def hello(
        self, ident: str, password: bytes = PASSWORD, timeout: float | None = None
    ) -> bytes:
        extra = b"" if timeout is None else b" %g" % timeout
        await self.send(b"HELLO " + ident.encode() + b" " + password + extra)
        return await self.line()

    async def closed_by_server(self, timeout: float = WAIT) -> bool:
        """Read until the server closes; True on EOF or reset."""
        with anyio.fail_after(timeout):
            try:
                while True:
                    await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return True

    async def aclose(self) -> None:
        await self.stream.aclose()

    def local_port(self) -> int:
        sock: socket.socket = self.stream.extra(anyio.abc.SocketAttribute.raw_socket)
        port: int = sock.getsockname()[1]
        return port


def closes(events: list[ServerEvent], reason: CloseReason) -> list[Any]:
    from keepconn import ConnectionClosed

    return [e for e in events if isinstance(e, ConnectionClosed) and e.reason is reason]


async def wait_for(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


def own_sockets() -> set[int]:
    """The inodes of this process's sockets: a census of a port can hold other processes'
    sockets (a benchmark beside the suite, a port number reused), which a test must not count."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            found.add(int(target[len("socket:[") : -1]))
    return found


async def tracked_objects_per_idle_connection(
    config: ServerConfig, sizes: tuple[int, int] = (100, 300)
) -> float:
    """How many tracked objects (``gc.get_objects()`` after a full collection) a line server
    with ``config`` holds per idle session: the change from ``sizes[0]`` to ``sizes[1]``
    sessions. Plain blocking sockets on the client side (loopback: the kernel completes them
    without the loop), so the count is the server's plus one client socket object each."""
    import gc

    counts = []
    clients: list[socket.socket] = []
    async with serving(config) as (server, port):
        try:
            for size in sizes:
                while len(clients) < size:
                    sock = socket.create_connection(("127.0.0.1", port))
                    sock.sendall(b"HELLO d%d secret\n" % len(clients))
                    clients.append(sock)
                await wait_for(lambda n=size: len(server.registry) == n, timeout=slack(10))
                await anyio.sleep(0.05)
                gc.collect()
                counts.append(len(gc.get_objects()))
        finally:
            for sock in clients:
                sock.close()
    return (counts[1] - counts[0]) / (sizes[1] - sizes[0])


@contextlib.contextmanager
def cyclic_garbage() -> Iterator[Counter[str]]:
    """Count, by type name, the cyclic garbage the block leaves: what only the cyclic
    collector can free (objects reference counting frees at once are not counted). The
    collector is held while the block runs, then one collection that keeps what it finds
    (``DEBUG_SAVEALL``) fills the counter, and the objects are let go."""
    import gc

    found: Counter[str] = Counter()
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield found
    finally:
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            found.update(type(obj).__name__ for obj in gc.garbage)
            gc.garbage.clear()
        finally:
            gc.set_debug(0)
            if enabled:
                gc.enable()

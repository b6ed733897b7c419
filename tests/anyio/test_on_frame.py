"""Server(on_frame=...): a synchronous shortcut past the handler for frames answered at once.

On the native transport (asyncio, uvloop) a session's frame is offered to it where it is framed,
whenever the handler waits and nothing is queued before it; everywhere else every frame goes to
the handler, which therefore handles every kind itself."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
import sniffio

from keepconn import (
    CloseReason,
    Connection,
    LineFramer,
    PingRateLimit,
    Server,
    ServerConfig,
    ServerEvent,
)
from tests.lineapp import Client, closes, identify, wait_for
from tests.timing import slack

from .test_server_edges import server_with

pytestmark = pytest.mark.anyio


def native() -> bool:
    return sniffio.current_async_library() == "asyncio"


@asynccontextmanager
async def running(server: Server[bytes]) -> AsyncIterator[int]:
    """Serve on a loopback port (yielded) for the block; shut down after it."""
    async with anyio.create_task_group() as tasks:
        [(_, port)] = await tasks.start(server.serve_tcp, "127.0.0.1", 0)
        yield port
        await server.shutdown()
        tasks.cancel_scope.cancel()


class Shortcut:
    """A line server whose on_frame answers PING (and raises on BOOM); its handler answers
    both too, and records every line it was given."""

    def __init__(self) -> None:
        self.offered: list[bytes] = []
        self.handled: list[bytes] = []
        self.events: list[ServerEvent] = []

    def on_frame(self, conn: Connection[bytes], line: bytes) -> bool:
        self.offered.append(line)
        if line == b"BOOM":
            raise ValueError("on_frame failed")
        if line != b"PING" or not conn.send_nowait(b"PONG\n"):
            return False
        conn.ping_received()
        return True

    async def handler(self, conn: Connection[bytes]) -> None:
        async for line in conn:
            self.handled.append(line)
            if line == b"PING":
                conn.ping_received()
            await conn.send(b"PONG\n" if line == b"PING" else b"ACK " + line[5:] + b"\n")

    def server(self, **config: object) -> Server[bytes]:
        return Server(
            identify=identify,
            handler=self.handler,
            framer=lambda: LineFramer(max_length=1024),
            config=ServerConfig(admission=None, flapping=None, **config),  # type: ignore[arg-type]
            on_event=self.events.append,
            on_frame=self.on_frame,
        )


async def test_frames_on_frame_takes_never_reach_the_handler_and_the_others_keep_their_order() -> (
    None
):
    app = Shortcut()
    server = app.server()
    async with running(server) as port:
        client = await Client.connect(port)
        assert await client.hello("dev") == b"OK"
        for i in range(5):
            await client.send(b"PING")
            assert await client.line() == b"PONG"
            await client.send(b"DATA %d" % i)
            assert await client.line() == b"ACK %d" % i
        # Several in one read: the ones before a declined frame are taken, the rest queue.
        await client.stream.send(b"PING\nPING\nDATA x\nPING\nDATA y\n")
        assert [await client.line() for _ in range(5)] == [b"PONG"] * 2 + [
            b"ACK x",
            b"PONG",
            b"ACK y",
        ]
        await client.aclose()
    data = [b"DATA %d" % i for i in range(5)]
    if native():
        assert app.handled == [*data, b"DATA x", b"PING", b"DATA y"]
        assert not any(line.startswith(b"HELLO") for line in app.offered)  # the hello never
        assert app.offered[:2] == [b"PING", b"DATA 0"]
    else:
        # Offered nothing: the handler answers everything (anyio streams, trio).
        assert app.offered == []
        assert app.handled == [
            line for pair in zip([b"PING"] * 5, data, strict=True) for line in pair
        ] + [b"PING", b"PING", b"DATA x", b"PING", b"DATA y"]


async def test_what_on_frame_raises_ends_the_session_as_the_handler_raising_would() -> None:
    app = Shortcut()
    server = app.server()
    async with running(server) as port:
        other = await Client.connect(port)
        assert await other.hello("other") == b"OK"
        client = await Client.connect(port)
        assert await client.hello("boom") == b"OK"
        await client.send(b"BOOM")
        if native():
            # Failure.OTHER, as for a handler that raised: an APPLICATION close, logged.
            failed = CloseReason.APPLICATION
            await wait_for(lambda: bool(closes(app.events, failed)), timeout=slack(5))
            [closed] = closes(app.events, failed)
            assert closed.identity == "boom" and "on_frame failed" in closed.detail
        else:
            assert await client.line() == b"ACK "  # the handler's answer to a line it knows not
        # The other session is untouched.
        await other.send(b"PING")
        assert await other.line() == b"PONG"
        await client.aclose()
        await other.aclose()


async def test_send_nowait_sends_on_the_native_transport_and_declines_elsewhere() -> None:
    results: list[bool] = []

    async def handler(conn: Connection[bytes]) -> None:
        async for _ in conn:
            results.append(conn.send_nowait(b"NOW\n"))
            if not results[-1]:
                await conn.send(b"NOW\n")

    server = server_with(handler, ServerConfig(admission=None, flapping=None), [])
    async with running(server) as port:
        client = await Client.connect(port)
        assert await client.hello("now") == b"OK"
        await client.send(b"DATA a")
        assert await client.line() == b"NOW"
        await client.aclose()
    assert results == [native()]


@pytest.mark.parametrize("together", [False, True], ids=["apart", "in_one_write"])
async def test_pings_taken_by_on_frame_are_policed_as_the_handlers_are(together: bool) -> None:
    # ping_received() from on_frame runs outside any task (where it is read): the rate limit
    # still holds, on the loop's clock. In one write, the close comes in the middle of the
    # frames on_frame is offered: the rest queue behind the end the handler is given.
    app = Shortcut()
    server = app.server(ping_rate=PingRateLimit(min_interval=0.2, max_strikes=2))
    async with running(server) as port:
        rude = await Client.connect(port)
        assert await rude.hello("rude") == b"OK"
        if together:
            await rude.stream.send(b"PING\n" * 5)
        else:
            for _ in range(5):
                await rude.send(b"PING")
        assert await rude.closed_by_server()
        rude_pings = CloseReason.TOO_MANY_PINGS
        await wait_for(lambda: bool(closes(app.events, rude_pings)), timeout=slack(5))
        if native():
            assert b"PING" in app.offered
        await rude.aclose()

"""Nothing a peer sent correctly is lost, and a stale hello never displaces a live session.

On real loopback sockets, on asyncio, uvloop and trio: frames that precede a malformed one in
the same write all reach the handler before the connection closes with PROTOCOL_ERROR, and no
other session notices; a hello read late on an older connection of a device cannot take the
session that device has since opened on a newer one.
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

from keepconn import (
    CloseReason,
    LineFramer,
    ProtocolError,
    Server,
    ServerConfig,
    ServerEvent,
)
from tests.lineapp import Client, closes, handler, identify, serving, wait_for
from tests.timing import slack

pytestmark = pytest.mark.anyio

BASE = dict(admission=None, flapping=None)


async def test_good_lines_before_an_overlong_one_in_one_write_all_reach_the_handler() -> None:
    events: list[ServerEvent] = []
    async with serving(ServerConfig(**BASE), events=events) as (server, port):
        bystander = await Client.connect(port)
        assert await bystander.hello("bystander") == b"OK"
        client = await Client.connect(port)
        # The hello, two good frames and a line over the framer's 1,024 bytes, in one write.
        await client.stream.send(
            b"HELLO sender secret\nDATA 1\nDATA 2\n" + b"x" * 2000 + b"\nDATA 3\n"
        )
        assert await client.line() == b"OK"
        assert await client.line() == b"ACK 1"
        assert await client.line() == b"ACK 2"
        assert await client.closed_by_server()
        await wait_for(lambda: bool(closes(events, CloseReason.PROTOCOL_ERROR)))
        [closed] = closes(events, CloseReason.PROTOCOL_ERROR)
        assert closed.identity == "sender"
        assert "longer than 1024" in closed.detail
        # The bad frame ended that connection only: nothing after it was served.
        assert b"ACK 3" not in client._buffer
        await bystander.send(b"DATA still-here")
        assert await bystander.line() == b"ACK still-here"
        assert server.stats().closed[CloseReason.PROTOCOL_ERROR] == 1
        await client.aclose()
        await bystander.aclose()


class YieldingFramer:
    """A user's framer written as a generator: it yields lines and raises on a line "BAD"."""

    def __init__(self) -> None:
        self._inner = LineFramer()

    def feed(self, data: bytes) -> Iterator[bytes]:
        for line in self._inner.feed(data):
            if line == b"BAD":
                raise ProtocolError("BAD line")
            yield line


class ForgetfulFramer(YieldingFramer):
    """Breaks the contract: returns a list and raises without handing over its frames."""

    def feed(self, data: bytes) -> list[bytes]:  # type: ignore[override]
        return list(super().feed(data))


@pytest.mark.parametrize("framer", [YieldingFramer, ForgetfulFramer])
async def test_a_users_framer_raising_with_frames_pending(framer: type[YieldingFramer]) -> None:
    events: list[ServerEvent] = []
    server = Server(
        identify=identify,
        handler=handler,
        framer=framer,
        config=ServerConfig(**BASE),
        on_event=events.append,
    )
    async with anyio.create_task_group() as tasks:
        [(_, port)] = await tasks.start(server.serve_tcp, "127.0.0.1", 0)
        client = await Client.connect(port)
        assert await client.hello("user-framer") == b"OK"
        await client.stream.send(b"DATA 1\nDATA 2\nBAD\nDATA 3\n")
        if framer is YieldingFramer:
            # What a generator yielded before it raised is delivered.
            assert await client.line() == b"ACK 1"
            assert await client.line() == b"ACK 2"
        # Either way the connection closes with PROTOCOL_ERROR, and nothing after the error
        # is served.
        assert await client.closed_by_server()
        assert b"ACK 3" not in client._buffer
        await wait_for(lambda: bool(closes(events, CloseReason.PROTOCOL_ERROR)))
        await client.aclose()
        await server.shutdown()


async def test_a_stale_hello_never_takes_over_the_session_of_a_newer_connection() -> None:
    events: list[ServerEvent] = []
    async with serving(ServerConfig(**BASE), events=events) as (server, port):
        # X connects first and says nothing yet: the server is behind, the device gives up on
        # it, connects again as Y and gets its session.
        x = await Client.connect(port)
        y = await Client.connect(port)
        assert await y.hello("dev") == b"OK"
        session = server.registry.get("dev")
        # Only now is X's hello read.
        await x.send(b"HELLO dev secret")
        assert await x.line() == b"BUSY"  # the application's refusal (Hello.refusal)
        assert await x.closed_by_server()
        await wait_for(lambda: bool(closes(events, CloseReason.STALE_HELLO)))
        assert server.registry.get("dev") is session
        for i in range(3):
            await y.send(b"PING")
            assert await y.line(timeout=slack(2)) == b"PONG", i
        assert not closes(events, CloseReason.TAKEN_OVER)
        [stale] = closes(events, CloseReason.STALE_HELLO)
        assert stale.identity is None and "newer connection" in stale.detail
        # A newer connection still takes the session over, as a rebooted device must.
        z = await Client.connect(port)
        assert await z.hello("dev") == b"OK"
        assert await y.closed_by_server()
        await wait_for(lambda: bool(closes(events, CloseReason.TAKEN_OVER)))
        assert server.registry.get("dev") is not session
        for client in (x, y, z):
            await client.aclose()

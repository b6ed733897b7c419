"""Nothing a peer sent correctly is lost, and a stale hello never displaces a live session.

On real loopback sockets, on asyncio, uvloop and trio: frames that precede a malformed one in
the same write all reach the handler before the connection closes with PROTOCOL_ERROR, and no
other session notices; a hello read late on an older connection of a device cannot take the
session that device has since opened on a newer one, nor can a hello on a newer connection whose
peer has given up on it (accepted late, as the kernel does under a listen-queue overflow).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import anyio
import pytest

from keepconn import (
    CloseReason,
    Connection,
    Hello,
    LineFramer,
    ProtocolError,
    Server,
    ServerConfig,
    ServerEvent,
)
from keepconn.testing.pytest_plugin import require_netns
from tests.lineapp import Client, closes, handler, identify, serving, wait_for
from tests.timing import slack

#: Linux's TCP_REPAIR (Python has no name for it): closing a socket in repair mode sends
#: nothing, as if its host had lost the connection's state (CRIU's use).
TCP_REPAIR = getattr(socket, "TCP_REPAIR", 19)

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


async def _slow_identify(conn: Connection[bytes]) -> Hello:
    # A server behind in a storm: the hello is read, and only some time later acted on.
    hello = await identify(conn)
    await anyio.sleep(slack(0.3))
    return hello


def _hello_then_vanish(port: int, hello: bytes) -> None:
    """Connect, send ``hello`` and close without a FIN or RST: the peer is gone, and the server
    can learn it only from the reset its next byte earns."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
    try:
        sock.sendall(hello)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
        except PermissionError as exc:
            require_netns(f"TCP_REPAIR needs CAP_NET_ADMIN ({exc})")
    finally:
        sock.close()


async def test_a_hello_whose_peer_has_vanished_never_takes_over_a_live_session() -> None:
    events: list[ServerEvent] = []
    config = ServerConfig(**BASE)
    async with serving(config, events=events, identify=_slow_identify) as (server, port):
        y = await Client.connect(port)
        assert await y.hello("dev") == b"OK"
        session = server.registry.get("dev")
        # X is accepted after Y, so accept order says it is the newer one; but its device has
        # given up on it by the time its hello is acted on (what a connection the kernel
        # completed late from a SYN cookie looks like: the device's kernel retransmitted the
        # CONNECT of a socket its owner had closed).
        _hello_then_vanish(port, b"HELLO dev secret\n")
        await wait_for(lambda: bool(closes(events, CloseReason.STALE_HELLO)), slack(5))
        [stale] = closes(events, CloseReason.STALE_HELLO)
        assert stale.identity is None and "reset the connection on its welcome" in stale.detail
        assert server.registry.get("dev") is session
        assert not closes(events, CloseReason.TAKEN_OVER)
        for i in range(3):
            await y.send(b"PING")
            assert await y.line(timeout=slack(2)) == b"PONG", i
        assert server.stats().closed[CloseReason.STALE_HELLO] == 1
        # A live newer connection still takes the session over, and gets one welcome only.
        z = await Client.connect(port)
        assert await z.hello("dev") == b"OK"
        assert await y.closed_by_server()
        await wait_for(lambda: bool(closes(events, CloseReason.TAKEN_OVER)))
        assert server.registry.get("dev") is not session
        await z.send(b"PING")
        assert await z.line(timeout=slack(2)) == b"PONG"
        for client in (y, z):
            await client.aclose()

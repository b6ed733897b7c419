"""keepconn.testing.TcpForwarder on real loopback sockets: pass, blackhole and reset, switched
while connections are open, on asyncio, uvloop and trio."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import anyio
import anyio.abc
import pytest

from keepconn.tcp import census
from keepconn.testing import ForwarderMode, TcpForwarder
from tests.timing import slack

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


class EchoServer:
    """An anyio echo server that counts what it accepted and how each connection ended."""

    def __init__(self) -> None:
        self.accepted = 0
        self.ends: list[str] = []
        self.port = 0

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        self.accepted += 1
        async with stream:
            try:
                while True:
                    await stream.send(await stream.receive())
            except anyio.EndOfStream:
                self.ends.append("eof")
            except anyio.BrokenResourceError:
                self.ends.append("reset")


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    server.port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, server.handle)
        yield server
        tasks.cancel_scope.cancel()


async def receive_exactly(stream: anyio.abc.SocketStream, size: int) -> bytes:
    data = bytearray()
    with anyio.fail_after(slack(10)):
        while len(data) < size:
            data += await stream.receive()
    return bytes(data)


async def assert_reset_on_connect(port: int) -> None:
    """The connection is reset: the RST may even beat the event loop's view of the handshake,
    so connect() itself may fail with ECONNRESET."""
    with anyio.fail_after(slack(5)):
        try:
            stream = await anyio.connect_tcp("127.0.0.1", port)
        except OSError as exc:
            causes = [exc, exc.__cause__, *getattr(exc.__cause__, "exceptions", ())]
            assert any(isinstance(c, ConnectionResetError) for c in causes), exc
            return
        async with stream:
            with pytest.raises(anyio.BrokenResourceError):
                await stream.receive()


async def wait_for(predicate: object, what: str) -> None:
    assert callable(predicate)
    with anyio.fail_after(slack(5)):
        while not predicate():
            await anyio.sleep(0.01)


async def test_pass_forwards_both_ways_and_passes_the_eof_on(echo: EchoServer) -> None:
    async with TcpForwarder("127.0.0.1", echo.port) as fwd:
        assert fwd.mode is ForwarderMode.PASS
        async with await anyio.connect_tcp("127.0.0.1", fwd.port) as client:
            payload = bytes(range(256)) * 4096  # 1 MiB: past every buffer on the way
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(client.send, payload)
                assert await receive_exactly(client, len(payload)) == payload
            await client.send_eof()
            with anyio.fail_after(slack(5)), pytest.raises(anyio.EndOfStream):
                await client.receive()
        await wait_for(lambda: echo.ends == ["eof"], "the server saw the EOF")
        assert fwd.accepted == 1
        await wait_for(lambda: fwd.open_connections == 0, "the pair was closed")


async def test_blackhole_holds_connections_silently_and_pass_resumes_them(
    echo: EchoServer,
) -> None:
    async with TcpForwarder("127.0.0.1", echo.port) as fwd:
        old = await anyio.connect_tcp("127.0.0.1", fwd.port)
        async with old:
            await old.send(b"before")
            assert await receive_exactly(old, 6) == b"before"
            fwd.mode = ForwarderMode.BLACKHOLE
            await anyio.sleep(0.05)
            await old.send(b"held")
            # A new connection is accepted and held too, without reaching the server.
            new = await anyio.connect_tcp("127.0.0.1", fwd.port)
            async with new:
                await new.send(b"queued")
                with anyio.move_on_after(0.3) as silent:
                    await old.receive()  # neither data nor EOF nor a reset comes back
                assert silent.cancelled_caught
                with anyio.move_on_after(0.1) as silent:
                    await new.receive()
                assert silent.cancelled_caught
                assert echo.accepted == 1
                # Both stay ESTABLISHED on the forwarder's side: no FIN, no RST was sent.
                held = [s.state for s in census(fwd.port).sockets if s.state != "LISTEN"]
                assert held == ["ESTABLISHED", "ESTABLISHED"]
                fwd.mode = "pass"
                assert await receive_exactly(old, 4) == b"held"
                assert await receive_exactly(new, 6) == b"queued"
                assert echo.accepted == 2


async def test_reset_resets_open_connections_and_every_new_one(echo: EchoServer) -> None:
    async with TcpForwarder("127.0.0.1", echo.port) as fwd:
        old = await anyio.connect_tcp("127.0.0.1", fwd.port)
        async with old:
            await old.send(b"ping")
            assert await receive_exactly(old, 4) == b"ping"
            fwd.mode = ForwarderMode.RESET
            with anyio.fail_after(slack(5)), pytest.raises(anyio.BrokenResourceError):
                await old.receive()
        # The server's side was reset as well, not closed with a FIN.
        await wait_for(lambda: echo.ends == ["reset"], "the server saw the reset")
        for _ in range(3):
            await assert_reset_on_connect(fwd.port)
        assert echo.accepted == 1
        assert fwd.accepted == 4
        fwd.mode = ForwarderMode.PASS
        async with await anyio.connect_tcp("127.0.0.1", fwd.port) as again:
            await again.send(b"back")
            assert await receive_exactly(again, 4) == b"back"


async def test_a_server_that_is_down_resets_the_client() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # bound, never listening: connections are refused
        async with TcpForwarder("127.0.0.1", dead_port) as fwd:
            await assert_reset_on_connect(fwd.port)


async def test_close_stops_listening_and_closes_what_it_held(echo: EchoServer) -> None:
    fwd = TcpForwarder("127.0.0.1", echo.port, mode="blackhole").start()
    port = fwd.port
    client = await anyio.connect_tcp("127.0.0.1", port)
    async with client:
        await wait_for(lambda: fwd.open_connections == 1, "the connection was accepted")
        await anyio.to_thread.run_sync(fwd.close)
        with anyio.fail_after(slack(5)), pytest.raises(anyio.EndOfStream):
            await client.receive()
    with pytest.raises(OSError):
        await anyio.connect_tcp("127.0.0.1", port)
    fwd.close()  # a second close is a no-op


def test_bad_mode_is_refused() -> None:
    with pytest.raises(ValueError):
        TcpForwarder("127.0.0.1", 1, mode="drop")

"""Connection.send takes turns without a lock object: concurrent senders' frames stay whole and
in each sender's order, a sender cancelled while waiting for its turn never blocks the others,
and the connection sends normally afterwards. On the anyio path a sender cancelled before its
turn sends nothing; the native asyncio transport buffers every send at once (asyncio's own
write semantics), so there the cancelled sender's frame goes out whole, exactly once."""

from __future__ import annotations

import anyio
import pytest

from keepconn import Connection, LineFramer, Server, ServerConfig
from keepconn._asyncio.connection import NativeConnection
from tests.lineapp import Client, identify
from tests.timing import slack

pytestmark = pytest.mark.anyio

SENDERS = 4
LINES = 40
#: Big enough that a send blocks on the socket buffers while the client is not reading.
PAD = 200_000


async def test_concurrent_senders_keep_frames_whole_and_a_cancelled_waiter_steps_aside() -> None:
    native: list[bool] = []

    async def handler(conn: Connection[bytes]) -> None:
        native.append(isinstance(conn, NativeConnection))

        async def sender(name: int) -> None:
            for n in range(LINES):
                await conn.send(b"S%d %d " % (name, n) + b"x" * PAD + b"\n")

        async with anyio.create_task_group() as tasks:
            for name in range(SENDERS):
                tasks.start_soon(sender, name)
            # A sender that gives up while it waits for its turn (the others hold the socket,
            # and the client is not reading yet).
            with anyio.move_on_after(0.2) as waited:
                await anyio.sleep(0.05)
                await conn.send(b"CANCELLED " + b"y" * PAD + b"\n")
                await anyio.sleep_forever()
            assert waited.cancelled_caught
        await conn.send(b"END\n")  # the turn is free again: no waiter left holding it
        async for _ in conn:
            pass

    server: Server[bytes] = Server(
        identify=identify,
        handler=handler,
        framer=lambda: LineFramer(max_length=1024),
        config=ServerConfig(admission=None, flapping=None),
    )
    async with anyio.create_task_group() as tasks:
        [(_, port)] = await tasks.start(server.serve_tcp, "127.0.0.1", 0)
        client = await Client.connect(port)
        try:
            assert await client.hello("turns") == b"OK"
            await anyio.sleep(0.4)  # let the senders pile up behind full buffers
            seen: dict[int, list[int]] = {name: [] for name in range(SENDERS)}
            cancelled = 0
            with anyio.fail_after(slack(30)):
                while (line := await client.line(slack(10))) != b"END":
                    if line.startswith(b"CANCELLED "):
                        assert line == b"CANCELLED " + b"y" * PAD
                        cancelled += 1
                        continue
                    head, number, pad = line.split(b" ")
                    assert pad == b"x" * PAD, line[:40]
                    seen[int(head[1:])].append(int(number))
            assert seen == {name: list(range(LINES)) for name in range(SENDERS)}
            # It was cancelled while waiting, so it sent nothing, not half a line (buffered at
            # once by the native transport: then exactly once, whole).
            assert cancelled == (1 if native == [True] else 0)
        finally:
            await client.aclose()
            await server.shutdown()
            tasks.cancel_scope.cancel()

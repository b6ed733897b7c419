"""Embedding keepconn in an asyncio server.

A newline-delimited protocol: the first line is ``HELLO <device-id> <token>``; after that any
line is telemetry, ``PING`` is answered with ``PONG``. Devices that stay silent longer than
their timeout are reaped; a device that reconnects takes over its old session at once.

Run it:  python docs/howto/asyncio_server.py            (serves 127.0.0.1:7000 until Ctrl-C)
         python docs/howto/asyncio_server.py --selftest (starts, talks to itself, exits 0)
"""

from __future__ import annotations

import asyncio
import logging
import sys

import keepconn
from keepconn.tcp import TcpKeepalive

TOKENS = {"sensor-1": b"s3cret", "sensor-2": b"hunter2"}


async def identify(conn: keepconn.Connection[bytes]) -> keepconn.Hello:
    # The first complete line is the hello; anything else is refused.
    parts = (await conn.receive()).split()
    if len(parts) != 3 or parts[0] != b"HELLO" or TOKENS.get(parts[1].decode()) != parts[2]:
        await conn.send(b"DENIED\n")
        raise keepconn.HelloRejected("bad hello")
    # A per-device timeout could come from the hello (MQTT: 1.5 x the client's keepalive).
    return keepconn.Hello(parts[1].decode(), timeout=2.0, welcome=b"WELCOME\n")


async def handler(conn: keepconn.Connection[bytes]) -> None:
    # Iterating the connection touches the session on every complete line.
    async for line in conn:
        if line == b"PING":
            await conn.send(b"PONG\n")
        else:
            await conn.send(b"OK\n")


def make_server() -> keepconn.Server[bytes]:
    config = keepconn.ServerConfig(
        idle_timeout=30.0,
        resolution=0.1,
        hello_timeout=5.0,
        keepalive=TcpKeepalive(idle=10, interval=5, count=3),
    )
    return keepconn.Server(
        identify=identify,
        handler=handler,
        framer=lambda: keepconn.LineFramer(max_length=4096),
        config=config,
        on_event=lambda event: print("event:", event),
    )


async def serve_forever() -> None:
    server = make_server()
    # Server.serve_tcp is an anyio task; inside asyncio it runs like any coroutine.
    await server.serve_tcp("127.0.0.1", 7000)


async def selftest() -> None:
    server = make_server()
    serving = asyncio.create_task(server.serve_tcp("127.0.0.1", 0))
    [(_, port)] = await server.wait_serving()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"HELLO sensor-1 s3cret\nPING\n")
    assert await reader.readline() == b"WELCOME\n"
    assert await reader.readline() == b"PONG\n"
    # Go silent: the server reaps the session after its 2 s timeout and resets the socket.
    try:
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    except ConnectionResetError:
        pass
    for _ in range(200):  # the reset reaches us just before the server's bookkeeping
        if server.stats().closed[keepconn.CloseReason.IDLE_TIMEOUT]:
            break
        await asyncio.sleep(0.01)
    stats = server.stats()
    assert stats.closed[keepconn.CloseReason.IDLE_TIMEOUT] == 1, stats
    writer.close()
    await server.shutdown()
    await serving
    print("selftest ok")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    asyncio.run(selftest() if "--selftest" in sys.argv else serve_forever())

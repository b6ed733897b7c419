"""Embedding keepconn in a trio server, with server-side pings and round-trip times.

The same newline protocol as asyncio_server.py, but the server pings each device every second
(``PING``), expects ``PONG`` within half a second, tolerates one miss, and reports the round-trip
time. The server runs in a trio nursery like any other trio task.

Run it:  python docs/howto/trio_server.py            (serves 127.0.0.1:7001 until Ctrl-C)
         python docs/howto/trio_server.py --selftest (starts, talks to itself, exits 0)
"""

from __future__ import annotations

import sys

import trio

import keepconn

rtts: list[float] = []


async def identify(conn: keepconn.Connection[bytes]) -> keepconn.Hello:
    parts = (await conn.receive()).split()
    if len(parts) != 2 or parts[0] != b"HELLO":
        raise keepconn.HelloRejected("bad hello")
    return keepconn.Hello(parts[1].decode(), welcome=b"WELCOME\n")


async def handler(conn: keepconn.Connection[bytes]) -> None:
    async for line in conn:
        if line == b"PONG":
            conn.pong_received()  # answers the server's ping: records the round trip
        elif line == b"PING":
            conn.ping_received()  # the device's own ping, rate-limited below
            await conn.send(b"PONG\n")


async def send_ping(conn: keepconn.Connection[bytes]) -> None:
    await conn.send(b"PING\n")


def on_event(event: keepconn.ServerEvent) -> None:
    if isinstance(event, keepconn.RoundTrip):
        rtts.append(event.rtt)
    else:
        print("event:", event)


def make_server() -> keepconn.Server[bytes]:
    config = keepconn.ServerConfig(
        heartbeat=keepconn.ActiveHeartbeat(interval=1.0, timeout=0.5, misses=1),
        ping_rate=keepconn.PingRateLimit(min_interval=0.5, max_strikes=2),
    )
    return keepconn.Server(
        identify=identify,
        handler=handler,
        framer=keepconn.LineFramer,
        config=config,
        send_ping=send_ping,
        on_event=on_event,
    )


async def serve_forever() -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(make_server().serve_tcp, "127.0.0.1", 7001)


async def selftest() -> None:
    server = make_server()
    async with trio.open_nursery() as nursery:
        [(_, port)] = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"HELLO meter-9\n")
        buffer = b""
        answered = 0
        with trio.fail_after(10):
            # Answer two server pings, then fall silent and let the heartbeat find us dead.
            while True:
                try:
                    data = await stream.receive_some()
                except trio.BrokenResourceError:
                    break  # the server declared us dead and reset the connection
                if not data:
                    break
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line == b"PING" and answered < 2:
                        answered += 1
                        await stream.send_all(b"PONG\n")
        with trio.fail_after(2):  # the reset reaches us just before the server's bookkeeping
            while not server.stats().closed[keepconn.CloseReason.HEARTBEAT_TIMEOUT]:
                await trio.sleep(0.01)
        closed = server.stats().closed
        assert closed[keepconn.CloseReason.HEARTBEAT_TIMEOUT] == 1, closed
        assert len(rtts) == 2 and all(rtt < 0.5 for rtt in rtts), rtts
        await server.shutdown()
    print("selftest ok, rtts:", [f"{rtt * 1000:.2f} ms" for rtt in rtts])


if __name__ == "__main__":
    trio.run(selftest if "--selftest" in sys.argv else serve_forever)

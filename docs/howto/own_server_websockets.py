"""keepconn's registry, TCP keepalive and a reaper inside your own ``websockets`` server.

The first message is ``HELLO <device-id>`` (answered ``WELCOME``); after it, every message
touches the device's session and ``PING`` is answered ``PONG``. websockets runs the accept loop,
the handshake and the framing; keepconn's registry decides who the device is and when it is
dead: a second hello takes the session over (the old connection is reset), a device silent for
the idle timeout is reaped with ``IDLE_TIMEOUT``, a peer's FIN ends the session at once.

websockets' own keepalive (``--ws-ping SECONDS``) may stay on beside it: its pings find a peer
that stopped answering and close the connection (recorded as HEARTBEAT_TIMEOUT), while
keepconn's timeout is about the *application*: pongs come from the peer's websocket library and
show nothing of the device's own life, so they do not touch the session.

Each close prints one line, ``closed <device> <REASON>``.

Run it: python docs/howto/own_server_websockets.py [--port 7000] [--timeout 30] [--ws-ping 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK
from websockets.frames import CloseCode

from keepconn import CloseReason, Session, SessionRegistry
from keepconn.tcp import TcpKeepalive

KEEPALIVE = TcpKeepalive(idle=10, interval=5, count=3)
HELLO_TIMEOUT = 5.0


def reset(ws: ServerConnection) -> None:
    """Close with a RST: no closing handshake, and no FIN for the kernel to retransmit to a
    dead or displaced peer (``transport.abort()`` alone still sends a FIN)."""
    sock = ws.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.transport.abort()


def reason_of(exc: ConnectionClosed) -> CloseReason:
    """Why a connection that ended without a clean close handshake ended."""
    sent = exc.sent
    if sent is not None and sent.code == CloseCode.INTERNAL_ERROR and "ping" in sent.reason:
        # websockets' own keepalive: its ping went unanswered (it said "keepalive ping timeout").
        return CloseReason.HEARTBEAT_TIMEOUT
    if isinstance(exc.__cause__, ConnectionError):
        return CloseReason.PEER_RESET
    return CloseReason.PEER_CLOSED  # a bare FIN (EOF), or a close frame with an error code


class DeviceServer:
    """The application: a registry of devices, served over websockets' connections."""

    def __init__(self, timeout: float) -> None:
        self.registry = SessionRegistry(timeout=timeout, resolution=min(0.05, timeout / 10))
        self.loop = asyncio.get_running_loop()

    def closed(self, session: Session) -> None:
        print(f"closed {session.key} {session.reason.name if session.reason else '?'}", flush=True)

    def end(self, session: Session, reason: CloseReason) -> None:
        # The first reason wins: a reaped or displaced session already has its own.
        if self.registry.close(session, reason):
            self.closed(session)

    async def handle(self, ws: ServerConnection) -> None:
        """One connection: the hello message, then messages until the connection ends."""
        KEEPALIVE.apply(ws.transport)
        try:
            hello = await asyncio.wait_for(ws.recv(), HELLO_TIMEOUT)
        except (TimeoutError, asyncio.TimeoutError, ConnectionClosed):
            return  # no hello (in time): no session was opened
        parts = str(hello).split()
        if len(parts) != 2 or parts[0] != "HELLO":
            await ws.close(1008, "bad hello")
            return
        displaced = self.registry.get(parts[1])
        session = self.registry.open(parts[1], now=self.loop.time(), conn=ws)
        if displaced is not None:  # the device came back: its old connection is dead
            reset(displaced.conn)
            self.closed(displaced)
        try:
            await ws.send("WELCOME")
            async for message in ws:
                session.touch(self.loop.time())
                if message == "PING":
                    await ws.send("PONG")
            self.end(session, CloseReason.PEER_CLOSED)  # a clean close frame
        except ConnectionClosedOK:
            self.end(session, CloseReason.PEER_CLOSED)
        except ConnectionClosed as exc:
            # Either way websockets closes the socket as the handler returns: no CLOSE_WAIT.
            self.end(session, reason_of(exc))

    async def reap_forever(self) -> None:
        """Sleep until the next deadline (at most one resolution), reap, reset the dead."""
        step = self.registry.resolution
        while True:
            due = self.registry.next_deadline()
            now = self.loop.time()
            await asyncio.sleep(step if due is None else min(max(due - now, 0.0), step))
            for session in self.registry.reap(self.loop.time(), limit=1000):
                reset(session.conn)  # a dead peer gets a RST, not a closing handshake
                self.closed(session)


async def main(host: str, port: int, idle: float, ws_ping: float | None) -> None:
    app = DeviceServer(idle)
    reaper = asyncio.create_task(app.reap_forever())
    try:
        async with serve(
            app.handle, host, port, ping_interval=ws_ping, ping_timeout=ws_ping
        ) as server:
            print("listening", *list(server.sockets)[0].getsockname()[:2], flush=True)
            await server.serve_forever()
    finally:
        reaper.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7000)
    parser.add_argument("--timeout", type=float, default=30.0, help="idle timeout, seconds")
    parser.add_argument(
        "--ws-ping", type=float, default=None, help="websockets' own ping interval (off by default)"
    )
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.host, args.port, args.timeout, args.ws_ping))

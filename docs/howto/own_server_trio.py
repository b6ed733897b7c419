"""keepconn's registry, TCP keepalive and a reaper inside your own ``trio.serve_tcp`` server.

The protocol and what it shows are those of own_server_asyncio.py: ``HELLO <device-id>`` then
lines, ``PING`` answered ``PONG``; a second hello takes the device's session over, a silent
device is reaped with ``IDLE_TIMEOUT``, a peer's FIN is answered at once. trio has no transport
to abort from outside: each connection runs in a cancel scope the reaper (or a takeover)
cancels, after setting SO_LINGER to zero so that the close which follows is a RST.

Each close prints one line, ``closed <device> <REASON>``.

Run it: python docs/howto/own_server_trio.py [--port 7000] [--timeout 30]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import socket
import struct
from functools import partial

import trio

from keepconn import CloseReason, Session, SessionRegistry
from keepconn.tcp import TcpKeepalive

KEEPALIVE = TcpKeepalive(idle=10, interval=5, count=3)
HELLO_TIMEOUT = 5.0
MAX_LINE = 4096


class Link:
    """What the registry holds for a session: the stream and the scope that serves it."""

    def __init__(self, stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        self.stream = stream
        self.scope = scope

    def abort(self) -> None:
        """End the connection with a RST: the peer is dead or displaced."""
        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.scope.cancel()


class Lines:
    """Complete lines out of a byte stream (a partial line shows no life)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def next(self) -> bytes | None:
        """The next line, without its newline; None at EOF."""
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_LINE:
                raise ValueError("line too long")
            data = await self.stream.receive_some(MAX_LINE)
            if not data:
                return None
            self.buffer += data
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        return line


class DeviceServer:
    """The application: a registry of devices, served over trio's streams."""

    def __init__(self, timeout: float) -> None:
        self.registry = SessionRegistry(timeout=timeout, resolution=min(0.05, timeout / 10))

    def closed(self, session: Session) -> None:
        print(f"closed {session.key} {session.reason.name if session.reason else '?'}", flush=True)

    def end(self, session: Session, reason: CloseReason) -> None:
        # The first reason wins: a reaped or displaced session already has its own.
        if self.registry.close(session, reason):
            self.closed(session)

    async def handle(self, stream: trio.SocketStream) -> None:
        """One connection: the hello, then its lines until EOF, a reset, a reap or a takeover."""
        KEEPALIVE.apply(stream.socket)
        session: Session | None = None
        lines = Lines(stream)
        try:
            with trio.CancelScope() as scope:
                with trio.move_on_after(HELLO_TIMEOUT):
                    hello = await lines.next()
                parts = (hello or b"").split()
                if len(parts) != 2 or parts[0] != b"HELLO":
                    return  # no hello (or no hello in time): no session was opened
                identity = parts[1].decode()
                displaced = self.registry.get(identity)
                session = self.registry.open(
                    identity, now=trio.current_time(), conn=Link(stream, scope)
                )
                if displaced is not None:  # the device came back: its old connection is dead
                    displaced.conn.abort()
                    self.closed(displaced)
                await stream.send_all(b"WELCOME\n")
                while (line := await lines.next()) is not None:
                    session.touch(trio.current_time())
                    if line == b"PING":
                        await stream.send_all(b"PONG\n")
                # EOF: the peer's FIN. Closing at once, below, keeps the socket out of CLOSE_WAIT.
                self.end(session, CloseReason.PEER_CLOSED)
        except (trio.BrokenResourceError, ValueError):
            if session is not None:
                self.end(session, CloseReason.PEER_RESET)
        finally:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await trio.aclose_forcefully(stream)

    async def reap_forever(self) -> None:
        """Sleep until the next deadline (at most one resolution), reap, reset the dead."""
        step = self.registry.resolution
        while True:
            due = self.registry.next_deadline()
            await trio.sleep_until(
                min(math.inf if due is None else due, trio.current_time() + step)
            )
            for session in self.registry.reap(trio.current_time(), limit=1000):
                session.conn.abort()
                self.closed(session)


async def main(host: str, port: int, idle: float) -> None:
    app = DeviceServer(idle)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app.reap_forever)
        listeners = await nursery.start(partial(trio.serve_tcp, app.handle, port, host=host))
        print("listening", *listeners[0].socket.getsockname()[:2], flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7000)
    parser.add_argument("--timeout", type=float, default=30.0, help="idle timeout, seconds")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main, args.host, args.port, args.timeout)

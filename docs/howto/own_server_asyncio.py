"""keepconn's registry, TCP keepalive and a reaper inside your own ``asyncio.start_server``.

A newline-delimited protocol: the first line is ``HELLO <device-id>`` (answered ``WELCOME``);
after it, every complete line touches the device's session and ``PING`` is answered ``PONG``.
The server keeps nothing keepconn's ``Server`` would: the accept loop, the streams and the tasks
are asyncio's own; keepconn supplies the parts.

- ``SessionRegistry``: one session per device; a second hello for a device takes the session
  over (the old connection is reset), and a silent device is reaped with ``IDLE_TIMEOUT``.
- ``keepconn.tcp.TcpKeepalive``: the kernel probes every accepted socket, so a peer that
  vanished without a FIN is found even when the application protocol is idle.
- A reaper task that sleeps until the registry's next deadline.

Each close prints one line, ``closed <device> <REASON>``.

Run it: python docs/howto/own_server_asyncio.py [--port 7000] [--timeout 30]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct

from keepconn import CloseReason, Session, SessionRegistry
from keepconn.tcp import TcpKeepalive

KEEPALIVE = TcpKeepalive(idle=10, interval=5, count=3)
HELLO_TIMEOUT = 5.0


def reset(transport: asyncio.BaseTransport) -> None:
    """Close with a RST. ``abort()`` alone drops the buffers but still sends a FIN, which the
    kernel would retransmit to a dead or displaced peer for minutes (FIN_WAIT1)."""
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class DeviceServer:
    """The application: a registry of devices, served over asyncio's streams."""

    def __init__(self, timeout: float) -> None:
        self.registry = SessionRegistry(timeout=timeout, resolution=min(0.05, timeout / 10))
        self.loop = asyncio.get_running_loop()

    def closed(self, session: Session) -> None:
        print(f"closed {session.key} {session.reason.name if session.reason else '?'}", flush=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: the hello, then its lines until EOF, a reset, a reap or a takeover."""
        KEEPALIVE.apply(writer.transport)
        session: Session | None = None
        try:
            hello = await asyncio.wait_for(reader.readline(), HELLO_TIMEOUT)
            parts = hello.split()
            if len(parts) != 2 or parts[0] != b"HELLO":
                return  # no session was opened: nothing to record
            displaced = self.registry.get(parts[1].decode())
            session = self.registry.open(parts[1].decode(), now=self.loop.time(), conn=writer)
            if displaced is not None:  # the device came back: its old connection is dead
                reset(displaced.conn.transport)
                self.closed(displaced)
            writer.write(b"WELCOME\n")
            while True:
                line = await reader.readline()
                if not line.endswith(b"\n"):
                    # EOF (the peer's FIN). Closing at once, below, is what keeps the socket
                    # out of CLOSE_WAIT.
                    self.end(session, CloseReason.PEER_CLOSED)
                    return
                session.touch(self.loop.time())  # only a complete line shows life
                if line == b"PING\n":
                    writer.write(b"PONG\n")
        except (TimeoutError, asyncio.TimeoutError):
            pass  # no hello in time: no session
        except ConnectionError:
            if session is not None:
                self.end(session, CloseReason.PEER_RESET)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def end(self, session: Session, reason: CloseReason) -> None:
        # A session the reaper or a takeover ended already has its reason; the first one wins.
        if self.registry.close(session, reason):
            self.closed(session)

    async def reap_forever(self) -> None:
        """Sleep until the next deadline (at most one resolution), reap, reset the dead."""
        step = self.registry.resolution
        while True:
            due = self.registry.next_deadline()
            now = self.loop.time()
            await asyncio.sleep(step if due is None else min(max(due - now, 0.0), step))
            for session in self.registry.reap(self.loop.time(), limit=1000):
                reset(session.conn.transport)  # a dead peer gets a RST, not a FIN
                self.closed(session)


async def main(host: str, port: int, idle: float) -> None:
    app = DeviceServer(idle)
    server = await asyncio.start_server(app.handle, host, port)
    reaper = asyncio.create_task(app.reap_forever())
    print("listening", *server.sockets[0].getsockname()[:2], flush=True)
    try:
        async with server:
            await server.serve_forever()
    finally:
        reaper.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7000)
    parser.add_argument("--timeout", type=float, default=30.0, help="idle timeout, seconds")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.host, args.port, args.timeout))

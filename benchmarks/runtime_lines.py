"""The line servers of the runtime benchmark: the same tiny protocol on three stacks.

Every client sends ``HELLO <id>`` once, then ``PING`` every few seconds; every server answers
each ``PING`` with ``PONG`` and nothing else. Run by benchmarks/runtime.py::

    python benchmarks/runtime_lines.py KIND --backend BACKEND --host 127.0.0.1 --port 0

* ``protocol``: an ``asyncio.Protocol`` that splits lines itself (asyncio only): the floor of a
  Python server;
* ``anyio``: an anyio listener, one task per connection reading lines with a
  ``BufferedByteReceiveStream``: the floor of anything built on anyio;
* ``keepconn``: ``keepconn.Server`` with ``LineFramer``; identify reads ``HELLO <id>``, the
  handler answers PING; ``ServerConfig(admission=None, flapping=None, idle_timeout=60)``;
  on asyncio and uvloop the native transport, on trio keepconn's own socket stream, unless
  ``--transport anyio``.

Each prints ``listening on HOST:PORT`` once it accepts connections, runs the loop-lag probe on
its own loop and the control thread of benchmarks/runtime_probe.py (port from the environment),
and leaves SIGTERM's default action alone: the benchmark stops it by pid, and an idle
connection needs no goodbye.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from anyio.streams.buffered import BufferedByteReceiveStream

import runtime_probe
from keepconn import Connection, Hello, HelloRejected, LineFramer, Server, ServerConfig

BACKLOG = 4096
MAX_LINE = 1024


def _listening(host: str, port: int) -> None:
    print(f"listening on {host}:{port}", flush=True)


# ----------------------------------------------------------------------------------------------
# asyncio.Protocol.


class LineProtocol(asyncio.Protocol):
    """Split lines by hand and answer PING; everything else is ignored."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        if len(self.buffer) > MAX_LINE:
            assert self.transport is not None
            self.transport.abort()
            return
        for line in lines:
            if line == b"PING":
                assert self.transport is not None
                self.transport.write(b"PONG\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve_protocol(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(LineProtocol, host, port, backlog=BACKLOG)
    probe = asyncio.create_task(runtime_probe.lag_loop(asyncio.sleep))
    _listening(host, server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()
    probe.cancel()


# ----------------------------------------------------------------------------------------------
# anyio, one task per connection.


async def _anyio_connection(stream: anyio.abc.SocketStream) -> None:
    lines = BufferedByteReceiveStream(stream)
    async with stream:
        try:
            while True:
                line = await lines.receive_until(b"\n", MAX_LINE)
                if line == b"PING":
                    await stream.send(b"PONG\n")
        except (
            anyio.EndOfStream,
            anyio.IncompleteRead,
            anyio.BrokenResourceError,
            anyio.DelimiterNotFound,
            OSError,
        ):
            pass


async def serve_anyio(host: str, port: int) -> None:
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port, backlog=BACKLOG)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(runtime_probe.lag_loop, runtime_probe.loop_sleep())
        _listening(host, listener.extra(SocketAttribute.local_port))
        await listener.serve(_anyio_connection)


# ----------------------------------------------------------------------------------------------
# keepconn.Server.


async def identify(conn: Connection[bytes]) -> Hello:
    parts = (await conn.receive()).split()
    if len(parts) != 2 or parts[0] != b"HELLO":
        raise HelloRejected("expected HELLO <id>")
    return Hello(parts[1].decode())


async def handler(conn: Connection[bytes]) -> None:
    async for line in conn:
        if line == b"PING":
            conn.ping_received()
            await conn.send(b"PONG\n")


def keepconn_server(transport: str = "auto") -> Server[bytes]:
    """The keepconn server measured: nothing between accept and session but the hello.
    ``transport`` "anyio" keeps it on anyio streams (the native transports' before)."""
    return Server(
        identify=identify,
        handler=handler,
        framer=lambda: LineFramer(max_length=MAX_LINE),
        config=ServerConfig(admission=None, flapping=None, idle_timeout=60, transport=transport),
    )


async def serve_keepconn(host: str, port: int, transport: str = "auto") -> None:
    server = keepconn_server(transport)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(runtime_probe.lag_loop, runtime_probe.loop_sleep())
        addresses = await tasks.start(server.serve_tcp, host, port)
        _listening(host, addresses[0][1])


# ----------------------------------------------------------------------------------------------
# Command line.


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=("protocol", "anyio", "keepconn"))
    p.add_argument("--backend", choices=("asyncio", "uvloop", "trio"), default="asyncio")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--transport", choices=("auto", "anyio"), default="auto", help="keepconn's")
    args = p.parse_args(argv)
    runtime_probe.start_from_env()
    if args.kind == "protocol":
        if args.backend != "asyncio":
            p.error("the Protocol server runs on asyncio only")
        asyncio.run(serve_protocol(args.host, args.port))
        return 0
    backend = "trio" if args.backend == "trio" else "asyncio"
    options: dict[str, Any] = {"use_uvloop": True} if args.backend == "uvloop" else {}
    if args.kind == "anyio":
        anyio.run(serve_anyio, args.host, args.port, backend=backend, backend_options=options)
    else:
        anyio.run(
            serve_keepconn,
            args.host,
            args.port,
            args.transport,
            backend=backend,
            backend_options=options,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

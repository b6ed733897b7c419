"""A closed connection is freed at once: the registry's deadline wheel keeps a closed session
until its slot comes up, and that must not keep the connection (its stream, socket, scope)
alive for the rest of the session's timeout."""

from __future__ import annotations

import gc
import weakref

import anyio
import pytest

from keepconn import Connection, LineFramer, Server, ServerConfig
from tests.lineapp import Client, identify, wait_for

pytestmark = pytest.mark.anyio


async def test_closed_connections_are_not_kept_by_their_sessions_deadline() -> None:
    seen: list[weakref.ref[Connection[bytes]]] = []

    async def handler(conn: Connection[bytes]) -> None:
        seen.append(weakref.ref(conn))
        async for _ in conn:
            pass

    server: Server[bytes] = Server(
        identify=identify,
        handler=handler,
        framer=lambda: LineFramer(max_length=1024),
        # An hour of timeout: the wheel holds each closed session that long.
        config=ServerConfig(admission=None, flapping=None, idle_timeout=3600),
    )
    async with anyio.create_task_group() as tasks:
        [(_, port)] = await tasks.start(server.serve_tcp, "127.0.0.1", 0)
        try:
            for n in range(20):
                client = await Client.connect(port)
                assert await client.hello(f"dev-{n % 5}") == b"OK"  # identities reused
                await client.aclose()
            await wait_for(lambda: len(server.registry) == 0 and not server.connections)
            gc.collect()
            alive = [ref() for ref in seen if ref() is not None]
            assert alive == [], alive
        finally:
            await server.shutdown()
            tasks.cancel_scope.cancel()

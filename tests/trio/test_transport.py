"""When a trio server carries its connections on keepconn's own stream, and what that saves."""

from __future__ import annotations

import socket
import struct

import anyio
import pytest
from anyio.abc import SocketAttribute

from keepconn import CloseReason, ServerConfig, ServerEvent
from keepconn._trio.stream import TrioStream
from tests.lineapp import Client, closes, serving, tracked_objects_per_idle_connection, wait_for
from tests.tlscerts import Pki

pytestmark = pytest.mark.anyio
BASE = dict(admission=None, flapping=None)


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


@pytest.mark.parametrize("transport", ["auto", "anyio"])
async def test_plain_tcp_on_trio_is_carried_on_keepconn_s_stream_unless_told_otherwise(
    transport: str,
) -> None:
    async with serving(ServerConfig(transport=transport, **BASE)) as (server, port):
        client = await Client.connect(port)
        assert await client.hello("dev") == b"OK"
        await client.send(b"DATA x")
        assert await client.line() == b"ACK x"
        [conn] = server.connections
        assert isinstance(conn.stream, anyio.abc.SocketStream)  # the documented contract
        assert isinstance(conn.stream, TrioStream) is (transport == "auto")
        assert conn.raw_socket().getpeername() == client.stream.extra(SocketAttribute.local_address)
        assert conn.peer == client.stream.extra(SocketAttribute.local_address)
        await client.aclose()


async def test_tls_on_trio_stays_on_anyio_s_streams(pki: Pki) -> None:
    context = pki.server_context()
    async with serving(ServerConfig(**BASE), ssl_context=context) as (server, port):
        client = await Client.connect(port, tls=pki.client_context())
        assert await client.hello("dev") == b"OK"
        [conn] = server.connections
        assert conn.tls_version is not None
        assert not isinstance(conn.stream, TrioStream)
        assert not isinstance(conn._transport, TrioStream)
        await client.aclose()


async def test_a_reset_and_a_fin_end_the_session_as_they_did_on_anyio_s_streams() -> None:
    events: list[ServerEvent] = []
    async with serving(ServerConfig(**BASE), events=events) as (server, port):
        gone = await Client.connect(port)
        assert await gone.hello("fin") == b"OK"
        await gone.aclose()
        await wait_for(lambda: not server.connections)
        reset = await Client.connect(port)
        assert await reset.hello("rst") == b"OK"
        raw = reset.stream.extra(SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await reset.aclose()  # RST
        await wait_for(lambda: not server.connections)
    assert [e.detail for e in closes(events, CloseReason.PEER_RESET)] == ["ECONNRESET"]
    assert len(closes(events, CloseReason.PEER_CLOSED)) == 1


async def test_an_idle_trio_connection_costs_fewer_tracked_objects() -> None:
    # The lever against the cyclic collector's pauses: what the server tracks per idle
    # connection. Plain blocking sockets on the client side (loopback completes them without
    # the loop), so the count is the server's plus one client socket object each.
    per_connection = await tracked_objects_per_idle_connection(ServerConfig(**BASE))
    # About 34 on CPython 3.11; on anyio's streams (transport="anyio") about 40: their
    # SocketStream and trio's socket wrapper, two coroutine frames of trio's recv, and a
    # BlockingIOError with its traceback (an await inside an except clause) are gone.
    assert per_connection < 37, per_connection

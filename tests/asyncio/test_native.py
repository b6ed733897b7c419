"""The native asyncio/uvloop transport: when it carries a server's connections, and what it
does differently underneath (read pausing, FIN, the cost of an idle connection). Everything a
connection does above that is the whole server suite's business, which runs on it."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest
import sniffio

from keepconn import (
    AdmissionConfig,
    CloseReason,
    Connection,
    ConnectionClosed,
    ServerConfig,
    ServerEvent,
)
from keepconn._asyncio.connection import NativeConnection
from keepconn._asyncio.gate import HELLOS_PER_TURN
from keepconn._asyncio.listener import ACCEPT_BATCH
from keepconn.tcp._socket import unread_bytes
from tests.lineapp import (
    Client,
    closes,
    cyclic_garbage,
    serving,
    tracked_objects_per_idle_connection,
    wait_for,
)
from tests.timing import slack

from ..anyio.test_server_edges import server_with

pytestmark = pytest.mark.anyio
BASE = dict(admission=None, flapping=None)
#: The loops the native transport runs on.
NATIVE_BACKENDS = pytest.mark.parametrize(
    "anyio_backend",
    [
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ],
)


@asynccontextmanager
async def sampled_each_turn(read: Callable[[], int]) -> AsyncIterator[list[int]]:
    """``read()`` once per turn of the event loop while the block runs (a task that yields
    after each sample), into the list yielded; two turns more after the block, so that the
    last change is seen."""
    samples: list[int] = []

    async def every_turn() -> None:
        while True:
            samples.append(read())
            await asyncio.sleep(0)

    sampler = asyncio.get_running_loop().create_task(every_turn())
    try:
        yield samples
        for _ in range(2):
            await asyncio.sleep(0)
    finally:
        sampler.cancel()


def on_asyncio() -> bool:
    return sniffio.current_async_library() == "asyncio"


@pytest.mark.parametrize("transport", ["auto", "anyio"])
async def test_plain_tcp_on_asyncio_is_carried_natively_unless_told_otherwise(
    transport: str,
) -> None:
    async with serving(ServerConfig(transport=transport, **BASE)) as (server, port):
        client = await Client.connect(port)
        assert await client.hello("dev") == b"OK"
        await client.send(b"DATA x")
        assert await client.line() == b"ACK x"
        [conn] = server.connections
        assert isinstance(conn, Connection)
        native = transport == "auto" and on_asyncio()
        assert isinstance(conn, NativeConnection) is native
        assert conn.raw_socket().getpeername() == client.stream.extra(
            anyio.abc.SocketAttribute.local_address
        )
        await client.aclose()


async def test_reading_pauses_while_frames_wait_for_a_busy_handler() -> None:
    # The peer's bytes wait in the kernel, not in the server's memory, while the handler is
    # busy; when it comes back every frame is there, in order.
    events: list[ServerEvent] = []
    release = anyio.Event()
    busy = anyio.Event()

    async def slow(conn: Connection[bytes]) -> None:
        async for line in conn:
            if line == b"DATA wait":
                busy.set()
                await release.wait()
            await conn.send(b"ACK " + line[5:] + b"\n")

    server = server_with(slow, ServerConfig(**BASE), events)
    async with anyio.create_task_group() as tasks:
        [(_, port)] = await tasks.start(server.serve_tcp, "127.0.0.1", 0)
        client = await Client.connect(port)
        assert await client.hello("slow") == b"OK"
        await client.send(b"DATA wait")
        with anyio.fail_after(slack(5)):
            await busy.wait()
        lines = [b"DATA %d" % i for i in range(200)]
        for line in lines:
            await client.send(line)
        [conn] = server.connections
        await wait_for(lambda: unread_bytes(conn.raw_socket()) > 0)
        assert conn.bytes_received < sum(len(line) + 1 for line in lines)
        release.set()
        assert await client.line() == b"ACK wait"
        for i in range(200):
            assert await client.line() == b"ACK %d" % i
        await client.aclose()
        await server.shutdown()


async def test_a_fin_is_answered_at_once() -> None:
    # No CLOSE_WAIT: the handler waiting in receive() sees the end and the socket closes.
    events: list[ServerEvent] = []
    async with serving(ServerConfig(**BASE), events=events) as (server, port):
        client = await Client.connect(port)
        assert await client.hello("leaver") == b"OK"
        await client.stream.send_eof()
        assert await client.closed_by_server()
        await wait_for(lambda: bool(closes(events, CloseReason.PEER_CLOSED)))
        assert not server.connections
        await client.aclose()


@NATIVE_BACKENDS
async def test_an_idle_native_connection_costs_few_tracked_objects() -> None:
    # The lever against the cyclic collector's pauses (issue: lean): count what the server
    # tracks per idle connection. Plain blocking sockets on the client side (loopback: the
    # kernel completes them without the loop), so that the count is the server's, plus one
    # client socket object each. (The native transport runs on asyncio and uvloop only.)
    per_connection = await tracked_objects_per_idle_connection(ServerConfig(**BASE))
    # About 22 on CPython 3.11, 20 on uvloop (the anyio transport: about 62).
    assert per_connection < 30, per_connection


@NATIVE_BACKENDS
async def test_a_full_listen_queue_is_taken_a_batch_per_loop_turn() -> None:
    # In a reconnect storm the listen queue is full, and an accept that finds a connection
    # waiting does not suspend: the accept loop took the whole backlog in one turn of the event
    # loop, and every live session's ping waited behind thousands of hellos (the storm
    # benchmark's loop lag: 5 s). Here the loop is held while 300 connections queue in the
    # kernel, and a task that runs once per loop turn samples the accept count.
    queued = 300
    clients: list[socket.socket] = []
    async with serving(ServerConfig(**BASE)) as (server, port):
        try:
            # Blocking connects: the kernel completes them into the queue while the loop waits.
            for _ in range(queued):
                clients.append(socket.create_connection(("127.0.0.1", port)))
            async with sampled_each_turn(lambda: server.stats().accepted) as samples:
                await wait_for(lambda: server.stats().accepted >= queued, timeout=slack(10))
        finally:
            for sock in clients:
                sock.close()
    steps = [b - a for a, b in zip(samples, samples[1:], strict=False)]
    # At most a batch per turn (plus the one a waiting accept may bring back first).
    assert max(steps) <= ACCEPT_BATCH + 1, max(steps)
    assert sum(steps) >= queued - samples[0]


@NATIVE_BACKENDS
async def test_hellos_that_arrive_together_are_served_a_batch_per_loop_turn() -> None:
    # The storm's last stall: connections accepted while their devices were still busy, whose
    # hellos then all became readable in one turn, and the next turns served every one of
    # them with the live sessions waiting. Here 200 connections wait in their hello, the loop
    # is held while all of them send it, and a task that runs once per turn samples how many
    # sessions are open.
    count = 200
    clients: list[socket.socket] = []
    async with serving(ServerConfig(**BASE)) as (server, port):
        try:
            for _ in range(count):
                clients.append(socket.create_connection(("127.0.0.1", port)))
            await wait_for(lambda: server.stats().pending_hellos == count, timeout=slack(10))
            for i, sock in enumerate(clients):  # the loop is held meanwhile
                sock.sendall(b"HELLO d%d secret\n" % i)
            async with sampled_each_turn(lambda: len(server.registry)) as samples:
                await wait_for(lambda: len(server.registry) == count, timeout=slack(10))
        finally:
            for sock in clients:
                sock.close()
    steps = [b - a for a, b in zip(samples, samples[1:], strict=False)]
    assert max(steps) <= HELLOS_PER_TURN, max(steps)
    assert samples[-1] - samples[0] >= count - HELLOS_PER_TURN


@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {}), id="asyncio")])
async def test_a_hello_sent_with_the_handshake_opens_its_session_the_turn_after_the_accept() -> (
    None
):
    # The churn benchmark's takeovers waited five loop turns between the accept and the
    # welcome (the accept task's wake-up, the connection's task, connection_made, the first
    # poll of the socket, the hello's task step), and in a reconnect burst every turn is as
    # long as everything else the loop serves in it. On asyncio's selector loop the accept is
    # a reader callback, which makes the transport and reads what the peer has sent: the
    # session opens in the next turn. Two tasks that run once per turn sample the counts.
    async with serving(ServerConfig(**BASE)) as (server, port):
        client = socket.create_connection(("127.0.0.1", port))
        try:
            async with (
                sampled_each_turn(lambda: server.stats().accepted) as accepted,
                sampled_each_turn(lambda: len(server.registry)) as opened,
            ):
                # While the loop is held, so both are there when it next polls.
                client.sendall(b"HELLO dev secret\n")
                await wait_for(lambda: len(server.registry) == 1, timeout=slack(5))
        finally:
            client.close()
    turns = opened.index(1) - accepted.index(1)
    # (Through an accept task and connect_accepted_socket: 4.)
    assert turns <= 1, (accepted, opened)


@NATIVE_BACKENDS
@pytest.mark.parametrize("ending", ["fin after the hello", "reset"])
async def test_a_peer_gone_before_it_is_served_is_closed_as_gone(ending: str) -> None:
    # On asyncio the accept turn reads what the socket holds (the hello and the FIN's EOF, or
    # the reset's error, which that read then takes): the connection must still end as one
    # whose client gave up in the listen queue, as it does on uvloop, which reads later.
    events: list[ServerEvent] = []
    async with serving(ServerConfig(**BASE), events=events) as (server, port):
        client = socket.create_connection(("127.0.0.1", port))
        if ending == "reset":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            client.sendall(b"HELLO gone secret\n")
        client.close()  # while the loop is held: accepted after it
        await wait_for(lambda: server.stats().accepted == 1 and not server.connections)
    [closed] = [e for e in events if isinstance(e, ConnectionClosed)]
    assert closed.reason is CloseReason.PEER_CLOSED
    assert closed.detail == "gone before it was accepted"
    assert not server.registry


@NATIVE_BACKENDS
async def test_an_answer_to_a_received_frame_keeps_the_turn_and_a_second_send_yields() -> None:
    # A PINGRESP is the commonest send: the handler waited for the ping, so the loop has run
    # since its last send, and yielding again costs a whole task step per ping (the gateway's
    # CPU per ping). A second send in a row must still let the loop run, as anyio's send does,
    # or a handler sending in a loop holds every other session. A task that runs once per
    # loop turn counts the turns around each send.
    events: list[ServerEvent] = []
    turns: list[tuple[int, int, int]] = []
    counted: list[int] = []  # one sample per loop turn, once the sampler runs (below)

    async def answer_twice(conn: Connection[bytes]) -> None:
        async for _ in conn:
            before = len(counted)
            await conn.send(b"ACK 1\n")
            between = len(counted)
            await conn.send(b"ACK 2\n")
            turns.append((before, between, len(counted)))

    server = server_with(answer_twice, ServerConfig(**BASE), events)
    async with anyio.create_task_group() as tasks:
        [(_, port)] = await tasks.start(server.serve_tcp, "127.0.0.1", 0)
        client = await Client.connect(port)
        assert await client.hello("twice") == b"OK"
        async with sampled_each_turn(lambda: 0) as counted:
            for i in range(3):
                await client.send(b"DATA %d" % i)
                assert await client.line() == b"ACK 1"
                assert await client.line() == b"ACK 2"
        await client.aclose()
        await server.shutdown()
    assert len(turns) == 3
    for before, between, after in turns:
        assert between == before, turns  # the answer went out in the turn the frame came
        assert after > between, turns  # the second send let the loop run


@NATIVE_BACKENDS
@pytest.mark.parametrize("ending", ["peer_closed", "taken_over", "refused", "malformed"])
async def test_a_finished_connection_is_freed_without_the_cyclic_collector(ending: str) -> None:
    # Every closed connection used to stay behind as a reference cycle (asyncio's transport
    # holds a bound method of its own; the connection, its task and the task's exception hold
    # each other): 7 to 15 objects each that only a full collection frees. With collections
    # held through a storm, tens of thousands of them made the one that finally ran last
    # 0.7 s. Now each is freed by reference counting the moment it is finished.
    count = 200
    config = ServerConfig(**BASE)
    if ending == "refused":
        config = ServerConfig(admission=AdmissionConfig(accept_rate=0.001, accept_burst=1))
    clients: list[socket.socket] = []
    async with serving(config) as (server, port):
        with cyclic_garbage() as garbage:
            try:
                for i in range(count):
                    sock = socket.create_connection(("127.0.0.1", port))
                    name = b"same" if ending == "taken_over" else b"d%d" % i
                    sock.sendall(b"HELLO " + name + b" secret\n")
                    if ending == "malformed":
                        sock.sendall(b"x" * 2000)  # a line over the framer's 1,024 bytes
                    clients.append(sock)
                stats = server.stats
                if ending == "taken_over":
                    await wait_for(lambda: stats().takeovers == count - 1, timeout=slack(10))
                elif ending == "malformed":
                    bad = CloseReason.PROTOCOL_ERROR
                    await wait_for(lambda: stats().closed[bad] == count, timeout=slack(10))
                elif ending == "refused":
                    refused = CloseReason.OVERLOADED
                    await wait_for(lambda: stats().closed[refused] == count - 1, timeout=slack(10))
                else:
                    await wait_for(lambda: len(server.registry) == count, timeout=slack(10))
            finally:
                for sock in clients:
                    sock.close()
            await wait_for(lambda: not server.connections, timeout=slack(10))
    # (A few objects of one-off set-up may be found; nothing per connection.)
    assert sum(garbage.values()) < count, garbage.most_common(8)

"""Edge cases of the server runtime found in review: concurrent sends, a ping stuck on a full
buffer, shutdown stragglers, cancellation, hellos during shutdown, graceful heartbeat closes,
a connection that lives and dies while an audit reads the kernel's table."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

from keepconn import (
    ActiveHeartbeat,
    AddressFlappingConfig,
    CloseReason,
    Connection,
    FlappingConfig,
    Hello,
    LineFramer,
    Server,
    ServerConfig,
    ServerEvent,
    SessionTakenOver,
)
from keepconn._anyio import audit as audit_module
from keepconn.tcp import census
from tests.lineapp import Client, closes, goodbye, identify, make_server, serving, wait_for
from tests.timing import slack

pytestmark = pytest.mark.anyio
BASE = dict(admission=None, flapping=None)


def server_with(
    handler: object, config: ServerConfig, events: list[ServerEvent], send_ping: object = None
) -> Server[bytes]:
    return Server(
        identify=identify,
        handler=handler,  # type: ignore[arg-type]
        framer=lambda: LineFramer(max_length=1024),
        config=config,
        send_ping=send_ping,  # type: ignore[arg-type]
        goodbye=goodbye,
        on_event=events.append,
    )


async def test_handler_and_ping_task_can_send_at_once() -> None:
    # The handler streams data while pings go out; the peer answers every ping.
    events: list[ServerEvent] = []

    async def streamer(conn: Connection[bytes]) -> None:
        async with anyio.create_task_group() as tasks:

            async def read() -> None:
                async for line in conn:
                    if line == b"PONG":
                        conn.pong_received()

            tasks.start_soon(read)
            while True:
                await conn.send(b"DATA " + b"x" * 2000 + b"\n")

    async def ping(conn: Connection[bytes]) -> None:
        await conn.send(b"PING\n")

    beat = ActiveHeartbeat(interval=0.05, timeout=0.05, misses=3)
    server = server_with(streamer, ServerConfig(heartbeat=beat, **BASE), events, ping)
    async with anyio.create_task_group() as tasks:
        [(_, port)] = await tasks.start(server.serve_tcp, "127.0.0.1", 0)
        client = await Client.connect(port)
        assert await client.hello("busy") == b"OK"
        with anyio.move_on_after(1.5):
            while True:
                line = await client.line()
                assert line == b"PING" or line.startswith(b"DATA x"), line[:20]
                if line == b"PING":
                    await client.send(b"PONG")
        assert "busy" in server.registry
        assert not closes(events, CloseReason.APPLICATION)
        await client.aclose()
        await server.shutdown()


async def test_a_ping_stuck_on_a_full_buffer_still_declares_the_peer_dead() -> None:
    events: list[ServerEvent] = []
    big = b"PING" + b" " * (32 << 20) + b"\n"  # application backlog filling the buffers

    async def ping(conn: Connection[bytes]) -> None:
        await conn.send(big)

    async def idle(conn: Connection[bytes]) -> None:
        await anyio.sleep_forever()

    beat = ActiveHeartbeat(interval=0.2, timeout=0.2, misses=1)
    server = server_with(idle, ServerConfig(heartbeat=beat, **BASE), events, ping)
    async with anyio.create_task_group() as tasks:
        [(_, port)] = await tasks.start(server.serve_tcp, "127.0.0.1", 0)
        client = await Client.connect(port)
        assert await client.hello("stopped") == b"OK"  # and never reads again
        started = time.monotonic()
        await wait_for(
            lambda: bool(closes(events, CloseReason.HEARTBEAT_TIMEOUT)), timeout=slack(5)
        )
        assert time.monotonic() - started <= beat.detection_bound + slack(0.5)
        await client.aclose()
        await server.shutdown()


async def test_shutdown_stragglers_are_reset_not_left_in_fin_wait1() -> None:
    events: list[ServerEvent] = []

    async def backlog(conn: Connection[bytes]) -> None:
        await conn.send(b"X" * (32 << 20))  # a stuck device with a backlog

    config = ServerConfig(shutdown_grace=0.3, **BASE)
    server = server_with(backlog, config, events)
    async with anyio.create_task_group() as tasks:
        [(_, port)] = await tasks.start(server.serve_tcp, "127.0.0.1", 0)
        client = await Client.connect(port)
        assert await client.hello("stuck") == b"OK"  # then never reads
        await anyio.sleep(slack(0.2))  # time for the handler to fill the buffers
        await server.shutdown()
    await anyio.sleep(slack(0.1))
    table = census(port)
    assert table.counts.get("FIN_WAIT1", 0) == 0, table.counts
    assert [e.reason for e in closes(events, CloseReason.SHUTDOWN)] == [CloseReason.SHUTDOWN]
    await client.aclose()


async def test_cancelling_serve_closes_connections_as_shutdown() -> None:
    events: list[ServerEvent] = []
    server = make_server(ServerConfig(**BASE), events)
    async with anyio.create_task_group() as tasks:
        [(_, port)] = await tasks.start(server.serve_tcp, "127.0.0.1", 0)
        live = await Client.connect(port)
        assert await live.hello("dev1") == b"OK"
        lurker = await Client.connect(port)
        await wait_for(lambda: server.stats().pending_hellos == 1)
        tasks.cancel_scope.cancel()
    reasons = sorted(str(e.identity) for e in closes(events, CloseReason.SHUTDOWN))
    assert reasons == ["None", "dev1"]
    assert not closes(events, CloseReason.APPLICATION)
    await live.aclose()
    await lurker.aclose()


async def test_a_hello_completed_during_shutdown_takes_nothing_over() -> None:
    events: list[ServerEvent] = []
    server = make_server(ServerConfig(shutdown_grace=1.0, **BASE), events)
    async with anyio.create_task_group() as tasks:
        [(_, port)] = await tasks.start(server.serve_tcp, "127.0.0.1", 0)
        incumbent = await Client.connect(port)
        assert await incumbent.hello("dev") == b"OK"
        late = await Client.connect(port)
        await wait_for(lambda: server.stats().pending_hellos == 1)
        tasks.start_soon(server.shutdown)
        assert (await incumbent.line()).startswith(b"GOAWAY ")
        await late.send(b"HELLO dev secret")
        await anyio.sleep(slack(0.2))
        assert not [e for e in events if isinstance(e, SessionTakenOver)]
        assert not closes(events, CloseReason.TAKEN_OVER)
        await incumbent.aclose()
        await late.aclose()


async def test_graceful_heartbeat_close_ends_the_session_at_once() -> None:
    events: list[ServerEvent] = []
    beat = ActiveHeartbeat(interval=0.2, timeout=0.15)
    config = ServerConfig(heartbeat=beat, timeout_close="graceful", close_grace=2.0, **BASE)
    async with serving(config, events=events) as (server, port):
        quiet = await Client.connect(port)
        assert await quiet.hello("dev") == b"OK"  # never answers a ping
        await wait_for(lambda: "dev" not in server.registry, timeout=slack(3))
        # Declared dead: a reconnect during the grace is a fresh session, not a takeover.
        again = await Client.connect(port)
        assert await again.hello("dev") == b"OK"
        assert server.stats().takeovers == 0
        # The close event comes when the grace is over (the quiet peer never sends its FIN).
        await wait_for(
            lambda: bool(closes(events, CloseReason.HEARTBEAT_TIMEOUT)),
            timeout=config.close_grace + slack(2),
        )
        assert not closes(events, CloseReason.TAKEN_OVER)
        await quiet.aclose()
        await again.aclose()


async def test_a_stale_hello_from_a_peer_that_gave_up_takes_nothing_over() -> None:
    # In a storm the server may read a hello long after it was sent; by then the device may
    # have given up on that connection and be live on a newer one, which must survive.
    events: list[ServerEvent] = []
    lag = 0.3

    async def laggy_identify(conn: Connection[bytes]) -> Hello:
        parts = (await conn.receive()).split()
        if parts[-1] == b"lag":
            await anyio.sleep(lag)  # the server is behind
        return Hello(parts[1].decode(), welcome=b"OK\n")

    async def handler(conn: Connection[bytes]) -> None:
        async for line in conn:
            await conn.send(b"ACK " + line + b"\n")

    server = Server(
        identify=laggy_identify,
        handler=handler,
        framer=LineFramer,
        config=ServerConfig(**BASE),
        on_event=events.append,
    )
    async with anyio.create_task_group() as tasks:
        [(_, port)] = await tasks.start(server.serve_tcp, "127.0.0.1", 0)
        stale = await Client.connect(port)
        await stale.send(b"HELLO dev lag")
        await anyio.sleep(slack(0.05))
        await stale.aclose()  # the device gives up on it ...
        fresh = await Client.connect(port)
        assert await fresh.hello("dev") == b"OK"  # ... and is live on a new connection
        await anyio.sleep(lag + slack(0.2))  # the stale hello is judged meanwhile
        assert not [e for e in events if isinstance(e, SessionTakenOver)]
        await fresh.send(b"still")
        assert await fresh.line() == b"ACK still"
        [gone] = closes(events, CloseReason.PEER_CLOSED)
        assert gone.identity is None and "before its hello" in gone.detail
        await fresh.aclose()
        await server.shutdown()


async def test_a_peer_whose_bytes_wait_unread_is_not_reaped_when_the_server_is_behind() -> None:
    # The handler is busy (a slow database, a stalled loop) while the peer keeps pinging:
    # the pings sit unread in the kernel, so the session looks silent but the peer is alive.
    events: list[ServerEvent] = []

    async def busy(conn: Connection[bytes]) -> None:
        async for line in conn:
            if line == b"WORK":
                await anyio.sleep(1.2)  # far past the 0.4 s timeout
            await conn.send(b"ACK " + line + b"\n")

    config = ServerConfig(idle_timeout=0.4, resolution=0.05, **BASE)
    server = server_with(busy, config, events)
    async with anyio.create_task_group() as tasks:
        [(_, port)] = await tasks.start(server.serve_tcp, "127.0.0.1", 0)
        client = await Client.connect(port)
        assert await client.hello("worker") == b"OK"
        await client.send(b"WORK")
        for _ in range(10):
            await anyio.sleep(0.15)
            await client.send(b"PING")
        assert await client.line() == b"ACK WORK"
        assert not closes(events, CloseReason.IDLE_TIMEOUT)
        assert server.stats().spared >= 1
        assert "worker" in server.registry
        # Once the peer really falls silent it is reaped as usual.
        await wait_for(lambda: bool(closes(events, CloseReason.IDLE_TIMEOUT)), timeout=slack(5))
        await client.aclose()
        await server.shutdown()


async def test_a_trickler_is_spared_at_most_once() -> None:
    # Bytes waiting in the kernel spare a due session, but a partial frame is not life: a peer
    # that keeps a byte always in flight gains one timeout at most.
    events: list[ServerEvent] = []
    timeout = 0.5
    config = ServerConfig(idle_timeout=30, resolution=0.05, **BASE)
    async with serving(config, events=events) as (server, port):
        client = await Client.connect(port)
        assert await client.hello("trickler", timeout=timeout) == b"OK"
        with anyio.move_on_after(3 * timeout + slack(1)):
            try:
                for byte in b"DATA " + b"x" * 500:
                    await client.stream.send(bytes([byte]))
                    await anyio.sleep(0.005)
            except (anyio.BrokenResourceError, OSError):
                pass
        await wait_for(lambda: bool(closes(events, CloseReason.IDLE_TIMEOUT)), timeout=slack(2))
        [closed] = closes(events, CloseReason.IDLE_TIMEOUT)
        assert closed.duration <= 2 * timeout + slack(0.5), closed.duration
        assert server.stats().spared <= 1
        await client.aclose()


async def test_a_connection_born_and_closed_during_the_audit_read_is_no_phantom(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Seen in the gateway's tests: an audit started before a connection was accepted read the
    # table while it was ESTABLISHED and finished after it had closed, so neither of the
    # audit's snapshots of the connections knew it. Here the read is held at those two points.
    real_read = audit_module.own_rows
    reading, opened, read, finished = (threading.Event() for _ in range(4))

    def held_read(addresses: tuple[tuple[str, int], ...]) -> object:
        reading.set()
        assert opened.wait(10)
        rows = real_read(addresses)
        read.set()
        assert finished.wait(10)
        return rows

    monkeypatch.setattr(audit_module, "own_rows", held_read)
    async with serving(ServerConfig(**BASE)) as (server, port):
        audits = []

        async def audit() -> None:
            audits.append(await server.audit())

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(audit)
            await wait_for(reading.is_set)
            client = await Client.connect(port)
            assert await client.hello("brief") == b"OK"
            opened.set()
            await wait_for(read.is_set)
            await client.aclose()
            await wait_for(lambda: server.stats().closed[CloseReason.PEER_CLOSED] == 1)
            finished.set()
    [result] = audits
    assert (result.established, result.closing, result.phantoms) == (1, 1, 0), result


async def test_hello_timeouts_count_toward_the_per_address_ban() -> None:
    # A connection that never says hello is the peer's doing (a scanner, a slowloris): with
    # the per-address detector on, enough of them ban the address, and its next connection
    # is closed FLAPPING at accept, before any byte is read.
    events: list[ServerEvent] = []
    config = ServerConfig(
        hello_timeout=0.3,
        address_flapping=AddressFlappingConfig(enabled=True, max_aborted=3),
        **BASE,
    )
    async with serving(config, events=events) as (_, port):
        silent = [await Client.connect(port) for _ in range(4)]
        await wait_for(lambda: len(closes(events, CloseReason.HELLO_TIMEOUT)) == 4, slack(5))
        late = await Client.connect(port)
        assert await late.closed_by_server(slack(2))
        [banned] = closes(events, CloseReason.FLAPPING)
        assert banned.detail == "address banned"
        for client in [*silent, late]:
            await client.aclose()


async def test_a_busy_handler_does_not_make_its_peer_s_answers_missed_pings() -> None:
    # The handler is busy (a slow commit, say) for longer than a ping's timeout while the peer
    # answers every ping: the answers wait for the handler, read or in the kernel. The server
    # is behind, not the peer: no HEARTBEAT_TIMEOUT (the reaper's FIONREAD rule, in the ping
    # loop too).
    events: list[ServerEvent] = []
    busy_for = 0.8

    async def worker(conn: Connection[bytes]) -> None:
        async for line in conn:
            if line == b"WORK":
                await anyio.sleep(busy_for)
                await conn.send(b"DONE\n")
            elif line == b"PONG":
                conn.pong_received()
            elif line == b"BYE":
                return

    async def ping(conn: Connection[bytes]) -> None:
        await conn.send(b"PING\n")

    beat = ActiveHeartbeat(interval=0.15, timeout=0.1)
    server = server_with(worker, ServerConfig(heartbeat=beat, **BASE), events, ping)
    async with anyio.create_task_group() as tasks:
        [(_, port)] = await tasks.start(server.serve_tcp, "127.0.0.1", 0)
        client = await Client.connect(port)
        assert await client.hello("worker") == b"OK"
        await client.send(b"WORK")
        pings = 0
        with anyio.fail_after(slack(5)):
            while (line := await client.line()) != b"DONE":
                assert line == b"PING", line
                pings += 1
                await client.send(b"PONG")
        assert pings >= 3  # pings went out, and were answered, while the handler was busy
        await client.send(b"BYE")
        assert await client.closed_by_server()
        await client.aclose()
        await server.shutdown()
    assert closes(events, CloseReason.HEARTBEAT_TIMEOUT) == []
    assert closes(events, CloseReason.APPLICATION) != []
    assert server.stats().spared >= 1


async def test_a_banned_hello_beside_a_live_session_is_refused_not_welcomed_first() -> None:
    # The verdict comes before any answer: a takeover's welcome goes out first (to prove the
    # peer is still there) only for a hello that may take over at all.
    events: list[ServerEvent] = []
    config = ServerConfig(flapping=FlappingConfig(max_hellos=2, window=60), admission=None)
    async with serving(config, events=events) as (_, port):
        clients = [await Client.connect(port) for _ in range(3)]
        answers = [await client.hello("flapper") for client in clients]
        assert answers == [b"OK", b"OK", b"BUSY"]
        assert await clients[2].closed_by_server()
        await clients[1].send(b"DATA kept")
        assert await clients[1].line() == b"ACK kept"
        assert len(closes(events, CloseReason.FLAPPING)) == 1
        for client in clients:
            await client.aclose()

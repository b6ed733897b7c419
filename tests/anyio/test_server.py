"""The server runtime on real loopback sockets, on asyncio, uvloop and trio."""

from __future__ import annotations

import socket
import time

import anyio
import anyio.abc
import pytest

from keepconn import (
    ActiveHeartbeat,
    CloseReason,
    ConfigError,
    ConnectionClosed,
    ConnectionOpened,
    PingRateLimit,
    RoundTrip,
    ServerConfig,
    ServerEvent,
    SessionTakenOver,
)
from keepconn.tcp import census
from tests.lineapp import RECEIVED, Client, closes, make_server, own_sockets, serving, wait_for
from tests.timing import not_before, slack

pytestmark = pytest.mark.anyio

# No admission limits or flapping bans unless a test asks: they are tested on their own.
BASE = dict(admission=None, flapping=None)


def server_side_established(port: int) -> int:
    # This process's sockets only. The kernel may hand a new listener a port number on which
    # another process's accepted connections still live (their listener gone, SO_REUSEADDR
    # inherited): with a benchmark running beside the suite this once counted 7, not 1.
    mine = own_sockets()
    return sum(
        1
        for row in census(port).sockets
        if row.state == "ESTABLISHED" and row.local_port == port and row.inode in mine
    )


async def test_silent_peer_is_reaped_within_its_bound_and_never_before() -> None:
    events: list[ServerEvent] = []
    timeout, resolution = 1.5, 0.1
    config = ServerConfig(idle_timeout=30, resolution=resolution, **BASE)
    async with serving(config, events=events) as (server, port):
        client = await Client.connect(port)
        assert await client.hello("silent", timeout=timeout) == b"OK"
        await client.send(b"DATA 1")
        assert await client.line() == b"ACK 1"
        last_frame = time.monotonic()
        assert await client.closed_by_server(timeout=timeout + slack(3))
        waited = time.monotonic() - last_frame
        assert not_before(timeout) <= waited <= timeout + resolution + slack(0.3), waited
        await wait_for(lambda: bool(closes(events, CloseReason.IDLE_TIMEOUT)))
        [closed] = closes(events, CloseReason.IDLE_TIMEOUT)
        assert closed.identity == "silent"
        assert "silent" not in server.registry
        await client.aclose()


async def test_responsive_peer_is_never_reaped_over_30_periods() -> None:
    events: list[ServerEvent] = []
    period = 0.1
    config = ServerConfig(idle_timeout=3 * period, resolution=0.05, **BASE)
    async with serving(config, events=events) as (server, port):
        client = await Client.connect(port)
        assert await client.hello("chatty") == b"OK"
        for i in range(30):
            await client.send(b"PING")
            assert await client.line() == b"PONG", i
            await anyio.sleep(period)
        assert "chatty" in server.registry
        assert not closes(events, CloseReason.IDLE_TIMEOUT)
        await client.aclose()


async def test_active_heartbeat_measures_rtt_and_reaps_a_peer_that_stops_answering() -> None:
    events: list[ServerEvent] = []
    beat = ActiveHeartbeat(interval=0.2, timeout=0.15, misses=1)
    config = ServerConfig(idle_timeout=60, heartbeat=beat, **BASE)
    async with serving(config, events=events) as (server, port):
        client = await Client.connect(port)
        assert await client.hello("pinged") == b"OK"
        for _ in range(3):
            assert await client.line() == b"PING"
            await client.send(b"PONG")
        await wait_for(lambda: any(isinstance(e, RoundTrip) for e in events))
        rtts = [e.rtt for e in events if isinstance(e, RoundTrip)]
        assert all(0 <= rtt < 0.15 for rtt in rtts)
        stopped = time.monotonic()
        # Stop answering (but keep the socket open): two misses in a row are fatal.
        assert await client.closed_by_server(timeout=beat.detection_bound + slack(2))
        assert time.monotonic() - stopped <= beat.detection_bound + slack(0.3)
        await wait_for(lambda: bool(closes(events, CloseReason.HEARTBEAT_TIMEOUT)))
        assert "pinged" not in server.registry
        await client.aclose()


async def test_peer_eof_is_answered_at_once_no_close_wait() -> None:
    config = ServerConfig(**BASE)
    async with serving(config) as (server, port):
        clients = []
        for i in range(500):
            client = await Client.connect(port)
            await client.send(b"HELLO dev%d secret" % i)
            clients.append(client)
        for client in clients:
            assert await client.line() == b"OK"
        assert len(server.registry) == 500
        for client in clients:
            await client.aclose()
        await anyio.sleep(slack(0.2))
        counts = census(port).counts
        assert counts.get("CLOSE_WAIT", 0) == 0, counts
        await wait_for(lambda: len(server.registry) == 0, timeout=slack(2))
        assert server.stats().closed[CloseReason.PEER_CLOSED] == 500


async def test_reconnect_with_same_identity_takes_over_at_once() -> None:
    events: list[ServerEvent] = []
    async with serving(ServerConfig(**BASE), events=events) as (server, port):
        old = await Client.connect(port)
        assert await old.hello("device-7") == b"OK"
        # The "rebooted" device: the old connection is never closed by the client.
        new = await Client.connect(port)
        started = time.monotonic()
        assert await new.hello("device-7") == b"OK"
        assert await old.closed_by_server(timeout=slack(1))
        assert time.monotonic() - started < slack(0.1)
        await new.send(b"DATA x")
        assert await new.line() == b"ACK x"
        assert [e for e in events if isinstance(e, SessionTakenOver)]
        await wait_for(lambda: bool(closes(events, CloseReason.TAKEN_OVER)))
        await anyio.sleep(slack(0.05))
        assert server_side_established(port) == 1
        assert server.registry.get("device-7") is not None
        await old.aclose()
        await new.aclose()


async def test_wrong_credentials_never_disturb_the_live_session() -> None:
    events: list[ServerEvent] = []
    async with serving(ServerConfig(**BASE), events=events) as (server, port):
        victim = await Client.connect(port)
        assert await victim.hello("victim") == b"OK"
        session = server.registry.get("victim")
        attacker = await Client.connect(port)
        assert await attacker.hello("victim", password=b"guess") == b"DENIED"
        assert await attacker.closed_by_server()
        await wait_for(lambda: bool(closes(events, CloseReason.AUTH_FAILED)))
        assert server.registry.get("victim") is session
        await victim.send(b"DATA still-here")
        assert await victim.line() == b"ACK still-here"
        assert closes(events, CloseReason.AUTH_FAILED)
        assert not closes(events, CloseReason.TAKEN_OVER)
        await victim.aclose()
        await attacker.aclose()


async def test_concurrent_hellos_for_one_identity_leave_exactly_one_winner() -> None:
    async with serving(ServerConfig(**BASE)) as (server, port):
        for _run in range(20):
            count = 100 if _run else 2000
            clients = [await Client.connect(port) for _ in range(count)]
            async with anyio.create_task_group() as tasks:
                for client in clients:
                    tasks.start_soon(client.send, b"HELLO shared secret")
            await wait_for(lambda: server.stats().pending_hellos == 0, timeout=slack(20))
            winner = server.registry.get("shared")
            assert winner is not None
            assert len(server.registry) == 1
            live = [c for c in server.connections if c.session is not None and c.session.open]
            assert len(live) == 1 and live[0].session is winner
            for client in clients:
                await client.aclose()
            await wait_for(lambda: len(server.registry) == 0, timeout=slack(10))
            await wait_for(lambda: not server.connections, timeout=slack(10))


async def test_hello_less_connections_are_closed_at_the_hello_timeout() -> None:
    # The server's promise is per connection: one that never sends its hello is closed
    # hello_timeout after it was accepted, never before and at most a little after, however
    # many others wait beside it. Each is measured from its own connect, not from the start of
    # the test: the test's 2,000 sequential connects alone take seconds on a loaded machine.
    hello_timeout, count = 1.0, 2000
    config = ServerConfig(hello_timeout=hello_timeout, **BASE)
    durations: list[float] = []
    closed_at: dict[int, float] = {}  # client port -> when the server reported the close

    def on_event(event: ServerEvent) -> None:
        if isinstance(event, ConnectionClosed) and event.reason is CloseReason.HELLO_TIMEOUT:
            closed_at[event.peer[1]] = time.monotonic()
            durations.append(event.duration)

    async with serving(config, on_event=on_event) as (server, port):
        connected_at: dict[int, float] = {}
        silent = []
        for _ in range(count):
            client = await Client.connect(port)
            connected_at[client.local_port()] = time.monotonic()
            silent.append(client)
        real = await Client.connect(port)
        before = time.monotonic()
        assert await real.hello("real") == b"OK"
        # A real device is served at once, whatever the hello-less crowd is doing.
        assert time.monotonic() - before < slack(0.5)
        await wait_for(lambda: len(closed_at) == count, timeout=hello_timeout + slack(5))
        assert set(closed_at) == set(connected_at)
        # Never early: the server's own clock, from accept to close.
        assert min(durations) >= hello_timeout
        # Never much late: from each client's own connect to the server's close of it.
        late = max(closed_at[p] - connected_at[p] for p in connected_at) - hello_timeout
        assert late <= slack(0.5), late
        assert "real" in server.registry
        for client in silent:
            await client.aclose()
        await real.aclose()


async def test_trickled_partial_frames_do_not_keep_a_peer_alive() -> None:
    events: list[ServerEvent] = []
    timeout = 0.8
    config = ServerConfig(idle_timeout=30, resolution=0.05, **BASE)
    async with serving(config, events=events) as (server, port):
        client = await Client.connect(port)
        assert await client.hello("slowloris", timeout=timeout) == b"OK"
        started = time.monotonic()
        with anyio.move_on_after(timeout + slack(1.5)):
            try:
                for byte in b"DATA " + b"x" * 100:
                    await client.stream.send(bytes([byte]))
                    await anyio.sleep(0.05)
            except (anyio.BrokenResourceError, OSError):
                pass
        assert closes(events, CloseReason.IDLE_TIMEOUT)
        closed = closes(events, CloseReason.IDLE_TIMEOUT)[0]
        assert timeout <= closed.duration - 0 <= timeout + slack(0.5) + (time.monotonic() - started)
        await client.aclose()


async def test_ping_rate_is_enforced_but_the_allowed_rate_is_fine() -> None:
    events: list[ServerEvent] = []
    limit = PingRateLimit(min_interval=0.2, max_strikes=2)
    config = ServerConfig(ping_rate=limit, **BASE)
    async with serving(config, events=events) as (server, port):
        polite = await Client.connect(port)
        assert await polite.hello("polite") == b"OK"
        rude = await Client.connect(port)
        assert await rude.hello("rude") == b"OK"
        for _ in range(6):
            await polite.send(b"PING")
            assert await polite.line() == b"PONG"
            await anyio.sleep(0.25)
        for _ in range(5):
            await rude.send(b"PING")
        assert await rude.closed_by_server()
        await wait_for(lambda: bool(closes(events, CloseReason.TOO_MANY_PINGS)))
        [closed] = closes(events, CloseReason.TOO_MANY_PINGS)
        assert closed.identity == "rude"
        assert "polite" in server.registry
        await polite.aclose()
        await rude.aclose()


async def test_protocol_error_closes_only_that_connection() -> None:
    events: list[ServerEvent] = []
    async with serving(ServerConfig(**BASE), events=events) as (server, port):
        good = await Client.connect(port)
        assert await good.hello("good") == b"OK"
        bad = await Client.connect(port)
        assert await bad.hello("bad") == b"OK"
        await bad.stream.send(b"x" * 5000)  # a line over the framer's 1024-byte limit
        assert await bad.closed_by_server()
        await wait_for(lambda: bool(closes(events, CloseReason.PROTOCOL_ERROR)))
        [closed] = closes(events, CloseReason.PROTOCOL_ERROR)
        assert closed.identity == "bad" and "longer than 1024" in closed.detail
        await good.send(b"DATA ok")
        assert await good.line() == b"ACK ok"
        await good.aclose()
        await bad.aclose()


async def test_shutdown_says_goodbye_with_a_jittered_hint_and_frees_the_port() -> None:
    events: list[ServerEvent] = []
    config = ServerConfig(shutdown_grace=1.0, shutdown_retry_after=10.0, **BASE)
    async with serving(config, events=events) as (server, port):
        clients = [await Client.connect(port) for _ in range(20)]
        for i, client in enumerate(clients):
            assert await client.hello(f"d{i}") == b"OK"
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(server.shutdown)
            hints = []
            for client in clients[:10]:
                line = await client.line()
                assert line.startswith(b"GOAWAY ")
                hints.append(float(line.split()[1]))
                await client.aclose()  # these leave politely
        assert all(9.0 <= h <= 11.0 for h in hints) and len(set(hints)) > 1
        # The other ten never closed: aborted after the grace period.
        await wait_for(lambda: len(closes(events, CloseReason.SHUTDOWN)) == 20)
        for client in clients[10:]:
            await client.aclose()
    # The port can be bound again at once.
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
    await listener.aclose()


async def test_census_agrees_with_the_registry() -> None:
    async with serving(ServerConfig(**BASE)) as (server, port):
        clients = [await Client.connect(port) for _ in range(50)]
        for i, client in enumerate(clients):
            assert await client.hello(f"c{i}") == b"OK"
        for client in clients[:20]:
            await client.aclose()
        await wait_for(lambda: len(server.registry) == 30)
        await anyio.sleep(slack(0.05))
        assert server_side_established(port) == len(server.registry) == 30
        audit = await server.audit()
        assert audit.established == audit.with_session == 30
        assert audit.phantoms == audit.close_wait == audit.in_hello == 0
        # A connection still in its hello is accounted for as such, not as a phantom.
        lurker = await Client.connect(port)
        await wait_for(lambda: server.stats().pending_hellos == 1)
        audit = await server.audit()
        assert (audit.established, audit.in_hello, audit.phantoms) == (31, 1, 0)
        await lurker.aclose()
        for client in clients[20:]:
            await client.aclose()


async def test_the_audit_counts_only_the_server_s_own_address() -> None:
    # Another listener on the same port number but another address (in this process, so its
    # sockets are this process's too): its connections are not the server's, and must not
    # count as the server's phantoms.
    async with serving(ServerConfig(**BASE)) as (server, port):
        client = await Client.connect(port)
        assert await client.hello("mine") == b"OK"
        with socket.socket() as other:
            other.bind(("127.0.0.2", port))
            other.listen()
            with socket.create_connection(("127.0.0.2", port)) as stranger:
                accepted, _ = other.accept()
                with accepted:
                    assert any(
                        row.local_address == "127.0.0.2" and row.state == "ESTABLISHED"
                        for row in census(port).sockets
                    )
                    audit = await server.audit()
                    assert stranger.fileno() >= 0
        assert (audit.established, audit.with_session, audit.phantoms) == (1, 1, 0)
        await client.aclose()


async def test_opened_events_and_stats() -> None:
    events: list[ServerEvent] = []
    async with serving(ServerConfig(**BASE), events=events) as (server, port):
        client = await Client.connect(port)
        assert await client.hello("x") == b"OK"
        await client.send(b"BYE")
        assert await client.closed_by_server()
        await wait_for(lambda: any(isinstance(e, ConnectionClosed) for e in events))
        opened = [e for e in events if isinstance(e, ConnectionOpened)]
        assert opened and opened[0].identity == "x" and not opened[0].took_over
        stats = server.stats()
        assert stats.accepted == 1 and stats.closed[CloseReason.APPLICATION] == 1
        await client.aclose()


def test_stats_can_be_read_before_and_after_the_server_serves() -> None:
    # A metrics collector registered at start-up may be scraped before serve() runs and
    # after it returned, from a thread with no event loop.
    server = make_server(ServerConfig(**BASE))
    before = server.stats()
    assert before.connections == 0 and before.accepted == 0

    async def serve_one() -> None:
        async with anyio.create_task_group() as tasks:
            [(_, port), *_] = await tasks.start(
                lambda task_status: server.serve_tcp("127.0.0.1", 0, task_status=task_status)
            )
            client = await Client.connect(port)
            assert await client.hello("x") == b"OK"
            await client.aclose()
            await server.shutdown()

    anyio.run(serve_one)
    after = server.stats()
    assert after.accepted == 1 and after.connections == 0


def test_config_is_validated_when_built() -> None:
    with pytest.raises(ConfigError, match="hello_timeout"):
        ServerConfig(hello_timeout=0)
    with pytest.raises(ConfigError, match="idle_timeout"):
        ServerConfig(idle_timeout=float("nan"))
    with pytest.raises(ConfigError, match="resolution"):
        ServerConfig(idle_timeout=1, resolution=2)
    with pytest.raises(ConfigError, match="reap_batch"):
        ServerConfig(reap_batch=0)
    with pytest.raises(ConfigError, match="timeout"):
        ActiveHeartbeat(interval=1, timeout=2)


async def test_graceful_timeout_close_sends_fin_and_keeps_reading_during_the_grace() -> None:
    events: list[ServerEvent] = []
    idle = 0.5
    config = ServerConfig(
        idle_timeout=30, resolution=0.05, timeout_close="graceful", close_grace=1.0, **BASE
    )
    async with serving(config, events=events) as (server, port):
        client = await Client.connect(port)
        assert await client.hello("slow-link", timeout=idle) == b"OK"
        # Silence: the server half-closes (FIN, not RST) ...
        assert await client.closed_by_server(timeout=idle + slack(2.5))
        # ... and what the peer still sends within the grace period is not lost.
        await client.send(b"DATA late")
        await wait_for(lambda: ("slow-link", b"late") in RECEIVED, timeout=slack(1))
        await client.aclose()
        await wait_for(lambda: bool(closes(events, CloseReason.IDLE_TIMEOUT)))
        assert "slow-link" not in server.registry


async def test_max_age_closes_with_jitter() -> None:
    events: list[ServerEvent] = []
    config = ServerConfig(max_age=0.5, max_age_jitter=0.2, **BASE)
    async with serving(config, events=events) as (server, port):
        clients = [await Client.connect(port) for _ in range(10)]
        for i, client in enumerate(clients):
            assert await client.hello(f"aged{i}") == b"OK"
        await wait_for(lambda: len(closes(events, CloseReason.MAX_AGE)) == 10, timeout=slack(3))
        durations = [e.duration for e in closes(events, CloseReason.MAX_AGE)]
        assert all(0.4 - 0.01 <= d <= 0.6 + slack(0.2) for d in durations), durations
        assert len({round(d, 3) for d in durations}) > 1  # spread, not all at once
        for client in clients:
            await client.aclose()


async def test_serves_ipv6_too() -> None:
    try:
        listener = await anyio.create_tcp_listener(local_host="::1", local_port=0)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    await listener.aclose()
    async with serving(ServerConfig(**BASE), host="::1") as (server, port):
        client = await Client.connect(port, host="::1")
        assert await client.hello("v6") == b"OK"
        assert server.connections[0].peer[0] == "::1"
        await client.aclose()


async def test_serve_accepts_anyio_multilistener() -> None:
    server = make_server(ServerConfig(**BASE))
    multi = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with anyio.create_task_group() as tasks:
        [(_, port)] = await tasks.start(server.serve, multi)
        client = await Client.connect(port)
        assert await client.hello("multi") == b"OK"
        await client.aclose()
        await server.shutdown()


async def test_peer_reset_is_reported_as_such_beside_the_ping_task() -> None:
    import socket
    import struct

    events: list[ServerEvent] = []
    beat = ActiveHeartbeat(interval=5, timeout=1)
    async with serving(ServerConfig(heartbeat=beat, **BASE), events=events) as (server, port):
        client = await Client.connect(port)
        assert await client.hello("resetter") == b"OK"
        sock = client.stream.extra(anyio.abc.SocketAttribute.raw_socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await client.aclose()
        await wait_for(lambda: bool(closes(events, CloseReason.PEER_RESET)))
        assert not closes(events, CloseReason.APPLICATION)

"""Cross-node takeover on a real redis-server: three servers in one process, one store."""

from __future__ import annotations

import time

import anyio
import pytest

from keepconn import CloseReason, ConnectionClosed, FlappingConfig, ServerConfig
from keepconn.testing import RedisServer
from tests.cluster.nodes import cluster, redis_client
from tests.lineapp import Client, closes, wait_for
from tests.timing import slack

pytestmark = pytest.mark.anyio


async def reset_or_eof(client: Client, timeout: float) -> str:
    """How the server ended the client's connection: "reset" or "eof"."""
    with anyio.fail_after(timeout):
        try:
            while await client.stream.receive():
                pass
        except anyio.BrokenResourceError:
            return "reset"
        except anyio.EndOfStream:
            return "eof"
    return "eof"


async def hello_from(
    port: int,
    clients: list[Client],
    ports: dict[Client, tuple[int, int]],
    answers: list[bytes],
    identity: str = "shared",
) -> None:
    """One device's hello for ``identity`` on ``port``, recorded in the lists (``ports``: the
    server's port and the client's own, which alone may repeat across nodes: the kernel gives
    connections to different addresses the same local port when it likes)."""
    client = await Client.connect(port)
    clients.append(client)
    ports[client] = (port, client.local_port())
    try:
        answers.append(await client.hello(identity))
    except (anyio.BrokenResourceError, anyio.EndOfStream, TimeoutError):
        answers.append(b"closed")


async def test_a_device_moving_to_another_node_resets_its_old_connection_at_once(
    redis_server: RedisServer,
) -> None:
    async with cluster(redis_server) as (a, b, _):
        latencies = []
        for trial in range(20):
            old = await Client.connect(a.port)
            assert await old.hello(f"dev{trial}") == b"OK"
            new = await Client.connect(b.port)
            start = time.perf_counter()
            assert await new.hello(f"dev{trial}") == b"OK"
            # The old connection is reset (RST), as a local takeover's is.
            assert await reset_or_eof(old, slack(2)) == "reset"
            latencies.append(time.perf_counter() - start)
            await old.aclose()
            await new.aclose()
        [taken] = [e for e in closes(a.events, CloseReason.TAKEN_OVER) if e.identity == "dev0"]
        assert "by node n1" in taken.detail
        stats_a, stats_b = a.store.stats(), b.store.stats()
        assert stats_a is not None and stats_b is not None
        assert stats_a.remote_takeovers == 20 and stats_b.took_from_remote == 20
        latencies.sort()
        # From the new hello's OK (sent after the claim) to the old socket's reset, on loopback.
        assert latencies[len(latencies) // 2] < slack(0.05), latencies


async def test_wrong_credentials_on_another_node_never_evict(redis_server: RedisServer) -> None:
    async with cluster(redis_server) as (a, b, c):
        live = await Client.connect(a.port)
        assert await live.hello("dev") == b"OK"
        for node in (b, c, a):
            bad = await Client.connect(node.port)
            assert await bad.hello("dev", b"wrong") == b"DENIED"
            assert await bad.closed_by_server()
            await bad.aclose()
        await live.send(b"DATA still-here")
        assert await live.line() == b"ACK still-here"
        async with redis_client(redis_server) as redis:
            owner = await redis.get("keepconn:owner:dev")
        assert owner is not None and owner.split("\t")[1] == "n0"
        assert not closes(a.events, CloseReason.TAKEN_OVER)
        await live.aclose()


@pytest.mark.parametrize("flapping", [None, FlappingConfig()], ids=["no-flapping", "flapping"])
async def test_exactly_one_winner_among_concurrent_hellos_across_nodes(
    redis_server: RedisServer, flapping: FlappingConfig | None
) -> None:
    # With the default flapping detector most of the 200 hellos are refused as flapping
    # (counted cluster-wide): the session the others settled on must stay. A new identity
    # per round, since the first round bans its identity for minutes.
    config = ServerConfig(idle_timeout=60, flapping=flapping, admission=None)
    async with cluster(redis_server, config=config) as nodes:
        for round_ in range(3):
            identity = f"shared-{round_}"
            clients: list[Client] = []
            ports: dict[Client, tuple[int, int]] = {}
            answers: list[bytes] = []

            with anyio.fail_after(slack(20)):
                async with anyio.create_task_group() as tasks:
                    for i in range(200):
                        tasks.start_soon(
                            hello_from, nodes[i % 3].port, clients, ports, answers, identity
                        )
            # Settle: every loser's close has been decided (a notice, a lost claim).
            await wait_for(lambda: sum(len(n.live()) for n in nodes) <= 1)
            await anyio.sleep(0.2)
            live = [(n.name, c) for n in nodes for c in n.live()]
            assert len(live) == 1, (round_, live)
            async with redis_client(redis_server) as redis:
                owner = await redis.get(f"keepconn:owner:{identity}")
            assert owner is not None and owner.split("\t")[1] == live[0][0]
            assert answers.count(b"OK") >= 1
            # Every other client's connection was closed by its server; the winner's is open.
            [winner_node] = [n for n in nodes if n.name == live[0][0]]
            winner_at = (winner_node.port, live[0][1].peer[1])
            for client in clients:
                if ports[client] != winner_at:
                    assert await client.closed_by_server(slack(2))
            [winner] = [c for c in clients if ports[c] == winner_at]
            await winner.send(b"DATA won")
            assert await winner.line() == b"ACK won"
            for client in clients:
                await client.aclose()
            await wait_for(lambda: all(not n.live() for n in nodes))


async def test_a_released_session_leaves_no_record(redis_server: RedisServer) -> None:
    async with cluster(redis_server, 2) as (a, _):
        client = await Client.connect(a.port)
        assert await client.hello("dev") == b"OK"
        await client.send(b"BYE")
        assert await client.closed_by_server()
        await client.aclose()
        async with redis_client(redis_server) as redis:
            with anyio.fail_after(slack(2)):
                while await redis.get("keepconn:owner:dev") is not None:
                    await anyio.sleep(0.01)
        assert [e.reason for e in a.events if isinstance(e, ConnectionClosed)] == [
            CloseReason.APPLICATION
        ]


async def test_a_device_bouncing_between_nodes_is_caught_as_flapping(
    redis_server: RedisServer,
) -> None:
    # Four hellos a minute at most, counted cluster-wide: each node alone sees only two of
    # the six hellos below, so only the store's count can catch the bounce.
    config = ServerConfig(idle_timeout=60, flapping=FlappingConfig(max_hellos=4, window=60))
    async with cluster(redis_server, 3, config=config) as (a, b, c):
        held = None
        answers = []
        for i in range(6):
            client = await Client.connect((a, b, c)[i % 3].port)
            answer = await client.hello("bouncer")
            answers.append(answer)
            if answer == b"OK":
                if held is not None:
                    await held.aclose()
                held = client
            else:
                assert await client.closed_by_server()
                await client.aclose()
        assert answers == [b"OK"] * 4 + [b"BUSY"] * 2
        # The refused hellos did not take the session over: the fourth one (on another node)
        # still serves.
        assert held is not None
        await held.send(b"DATA kept")
        assert await held.line() == b"ACK kept"
        assert [e.detail for e in closes(a.events + b.events + c.events, CloseReason.FLAPPING)] == [
            "flapping across the cluster"
        ] * 2
        await held.aclose()


async def test_two_hosts_fighting_over_one_identity_across_nodes_are_caught_as_a_duplicate(
    redis_server: RedisServer,
) -> None:
    # Two devices on different hosts share an identity and keep taking it from each other, each
    # on its own node: neither node sees a local takeover, so only the store's count of
    # host-changing claims can tell. Past two moves the newcomer is refused and the incumbent
    # keeps the session; its own host may still reconnect (a device replacing its phantom).
    flapping = FlappingConfig(max_hellos=100, duplicate_takeovers=2, duplicate_window=60)
    config = ServerConfig(idle_timeout=60, flapping=flapping)
    async with cluster(redis_server, 3, config=config) as (a, b, c):

        async def hello(node_port: int, host: str) -> tuple[Client, bytes]:
            client = Client(await anyio.connect_tcp("127.0.0.1", node_port, local_host=host))
            return client, await client.hello("twin")

        clients = []
        answers = []
        for node, host in ((a, "127.0.0.2"), (b, "127.0.0.3"), (a, "127.0.0.2"), (b, "127.0.0.3")):
            client, answer = await hello(node.port, host)
            clients.append(client)
            answers.append(answer)
        assert answers == [b"OK", b"OK", b"OK", b"BUSY"]
        assert await clients[3].closed_by_server()
        # The incumbent (the third hello, from 127.0.0.2 on a) still serves.
        await clients[2].send(b"DATA kept")
        assert await clients[2].line() == b"ACK kept"
        [refused] = closes(b.events, CloseReason.FLAPPING)
        assert refused.detail == "duplicate identity across the cluster"
        stats = b.store.stats()
        assert stats is not None and stats.duplicates_refused == 1
        # The incumbent's own host replacing its connection, on another node, is no duplicate.
        again, answer = await hello(c.port, "127.0.0.2")
        assert answer == b"OK"
        assert await clients[2].closed_by_server()
        for client in [*clients, again]:
            await client.aclose()


async def test_a_nodes_cluster_metrics(redis_server: RedisServer) -> None:
    from prometheus_client import CollectorRegistry

    from keepconn.metrics import ServerCollector

    async with cluster(redis_server, 2) as (a, b):
        registry = CollectorRegistry()
        ServerCollector(a.server, registry=registry)
        old = await Client.connect(a.port)
        assert await old.hello("dev") == b"OK"
        new = await Client.connect(b.port)
        assert await new.hello("dev") == b"OK"
        assert await old.closed_by_server()
        await wait_for(lambda: registry.get_sample_value("keepconn_cluster_owned_sessions") == 0)
        assert registry.get_sample_value("keepconn_cluster_store_healthy") == 1
        assert registry.get_sample_value("keepconn_cluster_remote_takeovers_total") == 1
        assert registry.get_sample_value("keepconn_cluster_store_round_trips_total") >= 2  # type: ignore[operator]
        for client in (old, new):
            await client.aclose()

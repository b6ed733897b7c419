"""The collector of dead nodes' owner records, on a real redis-server: what it deletes (only
records whose node has no lease, as they were read), how much per step (one batch per
interval, cluster-wide), and what a node whose lease vanished does about it (reasserts)."""

from __future__ import annotations

import anyio
import pytest

from keepconn.cluster import ClusterConfig, RedisCluster
from keepconn.testing import RedisServer
from tests.cluster.nodes import cluster, redis_client
from tests.lineapp import Client, wait_for
from tests.timing import slack

pytestmark = pytest.mark.anyio

INTERVAL = 0.2


def adapter(redis: RedisServer, node_id: str, **options: object) -> RedisCluster:
    config = ClusterConfig(node_id=node_id, collect_interval=INTERVAL, **options)  # type: ignore[arg-type]
    return RedisCluster(redis.url, config)


async def test_a_step_deletes_only_records_of_nodes_without_a_lease(
    redis_server: RedisServer,
) -> None:
    store = adapter(redis_server, "live")
    async with redis_client(redis_server) as redis, store.connected():
        await redis.set("keepconn:node:live", "live", px=60_000)
        await redis.set("keepconn:owner:mine", "17\tlive\t10.0.0.1")
        for n in range(5):
            await redis.set(f"keepconn:owner:orphan-{n}", f"{20 + n}\tdead\t10.0.0.2")
        await redis.set("keepconn:owner:odd", "not a record")  # not ours to judge
        await redis.hset("keepconn:owner:hash", {"a": "b"})  # another type: left alone
        await redis.set("other:owner:x", "1\tdead\th")  # another prefix
        assert await store.collect() == 5
        # Another step within the interval is not this node's (nor any node's) turn.
        assert await store.collect() is None
        other = adapter(redis_server, "other")
        async with other.connected():
            assert await other.collect() is None
        await anyio.sleep(INTERVAL + 0.05)
        assert await store.collect() == 0
        left = sorted([key async for key in redis.scan_iter(match="*owner*")])
        assert left == [
            "keepconn:owner:hash",
            "keepconn:owner:mine",
            "keepconn:owner:odd",
            "other:owner:x",
        ]


async def test_a_step_is_one_bounded_batch_and_a_pass_ends(redis_server: RedisServer) -> None:
    batch = 200
    store = adapter(redis_server, "live", collect_batch=batch)
    async with redis_client(redis_server) as redis, store.connected():
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(3000):
                pipe.set(f"keepconn:owner:orphan-{n}", f"{n + 1}\tdead\th")
        first = await store.collect()
        assert first is not None and 0 < first < 3000
        total, steps = first, 1
        while total < 3000:
            assert steps < 60, f"{total} collected after {steps} steps"
            await anyio.sleep(INTERVAL + 0.02)
            deleted = await store.collect()
            assert deleted is not None
            assert deleted <= 4 * batch  # SCAN's COUNT is a hint, but a bounded one
            total, steps = total + deleted, steps + 1
        assert total == 3000
        assert await redis.dbsize() == 2  # the collector's lock and cursor


async def test_a_prefix_with_glob_characters_matches_only_itself(
    redis_server: RedisServer,
) -> None:
    store = adapter(redis_server, "live", key_prefix="kc[1]*")
    async with redis_client(redis_server) as redis, store.connected():
        await redis.set("kc[1]*:owner:a", "1\tdead\th")
        await redis.set("kc1x:owner:b", "1\tdead\th")  # what the unescaped pattern matches
        assert await store.collect() == 1
        assert await redis.exists(["kc1x:owner:b"]) == 1


async def test_a_node_whose_lease_vanished_reasserts_what_the_collector_took(
    redis_server: RedisServer,
) -> None:
    # n0's lease is deleted under it (the store lost it): a collector step takes n0's records,
    # and n0, finding its lease gone at its next renewal, puts them back: its devices never
    # noticed, and a claim elsewhere still finds and tells n0.
    async with (
        cluster(redis_server, 2, collect_interval=INTERVAL) as (n0, n1),
        redis_client(redis_server) as redis,
    ):
        devices = []
        for n in range(3):
            client = await Client.connect(n0.port)
            assert await client.hello(f"dev{n}") == b"OK"
            devices.append(client)
        await redis.delete(["keepconn:node:n0"])

        def collected() -> int:  # by either node: n0 takes its turns too
            found = [node.store.stats() for node in (n0, n1)]
            return sum(stats.records_collected for stats in found if stats is not None)

        async def records() -> int:
            return len([key async for key in redis.scan_iter(match="keepconn:owner:*")])

        with anyio.fail_after(slack(5)):
            while await records() or not collected():
                # n0 may already have renewed (lease and records back): delete again, until
                # a collector step fell between the deletion and the renewal.
                if await redis.exists(["keepconn:node:n0"]):
                    await redis.delete(["keepconn:node:n0"])
                await anyio.sleep(0.005)
        with anyio.fail_after(slack(5)):
            while await records() < 3:
                await anyio.sleep(0.01)
        for n in range(3):
            value = await redis.get(f"keepconn:owner:dev{n}")
            assert value is not None and value.split("\t")[1] == "n0"
        for client in devices:
            await client.send(b"PING")
            assert await client.line() == b"PONG"
        moved = await Client.connect(n1.port)
        assert await moved.hello("dev0") == b"OK"
        await wait_for(lambda: len(n0.live()) == 2)
        await moved.aclose()
        for client in devices:
            await client.aclose()

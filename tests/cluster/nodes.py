"""Several line-protocol servers sharing one throwaway redis-server: a cluster in one process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import attrs
import coredis

from keepconn import LineFramer, Server, ServerConfig, ServerEvent
from keepconn.cluster import ClusterConfig, RedisCluster
from keepconn.testing import RedisServer
from tests import lineapp
from tests.timing import slack


@attrs.define
class Node:
    """One server of the cluster: its port, store adapter and the events it emitted."""

    name: str
    server: Server[bytes]
    port: int
    store: RedisCluster
    events: list[ServerEvent]
    #: (anyio.current_time(), event) of every event.
    timed_events: list[tuple[float, ServerEvent]]

    def live(self) -> list[Any]:
        """This node's connections with a live session."""
        return [c for c in self.server.connections if c.session is not None and c.reason is None]


@contextlib.asynccontextmanager
async def cluster(
    redis: RedisServer,
    count: int = 3,
    *,
    config: ServerConfig | None = None,
    **cluster_options: Any,
) -> AsyncIterator[list[Node]]:
    """Run ``count`` servers (nodes "n0", "n1", ...) on one store for the block."""
    cluster_options.setdefault("node_ttl", 3.0)
    nodes: list[Node] = []
    async with anyio.create_task_group() as tasks:
        try:
            for i in range(count):
                events: list[ServerEvent] = []
                timed: list[tuple[float, ServerEvent]] = []

                def record(
                    event: ServerEvent,
                    events: list[ServerEvent] = events,
                    timed: list[tuple[float, ServerEvent]] = timed,
                ) -> None:
                    events.append(event)
                    timed.append((anyio.current_time(), event))

                store = RedisCluster(redis.url, ClusterConfig(node_id=f"n{i}", **cluster_options))
                server: Server[bytes] = Server(
                    identify=lineapp.identify,
                    handler=lineapp.handler,
                    framer=lambda: LineFramer(max_length=1024),
                    config=config or ServerConfig(idle_timeout=60),
                    send_ping=lineapp.send_ping,
                    goodbye=lineapp.goodbye,
                    refuse=lineapp.refuse,
                    on_event=record,
                    cluster=store,
                )
                addresses = await tasks.start(
                    lambda task_status, s=server: s.serve_tcp(
                        "127.0.0.1", 0, task_status=task_status
                    )
                )
                nodes.append(Node(f"n{i}", server, addresses[0][1], store, events, timed))
            # Each node's first renewal makes its lease; hellos are refused until then.
            with anyio.fail_after(slack(5)):
                while not all(_healthy(node) for node in nodes):
                    await anyio.sleep(0.01)
            yield nodes
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(slack(15)):
                for node in nodes:
                    await node.server.shutdown()
            tasks.cancel_scope.cancel()


def _healthy(node: Node) -> bool:
    stats = node.store.stats()
    return stats is not None and stats.store_healthy and stats.lease_left > 0


@contextlib.asynccontextmanager
async def redis_client(redis: RedisServer) -> AsyncIterator[coredis.Redis[str]]:
    """A plain client of the test's store, to look at its keys."""
    client: coredis.Redis[str] = coredis.Redis.from_url(redis.url, decode_responses=True)
    async with client:
        yield client

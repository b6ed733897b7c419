"""One cluster node in a process of its own, for tests that SIGKILL it:
``python -m tests.cluster.node_main URL NODE_ID NODE_TTL`` prints ``PORT <port>`` once serving."""

from __future__ import annotations

import sys

import anyio

from keepconn import LineFramer, Server, ServerConfig
from keepconn.cluster import ClusterConfig, RedisCluster
from tests import lineapp


async def main(url: str, node_id: str, ttl: float) -> None:
    server: Server[bytes] = Server(
        identify=lineapp.identify,
        handler=lineapp.handler,
        framer=lambda: LineFramer(max_length=1024),
        config=ServerConfig(idle_timeout=60),
        cluster=RedisCluster(url, ClusterConfig(node_id=node_id, node_ttl=ttl)),
    )
    async with anyio.create_task_group() as tasks:
        addresses = await tasks.start(server.serve_tcp, "127.0.0.1", 0)
        sys.stdout.write(f"PORT {addresses[0][1]}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], float(sys.argv[3]))

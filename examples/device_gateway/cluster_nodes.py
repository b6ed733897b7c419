"""A gateway cluster on one host for demos and benchmarks: a throwaway redis-server and N gateway
nodes started from the documented command line (``--cluster``, ``--node-id``), each with its own
port, data file and status page, every process stopped by its pid.

:meth:`NodeCluster.census` reads the kernel's table on every node's port, which is what "one
connection per device cluster-wide" means on the wire: the sum of the nodes' server-side
ESTABLISHED sockets, and their CLOSE_WAIT.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from device_gateway.gateway_process import GatewayProcess
from keepconn.tcp import census
from keepconn.testing import RedisServer

__all__ = ["NodeCluster", "server_side_counts"]


def server_side_counts(port: int) -> dict[str, int]:
    """The gateway's own sockets on ``port`` by state (clients on this host have the port as
    their remote end, and are not counted)."""
    counts: dict[str, int] = {}
    for row in census(port).sockets:
        if row.local_port == port:
            counts[row.state] = counts.get(row.state, 0) + 1
    return counts


class NodeCluster:
    """A redis-server and ``nodes`` gateway nodes on ``host`` (all ended by :meth:`stop`)."""

    def __init__(
        self,
        work: Path,
        users: Path,
        *,
        nodes: int = 3,
        host: str = "127.0.0.1",
        node_ttl: float = 10.0,
        store_timeout: float = 0.5,
        extra: Sequence[str] = (),
        cluster: bool = True,
    ) -> None:
        """With ``cluster=False`` the nodes share nothing: independent gateways, the baseline
        a cluster is compared with (no redis-server is started)."""
        self.redis: RedisServer | None = RedisServer().start() if cluster else None
        self.nodes: list[GatewayProcess] = []
        self.names = [f"node-{i + 1}" for i in range(nodes)]
        try:
            for name in self.names:
                argv = list(extra)
                if self.redis is not None:
                    argv += ["--cluster", self.redis.url, "--node-id", name]
                    argv += ["--node-ttl", str(node_ttl), "--store-timeout", str(store_timeout)]
                self.nodes.append(
                    GatewayProcess(
                        host=host,
                        users=users,
                        data=work / f"{name}.sqlite3",
                        extra=argv,
                        log=work / f"{name}.log",
                    )
                )
        except BaseException:
            self.stop()
            raise

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """(host, port) of every node, for the fleet."""
        return [(node.host, node.port) for node in self.nodes]

    def statuses(self) -> list[dict[str, Any]]:
        """Every node's /status ({} for one that did not answer in time, or is gone)."""
        result = []
        for node in self.nodes:
            try:
                result.append(node.status() if node.proc.poll() is None else {})
            except OSError:
                result.append({})
        return result

    def census(self) -> dict[str, Any]:
        """The kernel's table on every node's port: per node and cluster-wide."""
        per_node = [server_side_counts(node.port) for node in self.nodes]
        return {
            "per_node": per_node,
            "established": sum(c.get("ESTABLISHED", 0) for c in per_node),
            "close_wait": sum(c.get("CLOSE_WAIT", 0) for c in per_node),
        }

    def stop(self) -> list[int | None]:
        """SIGTERM each node by pid (SIGKILL if it lingers), then the redis-server."""
        codes = [node.stop() for node in self.nodes]
        if self.redis is not None:
            self.redis.close()
        return codes

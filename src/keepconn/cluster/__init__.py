"""keepconn.cluster: many server processes act as one, with one live session per identity
cluster-wide, on Redis. Needs the ``redis`` extra (``pip install 'keepconn[redis]'``)::

    from keepconn.cluster import ClusterConfig, RedisCluster

    cluster = RedisCluster("redis://127.0.0.1:6379/0", ClusterConfig(node_id="gw-1"))
    server = keepconn.Server(identify=..., handler=..., framer=..., cluster=cluster)

A device that authenticates on node B while its session lives on node A is claimed by B in the
store, A is told at once and resets the old connection (TAKEN_OVER); when the store is
unreachable, hellos are refused and live sessions are closed OWNERSHIP_LOST before the node's
lease could have expired. How it works, and the figures measured: docs/topics/cluster.md.
"""

from __future__ import annotations

from .._core.errors import StoreUnavailable as StoreUnavailable
from .._core.ownership import Claim as Claim
from .._core.ownership import ClusterConfig as ClusterConfig
from .._core.ownership import ClusterStats as ClusterStats
from .._public import claim as _claim
from ._redis import RedisCluster as RedisCluster
from ._redis import node_id_default as node_id_default

__all__ = [
    "Claim",
    "ClusterConfig",
    "ClusterStats",
    "RedisCluster",
    "StoreUnavailable",
    "node_id_default",
]

_claim(__name__, __all__, globals())

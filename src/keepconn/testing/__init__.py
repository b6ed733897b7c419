"""keepconn.testing: helpers for testing servers against real kernel faults and a real store.

:class:`NetNs` builds a network namespace joined to the root namespace by a veth pair, opens
device-side sockets inside it and injects faults (cable pull, blackhole, restore).
:class:`RedisServer` runs a throwaway redis-server on a loopback port (no persistence) that a
test can stall, restart empty or kill, for the cluster tests. The pytest fixtures ``netns``,
``netns_factory`` and ``redis_server`` live in :mod:`keepconn.testing.pytest_plugin`; enable
them with ``pytest_plugins = ["keepconn.testing.pytest_plugin"]``. :class:`TcpForwarder`
forwards a loopback port to a server and can blackhole or reset the path while it runs (to cut
one node off from its store, say).
"""

from __future__ import annotations

from .._public import claim as _claim
from ._forwarder import ForwarderMode as ForwarderMode
from ._forwarder import TcpForwarder as TcpForwarder
from ._netns import NetNs as NetNs
from ._netns import NetnsError as NetnsError
from ._netns import cleanup_stale as cleanup_stale
from ._netns import netns_unavailable_reason as netns_unavailable_reason
from ._redis import RedisServer as RedisServer
from ._redis import RedisServerError as RedisServerError
from ._redis import redis_unavailable_reason as redis_unavailable_reason

__all__ = [
    "ForwarderMode",
    "NetNs",
    "NetnsError",
    "RedisServer",
    "RedisServerError",
    "TcpForwarder",
    "cleanup_stale",
    "netns_unavailable_reason",
    "redis_unavailable_reason",
]

_claim(__name__, __all__, globals())

"""keepconn.client: a reconnecting client connector for devices and for tests.

:class:`Connector` keeps one connection to a server alive: it connects, runs the
application's hello, serves the session (with client pings if asked), and when the connection
ends for any reason, reports a :class:`Disconnect` saying why, waits a jittered, growing delay
(never shorter than a server's retry-after hint) and connects again. It runs on asyncio,
uvloop and trio through anyio::

    connector = Connector("gw.example.net", 7000, framer=LineFramer, hello=hello)
    await connector.run(handler)            # or:
    async with connector.sessions() as sessions:
        async for conn in sessions:
            async for frame in conn:
                ...
"""

from __future__ import annotations

from .._public import claim as _claim
from ._connection import ClientConnection as ClientConnection
from ._connector import Connector as Connector
from ._records import ClientConfig as ClientConfig
from ._records import ConnectorStats as ConnectorStats
from ._records import Disconnect as Disconnect
from ._records import DisconnectReason as DisconnectReason

__all__ = [
    "ClientConfig",
    "ClientConnection",
    "Connector",
    "ConnectorStats",
    "Disconnect",
    "DisconnectReason",
]

_claim(__name__, __all__, globals())

"""keepconn: heartbeat and keepalive connection management for asyncio and trio servers.

The core (registry, close reasons, configuration) is sans-I/O; the adapters run it on anyio.
"""

from __future__ import annotations

from ._errors import ConfigError as ConfigError
from ._errors import KeepconnError as KeepconnError
from ._errors import ProtocolError as ProtocolError
from ._errors import SessionClosed as SessionClosed
from ._reasons import CloseReason as CloseReason
from ._registry import RegistryStats as RegistryStats
from ._registry import Session as Session
from ._registry import SessionRegistry as SessionRegistry

__version__ = "0.1.0"

__all__ = [
    "CloseReason",
    "ConfigError",
    "KeepconnError",
    "ProtocolError",
    "RegistryStats",
    "Session",
    "SessionClosed",
    "SessionRegistry",
]

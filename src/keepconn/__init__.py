"""keepconn: heartbeat and keepalive connection management for asyncio and trio servers.

The core (registry, close reasons, configuration) is sans-I/O; the adapters run it on anyio.
"""

from __future__ import annotations

from ._anyio.connection import Connection as Connection
from ._anyio.server import Server as Server
from ._core.admission import Admission as Admission
from ._core.admission import AdmissionConfig as AdmissionConfig
from ._core.admission import AdmissionController as AdmissionController
from ._core.admission import AdmissionStats as AdmissionStats
from ._core.admission import TokenBucket as TokenBucket
from ._core.backoff import Backoff as Backoff
from ._core.backoff import BackoffState as BackoffState
from ._core.backoff import jitter as jitter
from ._core.config import Hello as Hello
from ._core.config import ServerConfig as ServerConfig
from ._core.errors import ConfigError as ConfigError
from ._core.errors import HelloRejected as HelloRejected
from ._core.errors import KeepconnError as KeepconnError
from ._core.errors import ProtocolError as ProtocolError
from ._core.errors import SessionClosed as SessionClosed
from ._core.events import ConnectionClosed as ConnectionClosed
from ._core.events import ConnectionOpened as ConnectionOpened
from ._core.events import RoundTrip as RoundTrip
from ._core.events import ServerEvent as ServerEvent
from ._core.events import ServerStats as ServerStats
from ._core.events import SessionReaped as SessionReaped
from ._core.events import SessionTakenOver as SessionTakenOver
from ._core.events import SocketAudit as SocketAudit
from ._core.flapping import AddressFlappingConfig as AddressFlappingConfig
from ._core.flapping import AddressFlappingDetector as AddressFlappingDetector
from ._core.flapping import FlappingConfig as FlappingConfig
from ._core.flapping import FlappingDetector as FlappingDetector
from ._core.flapping import FlappingStats as FlappingStats
from ._core.flapping import Verdict as Verdict
from ._core.flapping import VerdictKind as VerdictKind
from ._core.framing import Framer as Framer
from ._core.framing import LengthPrefixedFramer as LengthPrefixedFramer
from ._core.framing import LineFramer as LineFramer
from ._core.gcpacing import CollectionPacer as CollectionPacer
from ._core.gcpacing import GcPacing as GcPacing
from ._core.gcpacing import GcPacingStats as GcPacingStats
from ._core.heartbeat import ActiveHeartbeat as ActiveHeartbeat
from ._core.heartbeat import PingAction as PingAction
from ._core.heartbeat import Pinger as Pinger
from ._core.heartbeat import PingPolicer as PingPolicer
from ._core.heartbeat import PingRateLimit as PingRateLimit
from ._core.reasons import CloseReason as CloseReason
from ._core.registry import RegistryStats as RegistryStats
from ._core.registry import Session as Session
from ._core.registry import SessionRegistry as SessionRegistry
from ._extras import MissingExtra as MissingExtra
from ._extras import check_backend as check_backend
from ._public import claim as _claim

__version__ = "0.1.0"

__all__ = [
    "ActiveHeartbeat",
    "AddressFlappingConfig",
    "AddressFlappingDetector",
    "Admission",
    "AdmissionConfig",
    "AdmissionController",
    "AdmissionStats",
    "Backoff",
    "BackoffState",
    "CloseReason",
    "ConfigError",
    "Connection",
    "ConnectionClosed",
    "ConnectionOpened",
    "FlappingConfig",
    "FlappingDetector",
    "FlappingStats",
    "GcPacing",
    "GcPacingStats",
    "CollectionPacer",
    "Framer",
    "Hello",
    "HelloRejected",
    "KeepconnError",
    "LengthPrefixedFramer",
    "LineFramer",
    "MissingExtra",
    "PingAction",
    "PingPolicer",
    "PingRateLimit",
    "Pinger",
    "ProtocolError",
    "RegistryStats",
    "RoundTrip",
    "Server",
    "ServerConfig",
    "ServerEvent",
    "ServerStats",
    "Session",
    "SessionClosed",
    "SessionReaped",
    "SessionRegistry",
    "SessionTakenOver",
    "SocketAudit",
    "TokenBucket",
    "Verdict",
    "VerdictKind",
    "check_backend",
    "jitter",
]

_claim(__name__, __all__, globals())

"""keepconn: heartbeat and keepalive connection management for asyncio and trio servers.

The core (registry, close reasons, configuration) is sans-I/O; the adapters run it on anyio.
"""

from __future__ import annotations

from ._admission import Admission as Admission
from ._admission import AdmissionConfig as AdmissionConfig
from ._admission import AdmissionController as AdmissionController
from ._admission import AdmissionStats as AdmissionStats
from ._admission import TokenBucket as TokenBucket
from ._backoff import Backoff as Backoff
from ._backoff import BackoffState as BackoffState
from ._backoff import jitter as jitter
from ._connection import Connection as Connection
from ._errors import ConfigError as ConfigError
from ._errors import HelloRejected as HelloRejected
from ._errors import KeepconnError as KeepconnError
from ._errors import ProtocolError as ProtocolError
from ._errors import SessionClosed as SessionClosed
from ._events import ConnectionClosed as ConnectionClosed
from ._events import ConnectionOpened as ConnectionOpened
from ._events import RoundTrip as RoundTrip
from ._events import ServerEvent as ServerEvent
from ._events import ServerStats as ServerStats
from ._events import SessionTakenOver as SessionTakenOver
from ._events import SocketAudit as SocketAudit
from ._flapping import AddressFlappingConfig as AddressFlappingConfig
from ._flapping import AddressFlappingDetector as AddressFlappingDetector
from ._flapping import FlappingConfig as FlappingConfig
from ._flapping import FlappingDetector as FlappingDetector
from ._flapping import FlappingStats as FlappingStats
from ._flapping import Verdict as Verdict
from ._flapping import VerdictKind as VerdictKind
from ._framing import Framer as Framer
from ._framing import LengthPrefixedFramer as LengthPrefixedFramer
from ._framing import LineFramer as LineFramer
from ._heartbeat import ActiveHeartbeat as ActiveHeartbeat
from ._heartbeat import PingAction as PingAction
from ._heartbeat import Pinger as Pinger
from ._heartbeat import PingPolicer as PingPolicer
from ._heartbeat import PingRateLimit as PingRateLimit
from ._reasons import CloseReason as CloseReason
from ._registry import RegistryStats as RegistryStats
from ._registry import Session as Session
from ._registry import SessionRegistry as SessionRegistry
from ._server import Hello as Hello
from ._server import Server as Server
from ._server import ServerConfig as ServerConfig

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
    "Framer",
    "Hello",
    "HelloRejected",
    "KeepconnError",
    "LengthPrefixedFramer",
    "LineFramer",
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
    "SessionRegistry",
    "SessionTakenOver",
    "SocketAudit",
    "TokenBucket",
    "Verdict",
    "VerdictKind",
    "jitter",
]

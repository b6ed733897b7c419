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
from ._errors import ConfigError as ConfigError
from ._errors import KeepconnError as KeepconnError
from ._errors import ProtocolError as ProtocolError
from ._errors import SessionClosed as SessionClosed
from ._flapping import AddressFlappingConfig as AddressFlappingConfig
from ._flapping import AddressFlappingDetector as AddressFlappingDetector
from ._flapping import FlappingConfig as FlappingConfig
from ._flapping import FlappingDetector as FlappingDetector
from ._flapping import FlappingStats as FlappingStats
from ._flapping import Verdict as Verdict
from ._flapping import VerdictKind as VerdictKind
from ._reasons import CloseReason as CloseReason
from ._registry import RegistryStats as RegistryStats
from ._registry import Session as Session
from ._registry import SessionRegistry as SessionRegistry

__version__ = "0.1.0"

__all__ = [
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
    "FlappingConfig",
    "FlappingDetector",
    "FlappingStats",
    "KeepconnError",
    "ProtocolError",
    "RegistryStats",
    "Session",
    "SessionClosed",
    "SessionRegistry",
    "TokenBucket",
    "Verdict",
    "VerdictKind",
    "jitter",
]

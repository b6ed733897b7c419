"""The exception tree. Every error keepconn raises derives from :class:`KeepconnError`::

KeepconnError
├── ConfigError (also a ValueError)   a configuration value is out of range; raised when built
├── MissingExtra (also an ImportError) an optional backend or integration is not installed
├── SessionClosed                     an operation needs a live session and this one has ended
├── ProtocolError                     a peer sent bytes that break the application's framing
├── HelloRejected                     the application refused a peer's hello (AUTH_FAILED)
├── cluster.StoreUnavailable          the cluster store did not answer (in time, or at all)
├── tcp.UnsupportedOption             the platform lacks a socket option that was asked for
├── testing.NetnsError                a network namespace could not be built or changed
└── testing.RedisServerError          a throwaway redis-server could not be started

The last four live with the namespaces that export them (``keepconn.cluster``,
``keepconn.tcp``, ``keepconn.testing``); a test checks that this tree names every exception
class keepconn defines.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "ConfigError",
    "HelloRejected",
    "KeepconnError",
    "ProtocolError",
    "SessionClosed",
    "StoreUnavailable",
]


class KeepconnError(Exception):
    """Base class of every exception keepconn raises on purpose."""


class ConfigError(KeepconnError, ValueError):
    """A configuration value is invalid. The message names the field and the allowed range.

    It is also a :class:`ValueError`, so code that validates input generically still catches it.
    """


class SessionClosed(KeepconnError):
    """The session has already ended (its ``reason`` says why)."""


class ProtocolError(KeepconnError):
    """The peer broke the wire protocol; the connection is closed with PROTOCOL_ERROR.

    A framer that finds bad bytes after good frames in the same input passes those frames
    along as ``frames``: the connection hands them to the application, in order, before it
    raises the error (nothing a peer sent correctly is lost).
    """

    def __init__(self, *args: object, frames: Iterable[object] = ()) -> None:
        super().__init__(*args)
        #: The frames completed before the bad bytes, in order.
        self.frames: tuple[Any, ...] = tuple(frames)


class HelloRejected(KeepconnError):
    """Raised by an application's identify callback to refuse a peer's hello.

    The connection is closed with AUTH_FAILED; a live session of the same identity is never
    disturbed. Send any protocol-level refusal (an MQTT CONNACK code, say) before raising.
    """


class StoreUnavailable(KeepconnError):
    """The cluster store could not be reached, or failed a call (``keepconn.cluster``).

    The server handles it: a hello is refused OVERLOADED, a renewal is retried; applications
    meet it only when they call a store adapter themselves.
    """

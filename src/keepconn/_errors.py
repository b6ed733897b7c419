"""The exception tree. Every error keepconn raises derives from :class:`KeepconnError`::

    KeepconnError
    ├── ConfigError (also a ValueError)   a configuration value is out of range; raised when built
    ├── SessionClosed                     an operation needs a live session and this one has ended
    └── ProtocolError                     a peer sent bytes that break the application's framing
"""

from __future__ import annotations

__all__ = ["ConfigError", "KeepconnError", "ProtocolError", "SessionClosed"]


class KeepconnError(Exception):
    """Base class of every exception keepconn raises on purpose."""


class ConfigError(KeepconnError, ValueError):
    """A configuration value is invalid. The message names the field and the allowed range.

    It is also a :class:`ValueError`, so code that validates input generically still catches it.
    """


class SessionClosed(KeepconnError):
    """The session has already ended (its ``reason`` says why)."""


class ProtocolError(KeepconnError):
    """The peer broke the wire protocol; the connection is closed with PROTOCOL_ERROR."""

"""The client's configuration, and the records it keeps about each disconnect."""

from __future__ import annotations

import enum
import ssl
from typing import Any

import attrs

from .._core.backoff import Backoff
from .._core.errors import ConfigError
from .._core.heartbeat import ActiveHeartbeat
from .._core.validate import number
from ..tcp import TcpKeepalive

__all__ = ["ClientConfig", "ConnectorStats", "Disconnect", "DisconnectReason"]


class DisconnectReason(enum.Enum):
    """Why one connection attempt ended. Every :class:`Disconnect` carries exactly one."""

    #: TCP connect failed: refused (nothing listening), unreachable, or the name did not resolve.
    CONNECT_FAILED = "connect_failed"
    #: TCP connect did not complete within ``connect_timeout`` (a black-holed address).
    CONNECT_TIMEOUT = "connect_timeout"
    #: The TLS handshake and the hello callback did not finish within ``hello_timeout``.
    HELLO_TIMEOUT = "hello_timeout"
    #: The TLS handshake failed: the server's certificate was refused (expired, signed by a CA
    #: we do not trust, or for another name), or no protocol version was shared. The error
    #: says which ("TLS handshake failed: ...").
    TLS_FAILED = "tls_failed"
    #: The hello callback raised :class:`~keepconn.HelloRejected` (the server refused us).
    REJECTED = "rejected"
    #: The server turned the connection away with a retry-after hint before the session began
    #: (admission control); the next attempt waits at least that long.
    REFUSED = "refused"
    #: The server closed the connection (EOF).
    SERVER_CLOSED = "server_closed"
    #: The connection was reset or broke (ECONNRESET, EPIPE, ...).
    RESET = "reset"
    #: Client pings went unanswered: the server, or the path to it, is gone (half-open).
    SERVER_SILENT = "server_silent"
    #: The kernel gave up on the socket (ETIMEDOUT from TCP keepalive or TCP_USER_TIMEOUT).
    KEEPALIVE_TIMEOUT = "keepalive_timeout"
    #: The server's bytes could not be framed, or the application declared them invalid.
    PROTOCOL_ERROR = "protocol_error"
    #: The application closed the connection, or its handler returned.
    CLOSED_BY_APP = "closed_by_app"


def _check_tls(instance: object, attribute: Any, value: Any) -> None:
    """True, False or a client-side ssl.SSLContext"""
    if not isinstance(value, (bool, ssl.SSLContext)):
        raise ConfigError(f"tls must be True, False or an ssl.SSLContext, got {value!r}")
    if isinstance(value, ssl.SSLContext) and value.protocol == ssl.PROTOCOL_TLS_SERVER:
        raise ConfigError("tls must be a client context, got a PROTOCOL_TLS_SERVER one")


def _check_hostname(instance: object, attribute: Any, value: Any) -> None:
    """a non-empty host name, or None"""
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"server_hostname must be a host name or None, got {value!r}")


@attrs.frozen
class Disconnect:
    """One connection attempt ended, and the connector will try again after ``delay``."""

    #: Why it ended.
    reason: DisconnectReason
    #: The number of this attempt since the connector started, from 1.
    attempt: int
    #: The backoff step the delay was drawn for: 0 for the first retry after a healthy
    #: connection, growing by one with each attempt that did not become healthy.
    backoff_attempt: int
    #: Seconds the connector waits before the next attempt.
    delay: float
    #: The server's retry-after hint, if the application reported one (``delay`` honours it).
    retry_after: float | None = None
    #: What went wrong, in words (an errno name, an exception, a count of missed pings).
    error: str = ""
    #: True when the hello completed, i.e. the attempt became a session.
    established: bool = False
    #: Seconds the TCP connection was open (None when it never opened).
    connected_for: float | None = None


@attrs.frozen
class ClientConfig:
    """Validated connector settings; a bad value fails here, naming the field."""

    #: Delays between attempts. The default is gRPC's connection backoff with full jitter.
    backoff: Backoff = attrs.field(factory=Backoff)
    #: Client pings (None: rely on the server's traffic, TCP keepalive and the application).
    #: Needs a ``send_ping`` callback and an application that reports answers with
    #: :meth:`ClientConnection.pong_received`.
    heartbeat: ActiveHeartbeat | None = None
    #: TCP keepalive and TCP_USER_TIMEOUT for each connected socket (None: the kernel's).
    keepalive: TcpKeepalive | None = None
    #: Seconds a TCP connect may take. gRPC uses 20 s as its minimum connect timeout: long
    #: enough for a SYN retransmission or two on a poor cellular link.
    connect_timeout: float = attrs.field(default=20.0, validator=number())
    #: Seconds the hello callback may take, so a server that accepts and then says nothing
    #: cannot hold a device forever.
    hello_timeout: float = attrs.field(default=10.0, validator=number())
    #: Seconds a session must stay up after its hello before the backoff starts over. A
    #: server that completes the hello and then drops the connection (a crash loop, a
    #: flapping ban) would otherwise see the device again within ``backoff.initial``, forever.
    #: 0 starts over as soon as a hello succeeds.
    healthy_after: float = attrs.field(default=10.0, validator=number(min_inclusive=True))
    #: Bytes asked of the socket per receive.
    receive_size: int = attrs.field(default=65536, validator=number(integer=True))
    #: TLS: False for plain TCP, True for the system's trusted CAs and hostname checking
    #: (``ssl.create_default_context()``), or a client ``ssl.SSLContext`` of one's own (a
    #: private CA, a client certificate). The handshake runs after TCP connect, within
    #: ``hello_timeout`` together with the hello.
    tls: bool | ssl.SSLContext = attrs.field(default=False, validator=_check_tls)
    #: The name the server's certificate must carry (and the SNI sent), when it is not the
    #: host the connector dials (an address, say). None: the connector's host.
    server_hostname: str | None = attrs.field(default=None, validator=_check_hostname)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client context :attr:`tls` stands for, or None for plain TCP."""
        if isinstance(self.tls, ssl.SSLContext):
            return self.tls
        return ssl.create_default_context() if self.tls else None


@attrs.frozen
class ConnectorStats:
    """A snapshot of a connector's counters."""

    #: Connection attempts started.
    attempts: int
    #: Attempts whose TCP connect succeeded.
    connected: int
    #: Attempts whose hello completed (sessions).
    established: int
    #: Ended attempts by reason.
    disconnects: dict[DisconnectReason, int]
    #: The most recent disconnect, if any.
    last_disconnect: Disconnect | None
    #: True while a connection is open (hello phase included).
    connected_now: bool

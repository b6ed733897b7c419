"""Why a session ended. Every close carries exactly one reason."""

from __future__ import annotations

import enum

__all__ = ["ABORTIVE", "CloseReason"]


class CloseReason(enum.Enum):
    """The one reason a session or connection ended.

    ``dead`` reasons mean the peer is believed gone: the server closes abortively (RST) rather
    than waiting on a FIN that no one will ever acknowledge.
    """

    #: No complete frame arrived within the session's timeout.
    IDLE_TIMEOUT = "idle_timeout"
    #: Server pings went unanswered for too long.
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    #: The kernel gave up on the socket (ETIMEDOUT from TCP keepalive or TCP_USER_TIMEOUT).
    KEEPALIVE_TIMEOUT = "keepalive_timeout"
    #: The peer closed its side (EOF).
    PEER_CLOSED = "peer_closed"
    #: The peer reset the connection (ECONNRESET, EPIPE).
    PEER_RESET = "peer_reset"
    #: A newer authenticated connection for the same identity replaced this one.
    TAKEN_OVER = "taken_over"
    #: The peer did not complete its hello in time.
    HELLO_TIMEOUT = "hello_timeout"
    #: The peer's hello was rejected.
    AUTH_FAILED = "auth_failed"
    #: The hello was read on a connection older than the one that holds the identity's
    #: session: the device gave up on this connection and has moved on (a storm, the server
    #: behind), so this hello is stale and must not take the newer session over.
    STALE_HELLO = "stale_hello"
    #: The peer broke the wire protocol.
    PROTOCOL_ERROR = "protocol_error"
    #: The TLS handshake failed: the peer's certificate was refused (or missing where one is
    #: required), no protocol version or cipher was shared, or the peer does not speak TLS at
    #: all (plaintext on a TLS port). Only that connection is closed, before its hello, so it
    #: never touches a live session. The detail says why ("TLS handshake failed: ...").
    TLS_FAILED = "tls_failed"
    #: The peer pinged faster than allowed, repeatedly.
    TOO_MANY_PINGS = "too_many_pings"
    #: Admission control refused the connection.
    OVERLOADED = "overloaded"
    #: The identity reconnected too often and is banned for a while.
    FLAPPING = "flapping"
    #: The connection reached its maximum age.
    MAX_AGE = "max_age"
    #: The server is shutting down.
    SHUTDOWN = "shutdown"
    #: Cluster mode: this node could no longer prove it owns the session, because the store
    #: was unreachable for as long as the node's lease (another node may have claimed the
    #: identity meanwhile). Sessions are closed so, spread over about a second, before the
    #: lease could have expired; the devices reconnect to a node that can reach the store.
    OWNERSHIP_LOST = "ownership_lost"
    #: The application closed the session for its own reasons.
    APPLICATION = "application"

    @property
    def dead(self) -> bool:
        """True when the peer is believed gone, so the close should be abortive (RST)."""
        return self in _DEAD


_DEAD = frozenset(
    {CloseReason.IDLE_TIMEOUT, CloseReason.HEARTBEAT_TIMEOUT, CloseReason.KEEPALIVE_TIMEOUT}
)

#: Reasons after which the peer is gone or displaced: the adapter closes abortively (RST, via
#: SO_LINGER 0) so the socket does not sit in FIN_WAIT1 retransmitting a FIN nobody will
#: acknowledge. Every other reason closes with a FIN.
ABORTIVE = frozenset(
    {
        CloseReason.IDLE_TIMEOUT,
        CloseReason.HEARTBEAT_TIMEOUT,
        CloseReason.KEEPALIVE_TIMEOUT,
        CloseReason.PEER_RESET,
        CloseReason.TAKEN_OVER,
        CloseReason.HELLO_TIMEOUT,
        CloseReason.STALE_HELLO,
    }
)

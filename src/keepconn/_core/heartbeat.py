"""Heartbeat policies and their sans-I/O state machines.

Three ways a server learns that a peer is alive, each a small object with explicit ``now``:

* Passive -- the peer must show life every ``timeout``; any complete frame counts. No object
  here: the :class:`~keepconn.SessionRegistry` enforces it (``ServerConfig.idle_timeout``, or
  a per-session ``Hello.timeout``, which is how MQTT's keepalive is served).
* :class:`ActiveHeartbeat` -- the server pings every ``interval`` and expects an answer within
  ``timeout``; ``misses`` unanswered pings in a row are tolerated, the next one is fatal. Each
  answered ping yields a round-trip time. :class:`Pinger` is its state machine.
* :class:`PingRateLimit` -- the opposite direction: a peer that pings faster than allowed
  collects strikes and is closed with TOO_MANY_PINGS (gRPC's keepalive enforcement policy).
  :class:`PingPolicer` is its state machine.
"""

from __future__ import annotations

import enum

import attrs

from .validate import number

__all__ = [
    "ActiveHeartbeat",
    "PingAction",
    "PingPolicer",
    "PingRateLimit",
    "Pinger",
]


@attrs.frozen
class ActiveHeartbeat:
    """The server pings every ``interval`` s; a ping unanswered after ``timeout`` s is a miss.

    ``misses`` consecutive misses are tolerated; one more closes the connection with
    HEARTBEAT_TIMEOUT. The worst-case detection time of a dead peer is therefore
    ``(misses + 1) * interval + timeout`` after its last answer (see :attr:`detection_bound`).

    :raises keepconn.ConfigError: a field is out of range, or ``timeout`` exceeds ``interval``.

    >>> ActiveHeartbeat(interval=10, timeout=5, misses=1).detection_bound
    25
    """

    #: Seconds between the starts of two server pings.
    interval: float = attrs.field(validator=number())
    #: Seconds a ping may wait for its answer before it counts as a miss (<= interval).
    timeout: float = attrs.field(validator=number())
    #: Consecutive misses tolerated; the next one closes with HEARTBEAT_TIMEOUT.
    misses: int = attrs.field(default=0, validator=number(min_inclusive=True, integer=True))

    def __attrs_post_init__(self) -> None:
        from .errors import ConfigError

        if self.timeout > self.interval:
            # An answer may then arrive after the next ping went out, and round-trip times
            # become ambiguous: ask for a shorter timeout or a longer interval instead.
            raise ConfigError(
                f"timeout ({self.timeout}) must not exceed interval ({self.interval})"
            )

    @property
    def detection_bound(self) -> float:
        """Seconds from a peer's last answer until it is declared dead, at the most."""
        return (self.misses + 1) * self.interval + self.timeout


@attrs.frozen
class PingRateLimit:
    """Peers may ping at most once every ``min_interval`` s; ``max_strikes`` violations in a row
    are tolerated and the next closes the connection with TOO_MANY_PINGS."""

    #: The shortest time, in seconds, allowed between two of the peer's pings.
    min_interval: float = attrs.field(validator=number())
    #: Too-early pings in a row that are tolerated.
    max_strikes: int = attrs.field(default=2, validator=number(min_inclusive=True, integer=True))


class PingAction(enum.Enum):
    """What :meth:`Pinger.poll` asks the adapter to do."""

    #: Nothing yet; sleep until :meth:`Pinger.next_deadline`.
    WAIT = "wait"
    #: Send a ping now, then call :meth:`Pinger.ping_sent`.
    SEND_PING = "send_ping"
    #: Too many pings went unanswered: close with HEARTBEAT_TIMEOUT.
    DEAD = "dead"


class Pinger:
    """The state machine of :class:`ActiveHeartbeat` for one connection."""

    __slots__ = ("_policy", "_next_ping", "_sent_at", "_misses", "rtt")

    def __init__(self, policy: ActiveHeartbeat, now: float) -> None:
        self._policy = policy
        self._next_ping = now + policy.interval
        self._sent_at: float | None = None
        self._misses = 0
        #: The last measured round-trip time in seconds (None until the first answer).
        self.rtt: float | None = None

    @property
    def misses(self) -> int:
        """Pings unanswered in a row so far."""
        return self._misses

    def next_deadline(self) -> float:
        """When :meth:`poll` next has something to do."""
        if self._sent_at is not None:
            return min(self._next_ping, self._sent_at + self._policy.timeout)
        return self._next_ping

    def poll(self, now: float) -> PingAction:
        """Advance to ``now`` and say what to do."""
        policy = self._policy
        if self._sent_at is not None and now >= self._sent_at + policy.timeout:
            self._sent_at = None
            self._misses += 1
            if self._misses > policy.misses:
                return PingAction.DEAD
        if now >= self._next_ping:
            return PingAction.SEND_PING
        return PingAction.WAIT

    def spared(self, now: float) -> None:
        """After :meth:`poll` said DEAD, the adapter found the peer's bytes waiting unread: the
        adapter is behind (a stalled event loop), not the peer, and the answer may be among
        them. The fatal miss is taken back and the answer awaited one more ``timeout``."""
        self._misses -= 1
        self._sent_at = now

    def ping_sent(self, now: float) -> None:
        """The adapter has sent a ping at ``now``."""
        self._sent_at = now
        self._next_ping = now + self._policy.interval

    def pong_received(self, now: float) -> float | None:
        """An answer arrived; returns the round-trip time, or None if no ping was outstanding."""
        if self._sent_at is None:
            return None
        self.rtt = now - self._sent_at
        self._sent_at = None
        self._misses = 0
        return self.rtt


class PingPolicer:
    """The state machine of :class:`PingRateLimit` for one connection.

    A ping sooner than ``min_interval`` after the previous one is a strike; a ping at or after
    the allowed interval clears the strikes (the peer has slowed down).
    """

    __slots__ = ("_policy", "_last", "strikes")

    def __init__(self, policy: PingRateLimit) -> None:
        self._policy = policy
        self._last: float | None = None
        #: Too-early pings in a row.
        self.strikes = 0

    def ping(self, now: float) -> bool:
        """Record a peer ping at ``now``; False means: close with TOO_MANY_PINGS."""
        last, self._last = self._last, now
        if last is not None and now - last < self._policy.min_interval:
            self.strikes += 1
            return self.strikes <= self._policy.max_strikes
        self.strikes = 0
        return True

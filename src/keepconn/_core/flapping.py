"""Flapping detection: identities that reconnect in a loop, addresses that never say hello, and
two devices fighting over one identity.

Sans-I/O: nothing here reads a clock; every call takes ``now`` (monotonic seconds).

Counting is an exact sliding window: an event at time ``t`` counts at ``now`` while
``t > now - window``. A key is banned by the first event that makes ``limit + 1`` events in the
window, never by fewer. Each key keeps at most ``limit`` timestamps, and keys whose window has
emptied are dropped lazily: whenever the table has doubled since the last sweep, one sweep (the
same as :meth:`FlappingDetector.prune`) removes them, so memory follows the number of keys seen
within one window, at amortised O(1) per event, with no timer needed.

How the server uses it, on every completed (authenticated) hello for ``identity`` from ``host``::

    verdict = flapping.record_hello(identity, now)
    if not verdict.ok: refuse the connection with verdict.reason (FLAPPING)
    elif identity already has a live session from old_host:
        verdict = flapping.record_takeover(identity, old_host, host, now)
        if not verdict.ok: refuse the *newcomer* with verdict.reason, keep the incumbent, log it
        else: take over as usual

Why the incumbent keeps the session on a duplicate: two devices sharing an identity each take
the session from the other as soon as they reconnect, forever, and neither gets work done.
Banning the identity outright would take both offline; refusing the newcomer for a while ends
the loop with one device working and the other one's refusals (and the server's warning,
naming both hosts) pointing at the misconfiguration. Once the hold expires takeovers are
allowed again, so a device that really moved is only delayed.
"""

from __future__ import annotations

import bisect
import enum
import math
from collections.abc import Hashable
from typing import Any

import attrs

from .reasons import CloseReason
from .validate import number

__all__ = [
    "AddressFlappingConfig",
    "AddressFlappingDetector",
    "FlappingConfig",
    "FlappingDetector",
    "FlappingStats",
    "Verdict",
    "VerdictKind",
]

# Below this many keys a sweep is not worth its time.
_MIN_SWEEP = 1024


class VerdictKind(enum.Enum):
    """What a detector concluded about one event."""

    #: Nothing wrong: carry on.
    OK = "ok"
    #: The identity (or address) is banned until :attr:`Verdict.until`.
    BANNED = "banned"
    #: Two or more live devices are fighting over the identity; refuse the newcomer.
    DUPLICATE = "duplicate"


@attrs.frozen
class Verdict:
    """A detector's answer for one event."""

    kind: VerdictKind
    #: When the ban (or duplicate hold) ends, in the caller's monotonic seconds; None if OK.
    until: float | None = None
    #: For DUPLICATE: the hosts seen fighting (incumbent first, then newcomer).
    peers: tuple[Hashable, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the connection may proceed."""
        return self.kind is VerdictKind.OK

    @property
    def reason(self) -> CloseReason | None:
        """The reason to close a refused connection with, or None when OK.

        Duplicates close with FLAPPING too: the identity is bouncing between connections; the
        verdict's kind and the statistics tell the two apart.
        """
        return None if self.kind is VerdictKind.OK else CloseReason.FLAPPING


_OK = Verdict(VerdictKind.OK)


@attrs.frozen
class FlappingStats:
    """A snapshot of a detector's counters."""

    #: Keys with events in memory (an upper bound until the next prune).
    tracked: int
    #: Bans in force at the time of the snapshot.
    active_bans: int
    #: Bans ever imposed.
    total_bans: int
    #: Duplicate-identity holds in force (always 0 for addresses).
    active_duplicates: int = 0
    #: Duplicate-identity conditions ever detected (always 0 for addresses).
    total_duplicates: int = 0


class _Window:
    """Per-key exact sliding-window counter that bans a key on its ``limit + 1``-th event."""

    __slots__ = ("_limit", "_window", "_ban", "_events", "_bans", "_total", "_sweep_at")

    def __init__(self, limit: int, window: float, ban: float) -> None:
        self._limit = limit
        self._window = window
        self._ban = ban
        # key -> its timestamps within the window, ascending, at most `limit` of them; a key
        # with one event holds its bare timestamp (most identities connect once a window, and a
        # number is no object for the cyclic collector to walk, a list is).
        self._events: dict[Hashable, float | list[float]] = {}
        self._bans: dict[Hashable, float] = {}
        self._total = 0
        self._sweep_at = _MIN_SWEEP

    def banned_until(self, key: Hashable, now: float) -> float | None:
        until = self._bans.get(key)
        if until is None:
            return None
        if now < until:
            return until
        del self._bans[key]
        return None

    def record(self, key: Hashable, now: float) -> float | None:
        """Count one event for ``key``; return the ban's end if this event bans it."""
        held = self._events.get(key)
        if held is None:
            self._events[key] = now
            if len(self._events) > self._sweep_at:
                self.prune(now)
            return None
        if isinstance(held, list):
            stamps = held
        else:
            stamps = self._events[key] = [held]
        del stamps[: bisect.bisect_right(stamps, now - self._window)]
        if len(stamps) >= self._limit:
            # Starting afresh after a ban: the events that earned it are paid for.
            del self._events[key]
            return self._impose(key, now)
        # Sorted insertion rather than append, in case a caller's clock steps back a little.
        bisect.insort(stamps, now)
        return None

    def _impose(self, key: Hashable, now: float) -> float:
        until = now + self._ban
        self._bans[key] = until
        self._total += 1
        return until

    def prune(self, now: float) -> int:
        horizon = now - self._window
        events = self._events
        stale = [key for key, held in events.items() if _last(held) <= horizon]
        for key in stale:
            del events[key]
        expired = [key for key, until in self._bans.items() if until <= now]
        for key in expired:
            del self._bans[key]
        self._sweep_at = max(_MIN_SWEEP, 2 * len(events))
        return len(stale) + len(expired)

    def tracked(self) -> int:
        return len(self._events)

    def active(self, now: float) -> int:
        return sum(1 for until in self._bans.values() if until > now)

    @property
    def total(self) -> int:
        return self._total


def _last(held: float | list[float]) -> float:
    """The latest timestamp a key holds (minus infinity for none)."""
    if isinstance(held, list):
        return held[-1] if held else -math.inf
    return held


def _whole(minimum: int) -> Any:
    return number(minimum=minimum, min_inclusive=True, integer=True)


@attrs.frozen
class FlappingConfig:
    """Per-identity flapping and duplicate-identity detection. Validated when built.

    Defaults follow EMQX's flapping detection: more than 15 completed hellos within 60 s ban the
    identity for 5 minutes. A device that reboots now and then, or a whole fleet reconnecting
    after an outage (one hello each), is nowhere near that; a device in a crash loop is.

    Duplicate identities: more than 5 takeovers that move the session between *different* hosts
    within 60 s mean two devices are fighting, and takeovers of the identity are refused for 5
    minutes. The threshold is well under the flapping limit so the fight is reported for what it
    is before the flapping ban hides it; a device roaming between networks (say Wi-Fi and
    cellular) changes host a few times, not six times a minute. A device replacing its own
    phantom connects from the same host and never counts. Pass hosts without ports: a port is
    new on every connection and would make each takeover look like a move.
    """

    #: Whether per-identity flapping detection runs at all.
    enabled: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    #: Most completed hellos allowed within ``window``; one more bans the identity.
    max_hellos: int = attrs.field(default=15, validator=_whole(1))
    #: The sliding window, in seconds.
    window: float = attrs.field(default=60.0, validator=number())
    #: How long a ban lasts, in seconds.
    ban: float = attrs.field(default=300.0, validator=number())
    #: Whether duplicate-identity detection runs at all.
    detect_duplicates: bool = attrs.field(
        default=True, validator=attrs.validators.instance_of(bool)
    )
    #: Most host-changing takeovers allowed within ``duplicate_window``; one more is a duplicate.
    duplicate_takeovers: int = attrs.field(default=5, validator=_whole(1))
    #: The duplicate-detection window, in seconds.
    duplicate_window: float = attrs.field(default=60.0, validator=number())
    #: How long takeovers of a duplicated identity are refused, in seconds.
    duplicate_hold: float = attrs.field(default=300.0, validator=number())


class FlappingDetector:
    """Bans identities that complete hellos too often, and detects duplicate identities.

    See the module docstring for how the server calls it. Keys are any hashable identity.
    """

    __slots__ = ("_config", "_hellos", "_takeovers")

    def __init__(self, config: FlappingConfig | None = None) -> None:
        if config is None:
            config = FlappingConfig()
        if not isinstance(config, FlappingConfig):
            raise TypeError(f"config must be a FlappingConfig, got {config!r}")
        self._config = config
        self._hellos = _Window(config.max_hellos, config.window, config.ban)
        self._takeovers = _Window(
            config.duplicate_takeovers, config.duplicate_window, config.duplicate_hold
        )

    @property
    def config(self) -> FlappingConfig:
        """The configuration in force."""
        return self._config

    def record_hello(self, identity: Hashable, now: float) -> Verdict:
        """Count a completed hello for ``identity``; BANNED if it is (now) banned, else OK.

        A hello refused because of a ban does not count again and does not extend the ban, so a
        ban ends exactly ``ban`` seconds after it began.
        """
        if not self._config.enabled:
            return _OK
        hellos = self._hellos
        until = hellos.banned_until(identity, now)
        if until is None:
            until = hellos.record(identity, now)
        return _OK if until is None else Verdict(VerdictKind.BANNED, until)

    def is_banned(self, identity: Hashable, now: float) -> bool:
        """Whether ``identity`` is banned at ``now`` (a ban ending at ``now`` has ended)."""
        return self.banned_until(identity, now) is not None

    def banned_until(self, identity: Hashable, now: float) -> float | None:
        """When ``identity``'s ban ends, or None if it is not banned at ``now``."""
        if not self._config.enabled:
            return None
        return self._hellos.banned_until(identity, now)

    def record_takeover(
        self, identity: Hashable, old_peer: Hashable, new_peer: Hashable, now: float
    ) -> Verdict:
        """Count a takeover of ``identity``'s session by a connection from ``new_peer``.

        ``old_peer`` is the host of the session being replaced. Returns DUPLICATE (refuse the
        newcomer, keep the incumbent) while the identity is held as duplicated, else OK.
        """
        if not self._config.detect_duplicates:
            return _OK
        takeovers = self._takeovers
        until = takeovers.banned_until(identity, now)
        if until is None:
            if old_peer == new_peer:
                return _OK
            until = takeovers.record(identity, now)
            if until is None:
                return _OK
        return Verdict(VerdictKind.DUPLICATE, until, (old_peer, new_peer))

    def is_duplicate(self, identity: Hashable, now: float) -> bool:
        """Whether takeovers of ``identity`` are being refused as a duplicate at ``now``."""
        return (
            self._config.detect_duplicates
            and self._takeovers.banned_until(identity, now) is not None
        )

    def prune(self, now: float) -> int:
        """Forget windows that have emptied and bans that have ended; return how many.

        Optional: the detector also does this by itself as its tables grow.
        """
        return self._hellos.prune(now) + self._takeovers.prune(now)

    def stats(self, now: float) -> FlappingStats:
        """A frozen snapshot of the counters at ``now``."""
        return FlappingStats(
            tracked=self._hellos.tracked() + self._takeovers.tracked(),
            active_bans=self._hellos.active(now),
            total_bans=self._hellos.total,
            active_duplicates=self._takeovers.active(now),
            total_duplicates=self._takeovers.total,
        )


@attrs.frozen
class AddressFlappingConfig:
    """Per-source-address detection of connections that end before completing a hello.

    Off by default: carrier-grade NAT puts thousands of devices behind one address, so counting
    by address would ban innocent fleets (and every test device here comes from loopback).
    Turn it on where addresses do mean devices. Same shape and defaults as
    :class:`FlappingConfig`: more than 15 aborted connections within 60 s ban the address for
    5 minutes.
    """

    #: Whether the detector runs at all.
    enabled: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    #: Most connections ending before their hello within ``window``; one more bans the address.
    max_aborted: int = attrs.field(default=15, validator=_whole(1))
    #: The sliding window, in seconds.
    window: float = attrs.field(default=60.0, validator=number())
    #: How long a ban lasts, in seconds.
    ban: float = attrs.field(default=300.0, validator=number())


class AddressFlappingDetector:
    """Bans source addresses whose connections keep ending before their hello completes.

    The adapter calls :meth:`record_aborted` when a connection ends (for any reason, timeout
    included) without a completed hello, and :meth:`is_banned` at accept, closing a banned
    address's connection with ``CloseReason.FLAPPING`` before reading from it.
    """

    __slots__ = ("_config", "_aborted")

    def __init__(self, config: AddressFlappingConfig | None = None) -> None:
        if config is None:
            config = AddressFlappingConfig()
        if not isinstance(config, AddressFlappingConfig):
            raise TypeError(f"config must be an AddressFlappingConfig, got {config!r}")
        self._config = config
        self._aborted = _Window(config.max_aborted, config.window, config.ban)

    @property
    def config(self) -> AddressFlappingConfig:
        """The configuration in force."""
        return self._config

    def record_aborted(self, address: Hashable, now: float) -> Verdict:
        """Count a connection from ``address`` that ended before its hello completed."""
        if not self._config.enabled:
            return _OK
        aborted = self._aborted
        until = aborted.banned_until(address, now)
        if until is None:
            until = aborted.record(address, now)
        return _OK if until is None else Verdict(VerdictKind.BANNED, until)

    def is_banned(self, address: Hashable, now: float) -> bool:
        """Whether ``address`` is banned at ``now`` (a ban ending at ``now`` has ended)."""
        return self.banned_until(address, now) is not None

    def banned_until(self, address: Hashable, now: float) -> float | None:
        """When ``address``'s ban ends, or None if it is not banned at ``now``."""
        if not self._config.enabled:
            return None
        return self._aborted.banned_until(address, now)

    def prune(self, now: float) -> int:
        """Forget windows that have emptied and bans that have ended; return how many."""
        return self._aborted.prune(now)

    def stats(self, now: float) -> FlappingStats:
        """A frozen snapshot of the counters at ``now``."""
        return FlappingStats(
            tracked=self._aborted.tracked(),
            active_bans=self._aborted.active(now),
            total_bans=self._aborted.total,
        )

"""Reconnect backoff for clients, and jitter for server-initiated closes.

Sans-I/O: these compute delays; the caller sleeps. Randomness comes from an injectable
:class:`random.Random` so that tests (and simulations of a fleet) are reproducible.

Why jitter at all: a fleet that lost its server at the same instant retries at the same
instants unless each device draws its own delay, and the server then sees the whole fleet in
one spike per retry round. Spreading the retries turns the spike into a ramp the server's
admission control can take.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Literal

import attrs

from .errors import ConfigError
from .validate import check_number, number

__all__ = ["Backoff", "BackoffState", "Strategy", "jitter"]

#: ``"full"``: uniform in [0, ceiling] (AWS "full jitter"). ``"proportional"``: ceiling +/-
#: ``jitter`` (gRPC connection backoff).
Strategy = Literal["full", "proportional"]

# For jitter() calls that do not pass their own generator.
_RNG = random.Random()


def jitter(value: float, fraction: float = 0.1, rng: random.Random | None = None) -> float:
    """``value`` moved by a uniformly random amount within +/- ``fraction`` of itself.

    Used to spread server-initiated closes that would otherwise fire together (maximum
    connection age, shutdown), as gRPC does for its max connection age (+/- 10 %).
    """
    check_number("value", value, min_inclusive=True)
    check_number("fraction", fraction, min_inclusive=True, maximum=1.0)
    spread = value * fraction
    return (rng if rng is not None else _RNG).uniform(value - spread, value + spread)


def _strategy(instance: object, attribute: attrs.Attribute[str], value: object) -> None:
    """one of ``'full'``, ``'proportional'``"""
    if value not in ("full", "proportional"):
        raise ConfigError(f"{attribute.name} must be 'full' or 'proportional', got {value!r}")


@attrs.frozen
class Backoff:
    """How long a client waits before reconnect attempt number ``attempt`` (0 = first retry).

    The *ceiling* grows geometrically: ``min(max_delay, initial * multiplier ** attempt)``. The
    defaults are gRPC's connection backoff (1 s, x1.6, 120 s, jitter 0.2). The default strategy
    is AWS's "full jitter" (a delay uniform in [0, ceiling]): it spreads a fleet the widest and,
    in AWS's measurements, costs the server the least work to get every client back. The
    ``"proportional"`` strategy is gRPC's: the ceiling +/- ``jitter``, capped at ``max_delay``.
    Unlike gRPC's spec we jitter the first delay too, since in a storm that is the one every
    device takes at the same moment.

    Every delay lies in [0, max_delay], with or without a server's retry-after hint.

    >>> import random
    >>> policy = Backoff(initial=1.0, multiplier=2.0, max_delay=10.0)
    >>> [policy.ceiling(attempt) for attempt in range(5)]
    [1.0, 2.0, 4.0, 8.0, 10.0]
    >>> delays = policy.delays(random.Random(7))
    >>> all(0 <= next(delays) <= 10.0 for _ in range(20))
    True
    >>> Backoff(initial=5.0, max_delay=1.0)
    Traceback (most recent call last):
    ...
    keepconn.ConfigError: max_delay must be >= initial (5), got 1.0
    """

    #: The first ceiling, in seconds.
    initial: float = attrs.field(default=1.0, validator=number())
    #: How much the ceiling grows per attempt (>= 1).
    multiplier: float = attrs.field(default=1.6, validator=number(minimum=1.0, min_inclusive=True))
    #: The largest delay ever returned, in seconds; also caps a server's retry-after hint.
    max_delay: float = attrs.field(default=120.0, validator=number())
    #: For ``"proportional"``: relative spread (+/-) around the ceiling, in [0, 1].
    jitter: float = attrs.field(default=0.2, validator=number(min_inclusive=True, maximum=1.0))
    #: How delays are drawn below the ceiling; see the class docstring.
    strategy: Strategy = attrs.field(default="full", validator=_strategy)

    def __attrs_post_init__(self) -> None:
        if self.max_delay < self.initial:
            raise ConfigError(
                f"max_delay must be >= initial ({self.initial:g}), got {self.max_delay!r}"
            )

    def ceiling(self, attempt: int) -> float:
        """``min(max_delay, initial * multiplier ** attempt)``."""
        check_number("attempt", attempt, min_inclusive=True, integer=True)
        try:
            grown = self.initial * self.multiplier**attempt
        except OverflowError:
            return self.max_delay
        return min(self.max_delay, grown)

    def bounds(self, attempt: int) -> tuple[float, float]:
        """The smallest and largest delay attempt number ``attempt`` can draw (no hint)."""
        top = self.ceiling(attempt)
        if self.strategy == "full":
            return 0.0, top
        return top * (1.0 - self.jitter), min(self.max_delay, top * (1.0 + self.jitter))

    def delays(self, rng: random.Random | None = None) -> BackoffState:
        """A fresh sequence of delays, starting at attempt 0.

        Each sequence draws from ``rng`` (by default its own generator seeded from the system,
        so two devices never share a stream).
        """
        return BackoffState(self, rng if rng is not None else random.Random())


class BackoffState(Iterator[float]):
    """The retry state of one client: which attempt comes next, and its random source.

    Iterating yields delays forever (attempt 0, 1, ...); :meth:`next_delay` does the same and
    can honour a server hint; :meth:`reset` starts over after a successful connection.
    """

    __slots__ = ("_policy", "_rng", "_attempt")

    def __init__(self, policy: Backoff, rng: random.Random) -> None:
        self._policy = policy
        self._rng = rng
        self._attempt = 0

    @property
    def policy(self) -> Backoff:
        """The backoff configuration."""
        return self._policy

    @property
    def attempt(self) -> int:
        """The number of the attempt the next delay is for (0 after a reset)."""
        return self._attempt

    def next_delay(self, hint: float | None = None) -> float:
        """The delay before the next attempt, and advance to the one after.

        ``hint`` is the server's retry-after suggestion in seconds: the delay is never shorter
        than it, except that it is capped at ``max_delay`` so a misconfigured server cannot
        park a device indefinitely (the device then asks again and gets a fresh hint).
        """
        if hint is not None:
            check_number("hint", hint, min_inclusive=True)
        low, high = self._policy.bounds(self._attempt)
        self._attempt += 1
        delay = self._rng.uniform(low, high)
        # uniform() may round a hair past its bounds; the promised bounds are exact.
        delay = min(max(delay, low), high)
        if hint is not None:
            delay = max(delay, min(hint, self._policy.max_delay))
        return delay

    def __next__(self) -> float:
        return self.next_delay()

    def __iter__(self) -> BackoffState:
        return self

    def reset(self) -> None:
        """Start over from attempt 0, after a connection succeeded."""
        self._attempt = 0

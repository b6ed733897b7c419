"""The server's one timer: when it wakes next, for the reaper, the loop-lag probe and GC pacing.

Why one timer. Each of the three used to sleep on a timer of its own: with the defaults an idle
server woke 18 times a second (the reaper every 0.25 s, the lag probe every 0.1 s, the pacer
every 0.25 s). A wake-up is not free where an idle process is parked: on this project's 2-core
virtual machine a bare ``asyncio.sleep`` loop costs 0.26 ms of CPU per wake-up, asyncio or anyio
alike (``time.process_time()`` over 10 s at 10 and 50 wake-ups a second), so those 18 cost more
than 4 ms a second before a single connection is served. One timer wakes at the earliest of
the three, and every job whose turn is near does its work at that wake-up: 4 wake-ups a second
with the defaults.

What each job gets:

* the reaper: a wake-up no later than the registry's :meth:`~SessionRegistry.next_deadline`,
  and at least every ``resolution`` (its promise: never later than deadline + resolution);
* the lag probe: every wake-up is a sample. The gauge is told when the timer means to wake
  (:meth:`LagGauge.expect`), so however the wake-up was chosen, its lateness is the loop's lag,
  and a probe gap is never longer than ``lag_probe_interval``;
* the GC pacer: a look at the accept rate at the first wake-up at most an eighth of its
  ``interval`` before it is due. It judges a rate over the time that actually passed, so a
  look a little early or late changes nothing but the window.

Sans-I/O: the adapter passes the time it woke and gets the time to wake next.
"""

from __future__ import annotations

import math

import attrs

from .gcpacing import CollectionPacer
from .lag import LagGauge
from .registry import SessionRegistry

__all__ = ["MIN_SLEEP", "Upkeep"]

#: The shortest sleep between two wake-ups, in seconds, when nothing is due at once: a
#: deadline a hair away is met by the next wake-up rather than by spinning.
MIN_SLEEP = 0.001


@attrs.define(slots=True)
class Upkeep:
    """Decides when the server's periodic work runs (see the module's text)."""

    registry: SessionRegistry
    #: Admission's loop-lag gauge, when ``max_loop_lag`` is set.
    gauge: LagGauge | None = None
    #: The full-collection pacer, when ``gc_pacing`` is set.
    pacer: CollectionPacer | None = None
    # When the pacer is to look next (-inf: at the first wake-up).
    _pace_at: float = attrs.field(default=-math.inf, init=False, repr=False)

    def start(self, now: float) -> None:
        """The timer starts at ``now``."""
        if self.gauge is not None:
            self.gauge.start(now)

    def woke(self, now: float) -> None:
        """The timer woke at ``now``: a sample of the loop's lag."""
        if self.gauge is not None:
            self.gauge.tick(now)

    def pace(self, now: float, accepted: int, full_collections: int) -> bool | None:
        """The pacer's look at this wake-up, if its turn has come: whether full collections
        are to be held from now on (see :meth:`CollectionPacer.tick` for the two counts).
        None when there is no pacer or its turn has not come: leave the collector as it is."""
        pacer = self.pacer
        # An eighth of an interval early counts as on time: the look then shares the wake-up
        # the reaper asked for (its own comes due as late as that wake-up came) instead of
        # waking the process again a moment later.
        if pacer is None or now < self._pace_at - pacer.config.interval / 8:
            return None
        self._pace_at = now + pacer.config.interval
        return pacer.tick(now, accepted, full_collections)

    def next_wake(self, now: float) -> float:
        """When to wake next, after the work of the wake-up at ``now``. At or before ``now``:
        reaping is behind (a mass expiry reaped in batches); let other work run, then go on
        without sleeping."""
        registry = self.registry
        latest = now + registry.resolution
        due = registry.next_deadline()
        if due is not None and due <= now:
            return due
        wake = latest if due is None else min(due, latest)
        if self.gauge is not None:
            wake = min(wake, self.gauge.next_deadline())
        if self.pacer is not None:
            wake = min(wake, self._pace_at)
        wake = max(wake, now + MIN_SLEEP)
        if self.gauge is not None:
            self.gauge.expect(wake)
        return wake

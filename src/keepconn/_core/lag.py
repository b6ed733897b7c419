"""How far behind its schedule the event loop runs: the measure admission sheds load on.

Sans-I/O: the adapter runs a probe that sleeps until :meth:`LagGauge.next_deadline` and then
calls :meth:`LagGauge.tick` with the time it woke; the gauge never reads a clock. A wake-up is
late by as long as other work held the loop, which is the delay every connection's next step
suffers too.

Why this and not a count: what a storm exhausts on one event loop is the loop's time, whatever
spends it (TLS handshakes, hellos, takeovers, a slow ``identify``, the garbage collector). A
cap on handshakes in progress measures it only by proxy, with a number that depends on the
machine, the key type and what else the loop does. The lag is the thing itself, and it costs no
wake-up of its own: the server's one timer (:mod:`keepconn._core.upkeep`) is the probe.

While the loop is stuck the probe cannot run to report it, so :meth:`LagGauge.lag` counts an
overdue wake-up as lag already: a connection accepted right after a stall is judged by the
stall it waited through, before the probe has had its turn.
"""

from __future__ import annotations

import math

import attrs

from .validate import number

__all__ = ["LagGauge"]


@attrs.define(slots=True)
class LagGauge:
    """The event loop's lag, from a probe that wakes every ``interval`` seconds.

    Before :meth:`start` (no probe running) the lag is 0: a gauge nobody feeds refuses nothing.
    """

    #: Seconds between two wake-ups of the probe.
    interval: float = attrs.field(validator=number())
    # When the probe is due to wake next (inf: not started).
    _due: float = attrs.field(default=math.inf, init=False, repr=False)
    # Lag measured at the probe's last wake-up.
    _last: float = attrs.field(default=0.0, init=False, repr=False)
    # The highest lag measured since start.
    _peak: float = attrs.field(default=0.0, init=False, repr=False)

    def start(self, now: float) -> None:
        """The probe starts: its first wake-up is due ``interval`` from ``now``."""
        self._due = now + self.interval

    def expect(self, at: float) -> None:
        """The probe means to wake at ``at``, sooner than :meth:`next_deadline` (a timer it
        shares with other work): its lateness is measured from then."""
        if at < self._due:
            self._due = at

    def tick(self, now: float) -> float:
        """The probe woke at ``now``: returns how late it was (0 if on time or early)."""
        if self._due == math.inf:
            self.start(now)
            return 0.0
        # Timers may fire a clock tick early; that is no lag.
        lag = max(0.0, now - self._due)
        self._last = lag
        if lag > self._peak:
            self._peak = lag
        self._due = now + self.interval
        return lag

    def next_deadline(self) -> float:
        """When the probe should wake next (inf before :meth:`start`)."""
        return self._due

    def lag(self, now: float) -> float:
        """The loop's lag as known at ``now``: the last measured one, or more if the probe is
        overdue by more (then the loop is behind right now and the probe has not had its
        turn)."""
        return max(self._last, now - self._due, 0.0)

    @property
    def peak(self) -> float:
        """The highest lag measured at a wake-up since start."""
        return self._peak

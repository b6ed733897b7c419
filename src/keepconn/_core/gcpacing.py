"""When the cyclic garbage collector may run a full collection: not in the middle of a storm.

Why. A full (generation 2) collection walks every tracked object of the process and stops the
event loop meanwhile: a server holding 15,000 connections spends a few hundred milliseconds in
one, longer on a machine that the storm's own clients keep busy. CPython starts one whenever the
objects that survived younger collections since the last one exceed a quarter of the long-lived
ones, and a reconnect storm is exactly that: thousands of new connections that survive, while
thousands of old ones die. Measured in the storm benchmark (15,000 devices back in 6 s): five
full collections of 340-440 ms, the whole loop-lag tail.

What. While the server accepts connections faster than :attr:`GcPacing.busy_rate`, full
collections are held (the adapter raises CPython's generation-2 threshold; young collections
go on as before). Once the rate has stayed below it for :attr:`GcPacing.calm` seconds, they
are released, and the collection the hold put off runs at once, the survivors of the storm
counted in: it comes when the storm is over, not at whatever moment the next allocations would
have set it off, which is the next burst of work. (Not at the first quiet tick: a
storm paced by admission and client backoff has lulls of a fraction of a second, and a
release in one brings the whole pending collection into the storm.) A hold lasts at most
:attr:`GcPacing.max_hold` seconds; after a forced release no new hold starts until a full
collection has run, so memory held by garbage cycles stays bounded however long a storm lasts.

With :attr:`GcPacing.freeze` CPython runs no full collection at all: at every look, what
survived the young collections is moved to the collector's permanent generation
(``gc.freeze()``, constant time), which no collection walks. Why. A full collection walks
every connection the server holds (337 ms at 15,000 in the storm benchmark, the release's), and
there is no good moment for it: a storm paced by admission has a tail (devices that backed off
come back for many seconds after the rate fell below ``busy_rate``), and between storms a
server's traffic keeps making objects that live for seconds (the future a handler waits on
until its device's next message, the message itself), which survive the young collections and
bring the next full collection on within a minute (175 ms at 15,000 in the churn benchmark,
where holding only through storms left one after the storm). Most of what a full collection
would walk is long-lived connections that reference counting frees when they close; walking
them again finds nothing. The price: a garbage cycle among frozen objects stays until they are
thawed. That is bounded: the first look outside a storm :attr:`GcPacing.thaw_after` seconds or
more after the last thaw (or the pacer's start) thaws everything (``gc.unfreeze()``) and runs
the full collection, which walks everything once; and the adapter thaws what is frozen when the
server stops. Use it where connections die by reference counting (keepconn's native asyncio
transport and the example gateway on it do, tested); the pacer owns the permanent generation
then, so an application that calls ``gc.freeze()`` itself should leave it off.

With :attr:`GcPacing.young` (on by default) every look also collects the young generations.
Why. CPython starts a young collection when its allocations minus its deallocations pass a
threshold (700), and a server's traffic can balance the two for a long time: each message a
handler waits for replaces long-lived objects one for one (the future it waits on, the
message it keeps until the next), a young one made for an old one freed. The count then stays
low while the young generation grows, and the collection that finally comes walks all of it
at once. Measured in the churn benchmark (15,000 devices publishing telemetry): young
collections of 70,000-87,000 objects, 33-65 ms (148 ms once), the whole takeover tail. A
collection at every look walks what an ``interval`` made instead.

Sans-I/O: the adapter ticks the pacer with the time, the server's accept count and the
collector's count of full collections, and applies what :meth:`CollectionPacer.tick` says.
"""

from __future__ import annotations

import math

import attrs

from .validate import number

__all__ = ["CollectionPacer", "GcPacing", "GcPacingStats"]


@attrs.frozen
class GcPacing:
    """Hold the cyclic collector's full collections while the server is in a storm.

    The garbage collector is the process's, not the server's: enable this on one server per
    process (``ServerConfig(gc_pacing=GcPacing())``). Off by default, as a library should leave
    process-wide settings alone unless asked.
    """

    #: Seconds between two looks at the accept rate (the reaction time to a storm).
    interval: float = attrs.field(default=0.25, validator=number())
    #: Accepted connections per second above which the server is in a storm.
    busy_rate: float = attrs.field(default=100.0, validator=number())
    #: Seconds the rate must stay below ``busy_rate`` before a hold ends.
    calm: float = attrs.field(default=2.0, validator=number(min_inclusive=True))
    #: Longest hold in seconds. Then full collections are released until one has run.
    max_hold: float = attrs.field(default=30.0, validator=number())
    #: Freeze what survives at every look instead of ever letting CPython run a full
    #: collection (see the module's text).
    freeze: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    #: With ``freeze``: seconds from one thaw to the next look outside a storm that thaws the
    #: frozen objects and runs the full collection (what bounds the garbage cycles kept).
    thaw_after: float = attrs.field(default=600.0, validator=number())
    #: Collect the young generations at every look, so that they hold no more than an
    #: ``interval`` of work (see the module's text). Never where the application has turned
    #: the collector off (``gc.disable()``).
    young: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))


@attrs.frozen
class GcPacingStats:
    """What the pacer did (``ServerStats.gc_pacing``)."""

    #: Whether full collections are held now.
    holding: bool
    #: Holds begun since start.
    holds: int
    #: Holds that ran out (``max_hold``) while the storm went on.
    forced: int
    #: Seconds held in all, the current hold included.
    held_seconds: float
    #: Looks that froze the survivors (``GcPacing.freeze``: every look but a thaw's).
    freezes: int = 0
    #: Looks that thawed the frozen objects and ran the full collection.
    thaws: int = 0


@attrs.define(slots=True)
class CollectionPacer:
    """Decides, tick by tick, whether full collections are held (see the module's text)."""

    config: GcPacing
    # Accepts counted at the previous tick, and when that was (None before the first tick).
    _accepted: int = attrs.field(default=0, init=False, repr=False)
    _at: float | None = attrs.field(default=None, init=False, repr=False)
    # When the current hold began (inf: not holding).
    _since: float = attrs.field(default=math.inf, init=False, repr=False)
    # Since when the rate has been below busy_rate during the hold (inf: it is not).
    _quiet: float = attrs.field(default=math.inf, init=False, repr=False)
    # After a forced release: the full-collection count that must be passed before a new hold.
    _owed: int | None = attrs.field(default=None, init=False, repr=False)
    #: Holds begun so far.
    holds: int = attrs.field(default=0, init=False)
    #: Holds that ran out (max_hold) while the storm went on.
    forced: int = attrs.field(default=0, init=False)
    #: Seconds held in all, counted when each hold ends.
    held_seconds: float = attrs.field(default=0.0, init=False)
    #: Looks that froze, and that thawed (see :meth:`settle`).
    freezes: int = attrs.field(default=0, init=False)
    thaws: int = attrs.field(default=0, init=False)
    # With freeze: when the frozen objects were last thawed and collected (None: before the
    # first look, whose time stands in for it).
    _thawed: float | None = attrs.field(default=None, init=False, repr=False)

    @property
    def holding(self) -> bool:
        """Whether full collections are held now."""
        return self._since != math.inf

    def tick(self, now: float, accepted: int, full_collections: int) -> bool:
        """The adapter's look at ``now``: ``accepted`` is the server's accept count so far,
        ``full_collections`` the collector's count of full collections so far. Returns whether
        full collections are to be held from now on."""
        at, self._at = self._at, now
        before, self._accepted = self._accepted, accepted
        if self._thawed is None:
            self._thawed = now
        if at is None or now <= at:
            return self.holding  # the first look, or no time passed: no rate to judge
        busy = (accepted - before) / (now - at) > self.config.busy_rate
        if self._owed is not None and full_collections > self._owed:
            self._owed = None  # the collection a forced release owed has run
        if self.holding:
            if busy:
                self._quiet = math.inf
            elif self._quiet == math.inf:
                self._quiet = at  # quiet since the previous look
            if now - self._quiet >= self.config.calm:
                self._end(now)
            elif now - self._since >= self.config.max_hold:
                self._end(now)
                self.forced += 1
                self._owed = full_collections
        elif busy and self._owed is None:
            self._since = now
            self.holds += 1
        return self.holding

    def settle(self, now: float) -> bool:
        """With ``freeze``, at every look (after :meth:`tick`): True, freeze what survived;
        False, thaw what is frozen and run the full collection (``thaw_after`` has passed, and
        this look is outside a storm). Without ``freeze``: always False."""
        config = self.config
        if not config.freeze:
            return False
        if self.holding or (self._thawed is not None and now - self._thawed < config.thaw_after):
            self.freezes += 1
            return True
        self._thawed = now
        self.thaws += 1
        return False

    def stats(self, now: float) -> GcPacingStats:
        """A snapshot of the counters at ``now``."""
        current = now - self._since if self.holding else 0.0
        return GcPacingStats(
            self.holding,
            self.holds,
            self.forced,
            self.held_seconds + current,
            self.freezes,
            self.thaws,
        )

    def stop(self, now: float) -> None:
        """The adapter stops (the server is going away): any hold ends."""
        if self.holding:
            self._end(now)

    def _end(self, now: float) -> None:
        self.held_seconds += now - self._since
        self._since = self._quiet = math.inf

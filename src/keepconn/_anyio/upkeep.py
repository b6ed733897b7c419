"""The server's one timer task: reaping, the loop-lag probe and GC pacing at the same wake-ups.

When each job runs is :class:`keepconn._core.upkeep.Upkeep`'s decision (and why one timer, its
module's text); this task sleeps, reads the clock, reaps in batches with a checkpoint between
them (a mass expiry never stalls the event loop), and applies the pacer's hold to CPython's
collector: with ``GcPacing.young`` it collects the young generations at each of the pacer's
looks, with ``GcPacing.freeze`` it freezes what survives them.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import NoReturn

import anyio
import anyio.lowlevel

from .._core.gcpacing import CollectionPacer
from .._core.registry import Session
from .._core.upkeep import Upkeep

__all__ = ["upkeep_forever"]

#: CPython's generation-2 threshold while full collections are held: never reached. (It counts
#: generation-1 collections since the last full one; young collections go on as before.)
_HELD = 1 << 30


class _Collector:
    """What the pacer changes of CPython's collector: the generation-2 threshold, raised while
    full collections are held; the young collections of ``GcPacing.young``; and, with
    ``GcPacing.freeze``, the permanent generation, where the survivors go."""

    def __init__(self, pacer: CollectionPacer) -> None:
        self._pacer = pacer
        self._normal = gc.get_threshold()[2]
        self._held = False
        self._storm = False
        # Whether this server froze objects that are still frozen: only then is unfreezing
        # ours to do (an application's own gc.freeze() is left alone without GcPacing.freeze).
        self._froze = False

    @staticmethod
    def count() -> int:
        """Full collections run so far."""
        return int(gc.get_stats()[2]["collections"])

    def look(self, storm: bool, now: float) -> None:
        """Apply the pacer's look at ``now``; ``storm``: whether it holds full collections."""
        config = self._pacer.config
        released, self._storm = self._storm and not storm, storm
        # With freeze CPython never starts a full collection: what survives is frozen at
        # every look instead, and the pacer says when to thaw and collect.
        self._hold(storm or config.freeze)
        if not gc.isenabled():
            return  # the application has turned the collector off: nothing of ours runs
        if config.young:
            # CPython's own rule for which young generation, except with freeze: there each
            # look takes the young generations whole, for what survives to be frozen.
            over = gc.get_count()[1] > gc.get_threshold()[1]
            gc.collect(1 if config.freeze or over else 0)
        if config.freeze:
            if not self._pacer.settle(now):
                self._thaw()
                gc.collect()
            else:
                # Frozen, the survivors are walked by no collection: a server's connections
                # live long and are freed by reference counting when they close.
                gc.freeze()
                self._froze = True
        elif released and self._normal and gc.get_count()[2] > self._normal:
            # The hold put off a full collection. Left to CPython it would run at the next
            # allocation past the young threshold: the next burst of work, the worst moment
            # (seen in the churn benchmark: 1.2 s, right as a burst of reboots began, 18 s
            # after the release). Now is the quiet the pacer waited for. (Never where the
            # application has turned full collections off.)
            gc.collect()

    def _hold(self, hold: bool) -> None:
        if hold == self._held:
            return
        self._held = hold
        # Only the generation-2 threshold is ours, and only while held: whatever the
        # application set before a hold is what the release restores.
        young_0, young_1, old = gc.get_threshold()
        if hold:
            self._normal = old
        gc.set_threshold(young_0, young_1, _HELD if hold else self._normal)

    def stop(self, now: float) -> None:
        """The server is stopping: the pacer ends any hold, and the collector is CPython's
        again."""
        self._pacer.stop(now)
        self._hold(False)
        # What this server froze goes back to the oldest generation, for CPython's own next
        # full collection: frozen objects outliving the server would never be looked at.
        self._thaw()

    def _thaw(self) -> None:
        if self._froze:
            gc.unfreeze()
            self._froze = False


async def upkeep_forever(
    upkeep: Upkeep,
    batch: int,
    *,
    spare: Callable[[Session], bool],
    expired: Callable[[Session, float], None],
    accepted: Callable[[], int],
) -> NoReturn:
    """Run the server's periodic work until cancelled.

    ``spare(session)`` may keep a due session open (see ``SessionRegistry.reap``);
    ``expired(session, now)`` closes the connection of each one reaped; ``accepted()`` is the
    server's accept count, whose rate the GC pacer judges. When this ends, CPython's own
    generation-2 threshold is back.
    """
    registry = upkeep.registry
    collections = None if upkeep.pacer is None else _Collector(upkeep.pacer)
    now = anyio.current_time()
    upkeep.start(now)
    try:
        while True:
            for session in registry.reap(now, limit=batch, spare=spare):
                expired(session, now)
            if collections is not None:
                hold = upkeep.pace(now, accepted(), _Collector.count())
                if hold is not None:
                    collections.look(hold, now)
            wake = upkeep.next_wake(now)
            if wake <= now:
                # A mass expiry: let other tasks run between batches.
                await anyio.lowlevel.checkpoint()
            else:
                await anyio.sleep_until(wake)
            now = anyio.current_time()
            upkeep.woke(now)
    finally:
        if collections is not None:
            collections.stop(anyio.current_time())

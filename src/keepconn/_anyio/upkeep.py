"""The server's one timer task: reaping, the loop-lag probe and GC pacing at the same wake-ups.

When each job runs is :class:`keepconn._core.upkeep.Upkeep`'s decision (and why one timer, its
module's text); this task sleeps, reads the clock, reaps in batches with a checkpoint between
them (a mass expiry never stalls the event loop), and applies the pacer's hold to CPython's
collector (and, with ``GcPacing.freeze``, freezes what survived a storm).
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


class _FullCollections:
    """CPython's generation-2 threshold, raised while the pacer holds full collections, and
    the permanent generation, where a release with ``GcPacing.freeze`` puts the survivors."""

    def __init__(self, pacer: CollectionPacer | None) -> None:
        self._pacer = pacer
        self._normal = gc.get_threshold()[2]
        self.held = False
        # Whether this server froze objects that are still frozen: only then is unfreezing
        # ours to do (an application's own gc.freeze() is left alone without GcPacing.freeze).
        self._froze = False

    @staticmethod
    def count() -> int:
        """Full collections run so far."""
        return int(gc.get_stats()[2]["collections"])

    def hold(self, hold: bool, now: float) -> None:
        if hold == self.held:
            return
        self.held = hold
        # Only the generation-2 threshold is ours, and only while held: whatever the
        # application set before a hold is what the release restores.
        young_0, young_1, old = gc.get_threshold()
        if hold:
            self._normal = old
        normal = self._normal
        gc.set_threshold(young_0, young_1, _HELD if hold else normal)
        if not hold and gc.isenabled() and normal and gc.get_count()[2] > normal:
            # The hold put off a full collection. Left to CPython it would run at the next
            # allocation past the young threshold: the next burst of work, the worst moment
            # (seen in the churn benchmark: 1.2 s, right as a burst of reboots began, 18 s
            # after the release). Now is the quiet the pacer waited for. (Never where the
            # application has turned full collections off.)
            assert self._pacer is not None
            if self._pacer.settle(now):
                # Frozen, the survivors are walked by no collection: the next full one,
                # which CPython still owes and runs soon, walks only what came after.
                gc.freeze()
                self._froze = True
            else:
                self._thaw()
                gc.collect()

    def restore(self) -> None:
        if self.held:
            gc.set_threshold(*gc.get_threshold()[:2], self._normal)
            self.held = False
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
    collections = _FullCollections(upkeep.pacer)
    now = anyio.current_time()
    upkeep.start(now)
    try:
        while True:
            for session in registry.reap(now, limit=batch, spare=spare):
                expired(session, now)
            hold = upkeep.pace(now, accepted(), collections.count())
            if hold is not None:
                collections.hold(hold, now)
            wake = upkeep.next_wake(now)
            if wake <= now:
                # A mass expiry: let other tasks run between batches.
                await anyio.lowlevel.checkpoint()
            else:
                await anyio.sleep_until(wake)
            now = anyio.current_time()
            upkeep.woke(now)
    finally:
        if upkeep.pacer is not None:
            upkeep.pacer.stop(anyio.current_time())
        collections.restore()

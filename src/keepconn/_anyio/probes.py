"""Background tasks that watch a server from the side: the loop-lag probe admission sheds load
on (the server runs it while ``max_loop_lag`` is set), the pacing of full garbage collections
(while ``gc_pacing`` is set), and the opt-in ones ``keepconn.metrics`` runs.

Each is one cheap loop on the event loop: they add nothing to a connection's path, and they
exist only when started.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Awaitable, Callable
from typing import NoReturn

import anyio

from .._core.events import SocketAudit
from .._core.gcpacing import CollectionPacer
from .._core.lag import LagGauge

__all__ = ["audit_forever", "feed_lag_forever", "pace_collections_forever", "sample_lag_forever"]

logger = logging.getLogger("keepconn.server")


async def sample_lag_forever(record: Callable[[float], None], interval: float) -> NoReturn:
    """Sleep ``interval`` seconds, again and again, and ``record`` how late each wake-up was.

    A wake-up is late by as long as other work held the event loop (or the process was not
    scheduled): that is the delay every connection's next step suffered too.
    """
    while True:
        asleep = anyio.current_time()
        await anyio.sleep(interval)
        # asyncio may run a timer up to its clock resolution early; that is no lag.
        record(max(0.0, anyio.current_time() - asleep - interval))


async def feed_lag_forever(gauge: LagGauge) -> NoReturn:
    """Wake when ``gauge`` says and tell it when we did: the core judges how late that was."""
    gauge.start(anyio.current_time())
    while True:
        await anyio.sleep_until(gauge.next_deadline())
        gauge.tick(anyio.current_time())


#: CPython's generation-2 threshold while full collections are held: never reached. (It counts
#: generation-1 collections since the last full one; young collections go on as before.)
_HELD = 1 << 30


async def pace_collections_forever(pacer: CollectionPacer, accepted: Callable[[], int]) -> NoReturn:
    """Tick ``pacer`` with the server's accept count (``accepted()``) and hold or release the
    collector's full collections as it says. When this ends, CPython's own threshold is back."""
    normal = gc.get_threshold()[2]
    held = False
    try:
        while True:
            await anyio.sleep(pacer.config.interval)
            full = gc.get_stats()[2]["collections"]
            hold = pacer.tick(anyio.current_time(), accepted(), full)
            if hold == held:
                continue
            held = hold
            # Only the generation-2 threshold is ours, and only while held: whatever the
            # application set before a hold is what the release restores.
            young_0, young_1, old = gc.get_threshold()
            if hold:
                normal = old
            gc.set_threshold(young_0, young_1, _HELD if hold else normal)
            if not hold and gc.isenabled() and normal and gc.get_count()[2] > normal:
                # The hold put off a full collection. Left to CPython it would run at the next
                # allocation past the young threshold: the next burst of work, the worst
                # moment (seen in the churn benchmark: 1.2 s, right as a burst of reboots
                # began, 18 s after the release). Now is the quiet the pacer waited for.
                # (Never where the application has turned full collections off.)
                gc.collect()
    finally:
        pacer.stop(anyio.current_time())
        if held:
            gc.set_threshold(*gc.get_threshold()[:2], normal)


async def audit_forever(
    audit: Callable[[], Awaitable[SocketAudit]],
    record: Callable[[SocketAudit], None],
    interval: float,
) -> None:
    """Run ``audit()`` every ``interval`` seconds and ``record`` each result.

    Returns (after one warning) if the kernel has no socket table to read (not Linux): an audit
    that can never succeed should not be retried for ever. Other failures to read it are logged
    and the next interval tries again.
    """
    while True:
        try:
            result = await audit()
        except FileNotFoundError as exc:
            logger.warning("no socket table to audit, auditing stops: %s", exc)
            return
        except OSError as exc:
            logger.warning("socket audit failed, retrying in %.0f s: %s", interval, exc)
        else:
            record(result)
        await anyio.sleep(interval)

"""Background tasks that watch a server from the side: the opt-in ones ``keepconn.metrics``
runs. (The loop-lag samples admission sheds load on, and GC pacing, ride the server's own
timer: :mod:`.upkeep`.)

Each is one cheap loop on the event loop: they add nothing to a connection's path, and they
exist only when started.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import NoReturn

import anyio

from .._core.events import SocketAudit

__all__ = ["audit_forever", "sample_lag_forever"]

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

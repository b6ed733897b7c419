"""The reaper: the one task per server that closes sessions whose deadline has passed.

It sleeps until the registry's next deadline (at most one resolution step), so a server with
nothing due costs one O(1) wake-up per step, and it reaps in batches of ``batch`` with a
checkpoint between them, so a mass expiry never stalls the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

import anyio
import anyio.lowlevel

from .._core.registry import Session, SessionRegistry

__all__ = ["reap_forever"]


async def reap_forever(
    registry: SessionRegistry,
    batch: int,
    *,
    spare: Callable[[Session], bool],
    expired: Callable[[Session, float], None],
) -> NoReturn:
    """Reap ``registry`` on time until cancelled.

    ``spare(session)`` may keep a due session open (see ``SessionRegistry.reap``);
    ``expired(session, now)`` closes the connection of each one reaped.
    """
    while True:
        now = anyio.current_time()
        for session in registry.reap(now, limit=batch, spare=spare):
            expired(session, now)
        wake = registry.next_deadline()
        if wake is not None and wake <= now:
            # A mass expiry: let other tasks run between batches.
            await anyio.lowlevel.checkpoint()
            continue
        delay = registry.resolution if wake is None else min(registry.resolution, wake - now)
        await anyio.sleep(max(delay, 0.001))

"""Shutdown: stop accepting, tell every peer, give them a grace, reset the stragglers."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import anyio
import anyio.abc

from .._core.backoff import jitter
from .._core.config import ServerConfig
from .._core.reasons import CloseReason
from .connection import Connection
from .life import Lifecycle

__all__ = ["drain"]

logger = logging.getLogger("keepconn.server")

F = TypeVar("F")


async def drain(
    listeners: Iterable[anyio.abc.SocketListener],
    lives: Lifecycle[F],
    config: ServerConfig,
    goodbye: Callable[[Connection[F], float], Awaitable[None]] | None,
    rng: random.Random,
) -> None:
    """Close the listeners, then end every connection: each peer with a session is told (with
    a jittered reconnect hint, so they do not all come back at once) and sent a FIN; whoever
    is still there after ``shutdown_grace`` is reset, so no socket lingers in FIN_WAIT1."""
    for listener in listeners:
        await listener.aclose()
    # Every peer is told at once: one dead peer with a full send buffer must not hold up the
    # goodbyes of thousands of live ones.
    async with anyio.create_task_group() as tasks:
        for conn in list(lives.connections):
            tasks.start_soon(_say_goodbye, conn, config, goodbye, rng)
    with anyio.move_on_after(config.shutdown_grace + 0.5):
        await lives.idle.wait()
    for conn in list(lives.connections):
        conn.close(CloseReason.SHUTDOWN, "aborted after grace")
    with anyio.move_on_after(1.0):
        await lives.idle.wait()


async def _say_goodbye(
    conn: Connection[Any],
    config: ServerConfig,
    goodbye: Callable[[Connection[Any], float], Awaitable[None]] | None,
    rng: random.Random,
) -> None:
    if goodbye is not None and conn.session is not None:
        retry_after = jitter(config.shutdown_retry_after, config.shutdown_jitter, rng)
        with anyio.move_on_after(min(1.0, config.shutdown_grace)):
            try:
                await goodbye(conn, retry_after)
            except Exception:  # a peer that cannot be told is aborted after the grace
                logger.debug("goodbye to %r failed", conn, exc_info=True)
    await conn.shutdown(CloseReason.SHUTDOWN, config.shutdown_grace)

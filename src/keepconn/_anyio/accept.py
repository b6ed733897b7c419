"""The accept loop, and what it does when accept() fails.

Errors that mean "short of a resource right now" (descriptors, buffers) leave the listening
socket readable, so without a pause the loop would spin at 100 % CPU while the live sessions
starve; it pauses briefly and tries again, since closes elsewhere free what accept needs
(trio's serve_listeners does the same; anyio's Listener.serve does not). A peer that gave up
before it was accepted is skipped. Anything else is logged and paced the same way: the live
sessions matter more than the listener.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import anyio.abc
import sniffio

from .failures import errno_of

__all__ = ["accept_forever", "connection_tasks", "pause_after"]

logger = logging.getLogger("keepconn.server")

#: accept() errors that mean the process or the system is short of a resource right now.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() errors that mean the peer gave up before we accepted: nothing to serve.
GONE_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
#: Seconds to wait after an accept() that failed for want of a resource.
PAUSE = 0.1

T = TypeVar("T")

#: ``start_soon(async_fn, *args)``: starts one connection's task.
StartSoon = Callable[..., Any]


@asynccontextmanager
async def connection_tasks(tasks: anyio.abc.TaskGroup) -> AsyncIterator[StartSoon]:
    """What starts the tasks of the connections one accept loop serves (on the anyio streams).

    On trio, a nursery of the accept task's own: anyio's ``start_soon`` wraps every task in
    a task handle (a cancel scope with its cancel status and two sets, an event with its
    set, one coroutine frame more), about ten objects an idle connection would hold for
    nothing, since its own cancel scope is what ends it. The nursery sits inside ``tasks``,
    so its cancellation still ends them, and the block ends only once they all have.
    Elsewhere, ``tasks.start_soon`` itself.
    """
    if sniffio.current_async_library() != "trio":
        yield tasks.start_soon
        return
    import trio  # only here: trio is an optional dependency

    async with trio.open_nursery() as nursery:
        yield nursery.start_soon


def pause_after(exc: BaseException, failed: Callable[[], None]) -> float | None:
    """What an accept() that raised ``exc`` calls for: None to go on at once (the peer gave
    up first), else the seconds to pause before the next one (counted with ``failed()`` and
    logged)."""
    code = errno_of(exc)
    if code in GONE_ERRNOS:
        return None
    failed()
    if code in RESOURCE_ERRNOS:
        name = errno.errorcode.get(code or 0, code)
        logger.warning("accept failed (%s); pausing %.0f ms", name, PAUSE * 1000)
    else:
        logger.error("accept failed unexpectedly: %r; pausing", exc)
    return PAUSE


async def accept_forever(
    accept: Callable[[], Awaitable[T]],
    spawn: Callable[[T], None],
    *,
    stopping: anyio.Event,
    failed: Callable[[], None],
) -> None:
    """Accept connections with ``accept()`` (a listener's anyio stream) and ``spawn`` each,
    until the listener closes.

    ``failed()`` counts each accept() that failed for a reason other than a vanished peer.
    """
    while True:
        try:
            accepted = await accept()
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError) as exc:
            if isinstance(exc, anyio.ClosedResourceError) or stopping.is_set():
                return
            pause = pause_after(exc, failed)
            if pause is not None:
                await anyio.sleep(pause)
            continue
        spawn(accepted)

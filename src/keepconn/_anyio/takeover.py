"""Before a takeover resets a live session: is the new connection's peer still there?"""

from __future__ import annotations

from typing import Any

import anyio

from .connection import Connection

__all__ = ["TAKEOVER_CONFIRM", "welcome_answered"]

#: Seconds a takeover waits at most for the peer's kernel to acknowledge the new connection's
#: welcome (a round trip). Past it the takeover goes ahead, as it would where the kernel cannot
#: say: the wait only bounds what a slow link costs.
TAKEOVER_CONFIRM = 2.0


async def welcome_answered(conn: Connection[Any], welcome: bytes) -> bool:
    """Send the welcome on ``conn``; False if the peer's kernel answers it with a reset.

    Under a listen-queue overflow the kernel completes some connections late (from a SYN
    cookie, or when a retransmitted ACK finds room), after the newer connection the device
    opened once it gave up on this one: accept order then puts the abandoned connection last,
    and its CONNECT (retransmitted by the device's kernel) would take the live session over.
    Nothing on the server's side tells the two apart before a byte goes out, but a peer that
    closed its socket answers data with a reset, and a live one acknowledges it within a round
    trip. Where the kernel cannot say (no SIOCOUTQ), or past TAKEOVER_CONFIRM, the takeover
    goes ahead.
    """
    try:
        await conn.send(welcome)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        return False
    deadline = anyio.current_time() + TAKEOVER_CONFIRM
    pause = 0.001
    while True:
        if conn._peer_gone():
            return False
        if not conn._unacknowledged() or anyio.current_time() >= deadline:
            return True
        await anyio.sleep(pause)
        pause = min(2 * pause, 0.05)

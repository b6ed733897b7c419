"""The hellos one turn of the event loop serves: at most :data:`HELLOS_PER_TURN`.

Why. A hello is the costly part of a connection (parse, authenticate, take over, welcome,
close the displaced connection: a few hundred microseconds in the example gateway), and in
a reconnect storm they come in waves: the devices' CONNECTs of some 1,400 connections the
accept loop took within a few milliseconds (its batches cost nothing until the first hello is
read) became readable in one turn, and the next three turns served all their hellos, 50-100
ms each, with every live session's ping waiting behind them. Handed on a batch per turn, the
same hellos take the same CPU, spread over turns of a few milliseconds each: live sessions
go first, new ones queue for a turn or two.

Only a connection's first frames are rationed, and only in time: a connection waiting here
costs a place in a queue (its further bytes wait in the kernel), its hello timeout runs on,
and the accept loop never waits for it, so a peer that connects and says nothing holds up no
one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

__all__ = ["HELLOS_PER_TURN", "HelloGate"]

#: Connections whose first frames one turn of the event loop hands on (the accept batch's
#: size: the gate lets through as many hellos a turn as the accept loop takes in one).
HELLOS_PER_TURN = 16


class Gated(Protocol):
    def _gate_opened(self) -> None: ...


class HelloGate:
    """Hands connections their first frames, at most ``per_turn`` connections a loop turn."""

    __slots__ = ("_loop", "_passed", "_per_turn", "_scheduled", "_waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop, per_turn: int = HELLOS_PER_TURN) -> None:
        self._loop = loop
        self._per_turn = per_turn
        # Connections let through in this turn, and those waiting for a later one, in order.
        self._passed = 0
        self._waiting: deque[Gated] = deque()
        # Whether the next turn's reset is scheduled (a callback queued now runs next turn).
        self._scheduled = False

    def admit(self, conn: Gated) -> bool:
        """True if ``conn`` may take its first frames now; otherwise it waits in order, and
        ``conn._gate_opened()`` is called in a later turn."""
        self._schedule()
        if not self._waiting and self._passed < self._per_turn:
            self._passed += 1
            return True
        self._waiting.append(conn)
        return False

    @property
    def waiting(self) -> int:
        """Connections waiting for a later turn."""
        return len(self._waiting)

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._scheduled = False
        self._passed = 0
        waiting = self._waiting
        while waiting and self._passed < self._per_turn:
            self._passed += 1
            waiting.popleft()._gate_opened()
        if self._passed:
            self._schedule()  # this turn's count is reset at the next one

"""The event-loop peers, measured inside their loops: (c) one asyncio TimerHandle per session and
(d) one trio CancelScope per session, entered by a live task.
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import trio
import trio.testing

from registry_measure import (
    RESOLUTION,
    T0,
    TIMEOUT,
    Nows,
    Plan,
    check,
    check_keys,
    new_row,
    no_gc,
    traced_bytes,
)

# -- (c) asyncio timers ------------------------------------------------------------------------


class _TimerOwner:
    """The connection table the timer callbacks remove themselves from."""

    def __init__(self) -> None:
        self.table: dict[str, _TimerConn] = {}
        self.reaped: list[str] = []


class _TimerConn:
    __slots__ = ("key", "owner", "handle")

    def __init__(self, key: str, owner: _TimerOwner) -> None:
        self.key = key
        self.owner = owner
        self.handle: asyncio.TimerHandle | None = None

    def expire(self) -> None:
        owner = self.owner
        del owner.table[self.key]
        owner.reaped.append(self.key)


def _touch_timers(conns: list[_TimerConn], call_later: Callable[..., asyncio.TimerHandle]) -> None:
    for conn in conns:
        conn.handle.cancel()  # type: ignore[union-attr]
        conn.handle = call_later(TIMEOUT, conn.expire)


def _open_timers(loop: asyncio.AbstractEventLoop, keys: list[str], owner: _TimerOwner) -> None:
    call_later = loop.call_later
    table = owner.table
    for key in keys:
        conn = _TimerConn(key, owner)
        conn.handle = call_later(TIMEOUT, conn.expire)
        table[key] = conn


def _virtual_clock(loop: asyncio.AbstractEventLoop) -> list[float]:
    """Give `loop` a settable clock: every timer decision reads self.time()."""
    clock = [T0]
    loop.time = lambda: clock[0]  # type: ignore[method-assign]
    return clock


async def _run_due_timers() -> int:
    """Time the loop running everything due: our task's step comes first in the iteration
    that pops the due timers, so the second sleep returns only after all of them ran."""
    start = time.perf_counter_ns()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    return time.perf_counter_ns() - start


async def _asyncio_run1(
    loop: asyncio.AbstractEventLoop, plan: Plan, row: dict[str, Any], errors: list[str]
) -> None:
    n, keys = plan.n, plan.keys
    where = f"asyncio_timer N={n}"
    owner = _TimerOwner()
    row["bytes_per_session"] = traced_bytes(lambda: _open_timers(loop, keys, owner)) / n
    conns = list(owner.table.values())
    shuffled = [conns[i] for i in plan.order]
    call_later = loop.call_later

    _touch_timers(shuffled, call_later)  # warm-up
    await asyncio.sleep(0)
    best = math.inf
    for _ in range(plan.touch_repeats):
        with no_gc():
            start = time.perf_counter_ns()
            for _ in range(plan.passes):
                _touch_timers(shuffled, call_later)
            elapsed = time.perf_counter_ns() - start
        best = min(best, elapsed)
        # A running server iterates its loop, which drops the cancelled handles (not timed).
        await asyncio.sleep(0)
    row["touch_ns"] = best / (plan.passes * n)
    del shuffled

    for _ in range(3):
        await asyncio.sleep(0)
    best = math.inf
    for _ in range(21):
        with no_gc():
            start = time.perf_counter_ns()
            await asyncio.sleep(0)
            elapsed = time.perf_counter_ns() - start
        best = min(best, elapsed)
    row["empty_sweep_ns"] = best
    row["empty_sweep_kind"] = "event-loop iteration"
    check(errors, not owner.reaped, f"{where}: timers fired before their time")

    # Mass expiry: move the loop to a virtual clock past every deadline.
    clock = _virtual_clock(loop)
    clock[0] = max(conn.handle.when() for conn in conns) + RESOLUTION  # type: ignore[union-attr]
    try:
        with no_gc():
            elapsed = await _run_due_timers()
    finally:
        del loop.time
    check_keys(errors, f"{where} mass expiry", owner.reaped, keys)
    check(errors, not owner.table, f"{where}: {len(owner.table)} left after the mass expiry")
    row["mass"] = {
        "limit": None,
        "reaped": len(owner.reaped),
        "calls": 1,
        "max_call_ms": elapsed / 1e6,
        "total_ms": elapsed / 1e6,
        "phases": {},
    }


async def _asyncio_reap(
    loop: asyncio.AbstractEventLoop, clock: list[float], plan: Plan, errors: list[str]
) -> tuple[int, int]:
    n, keys = plan.n, plan.keys
    where = f"asyncio_timer N={n} reap"
    owner = _TimerOwner()
    clock[0] = T0
    with no_gc():
        _open_timers(loop, keys, owner)
        conns = list(owner.table.values())
        busy = [conns[i] for i in plan.busy]
        del conns
        clock[0] = T0 + TIMEOUT / 2
        _touch_timers(busy, loop.call_later)
        del busy
    clock[0] = T0 + TIMEOUT + RESOLUTION
    with no_gc():
        elapsed = await _run_due_timers()
    for _ in range(3):
        await asyncio.sleep(0)
    idle_keys = [keys[i] for i in plan.idle]
    check_keys(errors, where, owner.reaped, idle_keys)
    check(errors, len(owner.table) == n - len(idle_keys), f"{where}: wrong number left")
    return elapsed, len(owner.reaped)


def bench_asyncio(plan: Plan, errors: list[str]) -> dict[str, Any]:
    row = new_row("asyncio_timer", plan.n)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_asyncio_run1(loop, plan, row, errors))
    finally:
        loop.close()
    gc.collect()
    best = math.inf
    for _ in range(plan.reap_repeats):
        loop = asyncio.new_event_loop()
        clock = _virtual_clock(loop)
        try:
            elapsed, reaped = loop.run_until_complete(_asyncio_reap(loop, clock, plan, errors))
        finally:
            loop.close()
        gc.collect()
        best = min(best, elapsed)
        row["reap_reaped"] = reaped
    row["reap_expected"] = plan.n_idle
    row["reap_ns_per_expired"] = best / plan.n_idle
    row["notes"].append(
        "touch on the loop's real clock; expiry on a virtual clock; no reap limit: "
        "mass.max_call_ms is the one loop iteration that runs every due timer"
    )
    return row


# -- (d) trio cancel scopes --------------------------------------------------------------------


class _TrioTable:
    def __init__(self) -> None:
        self.scopes: dict[str, trio.CancelScope] = {}
        self.reaped: list[str] = []
        self.stopping = False


async def _trio_conn(key: str, deadline: float, table: _TrioTable) -> None:
    """A connection task: its scope's deadline is its idle timeout."""
    with trio.CancelScope(deadline=deadline) as scope:
        table.scopes[key] = scope
        await trio.sleep_forever()
    if table.stopping:
        return
    # Only our own deadline gets here: the scope swallowed its own Cancelled.
    del table.scopes[key]
    table.reaped.append(key)


def _touch_scopes(scopes: list[trio.CancelScope], deadline: float) -> None:
    for scope in scopes:
        scope.deadline = deadline


async def _spawn(nursery: trio.Nursery, keys: list[str], table: _TrioTable) -> None:
    deadline = T0 + TIMEOUT
    start_soon = nursery.start_soon
    for key in keys:
        start_soon(_trio_conn, key, deadline, table)
    await trio.testing.wait_all_tasks_blocked()


async def _trio_stop(table: _TrioTable) -> None:
    table.stopping = True
    for scope in list(table.scopes.values()):
        scope.cancel()


async def _trio_run1(
    plan: Plan, row: dict[str, Any], errors: list[str], clock: trio.testing.MockClock
) -> None:
    n, keys = plan.n, plan.keys
    where = f"trio_scope N={n}"
    clock.jump(T0 - trio.current_time())
    table = _TrioTable()
    async with trio.open_nursery() as nursery:
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            with no_gc():
                await _spawn(nursery, keys, table)
            row["bytes_per_session"] = (tracemalloc.get_traced_memory()[0] - before) / n
        finally:
            tracemalloc.stop()
        check(errors, len(table.scopes) == n, f"{where}: {len(table.scopes)} scopes entered")

        scopes = [table.scopes[key] for key in keys]
        shuffled = [scopes[i] for i in plan.order]
        del scopes
        nows = Nows()
        _touch_scopes(shuffled, nows.take(1)[0] + TIMEOUT)  # warm-up
        await trio.lowlevel.checkpoint()
        best = math.inf
        for _ in range(plan.touch_repeats):
            deadlines = [now + TIMEOUT for now in nows.take(plan.passes)]
            with no_gc():
                start = time.perf_counter_ns()
                for deadline in deadlines:
                    _touch_scopes(shuffled, deadline)
                elapsed = time.perf_counter_ns() - start
            best = min(best, elapsed)
            # Let the run loop prune its deadline heap, as it would while serving (not timed).
            await trio.lowlevel.checkpoint()
        row["touch_ns"] = best / (plan.passes * n)
        last_deadline = shuffled[0].deadline
        del shuffled

        for _ in range(3):
            await trio.lowlevel.checkpoint()
        best = math.inf
        for _ in range(21):
            with no_gc():
                start = time.perf_counter_ns()
                await trio.lowlevel.checkpoint()
                elapsed = time.perf_counter_ns() - start
            best = min(best, elapsed)
        row["empty_sweep_ns"] = best
        row["empty_sweep_kind"] = "event-loop iteration"
        check(errors, not table.reaped, f"{where}: scopes expired before their time")

        # Mass expiry: every scope has the same deadline; jump past it.
        clock.jump(last_deadline + RESOLUTION - trio.current_time())
        with no_gc():
            start = time.perf_counter_ns()
            await trio.testing.wait_all_tasks_blocked()
            elapsed = time.perf_counter_ns() - start
        check_keys(errors, f"{where} mass expiry", table.reaped, keys)
        row["mass"] = {
            "limit": None,
            "reaped": len(table.reaped),
            "calls": 1,
            "max_call_ms": elapsed / 1e6,
            "total_ms": elapsed / 1e6,
            "phases": {},
        }
        await _trio_stop(table)


async def _trio_reap(
    plan: Plan, errors: list[str], clock: trio.testing.MockClock, result: list[int]
) -> None:
    n, keys = plan.n, plan.keys
    where = f"trio_scope N={n} reap"
    clock.jump(T0 - trio.current_time())
    table = _TrioTable()
    async with trio.open_nursery() as nursery:
        with no_gc():
            await _spawn(nursery, keys, table)
            scopes = [table.scopes[key] for key in keys]
            busy = [scopes[i] for i in plan.busy]
            del scopes
            clock.jump(TIMEOUT / 2)
            _touch_scopes(busy, trio.current_time() + TIMEOUT)
            del busy
        clock.jump(TIMEOUT / 2 + RESOLUTION)
        with no_gc():
            start = time.perf_counter_ns()
            await trio.testing.wait_all_tasks_blocked()
            elapsed = time.perf_counter_ns() - start
        idle_keys = [keys[i] for i in plan.idle]
        check_keys(errors, where, table.reaped, idle_keys)
        check(errors, len(table.scopes) == n - len(idle_keys), f"{where}: wrong number left")
        result[:] = [elapsed, len(table.reaped)]
        await _trio_stop(table)


def bench_trio(plan: Plan, errors: list[str], cap: int) -> dict[str, Any]:
    row = new_row("trio_scope", plan.n)
    if plan.n > cap:
        row["skipped"] = f"capped at {cap:,} live trio tasks"
        return row
    clock = trio.testing.MockClock()
    trio.run(_trio_run1, plan, row, errors, clock, clock=clock)
    gc.collect()
    best = math.inf
    for _ in range(plan.trio_reap_repeats):
        result: list[int] = []
        clock = trio.testing.MockClock()
        trio.run(_trio_reap, plan, errors, clock, result, clock=clock)
        gc.collect()
        best = min(best, result[0])
        row["reap_reaped"] = result[1]
    row["reap_expected"] = plan.n_idle
    row["reap_ns_per_expired"] = best / plan.n_idle
    row["notes"].append(
        "trio MockClock; the touch reads no clock; no reap limit: mass.max_call_ms is the "
        "loop iteration(s) that cancel every expired scope and finish its task"
    )
    return row

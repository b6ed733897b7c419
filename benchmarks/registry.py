"""Registry micro-benchmark: keepconn's SessionRegistry against the usual ways to track idle peers.

In one run, for N = 1e3, 1e4, 1e5 and 1e6 sessions, keepconn is compared with

(a) ``dict_scan``: a dict of last-seen times, swept by a full scan;
(b) ``ordered_lru``: an OrderedDict LRU, ``move_to_end`` on every touch, the sweep pops expired
    entries from the front;
(c) ``asyncio_timer``: one asyncio TimerHandle per session, reset on every touch (cancel +
    ``loop.call_later``), on a real asyncio event loop;
(d) ``trio_scope``: one trio CancelScope per session, entered by a live task (so trio files the
    deadline), its ``deadline`` moved on every touch;
(e) ``floor``: a bare ``__slots__`` object whose ``touch`` stores one slot; nothing can be cheaper.

What is measured, and how
-------------------------
* touch, ns/op: every implementation gets its per-session handles (keepconn's sessions and the
  floor's objects, called as ``obj.touch(now)``; the dict keys; the timer connections; the cancel
  scopes) in the same random order, and one timed pass touches every session once (small N:
  several passes per repeat); best of several repeats, after a warm-up pass. The peers' touches
  are written inline in the timing loop, with no extra Python call, so any doubt favours them.
* isolation: each implementation runs in its own fresh worker process (one per size in a full
  run), so none inherits a heap fragmented by another; at 1e5 and up the memory layout decides
  the touch cost as much as the code does.
* reap, ns per expired session: all sessions open at T0, 90% are touched half a timeout later,
  the remaining 10% go idle; the time of the reap that removes them, divided by their number.
  For (c) and (d) that is the event-loop iteration(s) that run the expired timers or cancel the
  expired scopes and let their tasks finish.
* empty sweep: one reap when nothing is due (for (c) and (d): one event-loop iteration).
* memory: bytes per session traced by tracemalloc while the structure is built; the keys exist
  before tracing starts, so they are not counted.
* mass expiry: all N sessions due at once, drained with ``reap(now, limit=10000)`` until nothing
  is due; the longest single call. keepconn is drained twice: with ``now`` at
  ``next_deadline()`` (how the adapter calls it) and with ``now`` in the middle of a resolution
  step (a caller reaping on its own period). asyncio and trio have no limit: one loop iteration
  runs every due timer, so their figure is that iteration.

Clocks: keepconn and (a), (b), (e) take explicit times. (c) touches on the loop's real clock; its
expiry scenarios switch that loop's ``time`` to a virtual clock so a 60 s timeout need not be
waited for. (d) runs under ``trio.testing.MockClock`` (the touch itself reads no clock).

Every scenario is checked: each implementation must reap exactly the expected sessions, exactly
once; a wrong result is reported and the program exits 1. The performance targets of issue 2
are printed as PASS/FAIL lines; they never change the exit status.

Usage: ``python benchmarks/registry.py [--quick] [--json PATH] [--png PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
import tracemalloc
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import trio.testing

import keepconn
from keepconn import CloseReason, SessionRegistry
from keepconn import _registry as registry_module

TIMEOUT = 60.0
RESOLUTION = 1.0
# Times start well away from zero, as monotonic clocks do.
T0 = 1000.0
IDLE_FRACTION = 0.1
LIMIT = 10_000
FULL_SIZES = (1_000, 10_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000, 10_000)
# A timed touch repeat covers at least this many touches (small N: several passes).
TOUCH_OPS = 100_000
QUICK_TOUCH_OPS = 10_000
# An empty-sweep repeat lasts about this long (ns), in calls of at most EMPTY_MAX_CALLS.
EMPTY_BUDGET_NS = 2_000_000
EMPTY_MAX_CALLS = 1_000
# Rough peak bytes per live trio task while tracemalloc traces it, to refuse sizes that would
# not fit in memory rather than swap.
TRIO_BYTES_ESTIMATE = 6_000

IMPLS: dict[str, str] = {
    "keepconn": "keepconn SessionRegistry (timing wheel, lazy re-filing)",
    "dict_scan": "(a) dict key -> last seen, swept by a full scan",
    "ordered_lru": "(b) OrderedDict LRU: move_to_end on touch, sweep pops expired from the front",
    "asyncio_timer": "(c) one asyncio TimerHandle per session: cancel + call_later on touch",
    "trio_scope": "(d) one trio CancelScope per session, entered by a live task: deadline = ...",
    "floor": "(e) floor: a __slots__ object whose touch stores one slot",
}


# -- plumbing ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Keep the cyclic collector out of a timed section (and of bulk builds, for speed)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Plan:
    """One size: the keys, the random touch order and the idle set, shared by every impl."""

    n: int
    keys: list[str]
    order: list[int]
    idle: list[int]
    busy: list[int]
    touch_repeats: int
    passes: int
    reap_repeats: int
    trio_reap_repeats: int

    @classmethod
    def make(cls, n: int, seed: int, quick: bool) -> Plan:
        rng = random.Random(seed + n)
        keys = [f"device-{i:07d}" for i in range(n)]
        for key in keys:
            hash(key)  # cache the hash now: the string hash is not the registry's cost
        order = list(range(n))
        rng.shuffle(order)
        n_idle = max(1, round(n * IDLE_FRACTION))
        idle_set = set(rng.sample(range(n), n_idle))
        busy = [i for i in range(n) if i not in idle_set]
        rng.shuffle(busy)
        touch_ops = TOUCH_OPS
        if quick:
            # A correctness smoke run: fewer and shorter repeats.
            touch_repeats, reap_repeats, trio_repeats = 3, 3, 1
            touch_ops = QUICK_TOUCH_OPS
        elif n <= 10_000:
            touch_repeats, reap_repeats, trio_repeats = 7, 9, 3
        elif n <= 100_000:
            touch_repeats, reap_repeats, trio_repeats = 5, 3, 2
        else:
            touch_repeats, reap_repeats, trio_repeats = 3, 2, 1
        return cls(
            n=n,
            keys=keys,
            order=order,
            idle=sorted(idle_set),
            busy=busy,
            touch_repeats=touch_repeats,
            passes=max(1, touch_ops // n),
            reap_repeats=reap_repeats,
            trio_reap_repeats=trio_repeats,
        )

    @property
    def n_idle(self) -> int:
        return len(self.idle)


class _Nows:
    """Strictly increasing touch times just after T0 (a deadline that does not move is a no-op
    for trio, so every pass must use a new one)."""

    def __init__(self) -> None:
        self._k = 0

    def take(self, count: int) -> list[float]:
        start = self._k
        self._k += count
        return [T0 + (start + i + 1) * 1e-6 for i in range(count)]


def _new_row(impl: str, n: int) -> dict[str, Any]:
    return {
        "impl": impl,
        "sessions": n,
        "skipped": None,
        "touch_ns": None,
        "reap_ns_per_expired": None,
        "reap_expected": None,
        "reap_reaped": None,
        "empty_sweep_ns": None,
        "empty_sweep_kind": None,
        "bytes_per_session": None,
        "mass": None,
        "notes": [],
    }


def _check(errors: list[str], ok: bool, message: str) -> bool:
    if not ok:
        errors.append(message)
        _log(f"  WRONG RESULT: {message}")
    return ok


def _check_keys(errors: list[str], where: str, got: Sequence[Any], expected: Sequence[Any]) -> bool:
    """`got` must hold exactly the `expected` keys, each once."""
    if len(got) == len(expected) and set(got) == set(expected):
        return True
    missing = len(set(expected) - set(got))
    extra = len(set(got) - set(expected))
    dupes = len(got) - len(set(got))
    return _check(
        errors,
        False,
        f"{where}: reaped {len(got)}, expected {len(expected)} "
        f"({missing} missing, {extra} unexpected, {dupes} duplicated)",
    )


def _traced_bytes(build: Callable[[], None]) -> int:
    """Bytes still allocated after `build()`, as traced by tracemalloc."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with _no_gc():
            build()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def _best_touch_ns(
    touch_pass: Callable[[list[Any], float], None], handles: list[Any], plan: Plan, nows: _Nows
) -> float:
    """Best ns per touch over the repeats of `plan.passes` passes over `handles`."""
    touch_pass(handles, nows.take(1)[0])  # warm-up
    best = math.inf
    for _ in range(plan.touch_repeats):
        times = nows.take(plan.passes)
        with _no_gc():
            start = time.perf_counter_ns()
            for now in times:
                touch_pass(handles, now)
            elapsed = time.perf_counter_ns() - start
        best = min(best, elapsed)
    return best / (plan.passes * plan.n)


def _best_call_ns(fn: Callable[[float], object], now: float, repeats: int = 5) -> float:
    """Best ns per call of fn(now), each repeat long enough to read a clock by."""
    fn(now)  # warm-up
    start = time.perf_counter_ns()
    fn(now)
    one = max(1, time.perf_counter_ns() - start)
    calls = max(1, min(EMPTY_MAX_CALLS, EMPTY_BUDGET_NS // one))
    best = math.inf
    for _ in range(repeats):
        with _no_gc():
            start = time.perf_counter_ns()
            for _ in range(calls):
                fn(now)
            elapsed = time.perf_counter_ns() - start
        best = min(best, elapsed)
    return best / calls


# -- the synchronous implementations: keepconn, (a), (b), (e) ---------------------------------


class _Sync:
    """What the generic driver needs from a synchronous implementation."""

    name = ""
    reaps = True

    def build(self, keys: list[str], now: float) -> None:
        raise NotImplementedError

    def handles(self, keys: list[str]) -> list[Any]:
        """Per-session handles (session objects or keys), in key order."""
        raise NotImplementedError

    def touch_pass(self, handles: list[Any], now: float) -> None:
        raise NotImplementedError

    def reaper(self) -> Callable[..., list[Any]]:
        """The raw reap callable, timed as is: reaper()(now, limit)."""
        raise NotImplementedError

    def keys_of(self, reaped: list[Any]) -> list[Any]:
        return reaped

    def due(self, now: float) -> bool:
        """Whether more is due at `now` even though the last call returned nothing."""
        return False

    def live(self) -> int:
        raise NotImplementedError

    def extra_checks(self, errors: list[str], where: str, n: int, n_idle: int) -> None:
        """Implementation-specific consistency checks after the reap scenario."""


class _Keepconn(_Sync):
    name = "keepconn"

    def build(self, keys: list[str], now: float) -> None:
        self.reg = reg = SessionRegistry(timeout=TIMEOUT, resolution=RESOLUTION)
        open_ = reg.open
        for key in keys:
            open_(key, now=now)

    def handles(self, keys: list[str]) -> list[Any]:
        get = self.reg.get
        return [get(key) for key in keys]

    def touch_pass(self, handles: list[Any], now: float) -> None:
        for session in handles:
            session.touch(now)

    def reaper(self) -> Callable[..., list[Any]]:
        return self.reg.reap

    def keys_of(self, reaped: list[Any]) -> list[Any]:
        return [session.key for session in reaped]

    def due(self, now: float) -> bool:
        deadline = self.reg.next_deadline()
        return deadline is not None and deadline <= now

    def live(self) -> int:
        return len(self.reg)

    def extra_checks(self, errors: list[str], where: str, n: int, n_idle: int) -> None:
        stats = self.reg.stats()
        _check(
            errors,
            stats.live == n - n_idle
            and stats.opened == n
            and stats.closed[CloseReason.IDLE_TIMEOUT] == n_idle
            and stats.total_closed == n_idle,
            f"{where}: stats do not add up: {stats!r}",
        )


class _DictScan(_Sync):
    name = "dict_scan"

    def build(self, keys: list[str], now: float) -> None:
        self.seen: dict[str, float] = dict.fromkeys(keys, now)

    def handles(self, keys: list[str]) -> list[Any]:
        return list(keys)

    def touch_pass(self, handles: list[Any], now: float) -> None:
        seen = self.seen
        for key in handles:
            seen[key] = now

    def reaper(self) -> Callable[..., list[Any]]:
        return self.reap

    def reap(self, now: float, limit: int | None = None) -> list[Any]:
        seen = self.seen
        cutoff = now - TIMEOUT
        if limit is None:
            expired = [key for key, last in seen.items() if last <= cutoff]
        else:
            expired = []
            for key, last in seen.items():
                if last <= cutoff:
                    expired.append(key)
                    if len(expired) >= limit:
                        break
        for key in expired:
            del seen[key]
        return expired

    def live(self) -> int:
        return len(self.seen)


class _OrderedLRU(_Sync):
    name = "ordered_lru"

    def build(self, keys: list[str], now: float) -> None:
        self.lru: OrderedDict[str, float] = OrderedDict.fromkeys(keys, now)

    def handles(self, keys: list[str]) -> list[Any]:
        return list(keys)

    def touch_pass(self, handles: list[Any], now: float) -> None:
        lru = self.lru
        move = lru.move_to_end
        for key in handles:
            lru[key] = now
            move(key)

    def reaper(self) -> Callable[..., list[Any]]:
        return self.reap

    def reap(self, now: float, limit: int | None = None) -> list[Any]:
        lru = self.lru
        cutoff = now - TIMEOUT
        popitem = lru.popitem
        budget = len(lru) if limit is None else limit
        expired: list[Any] = []
        while lru and len(expired) < budget:
            key, last = popitem(last=False)
            if last > cutoff:
                # The oldest is still live, so everything behind it is too: put it back.
                lru[key] = last
                lru.move_to_end(key, last=False)
                break
            expired.append(key)
        return expired

    def live(self) -> int:
        return len(self.lru)


class _FloorObject:
    __slots__ = ("key", "last")

    def __init__(self, key: str, last: float) -> None:
        self.key = key
        self.last = last

    def touch(self, now: float) -> None:
        self.last = now


class _Floor(_Sync):
    name = "floor"
    reaps = False

    def build(self, keys: list[str], now: float) -> None:
        self.objects = {key: _FloorObject(key, now) for key in keys}

    def handles(self, keys: list[str]) -> list[Any]:
        objects = self.objects
        return [objects[key] for key in keys]

    def touch_pass(self, handles: list[Any], now: float) -> None:
        for obj in handles:
            obj.touch(now)

    def live(self) -> int:
        return len(self.objects)


def _drain(
    impl: _Sync, now: float, limit: int | None, n: int, errors: list[str], where: str
) -> tuple[list[int], list[Any]]:
    """Call reap(now, limit) until nothing more is due; the duration of each call, the keys."""
    reap = impl.reaper()
    durations: list[int] = []
    got: list[Any] = []
    max_calls = 4 * (n // (limit or n) + 2)
    while True:
        with _no_gc():
            start = time.perf_counter_ns()
            reaped = reap(now, limit)
            elapsed = time.perf_counter_ns() - start
        durations.append(elapsed)
        got.extend(impl.keys_of(reaped))
        if not reaped and not impl.due(now):
            break
        if len(durations) > max_calls:
            _check(errors, False, f"{where}: still reaping after {len(durations)} calls")
            break
    return durations, got


def _mass_summary(durations: list[int], reaped: int, now: float) -> dict[str, Any]:
    return {
        "now": now,
        "reaped": reaped,
        "calls": len(durations),
        "max_call_ms": max(durations) / 1e6,
        "total_ms": sum(durations) / 1e6,
    }


def bench_sync(cls: type[_Sync], plan: Plan, errors: list[str]) -> dict[str, Any]:
    n, keys = plan.n, plan.keys
    row = _new_row(cls.name, n)
    where = f"{cls.name} N={n}"
    nows = _Nows()

    # Run 1: build under tracemalloc, then touch, empty sweep and mass expiry on that structure.
    is_keepconn = cls is _Keepconn
    phases: dict[str, Any] = {}
    impl = cls()
    row["bytes_per_session"] = _traced_bytes(lambda: impl.build(keys, T0)) / n
    handles = impl.handles(keys)
    shuffled = [handles[i] for i in plan.order]
    del handles
    row["touch_ns"] = _best_touch_ns(impl.touch_pass, shuffled, plan, nows)
    del shuffled
    if impl.reaps:
        reap = impl.reaper()
        quiet = T0 + RESOLUTION  # every deadline is at least T0 + TIMEOUT
        _check(errors, not reap(quiet, None), f"{where}: the empty sweep reaped something")
        row["empty_sweep_ns"] = _best_call_ns(reap, quiet)
        row["empty_sweep_kind"] = "reap call"
        _check(errors, impl.live() == n, f"{where}: {impl.live()} live after the empty sweep")
        # All were opened at T0 and touched just after it: everything is due at T0+TIMEOUT+RES,
        # which is also keepconn's next_deadline().
        now = T0 + TIMEOUT + RESOLUTION
        if is_keepconn:
            _check(
                errors,
                impl.reg.next_deadline() == now,
                f"{where}: next_deadline() is {impl.reg.next_deadline()}, expected {now}",
            )
        durations, got = _drain(impl, now, LIMIT, n, errors, f"{where} mass expiry")
        _check_keys(errors, f"{where} mass expiry", got, keys)
        phases["next_deadline"] = _mass_summary(durations, len(got), now)
    del impl
    gc.collect()

    if is_keepconn:
        # Run 1b: the same mass expiry with `now` inside the resolution step that holds every
        # deadline, as a caller reaping on its own period (not at next_deadline()) would.
        impl = cls()
        with _no_gc():
            impl.build(keys, T0)
        now = T0 + TIMEOUT + RESOLUTION / 2
        durations, got = _drain(impl, now, LIMIT, n, errors, f"{where} mid-step mass expiry")
        _check_keys(errors, f"{where} mid-step mass expiry", got, keys)
        phases["mid_step"] = _mass_summary(durations, len(got), now)
        del impl
        gc.collect()

    if cls.reaps:
        worst = max(phases.values(), key=lambda phase: phase["max_call_ms"])
        row["mass"] = {
            "limit": LIMIT,
            "reaped": min(phase["reaped"] for phase in phases.values()),
            "calls": worst["calls"],
            "max_call_ms": worst["max_call_ms"],
            "total_ms": worst["total_ms"],
            "phases": phases,
        }

        # Run 2: 10% go idle; time the reap that removes them.
        idle_keys = [keys[i] for i in plan.idle]
        best = math.inf
        for _ in range(plan.reap_repeats):
            impl = cls()
            with _no_gc():
                impl.build(keys, T0)
                handles = impl.handles(keys)
                busy = [handles[i] for i in plan.busy]
                del handles
                impl.touch_pass(busy, T0 + TIMEOUT / 2)
                del busy
            reap = impl.reaper()
            now = T0 + TIMEOUT + RESOLUTION
            with _no_gc():
                start = time.perf_counter_ns()
                reaped = reap(now, None)
                elapsed = time.perf_counter_ns() - start
            best = min(best, elapsed)
            got = impl.keys_of(reaped)
            _check_keys(errors, f"{where} reap", got, idle_keys)
            _check(errors, not reap(now, None), f"{where}: a second reap found more")
            _check(
                errors,
                impl.live() == n - len(idle_keys),
                f"{where}: {impl.live()} live after the reap, expected {n - len(idle_keys)}",
            )
            impl.extra_checks(errors, f"{where} reap", n, len(idle_keys))
            row["reap_reaped"] = len(got)
            del impl, reaped
            gc.collect()
        row["reap_expected"] = len(idle_keys)
        row["reap_ns_per_expired"] = best / len(idle_keys)
    if is_keepconn:
        row["notes"].append(
            "mass expiry: worst of now=next_deadline() and now mid-resolution-step "
            "(both in mass.phases)"
        )
    return row


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
    row["bytes_per_session"] = _traced_bytes(lambda: _open_timers(loop, keys, owner)) / n
    conns = list(owner.table.values())
    shuffled = [conns[i] for i in plan.order]
    call_later = loop.call_later

    _touch_timers(shuffled, call_later)  # warm-up
    await asyncio.sleep(0)
    best = math.inf
    for _ in range(plan.touch_repeats):
        with _no_gc():
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
        with _no_gc():
            start = time.perf_counter_ns()
            await asyncio.sleep(0)
            elapsed = time.perf_counter_ns() - start
        best = min(best, elapsed)
    row["empty_sweep_ns"] = best
    row["empty_sweep_kind"] = "event-loop iteration"
    _check(errors, not owner.reaped, f"{where}: timers fired before their time")

    # Mass expiry: move the loop to a virtual clock past every deadline.
    clock = _virtual_clock(loop)
    clock[0] = max(conn.handle.when() for conn in conns) + RESOLUTION  # type: ignore[union-attr]
    try:
        with _no_gc():
            elapsed = await _run_due_timers()
    finally:
        del loop.time
    _check_keys(errors, f"{where} mass expiry", owner.reaped, keys)
    _check(errors, not owner.table, f"{where}: {len(owner.table)} left after the mass expiry")
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
    with _no_gc():
        _open_timers(loop, keys, owner)
        conns = list(owner.table.values())
        busy = [conns[i] for i in plan.busy]
        del conns
        clock[0] = T0 + TIMEOUT / 2
        _touch_timers(busy, loop.call_later)
        del busy
    clock[0] = T0 + TIMEOUT + RESOLUTION
    with _no_gc():
        elapsed = await _run_due_timers()
    for _ in range(3):
        await asyncio.sleep(0)
    idle_keys = [keys[i] for i in plan.idle]
    _check_keys(errors, where, owner.reaped, idle_keys)
    _check(errors, len(owner.table) == n - len(idle_keys), f"{where}: wrong number left")
    return elapsed, len(owner.reaped)


def bench_asyncio(plan: Plan, errors: list[str]) -> dict[str, Any]:
    row = _new_row("asyncio_timer", plan.n)
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
            with _no_gc():
                await _spawn(nursery, keys, table)
            row["bytes_per_session"] = (tracemalloc.get_traced_memory()[0] - before) / n
        finally:
            tracemalloc.stop()
        _check(errors, len(table.scopes) == n, f"{where}: {len(table.scopes)} scopes entered")

        scopes = [table.scopes[key] for key in keys]
        shuffled = [scopes[i] for i in plan.order]
        del scopes
        nows = _Nows()
        _touch_scopes(shuffled, nows.take(1)[0] + TIMEOUT)  # warm-up
        await trio.lowlevel.checkpoint()
        best = math.inf
        for _ in range(plan.touch_repeats):
            deadlines = [now + TIMEOUT for now in nows.take(plan.passes)]
            with _no_gc():
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
            with _no_gc():
                start = time.perf_counter_ns()
                await trio.lowlevel.checkpoint()
                elapsed = time.perf_counter_ns() - start
            best = min(best, elapsed)
        row["empty_sweep_ns"] = best
        row["empty_sweep_kind"] = "event-loop iteration"
        _check(errors, not table.reaped, f"{where}: scopes expired before their time")

        # Mass expiry: every scope has the same deadline; jump past it.
        clock.jump(last_deadline + RESOLUTION - trio.current_time())
        with _no_gc():
            start = time.perf_counter_ns()
            await trio.testing.wait_all_tasks_blocked()
            elapsed = time.perf_counter_ns() - start
        _check_keys(errors, f"{where} mass expiry", table.reaped, keys)
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
        with _no_gc():
            await _spawn(nursery, keys, table)
            scopes = [table.scopes[key] for key in keys]
            busy = [scopes[i] for i in plan.busy]
            del scopes
            clock.jump(TIMEOUT / 2)
            _touch_scopes(busy, trio.current_time() + TIMEOUT)
            del busy
        clock.jump(TIMEOUT / 2 + RESOLUTION)
        with _no_gc():
            start = time.perf_counter_ns()
            await trio.testing.wait_all_tasks_blocked()
            elapsed = time.perf_counter_ns() - start
        idle_keys = [keys[i] for i in plan.idle]
        _check_keys(errors, where, table.reaped, idle_keys)
        _check(errors, len(table.scopes) == n - len(idle_keys), f"{where}: wrong number left")
        result[:] = [elapsed, len(table.reaped)]
        await _trio_stop(table)


def bench_trio(plan: Plan, errors: list[str], cap: int) -> dict[str, Any]:
    row = _new_row("trio_scope", plan.n)
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


# -- targets, table, JSON, plot ----------------------------------------------------------------


def _value(rows: list[dict[str, Any]], impl: str, n: int, field: str) -> float | None:
    for row in rows:
        if row["impl"] == impl and row["sessions"] == n:
            return row.get(field)  # type: ignore[no-any-return]
    return None


def _target(name: str, passed: bool | None, detail: str) -> dict[str, Any]:
    status = "SKIP" if passed is None else ("PASS" if passed else "FAIL")
    return {"target": name, "status": status, "detail": detail}


def evaluate_targets(rows: list[dict[str, Any]], sizes: Sequence[int]) -> list[dict[str, Any]]:
    targets = []
    for n in (100_000, 1_000_000):
        kc = _value(rows, "keepconn", n, "touch_ns")
        peers = {
            "floor": ("touch within 1.3x of the floor (e)", 1.3, False),
            "asyncio_timer": ("touch >= 30x cheaper than asyncio timers (c)", 30.0, True),
            "ordered_lru": ("touch >= 2x cheaper than OrderedDict move_to_end (b)", 2.0, True),
        }
        for impl, (label, bound, cheaper) in peers.items():
            other = _value(rows, impl, n, "touch_ns")
            name = f"{label} at N={n:,}"
            if kc is None or other is None:
                targets.append(_target(name, None, f"N={n:,} not measured"))
            elif cheaper:
                ratio = other / kc
                detail = f"{impl} {other:.1f} ns / keepconn {kc:.1f} ns = {ratio:.1f}x"
                targets.append(_target(name, ratio >= bound, detail))
            else:
                ratio = kc / other
                detail = f"keepconn {kc:.1f} ns / {impl} {other:.1f} ns = {ratio:.2f}x"
                targets.append(_target(name, ratio <= bound, detail))

    name = "reap cost per expired session within 2x from N=1e3 to N=1e6"
    costs = {n: _value(rows, "keepconn", n, "reap_ns_per_expired") for n in sizes}
    if costs.get(1_000) is None or costs.get(1_000_000) is None:
        targets.append(_target(name, None, "needs N=1e3 and N=1e6"))
    else:
        known = {n: c for n, c in costs.items() if c is not None}
        spread = max(known.values()) / min(known.values())
        detail = (
            ", ".join(f"{n:,}: {c:.0f} ns" for n, c in known.items()) + f"; max/min = {spread:.2f}x"
        )
        targets.append(_target(name, spread <= 2.0, detail))

    name = "empty sweep at N=1e6 under 0.1 ms"
    empty = _value(rows, "keepconn", 1_000_000, "empty_sweep_ns")
    if empty is None:
        targets.append(_target(name, None, "N=1e6 not measured"))
    else:
        targets.append(_target(name, empty < 100_000, f"{empty / 1000:.2f} us"))

    for n in (100_000, 1_000_000):
        name = f"<= 150 bytes per session at N={n:,}"
        size = _value(rows, "keepconn", n, "bytes_per_session")
        if size is None:
            targets.append(_target(name, None, f"N={n:,} not measured"))
        else:
            targets.append(_target(name, size <= 150, f"{size:.1f} B"))

    name = f"no single reap call over 10 ms with limit={LIMIT:,} (mass expiry, every N)"
    worst: tuple[float, int, str] | None = None
    parts = []
    for n in sizes:
        mass = _value(rows, "keepconn", n, "mass")
        if not mass:
            continue
        for phase, summary in mass["phases"].items():  # type: ignore[attr-defined]
            parts.append(f"{n:,}/{phase}: {summary['max_call_ms']:.2f} ms")
            if worst is None or summary["max_call_ms"] > worst[0]:
                worst = (summary["max_call_ms"], n, phase)
    if worst is None:
        targets.append(_target(name, None, "nothing measured"))
    else:
        detail = f"worst {worst[0]:.2f} ms at N={worst[1]:,} ({worst[2]}); " + ", ".join(parts)
        targets.append(_target(name, worst[0] <= 10.0, detail))
    return targets


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value / scale:,.{digits}f}{unit}"


def _fmt_time(ns: float | None) -> str:
    if ns is None:
        return "-"
    if ns >= 1e6:
        return f"{ns / 1e6:,.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:,.2f} us"
    return f"{ns:,.0f} ns"


def format_table(rows: list[dict[str, Any]], sizes: Sequence[int]) -> str:
    header = (
        f"{'implementation':<15} {'N':>9} {'touch ns':>9} {'x floor':>8} "
        f"{'reap ns/exp':>11} {'empty sweep':>12} {'B/session':>10} "
        f"{'mass max call':>14} {'calls':>6}"
    )
    lines = [header, "-" * len(header)]
    for n in sizes:
        floor = _value(rows, "floor", n, "touch_ns")
        for impl in IMPLS:
            row = next((r for r in rows if r["impl"] == impl and r["sessions"] == n), None)
            if row is None:
                continue
            if row["skipped"]:
                lines.append(f"{impl:<15} {n:>9,} {row['skipped']}")
                continue
            touch = row["touch_ns"]
            ratio = f"{touch / floor:.2f}" if touch and floor else "-"
            mass = row["mass"]
            if mass is None:
                mass_max, calls = "-", "-"
            else:
                mass_max = _fmt_time(mass["max_call_ms"] * 1e6)
                calls = str(mass["calls"]) if mass["limit"] else "1 (no limit)"
            empty = _fmt_time(row["empty_sweep_ns"])
            if row["empty_sweep_kind"] == "event-loop iteration":
                empty += "*"
            lines.append(
                f"{impl:<15} {n:>9,} {_fmt(touch):>9} {ratio:>8} "
                f"{_fmt(row['reap_ns_per_expired'], digits=0):>11} {empty:>12} "
                f"{_fmt(row['bytes_per_session']):>10} {mass_max:>14} {calls:>6}"
            )
        lines.append("")
    lines.append("* one event-loop iteration (asyncio and trio sweep inside their loop).")
    lines.append(
        f"mass max call: longest reap call draining all N at once with limit={LIMIT:,}; "
        "keepconn: worst of now=next_deadline() and now mid-step."
    )
    for row in rows:
        if row["impl"] == "keepconn" and row["mass"]:
            phases = row["mass"]["phases"]
            lines.append(
                f"  keepconn N={row['sessions']:>9,}: "
                + ", ".join(
                    f"{phase} {_fmt_time(s['max_call_ms'] * 1e6)} max over {s['calls']} calls"
                    for phase, s in phases.items()
                )
            )
    return "\n".join(lines)


def draw(rows: list[dict[str, Any]], targets: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("touch_ns", "touch (ns/op)", 1.0),
        ("reap_ns_per_expired", "reap (ns per expired session)", 1.0),
        ("empty_sweep_ns", "empty sweep (us)", 1e3),
        ("bytes_per_session", "memory (bytes/session)", 1.0),
        ("mass", f"longest reap call, mass expiry (ms; limit={LIMIT:,})", 1.0),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9.5))
    for ax, (field, label, scale) in zip(axes.flat, panels, strict=False):
        series: dict[str, list[tuple[int, float]]] = {}
        for row in rows:
            if row["skipped"]:
                continue
            value = row[field]
            if field != "mass":
                if value:
                    series.setdefault(row["impl"], []).append((row["sessions"], value / scale))
            elif value and value["phases"]:
                # keepconn: one line per phase of `now`, so the mid-step cost shows.
                for phase, summary in value["phases"].items():
                    name = f"{row['impl']} ({phase})"
                    series.setdefault(name, []).append((row["sessions"], summary["max_call_ms"]))
            elif value:
                name = row["impl"] + (" (no limit)" if value["limit"] is None else "")
                series.setdefault(name, []).append((row["sessions"], value["max_call_ms"]))
        for name, points in series.items():
            points.sort()
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
        if field == "mass":
            ax.axhline(10.0, color="grey", linestyle="--", linewidth=1)
            ax.legend(fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sessions")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    text_ax = axes.flat[5]
    text_ax.axis("off")
    text = "\n".join(f"{t['status']:<4}  {t['target']}" for t in targets)
    text_ax.text(0, 1, text, va="top", family="monospace", fontsize=7.5, wrap=True)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------------


def _trio_cap(sizes: Sequence[int], requested: int) -> tuple[int, str | None]:
    """The largest N trio may run at: the requested cap, lowered if memory cannot hold it."""
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a test dependency
        return requested, None
    fits = available // 2 // TRIO_BYTES_ESTIMATE
    if fits < min(requested, max(sizes)):
        return fits, (
            f"{available / 2**30:.1f} GiB available holds about {fits:,} trio tasks "
            f"(~{TRIO_BYTES_ESTIMATE} B each while traced, using at most half)"
        )
    if requested < max(sizes):
        return requested, f"--trio-max {requested:,}"
    return requested, None


def _measure(impl: str, plan: Plan, errors: list[str], trio_cap: int) -> dict[str, Any]:
    if impl == "asyncio_timer":
        return bench_asyncio(plan, errors)
    if impl == "trio_scope":
        return bench_trio(plan, errors, trio_cap)
    cls = {c.name: c for c in (_Keepconn, _DictScan, _OrderedLRU, _Floor)}[impl]
    return bench_sync(cls, plan, errors)


def _registry_hash() -> str:
    """Which src/keepconn/_registry.py this process measured (others edit the tree meanwhile)."""
    return hashlib.sha256(Path(registry_module.__file__).read_bytes()).hexdigest()[:16]


def _worker(impl: str, sizes: list[int], seed: int, quick: bool, trio_cap: int) -> int:
    """Measure one implementation in this (fresh) process; one JSON line on stdout."""
    errors: list[str] = []
    # Warm-up: every code path once, small and untimed (its errors still count).
    warm = Plan.make(1_000, seed - 1, quick=True)
    warm.touch_repeats = warm.reap_repeats = warm.trio_reap_repeats = 1
    _measure(impl, warm, errors, trio_cap)
    del warm
    gc.collect()
    rows = [_measure(impl, Plan.make(n, seed, quick), errors, trio_cap) for n in sizes]
    print(json.dumps({"rows": rows, "errors": errors, "registry_sha256": _registry_hash()}))
    return 0


def _run_worker(
    impl: str, sizes: list[int], args: argparse.Namespace, trio_cap: int, errors: list[str]
) -> list[dict[str, Any]]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", impl]
    command += ["--sizes", ",".join(map(str, sizes)), "--seed", str(args.seed)]
    command += ["--trio-max", str(trio_cap)] + (["--quick"] if args.quick else [])
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        report = None
    if proc.returncode != 0 or report is None:
        message = f"{impl} N={sizes}: worker exited with {proc.returncode} and no result"
        _check(errors, False, message)
        rows = []
        for n in sizes:
            row = _new_row(impl, n)
            row["skipped"] = "worker failed"
            rows.append(row)
        return rows
    errors.extend(report["errors"])
    for row in report["rows"]:
        row["registry_sha256"] = report["registry_sha256"]
    return report["rows"]  # type: ignore[no-any-return]


def _parse_sizes(text: str) -> list[int]:
    return [int(float(part)) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (1e3, 1e4)")
    parser.add_argument("--sizes", type=_parse_sizes, help="comma-separated sizes, e.g. 1e3,1e5")
    parser.add_argument("--json", type=Path, default=Path("out/registry.json"))
    parser.add_argument("--png", type=Path, default=Path("out/registry.png"))
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--worker", choices=list(IMPLS), help=argparse.SUPPRESS)
    parser.add_argument(
        "--trio-max",
        type=lambda text: int(float(text)),
        default=1_000_000,
        help="largest N for (d): one live trio task per session (default 1e6)",
    )
    args = parser.parse_args(argv)
    sizes = list(args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES))
    trio_cap, cap_reason = _trio_cap(sizes, args.trio_max)

    if args.worker:
        return _worker(args.worker, sizes, args.seed, args.quick, trio_cap)

    errors: list[str] = []
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    load_before = os.getloadavg()
    # A full run gives every (implementation, size) a fresh process; a quick run, one per impl.
    batches = [[n] for n in sizes] if not args.quick else [sizes]
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    for batch in batches:
        for impl in IMPLS:
            todo = [n for n in batch if impl != "trio_scope" or n <= trio_cap]
            for n in batch:
                if n not in todo:
                    row = _new_row(impl, n)
                    row["skipped"] = f"capped at {trio_cap:,} live trio tasks ({cap_reason})"
                    by_key[impl, n] = row
            if not todo:
                continue
            t = time.perf_counter()
            for row in _run_worker(impl, todo, args, trio_cap, errors):
                by_key[row["impl"], row["sessions"]] = row
            label = ",".join(f"{n:,}" for n in todo)
            _log(f"[N={label:>9}] {impl:<14} {time.perf_counter() - t:6.1f} s")
    rows = [by_key[impl, n] for n in sizes for impl in IMPLS if (impl, n) in by_key]
    load_after = os.getloadavg()
    hashes = sorted({row["registry_sha256"] for row in rows if row.get("registry_sha256")})

    targets = evaluate_targets(rows, sizes)
    elapsed = time.perf_counter() - started

    print(f"keepconn registry benchmark ({'quick' if args.quick else 'full'} run, {elapsed:.0f} s)")
    print(
        f"timeout={TIMEOUT:g}s resolution={RESOLUTION:g}s idle fraction={IDLE_FRACTION:.0%} "
        f"limit={LIMIT:,}; best of repeats; gc disabled while timing"
    )
    print()
    print(format_table(rows, sizes))
    if len(hashes) > 1:
        print(f"WARNING: _registry.py changed during the run (sha256 prefixes {hashes})")
    if any(row["skipped"] for row in rows):
        print(f"trio_scope capped at N={trio_cap:,}: {cap_reason}")
    print()
    print("targets (issue 2; ratios from this run):")
    for target in targets:
        print(f"  {target['status']:<4}  {target['target']}: {target['detail']}")

    report = {
        "benchmark": "registry",
        "quick": args.quick,
        "sizes": sizes,
        "elapsed_s": elapsed,
        "config": {
            "timeout": TIMEOUT,
            "resolution": RESOLUTION,
            "idle_fraction": IDLE_FRACTION,
            "limit": LIMIT,
            "touch_ops_per_repeat": TOUCH_OPS,
            "seed": args.seed,
            "trio_max_sessions": trio_cap,
            "trio_cap_reason": cap_reason,
            "touch_access": "per-session objects (keys for dict/OrderedDict), one random order",
            "isolation": "one fresh process per implementation and size"
            if not args.quick
            else "one fresh process per implementation",
        },
        "environment": {
            "python": sys.version.split()[0],
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "keepconn": keepconn.__version__,
            "trio": trio.__version__,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "registry_sha256": hashes,
        },
        "implementations": IMPLS,
        "results": rows,
        "targets": targets,
        "errors": errors,
        "ok": not errors,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nJSON: {args.json}")
    mode = "quick" if args.quick else "full"
    draw(rows, targets, args.png, f"keepconn registry benchmark ({mode} run)")
    print(f"PNG: {args.png}")

    if errors:
        print(f"\n{len(errors)} WRONG RESULT(S):", file=sys.stderr)
        for error in errors:
            print(f"  {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How the registry benchmark measures, for every implementation alike: the sizes and the
configuration, the plan of one size (keys, touch order, idle set), and the timing and checking
tools (best-of-repeats timers, tracemalloc, exact-result checks).
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

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


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Keep the cyclic collector out of a timed section (and of bulk builds, for speed)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def log(message: str) -> None:
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


class Nows:
    """Strictly increasing touch times just after T0 (a deadline that does not move is a no-op
    for trio, so every pass must use a new one)."""

    def __init__(self) -> None:
        self._k = 0

    def take(self, count: int) -> list[float]:
        start = self._k
        self._k += count
        return [T0 + (start + i + 1) * 1e-6 for i in range(count)]


def new_row(impl: str, n: int) -> dict[str, Any]:
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


def check(errors: list[str], ok: bool, message: str) -> bool:
    if not ok:
        errors.append(message)
        log(f"  WRONG RESULT: {message}")
    return ok


def check_keys(errors: list[str], where: str, got: Sequence[Any], expected: Sequence[Any]) -> bool:
    """`got` must hold exactly the `expected` keys, each once."""
    if len(got) == len(expected) and set(got) == set(expected):
        return True
    missing = len(set(expected) - set(got))
    extra = len(set(got) - set(expected))
    dupes = len(got) - len(set(got))
    return check(
        errors,
        False,
        f"{where}: reaped {len(got)}, expected {len(expected)} "
        f"({missing} missing, {extra} unexpected, {dupes} duplicated)",
    )


def traced_bytes(build: Callable[[], None]) -> int:
    """Bytes still allocated after `build()`, as traced by tracemalloc."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with no_gc():
            build()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def best_touch_ns(
    touch_pass: Callable[[list[Any], float], None], handles: list[Any], plan: Plan, nows: Nows
) -> float:
    """Best ns per touch over the repeats of `plan.passes` passes over `handles`."""
    touch_pass(handles, nows.take(1)[0])  # warm-up
    best = math.inf
    for _ in range(plan.touch_repeats):
        times = nows.take(plan.passes)
        with no_gc():
            start = time.perf_counter_ns()
            for now in times:
                touch_pass(handles, now)
            elapsed = time.perf_counter_ns() - start
        best = min(best, elapsed)
    return best / (plan.passes * plan.n)


def best_call_ns(fn: Callable[[float], object], now: float, repeats: int = 5) -> float:
    """Best ns per call of fn(now), each repeat long enough to read a clock by."""
    fn(now)  # warm-up
    start = time.perf_counter_ns()
    fn(now)
    one = max(1, time.perf_counter_ns() - start)
    calls = max(1, min(EMPTY_MAX_CALLS, EMPTY_BUDGET_NS // one))
    best = math.inf
    for _ in range(repeats):
        with no_gc():
            start = time.perf_counter_ns()
            for _ in range(calls):
                fn(now)
            elapsed = time.perf_counter_ns() - start
        best = min(best, elapsed)
    return best / calls

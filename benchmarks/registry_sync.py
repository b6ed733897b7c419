"""keepconn's registry and the synchronous peers it is compared with, (a) a dict swept by a full
scan, (b) an OrderedDict LRU and (e) the floor, with the driver that measures them all alike.
"""

from __future__ import annotations

import gc
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from keepconn import CloseReason, SessionRegistry
from registry_measure import (
    LIMIT,
    RESOLUTION,
    T0,
    TIMEOUT,
    Nows,
    Plan,
    best_call_ns,
    best_touch_ns,
    check,
    check_keys,
    new_row,
    no_gc,
    traced_bytes,
)


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
        check(
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
        with no_gc():
            start = time.perf_counter_ns()
            reaped = reap(now, limit)
            elapsed = time.perf_counter_ns() - start
        durations.append(elapsed)
        got.extend(impl.keys_of(reaped))
        if not reaped and not impl.due(now):
            break
        if len(durations) > max_calls:
            check(errors, False, f"{where}: still reaping after {len(durations)} calls")
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
    row = new_row(cls.name, n)
    where = f"{cls.name} N={n}"
    nows = Nows()

    # Run 1: build under tracemalloc, then touch, empty sweep and mass expiry on that structure.
    is_keepconn = cls is _Keepconn
    phases: dict[str, Any] = {}
    impl = cls()
    row["bytes_per_session"] = traced_bytes(lambda: impl.build(keys, T0)) / n
    handles = impl.handles(keys)
    shuffled = [handles[i] for i in plan.order]
    del handles
    row["touch_ns"] = best_touch_ns(impl.touch_pass, shuffled, plan, nows)
    del shuffled
    if impl.reaps:
        reap = impl.reaper()
        quiet = T0 + RESOLUTION  # every deadline is at least T0 + TIMEOUT
        check(errors, not reap(quiet, None), f"{where}: the empty sweep reaped something")
        row["empty_sweep_ns"] = best_call_ns(reap, quiet)
        row["empty_sweep_kind"] = "reap call"
        check(errors, impl.live() == n, f"{where}: {impl.live()} live after the empty sweep")
        # All were opened at T0 and touched just after it: everything is due at T0+TIMEOUT+RES,
        # which is also keepconn's next_deadline().
        now = T0 + TIMEOUT + RESOLUTION
        if is_keepconn:
            check(
                errors,
                impl.reg.next_deadline() == now,
                f"{where}: next_deadline() is {impl.reg.next_deadline()}, expected {now}",
            )
        durations, got = _drain(impl, now, LIMIT, n, errors, f"{where} mass expiry")
        check_keys(errors, f"{where} mass expiry", got, keys)
        phases["next_deadline"] = _mass_summary(durations, len(got), now)
    del impl
    gc.collect()

    if is_keepconn:
        # Run 1b: the same mass expiry with `now` inside the resolution step that holds every
        # deadline, as a caller reaping on its own period (not at next_deadline()) would.
        impl = cls()
        with no_gc():
            impl.build(keys, T0)
        now = T0 + TIMEOUT + RESOLUTION / 2
        durations, got = _drain(impl, now, LIMIT, n, errors, f"{where} mid-step mass expiry")
        check_keys(errors, f"{where} mid-step mass expiry", got, keys)
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
            with no_gc():
                impl.build(keys, T0)
                handles = impl.handles(keys)
                busy = [handles[i] for i in plan.busy]
                del handles
                impl.touch_pass(busy, T0 + TIMEOUT / 2)
                del busy
            reap = impl.reaper()
            now = T0 + TIMEOUT + RESOLUTION
            with no_gc():
                start = time.perf_counter_ns()
                reaped = reap(now, None)
                elapsed = time.perf_counter_ns() - start
            best = min(best, elapsed)
            got = impl.keys_of(reaped)
            check_keys(errors, f"{where} reap", got, idle_keys)
            check(errors, not reap(now, None), f"{where}: a second reap found more")
            check(
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


#: The implementations bench_sync measures, by name.
SYNC = {cls.name: cls for cls in (_Keepconn, _DictScan, _OrderedLRU, _Floor)}

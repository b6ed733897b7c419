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
import gc
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

import keepconn
from harness import loadavg, machine, write_json

# The only import of keepconn's registry module itself (_registry_hash reads its source file).
from keepconn._core import registry as registry_module
from registry_loops import bench_asyncio, bench_trio
from registry_measure import (
    FULL_SIZES,
    IDLE_FRACTION,
    IMPLS,
    LIMIT,
    QUICK_SIZES,
    RESOLUTION,
    TIMEOUT,
    TOUCH_OPS,
    TRIO_BYTES_ESTIMATE,
    Plan,
    check,
    log,
    new_row,
)
from registry_report import draw, evaluate_targets, format_table
from registry_sync import SYNC, bench_sync

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
    return bench_sync(SYNC[impl], plan, errors)


def _registry_hash() -> str:
    """Which source of keepconn's registry this process measured (others edit the tree
    meanwhile)."""
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
        check(errors, False, message)
        rows = []
        for n in sizes:
            row = new_row(impl, n)
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
    load_before = loadavg()
    # A full run gives every (implementation, size) a fresh process; a quick run, one per impl.
    batches = [[n] for n in sizes] if not args.quick else [sizes]
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    for batch in batches:
        for impl in IMPLS:
            todo = [n for n in batch if impl != "trio_scope" or n <= trio_cap]
            for n in batch:
                if n not in todo:
                    row = new_row(impl, n)
                    row["skipped"] = f"capped at {trio_cap:,} live trio tasks ({cap_reason})"
                    by_key[impl, n] = row
            if not todo:
                continue
            t = time.perf_counter()
            for row in _run_worker(impl, todo, args, trio_cap, errors):
                by_key[row["impl"], row["sessions"]] = row
            label = ",".join(f"{n:,}" for n in todo)
            log(f"[N={label:>9}] {impl:<14} {time.perf_counter() - t:6.1f} s")
    rows = [by_key[impl, n] for n in sizes for impl in IMPLS if (impl, n) in by_key]
    load_after = loadavg()
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
        source = Path(registry_module.__file__).name
        print(f"WARNING: {source} changed during the run (sha256 prefixes {hashes})")
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
            **machine(),
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
    write_json(args.json, report, indent=2)
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

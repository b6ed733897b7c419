"""The runtime benchmark's probe inside a Python server process: what the server itself costs,
measured where it lives.

Two parts, both started by the server (benchmarks/runtime_lines.py) or by the wrapper that
starts a gateway from its ``main()`` (benchmarks/runtime_wrap.py):

* :func:`lag_loop`, a task on the server's own event loop: it sleeps ``LAG_STEP`` (20 ms) again
  and again and records by how much each sleep overshot. That overshoot is the time the loop
  was busy with something else (the connections) when the timer fell due.
* :func:`start_control`, a daemon thread listening on a loopback port for one JSON command per
  line, answered with one JSON line:

  - ``{"cmd": "lag-reset"}``: forget the lag samples so far (the start of a window);
  - ``{"cmd": "types"}``: after a full collection, the tracked objects by type
    (``{"types": {"module.Name": [count, bytes, referents]}}``, bytes as ``sys.getsizeof``
    says, the object alone; referents the references a collection follows from them, what
    it pays for beside the objects themselves): what benchmarks/runtime_census.py compares
    at two sizes;
  - ``{"cmd": "sample"}``: ``{"rss": bytes, "objects": ..., "frozen": ..., "gc_ms": ...,
    "lag": {"n", "p50_ms", "p99_ms", "max_ms"}}``. ``objects`` counts every tracked object,
    ``len(gc.get_objects())`` and the frozen ones (``gc.get_freeze_count()``, which
    ``gc.get_objects()`` leaves out) alike: the example gateway freezes what survives a burst
    of connections (``GcPacing.freeze``), and its objects must not vanish from the count for
    that. ``frozen`` says how many of them no collection walks. The lag figures are those
    since the last reset, read first; then one untimed ``gc.collect()`` clears the garbage the
    last phase left, ``GC_TIMED`` more full collections are timed (the median is ``gc_ms``: the
    cost of a full collection of the live heap, frozen objects aside), and only then are the
    tracked objects counted and the RSS read, so two samples compare live objects, never
    garbage that was waiting.

The thread holds the GIL while it collects or counts, which stalls the loop exactly as a
collection the server ran itself would; a lag window never spans a sample.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = [
    "CONTROL_ENV",
    "LAG_STEP",
    "lag_loop",
    "loop_sleep",
    "start_control",
    "start_from_env",
]

#: The environment variable giving the control port to a server started by the benchmark.
CONTROL_ENV = "KEEPCONN_RUNTIME_CONTROL"
LAG_STEP = 0.02
GC_TIMED = 3
#: Bounds on the probe's own loops: longer than any run, so they end with the process.
LIFETIME = 6 * 3600.0
#: Samples kept between resets (floats: not tracked by the collector, so not counted as
#: objects; one window at 20 ms is far shorter than this).
MAX_SAMPLES = 200_000
_PAGE = os.sysconf("SC_PAGE_SIZE")

_lag: collections.deque[float] = collections.deque(maxlen=MAX_SAMPLES)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _quantile(ordered: list[float], q: float) -> float | None:
    # Nearest rank, as harness.quantile (the probe must not import the benchmarks' modules).
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def lag_stats() -> dict[str, Any]:
    """Loop-lag figures of the samples since the last reset, in milliseconds."""
    ordered = sorted(_lag)

    def ms(x: float | None) -> float | None:
        return None if x is None else round(1000.0 * x, 3)

    return {
        "n": len(ordered),
        "p50_ms": ms(_quantile(ordered, 0.5)),
        "p99_ms": ms(_quantile(ordered, 0.99)),
        "max_ms": ms(ordered[-1] if ordered else None),
    }


async def lag_loop(sleep: Callable[[float], Awaitable[Any]]) -> None:
    """Sleep ``LAG_STEP`` in a loop on the server's event loop, recording each overshoot.

    ``sleep`` is the loop's own: asyncio.sleep, or :func:`loop_sleep` in a server on anyio."""
    clock = time.monotonic
    end = clock() + LIFETIME
    while clock() < end:
        started = clock()
        await sleep(LAG_STEP)
        _lag.append(max(0.0, clock() - started - LAG_STEP))


def loop_sleep() -> Callable[[float], Awaitable[Any]]:
    """The running event loop's own sleep, for :func:`lag_loop` in a server on anyio:
    asyncio's on asyncio and uvloop, anyio's (trio's) elsewhere.

    The instrument must cost every server the same. ``anyio.sleep`` asks sniffio for the
    backend at every call: 20-35 us more per wake-up than ``asyncio.sleep`` on the benchmark's
    machine (30 s at 50 wake-ups a second, ``time.process_time()``), which at the probe's 50
    wake-ups a second charged a server on anyio 1 ms of CPU a second more than one on plain
    asyncio, counted as the cost of its pings."""
    import anyio
    import sniffio

    if sniffio.current_async_library() == "asyncio":
        return asyncio.sleep
    return anyio.sleep


def sample() -> dict[str, Any]:
    """The figures the coordinator asks for (see the module docstring for the order)."""
    lag = lag_stats()
    gc.collect()
    times = []
    for _ in range(GC_TIMED):
        started = time.perf_counter()
        gc.collect()
        times.append(1000.0 * (time.perf_counter() - started))
    frozen = gc.get_freeze_count()
    objects = len(gc.get_objects()) + frozen
    return {
        "rss": _rss(),
        "objects": objects,
        "frozen": frozen,
        "gc_ms": round(sorted(times)[len(times) // 2], 3),
        "lag": lag,
    }


def types() -> dict[str, list[int]]:
    """The tracked objects after a full collection, by type: ``{name: [count, bytes,
    referents]}``."""
    gc.collect()
    frozen = gc.get_freeze_count()
    if frozen:
        # gc.get_objects() does not list frozen objects; thawed for the count, they are frozen
        # again after it, with the few survivors that were not (the census changes no more).
        gc.unfreeze()
    found: dict[str, list[int]] = {}
    objects = gc.get_objects()
    if frozen:
        gc.freeze()
    for obj in objects:
        kind = type(obj)
        name = f"{kind.__module__}.{kind.__qualname__}"
        entry = found.get(name)
        if entry is None:
            entry = found[name] = [0, 0, 0]
        entry[0] += 1
        entry[1] += sys.getsizeof(obj)
        entry[2] += len(gc.get_referents(obj))
    return found


def _answer(request: dict[str, Any]) -> dict[str, Any]:
    cmd = request.get("cmd")
    if cmd == "lag-reset":
        _lag.clear()
        return {"ok": True}
    if cmd == "sample":
        return {"ok": True, **sample()}
    if cmd == "types":
        return {"ok": True, "types": types()}
    if cmd == "lag":
        return {"ok": True, "lag": lag_stats(), "rss": _rss()}
    return {"ok": False, "error": f"unknown command {cmd!r}"}


def _serve(listener: socket.socket) -> None:
    end = time.monotonic() + LIFETIME
    while time.monotonic() < end:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn, conn.makefile("rwb") as stream:
            for _, line in zip(range(10_000), stream, strict=False):
                try:
                    reply = _answer(json.loads(line))
                except ValueError as exc:
                    reply = {"ok": False, "error": str(exc)}
                stream.write(json.dumps(reply).encode() + b"\n")
                stream.flush()


def start_control(port: int) -> None:
    """Listen on 127.0.0.1:``port`` for the coordinator's commands, on a daemon thread."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4)
    threading.Thread(target=_serve, args=(listener,), name="runtime-probe", daemon=True).start()


def start_from_env() -> None:
    """Start the control thread on the port in ``CONTROL_ENV`` (nothing if it is unset)."""
    port = os.environ.get(CONTROL_ENV)
    if port:
        start_control(int(port))

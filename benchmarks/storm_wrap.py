"""Start the example gateway from its own ``main()`` with the storm benchmark's session trace::

    KEEPCONN_STORM_TRACE=PATH python benchmarks/storm_wrap.py ARGS...

ARGS are the gateway's own command line, passed through untouched. The trace is the server's
side of every session a device saw dropped (storm_drops.py sets it beside the device's side):
every session opened, reaped and closed, with the peer address, the close reason and its
detail, stamped with time.monotonic() (system-wide on Linux, like the devices' stamps). It is
kept in memory as tuples (about a microsecond per event, on the gateway's loop, where the
gateway's own info log line per close would cost a formatted write) and written to PATH as
JSON when the gateway exits. With it come the admission controller's final counters and the
retry hints the gateway's ``refuse`` callback was given (MQTT 3.1.1 cannot send them on), and
what may stall the gateway's loop: every cyclic-GC collection of PAUSE_MIN or more (start,
seconds, generation) and every status snapshot (start, seconds), to set beside the probe's lag.

Nothing of this lives in the gateway: it is the benchmark's instrument, like runtime_wrap.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio.abc

from device_gateway import gateway, sessions
from keepconn import ConnectionClosed, ConnectionOpened, ServerEvent, SessionReaped

TRACE_ENV = "KEEPCONN_STORM_TRACE"

_events: list[tuple[Any, ...]] = []
_hints: list[float] = []
_gateways: list[sessions.Gateway] = []
_admission: list[dict[str, Any]] = []
#: Collections shorter than this are not listed (they cannot explain a stall worth a look).
PAUSE_MIN = 0.005
_collections: list[tuple[float, float, int]] = []
_snapshots: list[tuple[float, float]] = []
_gc_started = [0.0]


def _gc_timer(phase: str, info: dict[str, Any]) -> None:
    now = time.monotonic()
    if phase == "start":
        _gc_started[0] = now
    elif now - _gc_started[0] >= PAUSE_MIN:
        _collections.append((_gc_started[0], now - _gc_started[0], info["generation"]))


def _peer(peer: Any) -> str:
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)


def _client_id(identity: Any) -> str:
    return str(identity[1]) if isinstance(identity, tuple) and len(identity) == 2 else str(identity)


def _record(event: ServerEvent) -> None:
    now = time.monotonic()
    if isinstance(event, ConnectionClosed):
        if event.identity is not None:  # hello-phase closes had no session to lose
            _events.append(
                ("closed", now, event.peer, event.identity, event.reason.name, event.detail)
            )
    elif isinstance(event, ConnectionOpened):
        _events.append(("opened", now, event.peer, event.identity, event.took_over))
    elif isinstance(event, SessionReaped):
        _events.append(("reaped", now, event.peer, event.identity, event.lateness))


class TracedGateway(sessions.Gateway):
    """The gateway, with the trace listening to its server's events."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server.add_listener(_record)
        _gateways.append(self)

    async def snapshot(self) -> dict[str, Any]:
        started = time.monotonic()
        try:
            return await super().snapshot()
        finally:
            _snapshots.append((started, time.monotonic() - started))

    async def refuse(self, stream: anyio.abc.ByteStream, retry_after: float) -> None:
        _hints.append(retry_after)
        await super().refuse(stream, retry_after)


def _write(path: str) -> None:
    events = []
    for kind, t, peer, identity, *rest in _events:
        row: dict[str, Any] = {"kind": kind, "t": round(t, 4), "peer": _peer(peer)}
        row["client_id"] = _client_id(identity)
        if kind == "closed":
            row["reason"], row["detail"] = rest
        elif kind == "opened":
            row["took_over"] = rest[0]
        else:
            row["lateness"] = round(rest[0], 4)
        events.append(row)
    admission = _admission[0] if _admission else None
    hints = sorted(_hints)
    report = {
        "events": events,
        "admission": admission,
        "retry_hints": {
            "count": len(hints),
            "min": hints[0] if hints else None,
            "median": hints[len(hints) // 2] if hints else None,
            "max": hints[-1] if hints else None,
        },
        "collections": [[round(t, 4), round(d, 4), g] for t, d, g in _collections],
        "snapshots": [[round(t, 4), round(d, 4)] for t, d in _snapshots],
    }
    with open(path, "w") as f:
        json.dump(report, f, separators=(",", ":"))


def _admission_kept(
    run: Callable[[argparse.Namespace], Awaitable[int]],
) -> Callable[[argparse.Namespace], Awaitable[int]]:
    # Server.stats() needs the event loop: take the last snapshot before run() leaves it.
    async def run_kept(args: argparse.Namespace) -> int:
        try:
            return await run(args)
        finally:
            stats = _gateways[0].server.stats().admission if _gateways else None
            if stats is not None:
                _admission.append(
                    {
                        "admitted": stats.admitted,
                        "refused": dict(stats.refused),
                        "shed_hellos": stats.shed_hellos,
                        "loop_lag_peak": stats.loop_lag_peak,
                    }
                )

    return run_kept


def main() -> int:
    path = os.environ.get(TRACE_ENV)
    gateway.Gateway = TracedGateway  # type: ignore[misc]
    gc.callbacks.append(_gc_timer)
    gateway.run = _admission_kept(gateway.run)  # type: ignore[assignment]
    try:
        return gateway.main(sys.argv[1:])
    finally:
        if path:
            _write(path)


if __name__ == "__main__":
    raise SystemExit(main())

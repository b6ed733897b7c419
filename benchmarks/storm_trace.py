"""The storm fleet's own evidence (used by storm_devices.py): how late each device worker's event
loop ran, and what a device saw of a session the server dropped.

A dropped session is a false reap only if the device kept it alive on schedule. The device's
side of that question is here: when its CONNECT left, when it read the CONNACK, when each
PINGREQ was due and when it really left, and how far its worker's loop was behind around then.
The server's side (the close reason and detail of that connection) comes from the gateway's
trace (storm_wrap.py); storm_drops.py sets the two side by side.

The loop-lag monitor sleeps ``LAG_INTERVAL`` on the worker's own loop and records how much
later than asked it woke: a worker of thousands of devices that shares two cores with the
server (and, on a shared machine, with anything else) can stall, and a stalled worker sends
its pings late however well the server behaves.
"""

from __future__ import annotations

import asyncio
import bisect
import socket
import time
from typing import Any, Protocol

LAG_INTERVAL = 0.05
#: Wake-ups this much later than asked are listed one by one in the final report.
STALL = 0.5
#: PINGREQs remembered per connection (the newest): enough to see the schedule around a drop.
PINGS_KEPT = 32


def local_address(sock: socket.socket) -> str:
    """``host:port`` of the socket's own end ("" once it is closed)."""
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return ""
    return f"{host}:{port}"


class LinkView(Protocol):
    """What storm_devices.Link keeps for this module."""

    local: str
    hello_sent_at: float | None
    connack_at: float | None
    pings: list[tuple[float, float]]
    lost_at: float | None
    lost_by: str


class LagMonitor:
    """The worker's event-loop lag, sampled every LAG_INTERVAL seconds."""

    def __init__(self) -> None:
        #: Wake-up times and how late each was, in time order.
        self.times: list[float] = []
        self.lags: list[float] = []

    async def run(self) -> None:
        """Sample until cancelled."""
        while True:
            started = time.monotonic()
            await asyncio.sleep(LAG_INTERVAL)
            woke = time.monotonic()
            self.times.append(woke)
            self.lags.append(max(0.0, woke - started - LAG_INTERVAL))

    def worst(self, start: float, end: float) -> float:
        """The longest stall that overlaps [start, end] (a wake-up at ``t`` late by ``lag``
        means the loop did nothing from about ``t - lag`` to ``t``)."""
        first = bisect.bisect_left(self.times, start)
        worst = 0.0
        for i in range(first, len(self.times)):
            t, lag = self.times[i], self.lags[i]
            if t - lag > end:
                break
            worst = max(worst, lag)
        return worst

    def summary(self, since: float | None) -> dict[str, Any]:
        """Quantiles from ``since`` (the cut) on, and every stall of STALL seconds or more."""
        start = 0 if since is None else bisect.bisect_left(self.times, since)
        lags = sorted(self.lags[start:])

        def q(p: float) -> float | None:
            return round(lags[min(len(lags) - 1, int(p * len(lags)))], 4) if lags else None

        stalls = [
            [round(t, 3), round(lag, 3)]
            for t, lag in zip(self.times, self.lags, strict=True)
            if lag >= STALL
        ]
        return {
            "samples": len(lags),
            "p50": q(0.5),
            "p99": q(0.99),
            "max": q(1.0),
            "stalls": stalls[:200],
        }


def drop_record(
    client_id: str, link: LinkView, lag: LagMonitor, history: list[list[Any]]
) -> dict[str, Any]:
    """What the device knows about a session the server closed under it, and about its last
    few connection attempts (``history``: started, local address, stage, outcome, ended)."""
    start = link.hello_sent_at if link.hello_sent_at is not None else link.connack_at
    end = link.lost_at if link.lost_at is not None else time.monotonic()
    return {
        "client_id": client_id,
        "local": link.local,
        "hello_sent_at": link.hello_sent_at,
        "connack_at": link.connack_at,
        # [due, sent]: due is when the device's schedule (keepalive after the CONNACK, then
        # after each ping) asked for it.
        "pings": [[round(d, 4), round(s, 4)] for d, s in link.pings],
        "lost_at": link.lost_at,
        "lost_by": link.lost_by,
        "worker_lag_max": round(lag.worst(start or end, end), 4),
        "history": [list(h) for h in history],
    }

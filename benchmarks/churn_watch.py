"""Watching the server's side during a churn run: the kernel's socket table polled for the
server's port (detection times, phantoms, CLOSE_WAIT) and the server process's CPU and memory.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import attrs
import psutil

from keepconn.tcp import census


@attrs.define
class _Vanished:
    t: float
    fault: str
    client_id: str
    #: Midpoint time of the last snapshot after the vanish that still showed it ESTABLISHED.
    last_present: float


class Watcher:
    """Polls census(port) on a thread: detection times, phantoms and CLOSE_WAIT over time."""

    def __init__(self, host: str, port: int, poll_s: float) -> None:
        self.host = host
        self.port = port
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int], _Vanished] = {}
        #: (fault, client id, estimated latency s, half-width of the estimate s)
        self.detected: list[tuple[str, str, float, float]] = []
        #: (monotonic t, established, close_wait, phantoms)
        self.timeline: list[tuple[float, int, int, int]] = []
        self.vanished = 0
        self.census_s: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="census", daemon=True)

    def on_event(self, message: dict[str, Any]) -> None:
        """The fleet's vanish reports (called on its reader threads)."""
        if message.get("kind") != "vanish":
            return
        key = (str(message["addr"]), int(message["port"]))
        t = float(message["t"])
        with self._lock:
            self.vanished += 1
            self._pending[key] = _Vanished(t, str(message["fault"]), str(message["id"]), t)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            snapshot = census(self.port)
            t1 = time.monotonic()
            mid = (t0 + t1) / 2
            established = set()
            close_wait = 0
            for row in snapshot.sockets:
                if row.local_address != self.host:
                    continue
                if row.state == "ESTABLISHED":
                    established.add((row.remote_address, row.remote_port))
                elif row.state == "CLOSE_WAIT":
                    close_wait += 1
            with self._lock:
                phantoms = 0
                for key, item in list(self._pending.items()):
                    if item.t >= t0:
                        continue  # vanished while this snapshot was read: judge it next time
                    if key in established:
                        item.last_present = mid
                        phantoms += 1
                    else:
                        low = item.last_present
                        estimate = (low + mid) / 2 - item.t
                        self.detected.append(
                            (item.fault, item.client_id, estimate, (mid - low) / 2)
                        )
                        del self._pending[key]
                self.timeline.append((t1, len(established), close_wait, phantoms))
            self.census_s.append(t1 - t0)
            self._stop.wait(max(0.0, self.poll_s - (time.monotonic() - t0)))

    def undetected(self, fault: str) -> list[tuple[str, float]]:
        """(client id, seconds since it vanished) of sockets of ``fault`` still ESTABLISHED."""
        now = time.monotonic()
        with self._lock:
            return [(v.client_id, now - v.t) for v in self._pending.values() if v.fault == fault]


class Sampler:
    """CPU time and peak RSS of the server process, once a second (psutil)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        times = self.proc.cpu_times()
        self.cpu0 = times.user + times.system
        self.rss0 = self.proc.memory_info().rss
        self.rss_peak = self.rss0
        self.rss_timeline: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="psutil", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                rss = self.proc.memory_info().rss
            except psutil.Error:
                return
            self.rss_peak = max(self.rss_peak, rss)
            self.rss_timeline.append((time.monotonic(), rss))

    def finish(self) -> float:
        """Stop sampling; return CPU seconds used since the start."""
        self._stop.set()
        self._thread.join(5)
        times = self.proc.cpu_times()
        return times.user + times.system - self.cpu0

"""Reconnect-storm benchmark: a real MQTT fleet over loopback cut at once and reconnecting.

Three servers, one after the other in the same run, each with a fresh process and fleet:

* ``keepconn``: the example gateway (examples/device_gateway/gateway.py) with its default
  admission control, and devices that back off with full jitter (keepconn.Backoff defaults);
* ``keepconn-open``: the same gateway with ``--no-admission``, and naive devices (reconnect at
  once, then retry every 1 s);
* ``naive``: benchmarks/naive_gateway.py (asyncio, a dict of last-seen times swept every 5 s,
  the tutorial client-id takeover), with the same naive devices.

Each run: the server starts (soft RLIMIT_NOFILE raised to the hard limit); a probe session
opens (benchmarks/storm_probe.py); the fleet (benchmarks/storm_devices.py, spread over worker
processes so that no process needs more than its 20,000 descriptors) connects over ``--ramp``
seconds and idles, pinging every keepalive. Then every device is cut at once: it walks away
from its connection without a FIN (the socket stays open and silent, a hung peer to the
server) and reconnects with the same client id. The run ends when every device is back (or at
``--storm-timeout``), after ``--settle`` more seconds, long enough for any server to reap what
it is ever going to reap by timeout (1.5 x keepalive plus the naive gateway's 5 s sweep).

What is measured, and how (the same way for all three servers):

* time until every device is back: each device stamps its first CONNACK 0 after the cut;
* accept rate: the server's own ``accepted`` counter from its ``/status`` page, once a second,
  and sessions opened per second as devices see them (CONNACK 0);
* event-loop lag: PINGREQ/PINGRESP round trips of the probe session, sent on a fixed 20 ms
  schedule whatever the answers do (see storm_probe.py); p50/p99/max from the cut until every
  device is back (or the timeout);
* server CPU and RSS: psutil on the server's pid, every 0.5 s;
* false reaps: sessions a device kept alive on schedule that the server closed (the device
  sees the close; MQTT 3.1.1 does not say why, and for a device that never stopped pinging any
  server close is a wrong reap). The keepconn gateway's own IDLE/HEARTBEAT_TIMEOUT counts are
  reported beside them: those also count correct reaps of cut connections;
* phantoms from the kernel's table (keepconn.tcp.census of the server's port, once a second):
  ESTABLISHED sockets beyond the devices' live and connecting sessions and the probe, and
  CLOSE_WAIT sockets. The devices also count their cut connections the server still holds
  open, which is the exact phantom figure.

Sources: loopback only. Every device binds one of ``--sources`` addresses in 127.0.1.0/24, so
old and new connections of 15,000 devices (30,000 sockets to one server port) fit within the
ephemeral port range (about 28,000 ports per source address by default).

Run ``python benchmarks/storm.py`` (15,000 devices, about ten minutes), ``--quick`` for the
test suite's smoke check (1,000 devices), ``--only NAME`` to run some servers. Writes a table to
the terminal, a PNG timeline (``--png``, default out/storm.png) and the figures as JSON
(``--json PATH``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import secrets
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import psutil

from keepconn.tcp import census

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = ROOT / "examples" / "device_gateway" / "gateway.py"
NAIVE_GATEWAY = ROOT / "benchmarks" / "naive_gateway.py"
DEVICES = ROOT / "benchmarks" / "storm_devices.py"
PROBE = ROOT / "benchmarks" / "storm_probe.py"
#: Devices per worker process: old plus new connections of each stay far below 20,000.
PER_WORKER = 4000
SAMPLE = 0.5
PROBE_INTERVAL = 0.02
#: Seconds between GET /status. Not more often: the keepconn gateway's status page parses the
#: kernel's socket table on every request (tens of milliseconds of its CPU at 30,000 sockets),
#: a cost the naive gateway's page does not have, which would bias the loop-lag comparison.
STATUS_EVERY = 5.0
#: The naive gateway's sweep interval (its default), part of the settle time.
NAIVE_SWEEP = 5.0
TIMEOUT_REASONS = ("IDLE_TIMEOUT", "HEARTBEAT_TIMEOUT", "KEEPALIVE_TIMEOUT")


@attrs.frozen
class Contender:
    """One server with one client policy."""

    name: str
    label: str
    server: str  # "gateway" or "naive"
    clients: str  # "jitter" or "naive"
    extra: tuple[str, ...] = ()


CONTENDERS = (
    Contender("keepconn", "keepconn, admission, jittered clients", "gateway", "jitter"),
    Contender(
        "keepconn-open",
        "keepconn, no admission, naive clients",
        "gateway",
        "naive",
        ("--no-admission",),
    ),
    # The same listen backlog as the keepconn gateway (the naive default is asyncio's 100), so
    # the comparison is about liveness and admission, not about one listen() argument.
    Contender(
        "naive",
        "naive asyncio gateway, naive clients",
        "naive",
        "naive",
        ("--backlog", "4096"),
    ),
)


# ----------------------------------------------------------------------------------------------
# Processes (every one is ended by its pid in a finally block).


def _raise_nofile() -> None:
    # Runs in the server's child process before exec: 15,000 devices plus hellos need more than
    # a conservative soft limit, and the hard limit is what the process may have.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[Any], grace: float = 10.0) -> int | None:
    """SIGTERM by pid, SIGKILL if it lingers; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


class Server:
    """A gateway process started from its documented command line."""

    def __init__(self, contender: Contender, users: Path, workdir: Path) -> None:
        self.status_port = _free_port()
        script = GATEWAY if contender.server == "gateway" else NAIVE_GATEWAY
        argv = [sys.executable, str(script), "--host", "127.0.0.1", "--port", "0"]
        argv += ["--users", str(users), "--status-port", str(self.status_port)]
        if contender.server == "gateway":
            # warning: the per-close info lines would cost the keepconn gateway 30,000 log
            # writes a storm that the naive gateway (which logs nothing) does not pay.
            argv += ["--data", str(workdir / f"{contender.name}.sqlite3"), "--log-level", "warning"]
        argv += list(contender.extra)
        self.argv = argv
        self.log_path = workdir / f"{contender.name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            preexec_fn=_raise_nofile,  # noqa: PLW1509 - no threads of ours touch the child
        )
        self.port: int | None = None
        bound = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                if self.port is None and line.startswith("listening on "):
                    self.port = int(line.split()[2].rsplit(":", 1)[1])
                    bound.set()
            bound.set()

        threading.Thread(target=read, daemon=True).start()
        if not bound.wait(30.0) or self.port is None:
            self.stop()
            raise RuntimeError(f"{script.name} did not start: see {self.log_path}")
        self.ps = psutil.Process(self.proc.pid)

    def status(self) -> dict[str, Any] | None:
        url = f"http://127.0.0.1:{self.status_port}/status"
        try:
            with urllib.request.urlopen(url, timeout=5.0) as reply:  # noqa: S310 - loopback
                return dict(json.load(reply))
        except (OSError, ValueError):
            return None

    def stop(self) -> int | None:
        code = _stop(self.proc)
        self._log.close()
        return code


class Lines:
    """A child process speaking JSON lines on stdout, read by one thread."""

    def __init__(self, argv: list[str], on_message: Callable[[dict[str, Any]], None]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.done = threading.Event()
        self._on_message = on_message
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            self._on_message(message)
        self.done.set()

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def stop(self) -> None:
        _stop(self.proc, grace=5.0)


class Fleet:
    """The device workers of one run."""

    def __init__(self, spec: dict[str, Any], devices: int, workers: int) -> None:
        self.ticks: list[dict[str, Any]] = [{} for _ in range(workers)]
        self.finals: list[dict[str, Any] | None] = [None] * workers
        self.procs: list[Lines] = []
        base, extra = divmod(devices, workers)
        first = 0
        for w in range(workers):
            count = base + (1 if w < extra else 0)
            one = dict(spec, first=first, count=count, seed=spec["seed"] * 7919 + w)
            first += count
            self.procs.append(
                Lines([sys.executable, str(DEVICES), json.dumps(one)], self._receiver(w))
            )

    def _receiver(self, w: int) -> Callable[[dict[str, Any]], None]:
        def receive(message: dict[str, Any]) -> None:
            if message.get("kind") == "tick":
                self.ticks[w] = message
            elif message.get("kind") == "final":
                self.finals[w] = message

        return receive

    def totals(self) -> dict[str, Any]:
        total: Counter[str] = Counter()
        failures: Counter[str] = Counter()
        for tick in self.ticks:
            for key, value in tick.items():
                if key != "t" and isinstance(value, int):
                    total[key] += value
            failures.update(tick.get("failures", {}))
        return dict(total, failures=dict(failures))

    def alive(self) -> bool:
        return all(p.proc.poll() is None for p in self.procs)

    def command(self, word: str) -> None:
        for p in self.procs:
            p.send(word)

    def finish(self, wait: float) -> list[dict[str, Any]]:
        self.command("quit")
        deadline = time.monotonic() + wait
        for p in self.procs:
            p.done.wait(max(0.0, deadline - time.monotonic()))
        self.stop()
        return [f for f in self.finals if f is not None]

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


class Probe:
    """The loop-lag probe session (storm_probe.py)."""

    def __init__(self, port: int, user: tuple[str, str]) -> None:
        self.ready = threading.Event()
        self.samples: dict[str, Any] | None = None
        argv = [sys.executable, str(PROBE), "127.0.0.1", str(port), *user, str(PROBE_INTERVAL)]
        self.lines = Lines(argv, self._receive)
        if not self.ready.wait(30.0):
            self.lines.stop()
            raise RuntimeError("the probe session did not open")

    def _receive(self, message: dict[str, Any]) -> None:
        if message.get("kind") == "ready":
            self.ready.set()
        elif message.get("kind") == "samples":
            self.samples = message

    def finish(self) -> dict[str, Any]:
        self.lines.send("quit")
        self.lines.done.wait(15.0)
        self.lines.stop()
        return self.samples or {"sent": [], "lag": [], "lost": True}


class StatusPoller:
    """GET /status every STATUS_EVERY seconds on its own thread, so a stalled server never
    stalls sampling."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.samples: list[tuple[float, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            status = self.server.status()
            if status is not None:
                self.samples.append((time.monotonic(), status))
            self._stop.wait(max(0.0, STATUS_EVERY - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10.0)


# ----------------------------------------------------------------------------------------------
# One run.


@attrs.frozen
class Params:
    devices: int
    workers: int
    keepalive: int
    ramp: float
    steady: float
    storm_timeout: float
    settle: float
    sources: int
    connect_timeout: float
    seed: int


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _rates(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Per-second rates between consecutive (time, cumulative count) points."""
    out = []
    for (t0, c0), (t1, c1) in zip(points, points[1:], strict=False):
        if t1 > t0:
            out.append((t1, max(0.0, (c1 - c0) / (t1 - t0))))
    return out


def run_one(
    contender: Contender, params: Params, workdir: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """Start a server, a probe and a fleet; cut; measure; stop everything."""
    user = ("storm", "pw-" + secrets.token_hex(8))
    users = workdir / "users.txt"
    users.write_text(f"{user[0]}:{user[1]}\n")
    server: Server | None = None
    probe: Probe | None = None
    fleet: Fleet | None = None
    poller: StatusPoller | None = None
    samples: list[dict[str, Any]] = []
    marks: dict[str, float] = {}
    notes: list[str] = []
    try:
        server = Server(contender, users, workdir)
        port = server.port
        assert port is not None
        where = f"pid {server.proc.pid}, port {port}"
        log(f"[{contender.name}] {shlex.join(server.argv[1:])} ({where})")
        probe = Probe(port, user)
        poller = StatusPoller(server)
        spec = {
            "host": "127.0.0.1",
            "port": port,
            "users": [list(user)],
            "mode": contender.clients,
            "keepalive": params.keepalive,
            "ramp": params.ramp,
            "seed": params.seed,
            "sources": [f"127.0.1.{i + 1}" for i in range(params.sources)],
            "connect_timeout": params.connect_timeout,
        }
        marks["start"] = time.monotonic()
        fleet = Fleet(spec, params.devices, params.workers)
        cpu_last = (time.monotonic(), sum(server.ps.cpu_times()[:2]))
        next_census = 0.0
        last_census: dict[str, int] = {}

        def sample() -> dict[str, Any]:
            nonlocal cpu_last, next_census, last_census
            assert server is not None and fleet is not None
            now = time.monotonic()
            row: dict[str, Any] = {"t": now, **fleet.totals()}
            try:
                times = server.ps.cpu_times()
                cpu = times.user + times.system
                row["cpu_s"] = cpu
                row["cpu_pct"] = 100.0 * (cpu - cpu_last[1]) / max(1e-6, now - cpu_last[0])
                cpu_last = (now, cpu)
                row["rss"] = server.ps.memory_info().rss
                row["fds"] = server.ps.num_fds()
            except psutil.Error:
                row["server_gone"] = True
            if now >= next_census:
                # About 50 ms of parsing at 30,000 sockets: once a second is plenty.
                # Only the server's end: a device socket whose ephemeral port happens to equal
                # the server's port has the same local port but a 127.0.1.x address.
                census_started = time.monotonic()
                found = Counter(
                    row.state for row in census(port).sockets if row.local_address == "127.0.0.1"
                )
                last_census = {
                    "established": found["ESTABLISHED"],
                    "close_wait": found["CLOSE_WAIT"],
                }
                row["census_ms"] = 1000.0 * (time.monotonic() - census_started)
                next_census = now + 1.0
                row.update(last_census)
                # Everything ESTABLISHED that no device holds as live or connecting, and that is
                # not the probe: an old connection the server never let go of.
                held = row.get("online", 0) + row.get("awaiting", 0) + 1
                row["phantom_established"] = max(0, last_census["established"] - held)
            samples.append(row)
            return row

        def wait_until(what: str, done: Callable[[dict[str, Any]], bool], limit: float) -> bool:
            deadline = time.monotonic() + limit
            while time.monotonic() < deadline:
                row = sample()
                if done(row):
                    return True
                if not fleet.alive() or server.proc.poll() is not None:
                    notes.append(f"a process died while waiting for {what}")
                    return False
                time.sleep(SAMPLE)
            return False

        n = params.devices
        if not wait_until("the ramp", lambda r: r.get("online", 0) >= n, params.ramp + 90.0):
            notes.append(f"only {samples[-1].get('online', 0)} of {n} online before the cut")
        marks["online"] = time.monotonic()
        log(f"[{contender.name}] {samples[-1].get('online', 0)} devices online; steady")
        wait_until("steady", lambda r: False, params.steady)
        marks["cut"] = cut = time.monotonic()
        fleet.command(f"cut {cut!r}")
        log(f"[{contender.name}] cut")
        back = wait_until("the storm", lambda r: r.get("back", 0) >= n, params.storm_timeout)
        marks["storm_end"] = time.monotonic()
        if back:
            log(f"[{contender.name}] all back after {marks['storm_end'] - cut:.1f} s; settling")
        else:
            got = samples[-1].get("back", 0)
            notes.append(f"{got} of {n} back at the {params.storm_timeout:g} s storm timeout")
            log(f"[{contender.name}] {got}/{n} back at the timeout; settling")
        wait_until("settling", lambda r: False, params.settle)
        marks["settled"] = time.monotonic()
        sample()
        poller.stop()
        final_status = server.status()
        finals = fleet.finish(wait=params.connect_timeout + 15.0)
        probe_data = probe.finish()
        marks["end"] = time.monotonic()
    finally:
        if poller is not None:
            poller.stop()
        if fleet is not None:
            fleet.stop()
        if probe is not None:
            probe.lines.stop()
        if server is not None:
            server.stop()
    if final_status is None and poller.samples:
        # A server out of descriptors cannot accept its status connection either: use the last
        # answer it gave.
        notes.append("the final /status failed; figures use the last one that answered")
        final_status = poller.samples[-1][1]
    return summarise(
        contender, params, marks, samples, poller.samples, final_status, finals, probe_data, notes
    )


def summarise(
    contender: Contender,
    params: Params,
    marks: dict[str, float],
    samples: list[dict[str, Any]],
    status: list[tuple[float, dict[str, Any]]],
    final_status: dict[str, Any] | None,
    finals: list[dict[str, Any]],
    probe: dict[str, Any],
    notes: list[str],
) -> dict[str, Any]:
    """Figures and timelines of one run (times relative to the cut)."""
    cut, storm_end, settled = marks["cut"], marks["storm_end"], marks["settled"]
    # Back before the census at the end of settling; later ones rode on the fleet's shutdown.
    limit = settled - cut
    back_after = [b for f in finals for b in f["back_after"] if b is not None and b <= limit]
    all_back = len(back_after) == params.devices and len(finals) == params.workers
    failures: Counter[str] = Counter()
    for f in finals:
        failures.update(f["failures"])
    in_storm = [r for r in samples if cut <= r["t"] <= storm_end]
    census_rows = [r for r in samples if "established" in r]
    last = census_rows[-1] if census_rows else {}

    pings = list(zip(probe["sent"], probe["lag"], strict=True))
    lag_values = [lag for t, lag in pings if cut <= t <= storm_end]
    before = [lag for t, lag in pings if marks["online"] <= t < cut]

    accepted = [(t, float(s["accepted"])) for t, s in status if "accepted" in s]
    accept_rates = _rates(accepted)
    storm_accepts = [r for t, r in accept_rates if cut <= t <= storm_end + 1.0]
    connack_rates = _rates([(r["t"], float(r.get("connacks", 0))) for r in samples])

    cpu_in_storm = None
    if len(in_storm) >= 2 and "cpu_s" in in_storm[0] and "cpu_s" in in_storm[-1]:
        cpu_in_storm = in_storm[-1]["cpu_s"] - in_storm[0]["cpu_s"]

    server_timeouts = None
    if final_status is not None:
        closed = final_status.get("closed")
        if isinstance(closed, dict):
            server_timeouts = sum(int(closed.get(k, 0)) for k in TIMEOUT_REASONS)
        elif "swept" in final_status:
            server_timeouts = int(final_status["swept"])

    def ms(x: float | None) -> float | None:
        return None if x is None else round(1000.0 * x, 2)

    # Lag timeline: the worst ping in each 0.25 s bucket keeps the JSON and the plot small.
    buckets: dict[int, float] = {}
    for t, lag in pings:
        key = int((t - cut) // 0.25)
        buckets[key] = max(lag, buckets.get(key, 0.0))

    figures = {
        "devices": params.devices,
        "back": len(back_after),
        "all_back": all_back,
        "time_to_all_back_s": round(max(back_after), 2) if all_back else None,
        "back_p50_s": _round(_percentile(back_after, 0.5)),
        "back_p99_s": _round(_percentile(back_after, 0.99)),
        "accept_rate_peak": _round(max(storm_accepts, default=None)),
        "accept_rate_mean": _round(statistics.fmean(storm_accepts) if storm_accepts else None),
        "lag_p50_ms": ms(_percentile(lag_values, 0.5)),
        "lag_p99_ms": ms(_percentile(lag_values, 0.99)),
        "lag_max_ms": ms(max(lag_values, default=None)),
        "lag_samples": len(lag_values),
        "lag_before_cut_p50_ms": ms(_percentile(before, 0.5)),
        "probe_lost": bool(probe.get("lost")),
        "cpu_s_in_storm": _round(cpu_in_storm),
        "cpu_pct_peak": _round(max((r.get("cpu_pct", 0.0) for r in samples), default=None)),
        "rss_peak_mb": _round(max((r.get("rss", 0) for r in samples), default=0) / 2**20),
        "rss_end_mb": _round(samples[-1].get("rss", 0) / 2**20) if samples else None,
        "fds_peak": max((r.get("fds", 0) for r in samples), default=0),
        # What one read of the kernel's table costs (here, in the coordinator) at this size.
        "census_ms_max": _round(max((r.get("census_ms", 0.0) for r in census_rows), default=None)),
        "false_reaps": sum(f["live_drops"] for f in finals),
        "server_timeout_closes": server_timeouts,
        "phantom_established_end": last.get("phantom_established"),
        "close_wait_end": last.get("close_wait"),
        "old_connections_open_end": samples[-1].get("abandoned_open") if samples else None,
        "phantom_established_peak": max(
            (r["phantom_established"] for r in census_rows), default=None
        ),
        "close_wait_peak": max((r["close_wait"] for r in census_rows), default=None),
        "failed_attempts": dict(failures),
        "attempts": sum(f["attempts"] for f in finals),
        "settle_s": round(settled - storm_end, 1),
    }
    timeline = {
        "t": [round(r["t"] - cut, 2) for r in samples],
        "online": [r.get("online", 0) for r in samples],
        "back": [r.get("back", 0) for r in samples],
        "cpu_pct": [_round(r.get("cpu_pct")) for r in samples],
        "rss_mb": [_round(r.get("rss", 0) / 2**20) for r in samples],
        "old_connections_open": [r.get("abandoned_open", 0) for r in samples],
        "census_t": [round(r["t"] - cut, 2) for r in census_rows],
        "established": [r["established"] for r in census_rows],
        "phantom_established": [r["phantom_established"] for r in census_rows],
        "close_wait": [r["close_wait"] for r in census_rows],
        "accept_t": [round(t - cut, 2) for t, _ in accept_rates],
        "accept_rate": [round(r, 1) for _, r in accept_rates],
        "connack_t": [round(t - cut, 2) for t, _ in connack_rates],
        "connack_rate": [round(r, 1) for _, r in connack_rates],
        "lag_t": [k * 0.25 for k in sorted(buckets)],
        "lag_max_ms": [round(1000.0 * buckets[k], 2) for k in sorted(buckets)],
    }
    return {
        "name": contender.name,
        "label": contender.label,
        "server": contender.server,
        "clients": contender.clients,
        "server_args": list(contender.extra),
        "figures": figures,
        "final_status": _brief_status(final_status),
        "notes": notes,
        "timeline": timeline,
    }


def _round(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


def _brief_status(status: dict[str, Any] | None) -> dict[str, Any] | None:
    if status is None:
        return None
    keep = ("sessions", "connections", "accepted", "takeovers", "closed", "swept", "phantoms")
    return {k: status[k] for k in keep if k in status}


# ----------------------------------------------------------------------------------------------
# Output.


def table(results: list[dict[str, Any]]) -> str:
    """The terminal table: one column per server."""

    def show(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    def lag(f: dict[str, Any]) -> str:
        return "/".join(show(f[k]) for k in ("lag_p50_ms", "lag_p99_ms", "lag_max_ms"))

    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("devices back", lambda f: f"{f['back']}/{f['devices']}"),
        ("time until all back, s", lambda f: show(f["time_to_all_back_s"])),
        ("back after, p50 / p99, s", lambda f: f"{show(f['back_p50_s'])}/{show(f['back_p99_s'])}"),
        ("accepts/s in storm, peak", lambda f: show(f["accept_rate_peak"])),
        ("accepts/s in storm, mean", lambda f: show(f["accept_rate_mean"])),
        ("loop lag p50/p99/max, ms", lag),
        ("loop lag before cut p50, ms", lambda f: show(f["lag_before_cut_p50_ms"])),
        ("server CPU in storm, s", lambda f: show(f["cpu_s_in_storm"])),
        ("server CPU peak, %", lambda f: show(f["cpu_pct_peak"])),
        ("server RSS peak, MB", lambda f: show(f["rss_peak_mb"])),
        ("server fds peak", lambda f: show(f["fds_peak"])),
        ("false reaps", lambda f: show(f["false_reaps"])),
        ("server timeout closes", lambda f: show(f["server_timeout_closes"])),
        ("phantom ESTABLISHED, peak", lambda f: show(f["phantom_established_peak"])),
        ("phantom ESTABLISHED, settled", lambda f: show(f["phantom_established_end"])),
        ("old conns still open, settled", lambda f: show(f["old_connections_open_end"])),
        ("CLOSE_WAIT, peak", lambda f: show(f["close_wait_peak"])),
        ("CLOSE_WAIT, settled", lambda f: show(f["close_wait_end"])),
        ("connect attempts", lambda f: show(f["attempts"])),
        (
            "failed attempts",
            lambda f: ", ".join(f"{k} {v}" for k, v in sorted(f["failed_attempts"].items())) or "0",
        ),
    ]
    header = ["", *[r["name"] for r in results]]
    body = [[name, *[fn(r["figures"]) for r in results]] for name, fn in rows]
    grid = [header, *body]
    widths = [max(len(line[i]) for line in grid) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in grid]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """A timeline per measure, one line per server, time 0 = the cut."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("devices online", "t", "online", "linear"),
        ("server accepts per second", "accept_t", "accept_rate", "linear"),
        ("loop lag (probe ping, worst per 0.25 s), ms", "lag_t", "lag_max_ms", "log"),
        ("phantom ESTABLISHED (kernel)", "census_t", "phantom_established", "linear"),
        ("CLOSE_WAIT (kernel)", "census_t", "close_wait", "linear"),
        ("old connections the server holds open", "t", "old_connections_open", "linear"),
        ("server CPU, %", "t", "cpu_pct", "linear"),
        ("server RSS, MB", "t", "rss_mb", "linear"),
    ]
    fig, axes = plt.subplots(4, 2, figsize=(13, 13), sharex=True)
    for ax, (name, xs, ys, scale) in zip(axes.flat, panels, strict=True):
        for r in results:
            tl = r["timeline"]
            values = [v if v is not None else float("nan") for v in tl[ys]]
            ax.plot(tl[xs], values, label=r["label"])
        ax.set_title(name, fontsize=10)
        ax.set_yscale(scale)
        ax.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
        ax.grid(True, alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("seconds since the cut")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Command line.


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1,000 devices, short: the smoke test")
    p.add_argument("--devices", type=int, help="fleet size (15000; quick: 1000)")
    p.add_argument("--workers", type=int, help="device processes (>= 2; default by size)")
    p.add_argument("--keepalive", type=int, help="device MQTT keepalive, s (10; quick: 3)")
    p.add_argument("--ramp", type=float, help="seconds over which the fleet first connects")
    p.add_argument("--steady", type=float, help="seconds online before the cut")
    p.add_argument("--storm-timeout", type=float, help="give up waiting for devices after, s")
    p.add_argument("--settle", type=float, help="seconds after the storm before the census")
    p.add_argument("--sources", type=int, default=8, help="127.0.1.x source addresses")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="TCP + CONNACK, s")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--only", action="append", choices=[c.name for c in CONTENDERS], help="run only these"
    )
    p.add_argument("--json", type=Path, help="write the figures and timelines here")
    p.add_argument("--png", type=Path, default=ROOT / "out" / "storm.png", help="timeline plot")
    return p.parse_args(argv)


def _params(args: argparse.Namespace) -> Params:
    quick = args.quick
    devices = args.devices or (1000 if quick else 15_000)
    keepalive = args.keepalive or (3 if quick else 10)
    workers = args.workers or max(2, math.ceil(devices / PER_WORKER))
    if workers < 2:
        raise SystemExit("storm.py: --workers must be at least 2 (the point is >1 process)")
    # Long enough for the naive gateway's sweep to have reaped whatever it ever will, and for
    # keepconn's reaper to close any cut connection that was not taken over.
    settle = args.settle if args.settle is not None else 1.5 * keepalive + NAIVE_SWEEP + 3.0
    return Params(
        devices=devices,
        workers=workers,
        keepalive=keepalive,
        ramp=args.ramp if args.ramp is not None else (2.0 if quick else 15.0),
        steady=args.steady if args.steady is not None else (1.0 if quick else 5.0),
        storm_timeout=args.storm_timeout or (40.0 if quick else 90.0),
        settle=settle,
        sources=args.sources,
        connect_timeout=args.connect_timeout,
        seed=args.seed,
    )


def _check_ports(params: Params) -> str | None:
    # Old plus new connections of every device, per source address, must fit the range.
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return None
    per_source = math.ceil(2 * params.devices / params.sources)
    if per_source > (high - low + 1) * 0.8:
        return (
            f"{per_source} connections per source address do not fit the ephemeral range "
            f"{low}-{high}: raise --sources"
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and report it."""
    args = _parse(argv)
    params = _params(args)

    def terminated(signum: int, frame: object) -> None:
        # SIGTERM would otherwise end the interpreter without the finally blocks that stop the
        # server, the probe and the device workers by their pids.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    problem = _check_ports(params)
    if problem:
        print(f"storm.py: {problem}", file=sys.stderr)
        return 2
    contenders = [c for c in CONTENDERS if not args.only or c.name in args.only]
    given = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "benchmarks/storm.py", *given])
    started = time.monotonic()

    def log(line: str) -> None:
        print(f"{time.monotonic() - started:7.1f}s {line}", flush=True)

    log(
        f"{params.devices} devices over {params.workers} worker processes, keepalive "
        f"{params.keepalive} s, {params.sources} source addresses, {os.cpu_count()} CPUs"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="keepconn-storm-") as tmp:
        for contender in contenders:
            results.append(run_one(contender, params, Path(tmp), log))
            for note in results[-1]["notes"]:
                log(f"[{contender.name}] note: {note}")
    print()
    print(table(results))
    title = f"Reconnect storm: {params.devices} devices cut at once ({os.cpu_count()} CPUs)"
    plot(results, args.png, title)
    print(f"\nplot: {args.png}")
    keepconn_ok = all(
        r["figures"]["all_back"]
        and r["figures"]["false_reaps"] == 0
        and r["figures"]["phantom_established_end"] == 0
        and r["figures"]["close_wait_end"] == 0
        for r in results
        if r["server"] == "gateway"
    )
    report = {
        "benchmark": "storm",
        "command": command,
        "quick": args.quick,
        "params": attrs.asdict(params),
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "keepconn_ok": keepconn_ok,
        "results": results,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

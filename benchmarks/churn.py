"""End-to-end churn benchmark: how fast are dead peers found, and what is left behind?

The same MQTT 3.1.1 device fleet (``examples/device_gateway/fleet.py``) and the same churn are run
against three servers in turn, in one program run:

* ``keepconn``: the example gateway (``examples/device_gateway/gateway.py``), started from its
  documented command line with its defaults (reaping resolution 1 s, admission and flapping on);
* ``mosquitto``: Debian's broker, started here with a configuration file written here (one
  listener, a password file made with ``mosquitto_passwd``, ``max_keepalive``, no persistence);
* ``naive``: ``benchmarks/naive_gateway.py``, the tutorial-style asyncio gateway whose sweeper
  closes connections idle past 1.5 x keepalive every 5 s.

Every one of them is asked for the same thing: MQTT-3.1.2-24, a client silent for 1.5 x its
keepalive is disconnected.

The churn
---------
Devices live in network-namespace *cells* (root only), so a device that dies is truly half-open:
the fleet silences its one connection with per-port blackhole rules, sends no FIN and no RST, and
the server's packets go nowhere. During the churn phase devices die at a steady rate, as Poisson
processes per worker: *reboots* (back after about a second with the same client id: a takeover of
the half-open connection) and *losses* (dark long enough that every server must reap the old
connection on its own). In the middle of the churn comes one burst: a wave of reboots and losses
at the same instant. Then the churn stops and the servers get time to settle.

What is measured, and how -- the same way for all three
---------------------------------------------------------
* Detection latency of half-open peers, per lost device: from the moment its connection went
  silent (the fleet reports it, with the 4-tuple, once the blackhole rules are in place; every
  process shares CLOCK_MONOTONIC) to the moment the server closed its socket, seen from the
  kernel's table: this program polls :func:`keepconn.tcp.census` for the server's port (the
  servers run in the root namespace, as this program does) and notes when the device's 4-tuple
  leaves ESTABLISHED. The close happened between two snapshots; the estimate is the midpoint, so
  its error is at most half a poll interval (printed). Compared with the configured bound:
  1.5 x keepalive plus the system's sweep resolution (keepconn: its 1 s reaping resolution;
  naive: its 5 s sweep; Mosquitto 2.0: its keepalive check runs only once more than 5 whole
  seconds have passed since the previous one, against last-activity times kept in whole seconds,
  so up to 7 s).
* Phantom ESTABLISHED: server-side ESTABLISHED sockets whose device connection has vanished or
  been replaced, counted at every poll. ``phantom_established_max_after_settle`` is the largest
  count in a window that starts once the churn has stopped and the slowest system's bound has
  passed: everything still there then will never be reaped. CLOSE_WAIT: the largest count of the
  server port's CLOSE_WAIT sockets during the run (ramp, churn and settle).
* Takeover latency: the fleet's own figure for a device returning after a reboot, from its TCP
  connect to the CONNACK, while the old connection is still half-open on the server.
* CPU seconds of the server process (user + system, from before the fleet connects to the end of
  the settle window) and RSS per 1,000 connections: (peak RSS during the run - RSS before the
  fleet connected) / connections x 1000, sampled with psutil.
* Telemetry lost: QoS 1 messages the device saw acknowledged but that the server did not store
  or deliver, summed per device as max(0, acked - stored). keepconn: rows in its SQLite file;
  naive: its per-client counters; Mosquitto: messages a ``mosquitto_sub`` subscribed to
  ``telemetry/#`` at QoS 1 received (Mosquitto acknowledges a QoS 1 PUBLISH once it has queued
  it for delivery, so the subscriber is its "store").

Outputs: a table on the terminal, ``out/churn-detection.png`` and ``out/churn-phantoms.png``,
``out/churn-details.json`` (everything, per system) and, with ``--json PATH``, the summary in the
shape issue 7 specifies. ``--quick`` is a small, short run (200 devices, keepalive 2 s, about 90 s)
that the test suite uses as a behaviour check; the full run (15,000 devices, keepalive 15 s, over
four worker processes and four cells) takes about eight minutes. Run it on an otherwise idle
machine: a starved fleet misses its own pings and every server then reaps live devices.

Usage: ``sudo .venv/bin/python benchmarks/churn.py [--quick] [--json PATH] [--systems ...]``.
Without root (or with ``--no-netns``) it runs on loopback, where a "dead" device is only hung
(the kernel still ACKs): the figures then say less, and the program says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import psutil

from device_gateway.fleet import (
    DeviceProfile,
    Fleet,
    GatewayProcess,
    make_cells,
    netns_reason,
    write_users,
)
from keepconn.tcp import census

ROOT = Path(__file__).resolve().parent.parent
NAIVE_SCRIPT = ROOT / "benchmarks" / "naive_gateway.py"
OUT = ROOT / "out"
SYSTEMS = ("keepconn", "mosquitto", "naive")
#: The example gateway's default reaping resolution (``--resolution``: min(1, idle_timeout/10)).
KEEPCONN_RESOLUTION = 1.0
#: The naive gateway's sweep period.
NAIVE_SWEEP = 5.0
#: Mosquitto 2.0.x: the check runs when more than 5 whole seconds have passed since the last
#: one (so every 6 s), and a client's last activity is kept in whole seconds (up to 1 s more).
MOSQUITTO_20_RESOLUTION = 7.0
#: Later Mosquitto releases check every second, still against whole-second timestamps.
MOSQUITTO_RESOLUTION = 2.0
#: Same --max-keepalive for both servers that have one (the example gateway's default).
MAX_KEEPALIVE = 1800


@attrs.frozen
class Plan:
    """One run's fleet and timeline. Rates are events per second over the whole fleet."""

    devices: int
    keepalive: int
    telemetry_interval: float
    reboots_per_s: float
    losses_per_s: float
    churn_s: float
    burst_at_s: float
    #: Devices struck by the burst: half of them reboot, half are lost.
    burst: int
    ramp_s: float
    #: Length of the window, after the settle point, in which phantoms are counted.
    settle_window_s: float
    poll_s: float
    per_worker: int
    qos1_fraction: float = 0.5

    @property
    def workers(self) -> int:
        """Worker processes (and cells) the fleet needs."""
        return Fleet.workers_needed(self.devices, self.per_worker)


QUICK = Plan(
    devices=200,
    keepalive=2,
    telemetry_interval=1.0,
    reboots_per_s=2.0,
    losses_per_s=1.5,
    churn_s=10.0,
    burst_at_s=5.0,
    burst=20,
    ramp_s=2.0,
    settle_window_s=3.0,
    poll_s=0.1,
    per_worker=4000,
)
# Keepalive 15 s keeps 15,000 Python devices and a Python server within two CPU cores
# (about 1,000 packets a second); churn, burst and settle then fit the 10-minute budget.
FULL = Plan(
    devices=15_000,
    keepalive=15,
    telemetry_interval=15.0,
    reboots_per_s=10.0,
    losses_per_s=4.0,
    churn_s=45.0,
    burst_at_s=20.0,
    burst=800,
    # The example gateway completes about 300 connects a second here while it serves the devices
    # already online; a faster ramp overflows its accept queue and devices time out and retry.
    ramp_s=60.0,
    settle_window_s=8.0,
    poll_s=0.5,
    per_worker=3750,
)


def mosquitto_binary() -> str | None:
    """Debian installs the broker in /usr/sbin, which is not on every PATH."""
    found = shutil.which("mosquitto")
    if found is None and os.access("/usr/sbin/mosquitto", os.X_OK):
        found = "/usr/sbin/mosquitto"
    return found


def mosquitto_resolution(binary: str) -> tuple[float, str]:
    """The keepalive-check resolution of this Mosquitto, from its version line."""
    done = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10, check=False)
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", done.stdout + done.stderr)
    version = ".".join(m.groups()) if m else "unknown"
    if m and (int(m.group(1)), int(m.group(2))) < (2, 1):
        return MOSQUITTO_20_RESOLUTION, version
    return MOSQUITTO_RESOLUTION, version


def bound_for(system: str, keepalive: int, mosq_resolution: float) -> float:
    """1.5 x keepalive plus the system's sweep resolution."""
    resolution = {
        "keepconn": KEEPCONN_RESOLUTION,
        "naive": NAIVE_SWEEP,
        "mosquitto": mosq_resolution,
    }[system]
    return 1.5 * keepalive + resolution


# ----------------------------------------------------------------------------------------------
# The servers. Each is a child process, started here and ended by its pid.


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_listening(host: str, port: int, proc: subprocess.Popen[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout:g} s")


def _end(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    """SIGTERM by pid, SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class KeepconnServer:
    """The example gateway, from its documented command line (via the fleet's helper)."""

    name = "keepconn"

    def __init__(self, host: str, workdir: Path, users: Path) -> None:
        self.data = workdir / "keepconn.sqlite3"
        self.gateway = GatewayProcess(
            host=host,
            users=users,
            data=self.data,
            # One log line per close is the default; 15,000 of them would be measured too.
            extra=["--log-level", "warning", "--max-keepalive", str(MAX_KEEPALIVE)],
            log=workdir / "keepconn.log",
        )
        self.pid = self.gateway.proc.pid
        self.port = self.gateway.port

    def stored_qos1(self) -> dict[str, int]:
        """QoS 1 rows per client id; read after stop(), once the gateway has flushed."""
        with sqlite3.connect(self.data) as db:
            rows = db.execute(
                "SELECT client_id, COUNT(*) FROM telemetry WHERE qos = 1 GROUP BY client_id"
            ).fetchall()
        return {cid: n for cid, n in rows}

    def before_stop(self) -> None:
        """Nothing to collect before the gateway stops: it flushes on SIGTERM."""

    def stop(self) -> None:
        self.gateway.stop()


class NaiveServer:
    """benchmarks/naive_gateway.py as a subprocess."""

    name = "naive"

    def __init__(self, host: str, workdir: Path, users: Path) -> None:
        self.status_port = _free_port("127.0.0.1")
        self._log = open(workdir / "naive.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(NAIVE_SCRIPT),
                "--host",
                host,
                "--port",
                "0",
                "--users",
                str(users),
                "--status-port",
                str(self.status_port),
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.pid = self.proc.pid
        self.port = self._read_port(timeout=20.0)
        self._stored: dict[str, int] = {}

    def _read_port(self, timeout: float) -> int:
        assert self.proc.stdout is not None
        found: list[int] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                if not found and line.startswith("listening on "):
                    found.append(int(line.split()[2].rsplit(":", 1)[1]))
                    # Keep draining: the gateway prints nothing more, but never block it.

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        while not found and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.05)
        if not found:
            _end(self.proc)
            raise RuntimeError("naive_gateway.py did not report 'listening on'")
        return found[0]

    def before_stop(self) -> None:
        url = f"http://127.0.0.1:{self.status_port}/telemetry"
        with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310 - loopback
            per_client = json.load(reply)
        self._stored = {cid: counts[1] for cid, counts in per_client.items()}

    def stored_qos1(self) -> dict[str, int]:
        return self._stored

    def stop(self) -> None:
        _end(self.proc)
        self._log.close()


class MosquittoServer:
    """Debian's broker with a configuration written here, plus a QoS 1 subscriber that counts
    what it delivers."""

    name = "mosquitto"

    def __init__(
        self,
        host: str,
        workdir: Path,
        users: Sequence[tuple[str, str]],
        binary: str,
    ) -> None:
        self.proc: subprocess.Popen[Any] | None = None
        self.sub: subprocess.Popen[Any] | None = None
        self._logs: list[Any] = []
        self.port = _free_port(host)
        passwd = workdir / "mosquitto.passwd"
        tool = shutil.which("mosquitto_passwd")
        if tool is not None:
            passwd.touch()
            for username, password in users:
                subprocess.run(
                    [tool, "-b", str(passwd), username, password],
                    check=True,
                    capture_output=True,
                    timeout=20,
                )
            auth = f"allow_anonymous false\npassword_file {passwd}\n"
        else:
            # Without the tool, run anonymous: authentication is not what is being compared.
            auth = "allow_anonymous true\n"
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {host}\n"
            + auth
            + f"max_keepalive {MAX_KEEPALIVE}\n"
            + "persistence false\n"
            # Unlimited queue for the one subscriber, so that a burst cannot make Mosquitto
            # drop telemetry that this benchmark would then count as lost.
            + "max_queued_messages 0\n"
            # Run as the user that started it (root here): the files above are private to it.
            + "user root\n"
            # Same log volume as the gateways: problems only, not one line per connection.
            + "log_dest stderr\nlog_type error\nlog_type warning\n"
        )
        log = open(workdir / "mosquitto.log", "w")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
        self.pid = self.proc.pid
        try:
            _wait_listening(host, self.port, self.proc, 10.0)
            self._start_subscriber(host, users[0], workdir)
        except BaseException:
            self.stop()
            raise

    def _start_subscriber(self, host: str, user: tuple[str, str], workdir: Path) -> None:
        self.sub_out = workdir / "mosquitto-sub.txt"
        out = open(self.sub_out, "w")  # noqa: SIM115 - closed in stop()
        self._logs.append(out)
        base = ["-h", host, "-p", str(self.port), "-u", user[0], "-P", user[1]]
        self.sub = subprocess.Popen(
            ["mosquitto_sub", *base, "-i", "churn-counter", "-q", "1", "-k", "30"]
            + ["-t", "telemetry/#", "-F", "%q %t"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        # A probe message proves the subscription is in place before any device publishes.
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            subprocess.run(
                ["mosquitto_pub", *base, "-i", "churn-probe", "-q", "1"]
                + ["-t", "telemetry/probe", "-m", "probe"],
                capture_output=True,
                timeout=10,
                check=False,
            )
            time.sleep(0.2)
            if "telemetry/probe" in self.sub_out.read_text():
                return
        raise RuntimeError("mosquitto_sub did not receive the probe message")

    def _received(self) -> int:
        with open(self.sub_out) as f:
            return sum(1 for _ in f)

    def before_stop(self) -> None:
        # Let the subscriber drain what Mosquitto still queues for it.
        last, deadline = -1, time.monotonic() + 15.0
        while time.monotonic() < deadline:
            now = self._received()
            if now == last:
                break
            last = now
            time.sleep(1.0)

    def stored_qos1(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        with open(self.sub_out) as f:
            for line in f:
                qos, _, topic = line.strip().partition(" ")
                if qos == "1" and topic.startswith("telemetry/"):
                    cid = topic[len("telemetry/") :]
                    counts[cid] = counts.get(cid, 0) + 1
        return counts

    def stop(self) -> None:
        _end(self.sub)
        _end(self.proc)
        for f in self._logs:
            f.close()


# ----------------------------------------------------------------------------------------------
# Watching the server's side: the kernel's table, polled.


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


# ----------------------------------------------------------------------------------------------
# One system, one run.


def _quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def run_system(
    system: str,
    plan: Plan,
    *,
    host: str,
    cells: Sequence[Any],
    workdir: Path,
    users: Sequence[tuple[str, str]],
    users_path: Path,
    bound: float,
    settle_after_s: float,
    mosquitto: str | None,
    log: Any,
) -> dict[str, Any]:
    """Start ``system``, run the fleet and the churn against it, measure, stop everything."""
    profile = DeviceProfile(
        keepalive=plan.keepalive,
        telemetry_interval=plan.telemetry_interval,
        qos1_fraction=plan.qos1_fraction,
        reboot_rate=plan.reboots_per_s * 60.0 / plan.devices,
        loss_rate=plan.losses_per_s * 60.0 / plan.devices,
        # A lost device must stay away until the slowest server has had to reap it; if it came
        # back sooner its return would take the old connection over and hide the detection.
        loss_offline=settle_after_s + 2.0,
    )
    server: Any = None
    fleet: Fleet | None = None
    watcher: Watcher | None = None
    sampler: Sampler | None = None
    try:
        if system == "keepconn":
            server = KeepconnServer(host, workdir, users_path)
        elif system == "naive":
            server = NaiveServer(host, workdir, users_path)
        else:
            assert mosquitto is not None
            server = MosquittoServer(host, workdir, users, mosquitto)
        log(f"[{system}] pid {server.pid} listening on {host}:{server.port}")
        watcher = Watcher(host, server.port, plan.poll_s)
        sampler = Sampler(server.pid)
        fleet = Fleet(
            devices=plan.devices,
            host=host,
            port=server.port,
            users=users,
            profile=profile,
            cells=cells,
            per_worker=plan.per_worker,
            ramp=plan.ramp_s,
            id_prefix="dev",
            on_event=watcher.on_event,
        )
        watcher.start()
        fleet.start()
        started = time.monotonic()
        # Ramp: everyone online (bounded; a straggler is reported, not waited for forever).
        deadline = started + plan.ramp_s + 30.0
        while time.monotonic() < deadline and fleet.totals().get("online", 0) < plan.devices:
            if not fleet.alive():
                raise RuntimeError("a fleet worker died during the ramp")
            time.sleep(0.25)
        online_after_ramp = fleet.totals().get("online", 0)
        ramp_s = time.monotonic() - started
        log(f"[{system}] {online_after_ramp}/{plan.devices} online after {ramp_s:.1f} s")

        churn_start = time.monotonic()
        fleet.command("churn")
        burst_done = False
        while (elapsed := time.monotonic() - churn_start) < plan.churn_s:
            if not burst_done and elapsed >= plan.burst_at_s:
                # Half reboots (a burst of takeovers), half losses (a burst of reaping).
                per_worker = max(1, plan.burst // 2 // max(1, plan.workers))
                fleet.command(f"burst {per_worker} reboot")
                fleet.command(f"burst {per_worker} loss")
                burst_done = True
                burst_t = time.monotonic()
            time.sleep(0.25)
        fleet.command("calm")
        calm_t = time.monotonic()
        settle_t = calm_t + settle_after_s
        end_t = settle_t + plan.settle_window_s
        live = sys.stdout.isatty()  # a progress line only for a human, not into a log
        while (now := time.monotonic()) < end_t:
            if live:
                t = fleet.totals()
                print(
                    f"\r[{system}] settling {end_t - now:5.1f} s: online {t.get('online', 0)}, "
                    f"dark {t.get('dark', 0)}   ",
                    end="",
                    flush=True,
                )
            time.sleep(0.5)
        if live:
            print(flush=True)
        cpu_s = sampler.finish()
        totals = fleet.totals()
        watcher.stop()
        undetected = watcher.undetected("loss")
        summary = fleet.finish(timeout=30.0)
        server.before_stop()
        server.stop()
        stored = server.stored_qos1()
    finally:
        if fleet is not None:
            fleet.kill()
        if watcher is not None:
            watcher.stop()
        if server is not None:
            server.stop()

    losses = [d for d in watcher.detected if d[0] == "loss"]
    # A lost device whose socket is still ESTABLISHED at the end was not detected: it counts
    # with the time it had been gone, a lower bound, so percentiles are never flattered.
    detect = [d[2] for d in losses] + [age for _, age in undetected]
    reboots_closed = [d[2] for d in watcher.detected if d[0] == "reboot"]
    timeline = [
        {
            "t": round(t - churn_start, 2),
            "established": est,
            "close_wait": cw,
            "phantoms": ph,
        }
        for t, est, cw, ph in watcher.timeline
    ]
    after_settle = [row["phantoms"] for row in timeline if row["t"] >= settle_t - churn_start]
    # The connections the server actually held when the churn began (a server too slow to admit
    # the whole fleet within the ramp is measured, and its per-connection figures divided, at
    # what it really held).
    connections = online_after_ramp
    lost = 0
    acked = 0
    for record in summary["per_device"]:
        acked += record["acked"]
        lost += max(0, record["acked"] - stored.get(record["id"], 0))
    takeover = [x for r in summary["per_device"] for x in r["takeover_ms"]]
    result = {
        "system": system,
        "connections": connections,
        "detect_p50_s": _round(_quantile(detect, 0.50), 3),
        "detect_p99_s": _round(_quantile(detect, 0.99), 3),
        "detect_max_s": _round(max(detect) if detect else None, 3),
        "bound_s": round(bound, 3),
        "phantom_established_max_after_settle": max(after_settle) if after_settle else None,
        "close_wait_max": max((row["close_wait"] for row in timeline), default=0),
        "takeover_p99_ms": _round(_quantile(takeover, 0.99), 1),
        "cpu_s": round(cpu_s, 2),
        "rss_mb_per_1k": round(
            (sampler.rss_peak - sampler.rss0) / 2**20 / max(1, connections) * 1000, 2
        ),
        "lost_messages": lost,
    }
    details = {
        "result": result,
        "online_after_ramp": online_after_ramp,
        "ramp_s": round(ramp_s, 1),
        "online_at_settle_end": totals.get("online", 0),
        "losses_detected": len(losses),
        "losses_undetected": len(undetected),
        "detect_s": sorted(round(x, 3) for x in detect),
        "detect_mean_s": _round(statistics.fmean(detect), 3) if detect else None,
        "estimate_halfwidth_max_s": _round(max((d[3] for d in losses), default=0.0), 3),
        "reboot_old_socket_closed_p50_s": _round(_quantile(reboots_closed, 0.5), 3),
        "reboot_old_socket_closed_p99_s": _round(_quantile(reboots_closed, 0.99), 3),
        "reboots_old_socket_closed": len(reboots_closed),
        "vanish_reports": watcher.vanished,
        "census_s_p50": _round(_quantile(watcher.census_s, 0.5), 4),
        "census_s_max": _round(max(watcher.census_s, default=0.0), 4),
        "takeover_ms_p50": _round(_quantile(takeover, 0.5), 1),
        "takeovers": len(takeover),
        "qos1_acked": acked,
        "qos1_stored": sum(stored.values()),
        "rss0_mb": round(sampler.rss0 / 2**20, 1),
        "rss_peak_mb": round(sampler.rss_peak / 2**20, 1),
        "burst_at_s": round(burst_t - churn_start, 2) if burst_done else None,
        "calm_at_s": round(calm_t - churn_start, 2),
        "settle_at_s": round(settle_t - churn_start, 2),
        "fleet": {k: v for k, v in summary.items() if k != "per_device"},
        "timeline": timeline,
    }
    return details


# ----------------------------------------------------------------------------------------------
# Output.


def print_table(results: Sequence[dict[str, Any]], details: dict[str, Any], plan: Plan) -> None:
    """The terminal table: one row per system."""
    head = (
        f"{'system':<10} {'conns':>6} {'det p50':>8} {'det p99':>8} {'det max':>8} {'bound':>6} "
        f"{'undet':>5} {'phantom':>7} {'CL_WAIT':>7} {'tkov p99':>9} {'cpu s':>7} "
        f"{'MB/1k':>6} {'lost':>5}"
    )
    print()
    print(
        f"churn: {plan.devices} devices, keepalive {plan.keepalive} s, "
        f"{plan.reboots_per_s:g} reboots/s + {plan.losses_per_s:g} losses/s "
        f"for {plan.churn_s:g} s, "
        f"burst of {plan.burst} at {plan.burst_at_s:g} s; census every {plan.poll_s:g} s"
    )
    print(head)
    print("-" * len(head))

    def cell(value: Any, width: int, fmt: str = "") -> str:
        return f"{'-' if value is None else format(value, fmt):>{width}}"

    for r in results:
        d = details[r["system"]]
        print(
            f"{r['system']:<10} {r['connections']:>6} {cell(r['detect_p50_s'], 8, '.2f')} "
            f"{cell(r['detect_p99_s'], 8, '.2f')} {cell(r['detect_max_s'], 8, '.2f')} "
            f"{r['bound_s']:>6.1f} {d['losses_undetected']:>5} "
            f"{cell(r['phantom_established_max_after_settle'], 7)} {r['close_wait_max']:>7} "
            f"{cell(r['takeover_p99_ms'], 9, '.1f')} {r['cpu_s']:>7.1f} "
            f"{r['rss_mb_per_1k']:>6.2f} {r['lost_messages']:>5}"
        )
    print(
        "det = seconds from a device's silence to its server socket leaving ESTABLISHED "
        "(lost devices; undet = never left); phantom = vanished devices' sockets still "
        "ESTABLISHED after the settle point; tkov = reconnect to CONNACK after a reboot (ms)"
    )


def plot(details: dict[str, Any], out_dir: Path) -> list[Path]:
    """Detection-latency distribution and phantoms over time, one PNG each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"keepconn": "tab:green", "mosquitto": "tab:blue", "naive": "tab:red"}
    paths = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for system, d in details.items():
        values = d["detect_s"]
        if not values:
            continue
        ys = [(i + 1) / len(values) for i in range(len(values))]
        ax.step(values, ys, where="post", color=colors[system], label=f"{system} (n={len(values)})")
        ax.axvline(d["result"]["bound_s"], color=colors[system], linestyle=":", linewidth=1)
    ax.set_xlabel("detection latency of a half-open peer (s); dotted: configured bound")
    ax.set_ylabel("fraction of lost devices")
    ax.set_title("Half-open peers: silence to server close (CDF)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / "churn-detection.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for system, d in details.items():
        xs = [row["t"] for row in d["timeline"]]
        top.plot(xs, [row["phantoms"] for row in d["timeline"]], color=colors[system], label=system)
        bottom.plot(
            xs, [row["close_wait"] for row in d["timeline"]], color=colors[system], label=system
        )
        top.axvline(d["settle_at_s"], color=colors[system], linestyle=":", linewidth=1)
    any_d = next(iter(details.values()))
    for ax in (top, bottom):
        ax.axvline(any_d["calm_at_s"], color="grey", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
    top.set_ylabel("phantom ESTABLISHED")
    top.set_title("Server sockets of vanished devices (dashed: churn stops; dotted: settle point)")
    top.legend()
    bottom.set_ylabel("CLOSE_WAIT")
    # A flat zero line should read as zero, not as matplotlib's +/-0.05 default range.
    bottom.set_ylim(bottom=-0.5, top=max(5.0, bottom.get_ylim()[1]))
    bottom.set_xlabel("seconds since the churn started")
    fig.tight_layout()
    path = out_dir / "churn-phantoms.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# Main.


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    # A SIGTERM (a time limit, a CI cancel) must still run every finally: below, so that no
    # server, worker or namespace outlives the benchmark.
    def raise_exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small fleet, short keepalive (tests)")
    p.add_argument("--json", type=Path, help="write the summary (issue 7's shape) here")
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="comma-separated subset of keepconn,mosquitto,naive",
    )
    p.add_argument("--devices", type=int, help="override the fleet size")
    p.add_argument("--no-netns", action="store_true", help="loopback only, even as root")
    p.add_argument("--out", type=Path, default=OUT, help="directory for PNGs and details")
    args = p.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown or not args.systems:
        p.error(f"--systems takes {', '.join(SYSTEMS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.devices:
        plan = attrs.evolve(plan, devices=args.devices)
    mosquitto = mosquitto_binary()
    if "mosquitto" in args.systems and mosquitto is None:
        print("churn: the mosquitto broker is not installed (make setup installs it)")
        return 2
    mosq_resolution, mosq_version = (
        mosquitto_resolution(mosquitto) if mosquitto else (MOSQUITTO_RESOLUTION, "absent")
    )
    reason = "--no-netns given" if args.no_netns else netns_reason()
    if reason:
        print(f"churn: loopback only ({reason}): a dead device is hung, not truly half-open")
    bounds = {s: bound_for(s, plan.keepalive, mosq_resolution) for s in args.systems}
    # Same timeline for every system: the settle point comes after the slowest bound.
    settle_after = max(bounds.values()) + 2.0
    started = time.monotonic()

    def log(text: str) -> None:
        print(f"{time.monotonic() - started:6.1f}s {text}", flush=True)

    log(
        f"plan: {plan.devices} devices in {plan.workers} worker(s), keepalive {plan.keepalive} s,"
        f" mosquitto {mosq_version}; bounds " + ", ".join(f"{s} {b:g} s" for s, b in bounds.items())
    )
    args.out.mkdir(parents=True, exist_ok=True)
    namespaces: list[Any] = []
    details: dict[str, Any] = {}
    with _sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="keepconn-churn-") as tmp:
        workdir = Path(tmp)
        try:
            cells: list[Any] = []
            host = "127.0.0.1"
            if reason is None:
                namespaces, cells = make_cells(plan.workers)
                host = cells[0].host_addr
                log(f"cells: {', '.join(c.name for c in cells)}; servers on {host}")
            users_path = workdir / "users.txt"
            users = write_users(users_path)
            for system in args.systems:
                details[system] = run_system(
                    system,
                    plan,
                    host=host,
                    cells=cells,
                    workdir=workdir,
                    users=users,
                    users_path=users_path,
                    bound=bounds[system],
                    settle_after_s=settle_after,
                    mosquitto=mosquitto,
                    log=log,
                )
                r = details[system]["result"]
                log(
                    f"[{system}] detect p99 {r['detect_p99_s']} s (bound {r['bound_s']} s), "
                    f"phantoms after settle {r['phantom_established_max_after_settle']}"
                )
        finally:
            for ns in namespaces:
                ns.close()
    results = [details[s]["result"] for s in args.systems]
    print_table(results, details, plan)
    meta = {
        "plan": attrs.asdict(plan),
        "quick": args.quick,
        "mode": "loopback" if reason else "netns",
        "loopback_reason": reason,
        "mosquitto_version": mosq_version,
        "command": " ".join(["benchmarks/churn.py", *(argv or sys.argv[1:])]),
        "seconds": round(time.monotonic() - started, 1),
    }
    (args.out / "churn-details.json").write_text(json.dumps({**meta, "systems": details}))
    for path in plot(details, args.out):
        log(f"wrote {path}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results}, indent=1) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

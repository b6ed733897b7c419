"""One run of the storm benchmark: a server with its client policy (a :class:`Contender`), a
probe and a fleet; the cut; the measurements, and the figures they give (times from the cut).
"""

from __future__ import annotations

import secrets
import shlex
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import psutil

from device_gateway.devcerts import make_dev_pki
from device_gateway.gateway_process import write_users_file
from harness import quantile, round_or_none
from keepconn.tcp import census
from storm_drops import classify
from storm_processes import Fleet, Probe, Server, StatusPoller

#: Devices per worker process: old plus new connections of each stay far below 20,000.
PER_WORKER = 4000
SAMPLE = 0.5
#: The naive gateway's sweep interval (its default), part of the settle time.
NAIVE_SWEEP = 5.0
TIMEOUT_REASONS = ("IDLE_TIMEOUT", "HEARTBEAT_TIMEOUT", "KEEPALIVE_TIMEOUT")
#: The devices' source addresses (127.0.1.x, see storm.py): how the census tells their
#: connections from anything else on the shared loopback.
DEVICES = "127.0.1."


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
    #: Devices (and the probe) speak MQTT over TLS to a server with a throwaway certificate.
    tls: bool = False


#: The kernel's TCP counters (/proc/net/netstat, machine-wide) that say how the listen queue
#: fared: full accept queues, SYN cookies, and data that reached a socket its owner had closed.
NETSTAT_KEYS = (
    "ListenOverflows",
    "ListenDrops",
    "SyncookiesSent",
    "SyncookiesRecv",
    "SyncookiesFailed",
    "TCPAbortOnData",
    "TCPReqQFullDoCookies",
    "TCPReqQFullDrop",
)


def netstat() -> dict[str, int]:
    """The NETSTAT_KEYS counters now (empty where /proc/net/netstat cannot be read)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    found: dict[str, int] = {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        for name, value in zip(names.split()[1:], values.split()[1:], strict=False):
            if name in NETSTAT_KEYS:
                found[name] = int(value)
    return found


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
    # Hashed for the keepconn gateway (which refuses clear text); the naive gateway compares
    # clear text, as such a gateway does.
    write_users_file(users, [user], hashed=contender.server == "gateway")
    server: Server | None = None
    probe: Probe | None = None
    fleet: Fleet | None = None
    poller: StatusPoller | None = None
    samples: list[dict[str, Any]] = []
    marks: dict[str, float] = {}
    notes: list[str] = []
    # One throwaway CA and server certificate per run (openssl: about 0.1 s).
    pki = make_dev_pki(workdir / f"{contender.name}-pki") if params.tls else None
    ca = None if pki is None else str(pki.ca)
    try:
        server = Server(contender, users, workdir, pki)
        port = server.port
        assert port is not None
        where = f"pid {server.proc.pid}, port {port}"
        log(f"[{contender.name}] {shlex.join(server.argv[1:])} ({where})")
        probe = Probe(port, user, ca)
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
            "tls": None if ca is None else {"ca": ca},
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
                # Only the server's end of the devices' connections: a device socket whose
                # ephemeral port happens to equal the server's port has the same local port but
                # a 127.0.1.x address, and so may another program's client on 127.0.0.1 (the
                # machine is shared), whose remote end is not a device's 127.0.1.x. The probe
                # (from 127.0.0.1) is left out with them.
                census_started = time.monotonic()
                found: Counter[str] = Counter()
                for sock in census(port).sockets:
                    if sock.local_address == "127.0.0.1" and sock.remote_address.startswith(
                        DEVICES
                    ):
                        found[sock.state] += 1
                        # Inode 0: still in the listen queue, not accepted by the server yet
                        # (a socket the server accepted has one until it closes it).
                        found[sock.state + "/unaccepted"] += sock.inode == 0
                last_census = {
                    "established": found["ESTABLISHED"],
                    "close_wait": found["CLOSE_WAIT"],
                    "close_wait_unaccepted": found["CLOSE_WAIT/unaccepted"],
                }
                row["census_ms"] = 1000.0 * (time.monotonic() - census_started)
                next_census = now + 1.0
                row.update(last_census)
                # Everything ESTABLISHED that no device holds as live or connecting: an old
                # connection the server never let go of.
                held = row.get("online", 0) + row.get("awaiting", 0)
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
        kernel_before = netstat()
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
        kernel_after = netstat()
        notes_kernel = {k: kernel_after[k] - kernel_before.get(k, 0) for k in kernel_after}
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
    trace = server.trace()
    if contender.server == "gateway" and trace is None:
        notes.append("the gateway left no session trace: drops cannot be classified")
    if final_status is None and poller.samples:
        # A server out of descriptors cannot accept its status connection either: use the last
        # answer it gave.
        notes.append("the final /status failed; figures use the last one that answered")
        final_status = poller.samples[-1][1]
    return summarise(
        contender,
        params,
        marks,
        samples,
        poller.samples,
        final_status,
        finals,
        probe_data,
        notes,
        trace,
        notes_kernel,
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
    trace: dict[str, Any] | None = None,
    kernel: dict[str, int] | None = None,
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
    # Connections the devices completed (under TLS: handshakes), per second.
    made_rates = _rates([(r["t"], float(r.get("handshakes", 0))) for r in samples])
    storm_made = [r for t, r in made_rates if cut <= t <= storm_end + 1.0]
    drops = classify([d for f in finals for d in f.get("drops", [])], trace, params.keepalive, cut)
    worker_lags = [f["lag"] for f in finals if "lag" in f]

    cpu_in_storm = None
    if len(in_storm) >= 2 and "cpu_s" in in_storm[0] and "cpu_s" in in_storm[-1]:
        cpu_in_storm = in_storm[-1]["cpu_s"] - in_storm[0]["cpu_s"]

    server_timeouts = None
    audited: dict[str, int] = (final_status or {}).get("audit") or {}
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
        "back_p50_s": round_or_none(quantile(back_after, 0.5)),
        "back_p99_s": round_or_none(quantile(back_after, 0.99)),
        "accept_rate_peak": round_or_none(max(storm_accepts, default=None)),
        "accept_rate_mean": round_or_none(
            statistics.fmean(storm_accepts) if storm_accepts else None
        ),
        "lag_p50_ms": ms(quantile(lag_values, 0.5)),
        "lag_p99_ms": ms(quantile(lag_values, 0.99)),
        "lag_max_ms": ms(max(lag_values, default=None)),
        "lag_samples": len(lag_values),
        "lag_before_cut_p50_ms": ms(quantile(before, 0.5)),
        "probe_lost": bool(probe.get("lost")),
        "cpu_s_in_storm": round_or_none(cpu_in_storm),
        "cpu_pct_peak": round_or_none(max((r.get("cpu_pct", 0.0) for r in samples), default=None)),
        "rss_peak_mb": round_or_none(max((r.get("rss", 0) for r in samples), default=0) / 2**20),
        "rss_end_mb": round_or_none(samples[-1].get("rss", 0) / 2**20) if samples else None,
        "fds_peak": max((r.get("fds", 0) for r in samples), default=0),
        # What one read of the kernel's table costs (here, in the coordinator) at this size.
        "census_ms_max": round_or_none(
            max((r.get("census_ms", 0.0) for r in census_rows), default=None)
        ),
        # Sessions the server closed under a device that had not walked away from them, and of
        # those the ones the device's own evidence does not excuse (storm_drops.py).
        "sessions_dropped": sum(f["live_drops"] for f in finals),
        "false_reaps": drops["false_reaps"],
        "device_stalled": drops["device_stalled"],
        "device_lag_p99_ms": ms(max((w["p99"] or 0.0 for w in worker_lags), default=None)),
        "device_lag_max_ms": ms(max((w["max"] or 0.0 for w in worker_lags), default=None)),
        "device_stalls": sum(len(w["stalls"]) for w in worker_lags),
        "tls": params.tls,
        "handshake_rate_peak": round_or_none(max(storm_made, default=None)),
        "overloaded_closes": (final_status or {}).get("closed", {}).get("OVERLOADED"),
        "retry_hints": None if trace is None else trace["retry_hints"]["count"],
        "admission_refused": None if trace is None else trace.get("admission"),
        "server_timeout_closes": server_timeouts,
        # Settled phantoms. The device-side estimate (the kernel's ESTABLISHED count less the
        # devices' live and connecting sessions) cannot tell a true phantom from a socket the
        # server holds in its hello phase for an attempt its device already abandoned (a late
        # handshake that is closed at the hello timeout). A keepconn gateway's own audit can:
        # it matches every socket by inode, so its figure is used where it exists.
        "phantom_established_end": audited.get("phantoms", last.get("phantom_established")),
        "in_hello_end": audited.get("in_hello"),
        "unowned_established_end": last.get("phantom_established"),
        "close_wait_end": last.get("close_wait"),
        "close_wait_unaccepted_end": last.get("close_wait_unaccepted"),
        "old_connections_open_end": samples[-1].get("abandoned_open") if samples else None,
        # Devices whose new session was up within 1.5 x keepalive of the last packet they sent
        # on the connection they left: no keepalive sweep could have closed that one before
        # the new CONNECT replaced it, so a gateway that leaves a replaced connection open
        # (the naive one) still holds at least these at the end.
        "replaced_before_timeout": sum(
            1 for f in finals for idle in f["back_idle"] if idle < 1.5 * params.keepalive
        ),
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
        "cpu_pct": [round_or_none(r.get("cpu_pct")) for r in samples],
        "rss_mb": [round_or_none(r.get("rss", 0) / 2**20) for r in samples],
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
        "drops": drops["drops"],
        # Machine-wide kernel counters from the cut to the end of settling (other processes'
        # sockets count too): how the listen queue fared.
        "kernel_tcp": kernel or {},
        "worker_lag": worker_lags,
        "final_status": _brief_status(final_status),
        "notes": notes,
        "timeline": timeline,
        # What stalled the gateway's loop (storm_wrap.py), from its ramp to its exit: its
        # cyclic-GC collections of 5 ms or more [t, seconds, generation] and its status
        # snapshots [t, seconds], t relative to the cut.
        "server_pauses": _pauses(trace, cut),
    }


def _pauses(trace: dict[str, Any] | None, cut: float) -> dict[str, list[list[float]]] | None:
    if trace is None or "collections" not in trace:
        return None
    return {
        "collections": [[round(t - cut, 3), d, g] for t, d, g in trace["collections"]],
        "snapshots": [[round(t - cut, 3), d] for t, d in trace["snapshots"]],
    }


def _brief_status(status: dict[str, Any] | None) -> dict[str, Any] | None:
    if status is None:
        return None
    keep = ("sessions", "connections", "accepted", "takeovers", "closed", "swept", "phantoms")
    return {k: status[k] for k in keep if k in status}

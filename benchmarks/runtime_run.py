"""One contender of the runtime benchmark: its phases, and the figures they give.

* **sizes** (every server): a fresh server; the clients grow to N1 idle connections, settle,
  and the server is sampled; they grow to N2, settle, and it is sampled again; after one more
  settle (a sample's collections stall the loop, and the pings sent meanwhile queue up), a
  window of steady pinging at N2 (server CPU over the window, pings answered, the loop-lag
  probe's samples of that window, and the clients' ping round trips).
* **takeover** (MQTT servers): another fresh server; ``takeover_devices`` connect and settle;
  then ``reboots`` of them reboot at ``reboot_rate`` per second in all, interleaved across
  the client processes on one clock: each old connection falls silent and stays open, and a
  new connection with the same client id sends CONNECT; CONNECT -> CONNACK is timed.

A sample of a Python server comes from inside it (runtime_probe: RSS, tracked objects after a
collection, the time of a full collection); Mosquitto's is its RSS from psutil.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from harness import quantile, round_or_none
from runtime_servers import Account, Clients, Contender, ServerProcess

Log = Callable[[str], None]


@attrs.frozen
class Params:
    n1: int
    n2: int
    takeover_devices: int
    reboots: int
    reboot_rate: float
    interval: float
    keepalive: int
    window: float
    settle: float
    rate: float
    processes: int
    connect_timeout: float
    seed: int


def _spec(c: Contender, port: int, p: Params, account: Account, prefix: str) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "proto": c.proto,
        "interval": p.interval,
        "keepalive": p.keepalive,
        "user": list(account.user),
        "rate": p.rate,
        "seed": p.seed,
        "connect_timeout": p.connect_timeout,
        "prefix": prefix,
    }


def _grow_timeout(n: int, p: Params) -> float:
    # The ramp itself, every retry of a device, and slack for a slow accept loop.
    return n / p.rate + 5 * (p.connect_timeout + 1.0) + 60.0


def _wait(seconds: float, server: ServerProcess) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.contender.name} exited ({server.proc.returncode})")
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def _up(answers: list[dict[str, Any]]) -> int:
    return sum(int(a["up"]) for a in answers)


def _sample(server: ServerProcess) -> dict[str, Any]:
    if not server.contender.python:
        return {"rss": server.rss(), "objects": None, "frozen": None, "gc_ms": None}
    answer = server.ask("sample")
    return {
        "rss": answer["rss"],
        "rss_psutil": server.rss(),
        "objects": answer["objects"],
        "frozen": answer["frozen"],
        "gc_ms": answer["gc_ms"],
    }


def sizes(c: Contender, p: Params, workdir: Path, account: Account, log: Log) -> dict[str, Any]:
    """The sizes phase (see the module docstring): samples at N1 and N2, the N2 window."""
    notes: list[str] = []
    server = ServerProcess(c, workdir, account, "sizes")
    clients: Clients | None = None
    try:
        log(f"[{c.name}] pid {server.proc.pid}, port {server.port}: {' '.join(server.argv[1:])}")
        clients = Clients(_spec(c, server.port, p, account, "rt"), p.n2, p.processes)
        samples: dict[str, dict[str, Any]] = {}
        for label, n in (("n1", p.n1), ("n2", p.n2)):
            started = time.monotonic()
            answers = clients.grow(n, _grow_timeout(n, p))
            up = _up(answers)
            if up != n:
                notes.append(f"{up} of {n} connections up at {label}")
            log(f"[{c.name}] {up} connections up in {time.monotonic() - started:.1f} s")
            _wait(p.settle, server)
            samples[label] = {"connections": up, **_sample(server)}
        # A sample stalls the server for its collections (seconds at N2 for the gateway) and
        # the pings sent meanwhile queue up: the window starts once that backlog is answered
        # and the stalled sleep has been recorded, so it measures steady pinging only.
        _wait(p.settle, server)
        if c.python:
            server.ask("lag-reset")
        for i in range(len(clients.procs)):
            clients.send(i, {"cmd": "mark"})
        clients.collect("marked", 30.0)
        cpu0, t0 = server.cpu(), time.monotonic()
        _wait(p.window, server)
        cpu1, t1 = server.cpu(), time.monotonic()
        for i in range(len(clients.procs)):
            clients.send(i, {"cmd": "count"})
        counts = clients.collect("count", 60.0)
        lag = server.ask("lag")["lag"] if c.python else None
        lost = sum(int(a["lost"]) for a in counts)
        if lost:
            notes.append(f"{lost} connections closed by the server while idle")
    finally:
        if clients is not None:
            clients.stop()
        code = server.stop()
    log(f"[{c.name}] sizes done (server exit code {code})")
    replies = sum(int(a["replies"]) for a in counts)
    rtt = [r for a in counts for r in a["rtt_ms"]]
    window = {
        "seconds": round(t1 - t0, 3),
        "cpu_s": round(cpu1 - cpu0, 4),
        "pings_sent": sum(int(a["pings"]) for a in counts),
        "pings_answered": replies,
        "connections_end": _up(counts),
        "rtt_n": len(rtt),
        "rtt_p50_ms": quantile(rtt, 0.5),
        "rtt_p99_ms": quantile(rtt, 0.99),
        "rtt_max_ms": max(rtt, default=None),
        "lag": lag,
    }
    return {"samples": samples, "window": window, "notes": notes}


def takeover(c: Contender, p: Params, workdir: Path, account: Account, log: Log) -> dict[str, Any]:
    """The takeover phase: CONNECT -> CONNACK of rebooted devices over a connected fleet."""
    notes: list[str] = []
    server = ServerProcess(c, workdir, account, "takeover")
    clients: Clients | None = None
    try:
        log(f"[{c.name}] takeover: pid {server.proc.pid}, port {server.port}")
        n = p.takeover_devices
        clients = Clients(_spec(c, server.port, p, account, "tk"), n, p.processes)
        up = _up(clients.grow(n, _grow_timeout(n, p)))
        if up != n:
            notes.append(f"{up} of {n} devices up before the reboots")
        _wait(p.settle, server)
        procs = len(clients.procs)
        # The j-th reboot of the whole fleet is due at start + j / rate; process i takes every
        # procs-th one from j = i, so together they keep the rate on one schedule.
        start = time.monotonic() + 1.0
        step = procs / p.reboot_rate
        for i in range(procs):
            count = len(range(i, p.reboots, procs))
            at = start + i / p.reboot_rate
            clients.send(i, {"cmd": "reboot", "count": count, "at": at, "step": step})
        limit = p.reboots / p.reboot_rate + 2 * p.connect_timeout + 30.0
        log(f"[{c.name}] {up} devices up; {p.reboots} reboots at {p.reboot_rate:g}/s")
        answers = clients.collect("rebooted", limit)
        cpu = server.cpu()
    finally:
        if clients is not None:
            clients.stop()
        code = server.stop()
    log(f"[{c.name}] takeover done (server exit code {code})")
    connack = [x for a in answers for x in a["connack_ms"]]
    connect = [x for a in answers for x in a["connect_ms"]]
    failed = sum(int(a["failed"]) for a in answers)
    if failed:
        notes.append(f"{failed} of {p.reboots} rebooted devices got no CONNACK 0")
    return {
        "devices": up,
        "reboots": p.reboots,
        "rate": p.reboot_rate,
        "connacks": len(connack),
        "failed": failed,
        "connack_p50_ms": quantile(connack, 0.5),
        "connack_p99_ms": quantile(connack, 0.99),
        "connack_max_ms": max(connack, default=None),
        "tcp_connect_p99_ms": quantile(connect, 0.99),
        "old_closed_by_server": sum(int(a["old_closed"]) for a in answers),
        "server_cpu_s_total": round(cpu, 3),
        "notes": notes,
    }


def _per_conn(a: float | None, b: float | None, n: int) -> float | None:
    if a is None or b is None or n <= 0:
        return None
    return round((b - a) / n, 1)


def figures(c: Contender, sized: dict[str, Any], took: dict[str, Any] | None) -> dict[str, Any]:
    """The row of the table: per-connection costs from N1 to N2, the window, the takeover."""
    s1, s2 = sized["samples"]["n1"], sized["samples"]["n2"]
    added = s2["connections"] - s1["connections"]
    window = sized["window"]
    answered = window["pings_answered"]
    lag = window["lag"] or {}
    cpu_per_1k = None
    if answered > 0:
        cpu_per_1k = round(window["cpu_s"] / (answered / 1000.0), 4)
    out: dict[str, Any] = {
        "n1": s1["connections"],
        "n2": s2["connections"],
        "rss_per_conn": _per_conn(s1["rss"], s2["rss"], added),
        "objects_per_conn": _per_conn(s1["objects"], s2["objects"], added),
        "cpu_s_per_1k_pings": cpu_per_1k,
        "gc_ms_n2": s2["gc_ms"],
        # Of the objects at N2, those frozen (GcPacing.freeze): counted above, walked by no
        # collection, so not in gc_ms_n2.
        "frozen_n2": s2["frozen"],
        "rss_n2_mb": round(s2["rss"] / 2**20, 1),
        "lag_p50_ms": lag.get("p50_ms"),
        "lag_p99_ms": lag.get("p99_ms"),
        "lag_max_ms": lag.get("max_ms"),
        "lag_samples": lag.get("n"),
        # Where the table's lag column comes from: the probe on the server's loop, or (for a
        # server with no probe) the clients' PING round trips.
        "lag_source": "server_loop" if c.python else "client_rtt",
        "rtt_p50_ms": round_or_none(window["rtt_p50_ms"], 3),
        "rtt_p99_ms": round_or_none(window["rtt_p99_ms"], 3),
        "pings_answered": answered,
        "window_s": window["seconds"],
    }
    if took is not None:
        out.update(
            {
                "takeover_devices": took["devices"],
                "takeover_reboots": took["reboots"],
                "takeover_connack_p50_ms": round_or_none(took["connack_p50_ms"], 2),
                "takeover_connack_p99_ms": round_or_none(took["connack_p99_ms"], 2),
                "takeover_connack_max_ms": round_or_none(took["connack_max_ms"], 2),
                "takeover_failed": took["failed"],
                "takeover_old_closed": took["old_closed_by_server"],
            }
        )
    return out


def run_one(c: Contender, p: Params, workdir: Path, account: Account, log: Log) -> dict[str, Any]:
    """Every phase of one contender, and its result record."""
    sized = sizes(c, p, workdir, account, log)
    took = takeover(c, p, workdir, account, log) if c.proto == "mqtt" else None
    notes = sized["notes"] + (took["notes"] if took else [])
    return {
        "name": c.name,
        "label": c.label,
        "program": c.program,
        "protocol": c.proto,
        "python": c.python,
        "figures": figures(c, sized, took),
        "samples": sized["samples"],
        "window": sized["window"],
        "takeover": took,
        "notes": notes,
    }

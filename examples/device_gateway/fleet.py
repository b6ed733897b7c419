"""A device-fleet simulator: thousands of MQTT devices that heartbeat, send telemetry, reboot,
vanish half-open and reconnect in storms, aimed at the example gateway.

Run it standalone against a gateway it starts itself (``--spawn-gateway``) or one already
listening on loopback (``--host``/``--port``, with ``--users`` the devices' credentials in clear
text, ``username:password`` a line: the gateway's own file holds only hashes);
``examples/demo.py`` drives it with a live view. ``--tls`` makes every device speak MQTT over
TLS: a spawned gateway gets throwaway certificates (:mod:`device_gateway.devcerts`), an external
one is checked against ``--tls-ca`` (default: the system's CAs) and ``--tls-hostname``.

How a device dies: as root, devices live in network-namespace *cells*, so a reboot, a loss or a
storm leaves a truly half-open connection on the server; without root (or with ``--no-netns``)
they use loopback, where a dropped connection is only hung (the kernel still ACKs), and the
simulator says so when it starts. :mod:`device_gateway.fleet_cells` explains how, and why this is
honest.

Modules: this one is the coordinator (:class:`Fleet`) and the command line;
:mod:`~device_gateway.fleet_device` is one device, :mod:`~device_gateway.fleet_worker` the worker
process, :mod:`~device_gateway.fleet_cells` the namespaces and
:mod:`~device_gateway.gateway_process` the gateway run as a subprocess.

Processes: one worker holds at most ``--per-worker`` devices (default 4000; the hard limit is
20,000 descriptors per process and abandoned sockets also hold one each). Workers report JSON
lines on stdout (a tick every half second, then per-device records) and take commands on stdin
(``churn``, ``calm``, ``storm``, ``burst N FAULT``, ``quit``).

Vanish reports (opt-in, for benchmarks that time the server's side): with ``Fleet(on_event=...)``
every worker also reports each device connection the moment it has gone silent -- after the
blackhole rules are in place, or after the aborted socket of a storm -- as ``{"kind": "vanish",
"fault", "id", "addr", "port", "t"}``, where (addr, port) is the device's end of the 4-tuple as
the server sees it and ``t`` is ``time.monotonic()`` (one clock for every process on the host).

What it reports, per device and in aggregate: connect latency (TCP connect to CONNACK),
takeover latency (the same for a reconnect after a reboot or storm, while the old connection is
still half-open on the server), disconnects by reason, QoS 0/1 messages published and QoS 1
messages acknowledged, CONNACK refusals by return code.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from device_gateway.devcerts import make_dev_pki
from device_gateway.fleet_cells import Cell, make_cells, netns_reason
from device_gateway.fleet_device import DeviceProfile
from device_gateway.fleet_worker import DEFAULT_PER_WORKER, run_worker
from device_gateway.gateway_process import GatewayProcess, write_users

__all__ = [
    "Cell",
    "DeviceProfile",
    "Fleet",
    "GatewayProcess",
    "make_cells",
    "netns_reason",
    "write_users",
]


# ----------------------------------------------------------------------------------------------
# The coordinator: spawns workers, merges their reports, aggregates the summary.


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 1)

    return {
        "n": len(ordered),
        "p50": pick(0.50),
        "p95": pick(0.95),
        "max": round(ordered[-1], 1),
        "mean": round(statistics.fmean(ordered), 1),
    }


class _WorkerHandle:
    def __init__(
        self,
        proc: subprocess.Popen[str],
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.proc = proc
        self.on_event = on_event
        self.tick: dict[str, Any] = {}
        self.final: list[dict[str, Any]] | None = None
        self.done = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("kind") == "tick":
                self.tick = message
            elif message.get("kind") == "final":
                self.final = message["devices"]
            elif self.on_event is not None:
                self.on_event(message)
        self.done.set()

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass


class Fleet:
    """N devices spread over worker processes (one per cell when cells are given)."""

    def __init__(
        self,
        *,
        devices: int,
        host: str,
        port: int,
        users: Sequence[tuple[str, str]],
        profile: DeviceProfile,
        cells: Sequence[Cell] = (),
        per_worker: int = DEFAULT_PER_WORKER,
        ramp: float = 3.0,
        seed: int = 1,
        id_prefix: str = "dev",
        on_event: Callable[[dict[str, Any]], None] | None = None,
        tls: bool = False,
        tls_ca: Path | None = None,
        tls_hostname: str | None = None,
        endpoints: Sequence[tuple[str, int]] = (),
    ) -> None:
        """``endpoints`` (optional) are the (host, port) of every node of a gateway cluster:
        each device starts on one (spread by index) and reconnects to another after every
        reboot or storm; without them every device talks to ``host:port``.

        ``on_event`` (optional) is called, on a reader thread, with every worker message
        that is neither a tick nor the final report: the vanish reports (module doc).

        With ``tls`` devices connect over TLS, trusting ``tls_ca`` (None: the system's CAs)
        and expecting ``tls_hostname`` on the certificate (None: ``host``)."""
        self.devices = devices
        self._on_event = on_event
        self.cells = list(cells)
        self.mode = "netns" if self.cells else "loopback"
        workers = max(1, math.ceil(devices / per_worker))
        if self.cells and len(self.cells) < workers:
            raise ValueError(f"{devices} devices need {workers} cells, got {len(self.cells)}")
        workers = max(workers, len(self.cells))
        self._specs = []
        base, extra = divmod(devices, workers)
        first = 0
        for w in range(workers):
            count = base + (1 if w < extra else 0)
            self._specs.append(
                {
                    "host": host,
                    "port": port,
                    "endpoints": [list(e) for e in endpoints] or None,
                    "users": [list(u) for u in users],
                    "profile": attrs.asdict(profile),
                    "seed": seed * 7919 + w,
                    "ramp": ramp,
                    "id_prefix": id_prefix,
                    "first": first,
                    "count": count,
                    "cell": attrs.asdict(self.cells[w]) if self.cells else None,
                    "report_vanish": on_event is not None,
                    "tls": (
                        {"ca": None if tls_ca is None else str(tls_ca), "hostname": tls_hostname}
                        if tls
                        else None
                    ),
                }
            )
            first += count
        self._workers: list[_WorkerHandle] = []

    @staticmethod
    def workers_needed(devices: int, per_worker: int = DEFAULT_PER_WORKER) -> int:
        """How many worker processes (and cells) ``devices`` devices need."""
        return max(1, math.ceil(devices / per_worker))

    def start(self) -> None:
        """Spawn the workers; devices start connecting over the ramp."""
        for spec in self._specs:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                bufsize=1,
            )
            self._workers.append(_WorkerHandle(proc, self._on_event))

    def command(self, word: str) -> None:
        """Send ``churn``, ``calm``, ``storm``, ``burst N FAULT`` or ``quit`` to every worker
        (a burst's N is per worker)."""
        for handle in self._workers:
            handle.send(word)

    def totals(self) -> dict[str, int]:
        """The workers' latest counters, summed."""
        total: Counter[str] = Counter()
        for handle in self._workers:
            for key, value in handle.tick.items():
                if isinstance(value, int):
                    total[key] += value
        return dict(total)

    def alive(self) -> bool:
        """True while every worker process runs."""
        return all(h.proc.poll() is None for h in self._workers)

    def finish(self, timeout: float = 20.0) -> dict[str, Any]:
        """Quit every device cleanly (DISCONNECT), collect and aggregate their records."""
        self.command("quit")
        deadline = time.monotonic() + timeout
        for handle in self._workers:
            handle.done.wait(max(0.0, deadline - time.monotonic()))
        self.kill()
        records = [r for h in self._workers for r in (h.final or [])]
        return self._aggregate(records)

    def kill(self) -> None:
        """End every worker by its pid (SIGTERM, then SIGKILL)."""
        for handle in self._workers:
            if handle.proc.poll() is None:
                handle.proc.terminate()
        for handle in self._workers:
            try:
                handle.proc.wait(5)
            except subprocess.TimeoutExpired:
                handle.proc.kill()
                handle.proc.wait(5)

    def _aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        disconnects: Counter[str] = Counter()
        failures: Counter[str] = Counter()
        refused: Counter[str] = Counter()
        for r in records:
            disconnects.update(r["disconnects"])
            failures.update(r["failures"])
            refused.update(r["refused"])
        connect_ms = [x for r in records for x in r["connect_ms"]]
        takeover_ms = [x for r in records for x in r["takeover_ms"]]
        return {
            "mode": self.mode,
            "devices": self.devices,
            "workers": len(self._workers),
            "cells": [c.name for c in self.cells],
            "reported": len(records),
            "ever_online": sum(1 for r in records if r["connects"]),
            "connects": sum(r["connects"] for r in records),
            "connect_ms": _percentiles(connect_ms),
            "takeovers": len(takeover_ms),
            "takeover_ms": _percentiles(takeover_ms),
            "reboots": disconnects["reboot"],
            "losses": disconnects["loss"],
            "storm_drops": disconnects["storm"],
            "disconnects": dict(disconnects),
            "failures": dict(failures),
            "refused": dict(refused),
            "published": {
                "qos0": sum(r["qos0"] for r in records),
                "qos1": sum(r["qos1"] for r in records),
            },
            "acked": sum(r["acked"] for r in records),
            "pings": sum(r["pings"] for r in records),
            "moves": sum(r.get("moves", 0) for r in records),
            "per_device": records,
        }


# ----------------------------------------------------------------------------------------------
# Standalone command line.


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=60.0, help="churn duration")
    p.add_argument("--keepalive", type=int, default=10)
    p.add_argument("--telemetry", type=float, default=2.0, help="seconds between publishes")
    p.add_argument("--qos1", type=float, default=0.5, help="fraction of QoS 1 publishes")
    p.add_argument("--reboot-rate", type=float, default=0.2, help="per device per minute")
    p.add_argument("--loss-rate", type=float, default=0.05, help="per device per minute")
    p.add_argument("--storm-at", type=float, action="append", default=[], help="seconds")
    p.add_argument("--per-worker", type=int, default=DEFAULT_PER_WORKER)
    p.add_argument("--cells", type=int, default=2, help="namespaces (root only)")
    p.add_argument("--no-netns", action="store_true", help="loopback only, even as root")
    p.add_argument("--host", help="an already running gateway (loopback only)")
    p.add_argument("--port", type=int)
    p.add_argument(
        "--gateway",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a node of a gateway cluster (repeat for each): devices land on another node after "
        "every reboot (with --users; instead of --host/--port)",
    )
    p.add_argument(
        "--users", type=Path, help="the devices' credentials for that gateway (username:password)"
    )
    p.add_argument("--spawn-gateway", action="store_true", help="start examples' gateway.py")
    p.add_argument("--tls", action="store_true", help="devices speak MQTT over TLS")
    p.add_argument("--tls-ca", type=Path, help="CA of an external gateway's certificate")
    p.add_argument("--tls-hostname", help="name on an external gateway's certificate")
    p.add_argument("--json", type=Path, help="write the summary here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.gateway:
        try:
            split = (g.rpartition(":") for g in args.gateway)
            args.endpoints = [(host, int(port)) for host, _, port in split]
        except ValueError:
            p.error("--gateway takes HOST:PORT")
        args.host, args.port = args.endpoints[0]
    else:
        args.endpoints = []
    if not args.worker and not args.spawn_gateway and not (args.host and args.port and args.users):
        p.error(
            "give --spawn-gateway, or --host, --port (or --gateway ...) and --users of a running "
            "gateway"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run a fleet for ``--seconds`` and print (and optionally write) its summary."""
    args = _parse(argv)
    if args.worker:
        run_worker(json.loads(args.worker))
        return 0
    profile = DeviceProfile(
        keepalive=args.keepalive,
        telemetry_interval=args.telemetry,
        qos1_fraction=args.qos1,
        reboot_rate=args.reboot_rate,
        loss_rate=args.loss_rate,
    )
    reason = "--no-netns given" if args.no_netns else netns_reason()
    if args.host and not args.spawn_gateway:
        reason = reason or "an external gateway on loopback cannot be reached from a namespace"
    print(
        f"fleet: {args.devices} devices, keepalive {args.keepalive} s"
        + (", over TLS" if args.tls else "")
    )
    if reason:
        print(f"fleet: loopback only ({reason}); reboots abandon sockets silently, which the")
        print("       kernel still ACKs: a hung device, not a truly half-open one")
    namespaces: list[Any] = []
    gateway: GatewayProcess | None = None
    fleet: Fleet | None = None
    tmp = tempfile.TemporaryDirectory(prefix="keepconn-fleet-")
    try:
        cells: list[Cell] = []
        if reason is None:
            count = max(args.cells, Fleet.workers_needed(args.devices, args.per_worker))
            namespaces, cells = make_cells(count)
            print(f"fleet: {len(cells)} cells: " + ", ".join(c.name for c in cells))
        tls_ca = args.tls_ca
        if args.spawn_gateway:
            users_path = Path(tmp.name) / "users.txt"
            users = write_users(users_path)
            host = cells[0].host_addr if cells else "127.0.0.1"
            extra: list[str] = []
            if args.tls:
                pki = make_dev_pki(Path(tmp.name) / "pki", names=(host, "localhost"))
                extra = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
                tls_ca = pki.ca
            gateway = GatewayProcess(
                host=host, users=users_path, data=Path(tmp.name) / "t.db", extra=extra
            )
            port = gateway.port
        else:
            host, port = args.host, args.port
            users = [tuple(line.split(":", 1)) for line in args.users.read_text().split()]
        fleet = Fleet(
            devices=args.devices,
            host=host,
            port=port,
            users=users,
            profile=profile,
            cells=cells,
            per_worker=args.per_worker,
            tls=args.tls,
            tls_ca=tls_ca,
            tls_hostname=args.tls_hostname,
            endpoints=[] if args.spawn_gateway else args.endpoints,
        )
        fleet.start()
        started = time.monotonic()
        fleet.command("churn")
        storms = sorted(args.storm_at)
        while (elapsed := time.monotonic() - started) < args.seconds:
            if storms and elapsed >= storms[0]:
                storms.pop(0)
                fleet.command("storm")
            t = fleet.totals()
            print(
                f"\r{elapsed:5.1f}s online={t.get('online', 0):6d} "
                f"reboots={t.get('reboots', 0):5d} losses={t.get('losses', 0):5d} "
                f"takeovers={t.get('takeovers', 0):5d} moves={t.get('moves', 0):5d} "
                f"acked={t.get('acked', 0):7d}",
                end="",
                flush=True,
            )
            time.sleep(0.5)
        print()
        fleet.command("calm")
        summary = fleet.finish()
        brief = {k: v for k, v in summary.items() if k != "per_device"}
        print(json.dumps(brief, indent=2))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(summary, indent=1))
        return 0
    finally:
        if fleet is not None:
            fleet.kill()
        if gateway is not None:
            gateway.stop()
        for ns in namespaces:
            ns.close()
        tmp.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())

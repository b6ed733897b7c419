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
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from churn_report import plot, print_table
from churn_run import FULL, QUICK, run_system
from churn_servers import MOSQUITTO_RESOLUTION, bound_for, mosquitto_binary, mosquitto_resolution
from device_gateway.fleet import make_cells, netns_reason, write_users
from device_gateway.gateway_process import write_users_file
from harness import OUT, sigterm_as_exit, write_json

SYSTEMS = ("keepconn", "mosquitto", "naive")


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
    with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="keepconn-churn-") as tmp:
        workdir = Path(tmp)
        try:
            cells: list[Any] = []
            host = "127.0.0.1"
            if reason is None:
                namespaces, cells = make_cells(plan.workers)
                host = cells[0].host_addr
                log(f"cells: {', '.join(c.name for c in cells)}; servers on {host}")
            users_path = workdir / "users.txt"
            users = write_users(users_path)  # hashed, for the keepconn gateway
            # The naive gateway compares clear text, as such a gateway does.
            plain_users_path = workdir / "users-plain.txt"
            write_users_file(plain_users_path, users, hashed=False)
            for system in args.systems:
                details[system] = run_system(
                    system,
                    plan,
                    host=host,
                    cells=cells,
                    workdir=workdir,
                    users=users,
                    users_path=users_path,
                    plain_users_path=plain_users_path,
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
    write_json(args.out / "churn-details.json", {**meta, "systems": details}, indent=None)
    for path in plot(details, args.out):
        log(f"wrote {path}")
    if args.json:
        write_json(args.json, {"results": results})
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Runtime benchmark: what one idle connection costs each server runtime, in one run.

Eleven servers, one after the other, each in its own fresh process, each holding idle loopback
connections that ping every ``--interval`` seconds (10; ``PING``/``PONG`` lines for the line
servers, PINGREQ/PINGRESP for the MQTT ones):

* ``asyncio-protocol``: a bare ``asyncio.Protocol`` line server (the Python floor);
* ``anyio-asyncio``, ``anyio-trio``: a bare anyio listener, one task per connection (the
  floor of anything on anyio);
* ``keepconn-asyncio``, ``keepconn-uvloop``, ``keepconn-trio``: ``keepconn.Server`` with
  ``LineFramer``, ``ServerConfig(admission=None, flapping=None, idle_timeout=60)``, which on
  asyncio and uvloop is the native transport (keepconn._asyncio), on trio keepconn's own
  socket stream (keepconn._trio); ``keepconn-asyncio-anyio`` and ``keepconn-trio-anyio`` are
  the same with ``transport="anyio"``: the anyio streams the native transports replace
  (these three kinds are benchmarks/runtime_lines.py);
* ``gateway``: the example MQTT gateway from ``device_gateway.gateway:main`` with its default
  options (``--users``, ``--port 0``, ``--data`` given);
* ``naive``: benchmarks/naive_gateway.py from its ``main()``, default options;
* ``mosquitto``: Debian's broker with a configuration written here (anonymous).

Figures (benchmarks/runtime_run.py has the phases):

* RSS and tracked objects per connection: the change from N1 (2,000) to N2 (10,000) idle
  connections divided by the difference; measured inside each Python server by the probe
  (benchmarks/runtime_probe.py; started by the line servers themselves, and for the two
  gateways by benchmarks/runtime_wrap.py, which runs their own ``main()``). Mosquitto: RSS
  from psutil, no objects.
* CPU per 1,000 pings: the server's user+system seconds (psutil) over ``--window`` seconds of
  steady pinging at N2, divided by the pings answered in that window / 1,000.
* ``gc.collect()`` at N2: the median of three full collections, inside the server.
* Loop lag p99 at N2, over the same window: a task on the server's loop sleeps 20 ms again and
  again and records the overshoot. Mosquitto has no such probe: its column shows the
  clients' PING round-trip p99 instead, labelled "(client rtt)"; the round trips of every
  server are in the JSON.
* Takeover (gateway, naive, mosquitto): 5,000 devices connected, then 10 % of them reboot at
  50/s: each opens a new connection with the same client id and sends CONNECT, its old
  connection left silent and open (as a rebooted device's is); CONNECT -> CONNACK p50/p99.

Clients: ``--processes`` processes (benchmarks/runtime_clients.py, uvloop; default one per
4,000 connections, at least 2) so that none holds more than a fraction of its 20,000
descriptors; they connect from 127.0.0.1 at ``--rate`` connections/s in all (500: below the
gateway's default admission rate of 1,000/s), and all traffic is loopback. Every process is
stopped by its pid in a finally block.

Run ``python benchmarks/runtime.py`` (about 12 minutes on 2 cores), ``--quick`` for the test
suite's smoke check (200 -> 600 connections, shorter windows), ``--only NAME`` (repeatable) to
run some servers. Writes a table to the terminal, JSON (``--json``, default out/runtime.json)
and a PNG of the per-connection bars (``--png``, default out/runtime.png).
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

from churn_servers import mosquitto_binary
from device_gateway.gateway_process import write_users_file
from harness import OUT, loadavg, machine, sigterm_as_exit, write_json
from runtime_report import plot, table
from runtime_run import Params, run_one
from runtime_servers import CONTENDERS, NAMES, Account

#: Connections per client process (old and new ones of a takeover included).
PER_PROCESS = 4000


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, short: the smoke test")
    p.add_argument("--n1", type=int, help="first size (2000; quick: 200)")
    p.add_argument("--n2", type=int, help="second size (10000; quick: 600)")
    p.add_argument("--takeover-devices", type=int, help="fleet for the takeover (5000; quick 300)")
    p.add_argument("--reboot-share", type=float, default=0.10, help="share that reboots")
    p.add_argument("--reboot-rate", type=float, default=50.0, help="reboots per second")
    p.add_argument("--interval", type=float, help="seconds between a connection's pings (10)")
    p.add_argument("--window", type=float, help="seconds of steady pinging measured (30)")
    p.add_argument("--settle", type=float, help="seconds after a ramp before sampling (5)")
    p.add_argument("--rate", type=float, default=500.0, help="new connections per second")
    p.add_argument("--processes", type=int, help="client processes (default by size, >= 2)")
    p.add_argument("--connect-timeout", type=float, default=30.0, help="TCP + hello reply, s")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--only", action="append", choices=NAMES, help="run only these (repeatable)")
    p.add_argument("--json", type=Path, default=OUT / "runtime.json", help="figures as JSON")
    p.add_argument("--png", type=Path, default=OUT / "runtime.png", help="per-connection bars")
    return p.parse_args(argv)


def _params(args: argparse.Namespace) -> Params:
    quick = args.quick
    n1 = args.n1 or (200 if quick else 2000)
    n2 = args.n2 or (600 if quick else 10_000)
    if not 0 < n1 < n2:
        raise SystemExit("runtime.py: need 0 < --n1 < --n2")
    devices = args.takeover_devices or (300 if quick else 5000)
    reboots = max(1, round(devices * args.reboot_share))
    interval = args.interval or (2.0 if quick else 10.0)
    biggest = max(n2, devices + reboots)
    processes = args.processes or max(2, math.ceil(biggest / PER_PROCESS))
    return Params(
        n1=n1,
        n2=n2,
        takeover_devices=devices,
        reboots=reboots,
        reboot_rate=args.reboot_rate,
        interval=interval,
        # MQTT: the server's timeout is 1.5 x keepalive; 3 x the ping interval leaves room
        # for clients that are late on a loaded machine.
        keepalive=max(3, math.ceil(3 * interval)),
        window=args.window or (4.0 if quick else 30.0),
        settle=args.settle if args.settle is not None else (1.0 if quick else 5.0),
        rate=args.rate,
        processes=processes,
        connect_timeout=args.connect_timeout,
        seed=args.seed,
    )


def _check(params: Params) -> str | None:
    """Whether every connection of a phase fits the ephemeral ports of one source address, and
    each client process its descriptors."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return None
    biggest = max(params.n2, params.takeover_devices + params.reboots)
    if biggest > 0.8 * (high - low + 1):
        return f"{biggest} connections from 127.0.0.1 do not fit the ports {low}-{high}"
    if math.ceil(biggest / params.processes) > 15_000:
        return "too many connections per client process: raise --processes"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every server chosen, print the table, write the JSON and the PNG."""
    args = _parse(argv)
    params = _params(args)
    with sigterm_as_exit():
        problem = _check(params)
        if problem:
            print(f"runtime.py: {problem}", file=sys.stderr)
            return 2
        contenders = [c for c in CONTENDERS if not args.only or c.name in args.only]
        if any(c.program == "mosquitto" for c in contenders) and mosquitto_binary() is None:
            print(
                "runtime.py: mosquitto is not installed (`make setup` installs it as root); "
                "leave it out with --only",
                file=sys.stderr,
            )
            return 2
        given = sys.argv[1:] if argv is None else list(argv)
        command = shlex.join(["python", "benchmarks/runtime.py", *given])
        started = time.monotonic()
        load_before = loadavg()

        def log(line: str) -> None:
            print(f"{time.monotonic() - started:7.1f}s {line}", flush=True)

        log(
            f"N1={params.n1} N2={params.n2}, pings every {params.interval:g} s, "
            f"{params.processes} client processes, {os.cpu_count()} CPUs"
        )
        results = []
        with tempfile.TemporaryDirectory(prefix="keepconn-runtime-") as tmp:
            workdir = Path(tmp)
            user = ("runtime", "pw-" + secrets.token_hex(8))
            account = Account(workdir / "users.txt", workdir / "users-clear.txt", user)
            write_users_file(account.users_file, [user])
            write_users_file(account.clear_users_file, [user], hashed=False)
            for contender in contenders:
                results.append(run_one(contender, params, workdir, account, log))
        elapsed = time.monotonic() - started
        print()
        print(table(results, params.n1, params.n2))
        title = (
            f"Per-connection cost, {params.n1:,} -> {params.n2:,} idle connections "
            f"({os.cpu_count()} CPUs)"
        )
        plot(results, args.png, title)
        print(f"\nplot: {args.png}")
        report = {
            "benchmark": "runtime",
            "command": command,
            "quick": args.quick,
            "params": attrs.asdict(params),
            "machine": machine(),
            "load_before": load_before,
            "load_after": loadavg(),
            "duration_s": round(elapsed, 1),
            "results": results,
        }
        write_json(args.json, report)
        print(f"json: {args.json}")
        log(f"done in {elapsed:.0f} s")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())

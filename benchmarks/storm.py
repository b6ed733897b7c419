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
* false reaps: sessions a device kept alive on schedule that the server closed. The device
  sees the close (MQTT 3.1.1 does not say why) and records its side: CONNECT, CONNACK and
  every PINGREQ's due and sent times, and its worker's own event-loop lag. The keepconn
  gateway runs under benchmarks/storm_wrap.py, which traces every session's open, reap and
  close (reason, detail) by peer address; benchmarks/storm_drops.py sets the two side by side
  and counts as ``device_stalled``, not as a false reap, a drop for silence that the device's
  own stalled loop explains. Without a server trace (the naive gateway) every drop counts.
  The keepconn gateway's own IDLE/HEARTBEAT_TIMEOUT counts are reported beside them: those
  also count correct reaps of cut connections;
* phantoms from the kernel's table (keepconn.tcp.census of the server's port, once a second):
  ESTABLISHED sockets beyond the devices' live and connecting sessions and the probe, and
  CLOSE_WAIT sockets. The devices also count their cut connections the server still holds
  open, which is the exact phantom figure.

Sources: loopback only. Every device binds one of ``--sources`` addresses in 127.0.1.0/24, so
old and new connections of 15,000 devices (30,000 sockets to one server port) fit within the
ephemeral port range (about 28,000 ports per source address by default).

With ``--tls`` every server speaks MQTT over TLS (a throwaway CA and certificate from
device_gateway.devcerts; the naive gateway with its ``--tls-cert``/``--tls-key``), every device
and the probe verify it, and every reconnect is a full handshake: the storm's costliest work.
The table then shows handshakes completed per second at the peak (devices' count), and for
the keepconn gateway whether admission engaged (OVERLOADED closes, retry hints the gateway's
refuse callback was given: none under TLS, where a refused connection is closed before any
handshake and MQTT 3.1.1 has no field for a hint anyway).

Run ``python benchmarks/storm.py`` (15,000 devices, about ten minutes), ``--quick`` for the
test suite's smoke check (1,000 devices), ``--only NAME`` to run some servers. Writes a table to
the terminal, a PNG timeline (``--png``, default out/storm.png) and the figures as JSON
(``--json PATH``).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

from harness import OUT, machine, sigterm_as_exit, write_json
from storm_report import plot, table
from storm_run import CONTENDERS, NAIVE_SWEEP, PER_WORKER, Params, run_one

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
        "--tls",
        action="store_true",
        help="MQTT over TLS: every server gets a throwaway certificate, devices its CA",
    )
    p.add_argument(
        "--only", action="append", choices=[c.name for c in CONTENDERS], help="run only these"
    )
    p.add_argument("--json", type=Path, help="write the figures and timelines here")
    p.add_argument("--png", type=Path, default=OUT / "storm.png", help="timeline plot")
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
        tls=args.tls,
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
    # Every server, probe and device worker is stopped by its pid in a finally block; a SIGTERM
    # must reach those blocks too.
    with sigterm_as_exit():
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
            "machine": machine(),
            "keepconn_ok": keepconn_ok,
            "results": results,
        }
        if args.json:
            write_json(args.json, report)
            print(f"json: {args.json}")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())

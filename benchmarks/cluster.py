"""Cluster benchmark: devices over three gateway nodes, rebooting onto another node.

Two contenders, one after the other in the same run, each with fresh processes:

* ``cluster``: three example gateways (examples/device_gateway/gateway.py) on one throwaway
  redis-server (``--cluster redis://... --node-id node-N``);
* ``independent``: the same three gateways with no shared store, which is what users have
  today behind an L4 balancer: each process knows only its own sessions.

Each run: the nodes start (device_gateway.cluster_nodes); the fleet (benchmarks/
cluster_devices.py, spread over processes so that none needs more than its 20,000 descriptors)
connects, device i to node i % 3, and heartbeats every ``--keepalive`` s. An idle window
measures the store's load with every device online; then ``--trials`` devices (at ``--rate`` a
second) reboot: each walks away from its connection without a FIN (the old socket stays open
and silent, a hung peer on loopback) and connects with the same client id to another node.

What is measured, and how (the same way for both contenders):

* cross-node takeover latency: from the device's CONNECT written on node B to the old node's
  socket leaving the kernel's table, seen as its RST arriving on the device's abandoned socket
  (the gateway resets a taken-over connection with SO_LINGER 0, which removes it from the table
  as the RST goes out; loopback delivers it within microseconds); p50/p99 over the trials, and
  how many old sockets were never reset within ``--watch`` s. The CONNACK latency is beside it;
* devices with more than one ESTABLISHED socket across all nodes, ``--settle`` s after the last
  reboot: every node's server-side sockets from the kernel's table (keepconn.tcp.census),
  matched by (source address, source port, node port) to the device; and CLOSE_WAIT on every
  node's port;
* store round trips a second (the nodes' own ``store_round_trips`` counters) and redis-server
  CPU (utime + stime from /proc), over the idle window and over the reboots.

Run ``python benchmarks/cluster.py`` (15,000 devices over 3 node processes, 1,000 reboots;
about five minutes) wrapped in ``flock /tmp/keepconn-bench.lock``, or ``--quick`` (the test
suite's smoke check). Writes a table, a PNG (``--png``, default out/cluster.png) and JSON
(``--json PATH``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster_doubled import describe, process_inodes
from device_gateway.cluster_nodes import NodeCluster
from device_gateway.gateway_process import write_users
from harness import OUT, grid, machine, quantile, round_or_none, sigterm_as_exit, write_json
from keepconn.tcp import census

DEVICES_SCRIPT = Path(__file__).resolve().parent / "cluster_devices.py"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="300 devices, 100 reboots: smoke test")
    p.add_argument("--devices", type=int, help="fleet size (15000; quick: 300)")
    p.add_argument("--trials", type=int, help="reboots onto another node (1000; quick: 100)")
    p.add_argument("--rate", type=float, help="reboots a second (50; quick: 50)")
    p.add_argument("--per-process", type=int, default=4000, help="devices per device process")
    p.add_argument("--keepalive", type=int, default=30, help="device keepalive, s")
    p.add_argument("--idle", type=float, help="idle window, s (20; quick: 3)")
    p.add_argument("--watch", type=float, default=3.0, help="how long to watch an old socket")
    p.add_argument("--settle", type=float, default=2.0, help="seconds before the census")
    p.add_argument("--backend", default="asyncio", choices=("asyncio", "uvloop", "trio"))
    p.add_argument("--only", choices=("cluster", "independent"), action="append")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--png", type=Path, default=OUT / "cluster.png", help="plot")
    args = p.parse_args(argv)
    args.devices = args.devices or (300 if args.quick else 15_000)
    args.trials = args.trials or (100 if args.quick else 1000)
    args.rate = args.rate or 50.0
    args.idle = args.idle if args.idle is not None else (3.0 if args.quick else 20.0)
    return args


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class DeviceProcess:
    """One cluster_devices.py process: its JSON lines, by kind."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(DEVICES_SCRIPT), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.messages: dict[str, dict[str, Any]] = {}
        self.arrived = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            message = json.loads(line)
            with self.arrived:
                self.messages[message["kind"]] = message
                self.arrived.notify_all()
        with self.arrived:
            self.arrived.notify_all()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait(self, kind: str, timeout: float) -> dict[str, Any]:
        with self.arrived:
            self.arrived.wait_for(
                lambda: kind in self.messages or self.proc.poll() is not None, timeout
            )
            if kind not in self.messages:
                raise RuntimeError(f"device process gave no {kind!r} (exit {self.proc.poll()})")
            return self.messages.pop(kind)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


def _store_trips(statuses: list[dict[str, Any]]) -> int | None:
    trips = [s.get("cluster", {}).get("store_round_trips") for s in statuses]
    return None if any(t is None for t in trips) else sum(trips)  # type: ignore[misc]


def _window(cluster: NodeCluster, seconds: float, during: Any = None) -> dict[str, Any]:
    """Store round trips a second and redis-server CPU over ``seconds`` (or over ``during()``)."""
    redis_pid = cluster.redis.pid if cluster.redis is not None else None
    trips0, cpu0, t0 = _store_trips(cluster.statuses()), None, time.monotonic()
    if redis_pid is not None:
        cpu0 = _cpu_seconds(redis_pid)
    result = during() if during is not None else time.sleep(seconds)
    elapsed = time.monotonic() - t0
    trips1 = _store_trips(cluster.statuses())
    window: dict[str, Any] = {"seconds": round(elapsed, 2), "result": result}
    if trips0 is not None and trips1 is not None:
        window["store_round_trips_per_s"] = round((trips1 - trips0) / elapsed, 1)
    if redis_pid is not None and cpu0 is not None:
        window["redis_cpu_percent"] = round(100 * (_cpu_seconds(redis_pid) - cpu0) / elapsed, 2)
    return window


def run_one(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One contender, start to stop; its figures."""
    users = write_users(work / "users.txt")
    extra = ["--accept-rate", "5000", "--accept-burst", "10000", "--no-flapping"]
    # INFO: one line per closed connection (with its reason), which the account of a doubled
    # device quotes; a few hundred lines a second at most, while the nodes run.
    extra += ["--log-level", "info", "--backend", args.backend, "--hello-timeout", "10"]
    cluster = NodeCluster(work, work / "users.txt", nodes=3, cluster=name == "cluster",
                          extra=extra)  # fmt: skip
    processes: list[DeviceProcess] = []
    try:
        count = max(2, -(-args.devices // args.per_process))
        base, left = divmod(args.devices, count)
        first = 0
        for i in range(count):
            share = base + (1 if i < left else 0)
            spec = {
                "endpoints": cluster.endpoints, "users": users, "keepalive": args.keepalive,
                "sources": [f"127.0.1.{1 + (i * 4 + k) % 250}" for k in range(4)],
                "prefix": "dev", "first": first, "count": share, "seed": 17 + i,
                "watch": args.watch,
            }  # fmt: skip
            processes.append(DeviceProcess(spec))
            first += share
        ready = [p.wait("ready", 120 + args.devices / 200) for p in processes]
        online = sum(r["online"] for r in ready)
        print(f"  {name}: {online}/{args.devices} devices online", flush=True)
        idle = _window(cluster, args.idle)

        def reboots() -> list[dict[str, Any]]:
            per, extra_trials = divmod(args.trials, len(processes))
            for i, process in enumerate(processes):
                n = per + (1 if i < extra_trials else 0)
                process.send(f"reboot {n} {args.rate / len(processes)}")
            wait = args.trials / args.rate + args.watch + 60
            return [r for p in processes for r in p.wait("trials", wait)["results"]]

        rebooting = _window(cluster, 0, reboots)
        trials: list[dict[str, Any]] = rebooting.pop("result")
        time.sleep(args.settle)
        owners: dict[tuple[str, int, int], tuple[str, str]] = {}
        history: dict[str, Any] = {}
        for process in processes:
            process.send("ports")
        for process in processes:
            listing = process.wait("ports", 60)
            history.update(listing["history"])
            for client_id, ports in listing["devices"].items():
                for address, port, node_port, role in ports:
                    owners[address, port, node_port] = (client_id, role)
        per_device: dict[str, list[dict[str, Any]]] = {}
        close_wait = repeated = 0
        for node_name, node in zip(cluster.names, cluster.nodes, strict=True):
            table = census(node.port)
            # Rows the kernel listed twice while the table changed (another run's churn on
            # the machine): census() drops them. Counted, they were the "doubled" devices of
            # the first full runs: one socket, listed again.
            repeated += table.duplicates
            for row in table.sockets:
                if row.local_port != node.port:
                    continue
                peer = (row.remote_address, row.remote_port, node.port)
                if row.state == "ESTABLISHED" and peer in owners:
                    device, role = owners[peer]
                    per_device.setdefault(device, []).append(
                        {"node": node_name, "pid": node.proc.pid, "peer": f"{peer[0]}:{peer[1]}",
                         "role": role, "inode": row.inode, "rx": row.rx_queue,
                         "tx": row.tx_queue}
                    )  # fmt: skip
                close_wait += row.state == "CLOSE_WAIT"
        doubled = {d: found for d, found in per_device.items() if len(found) > 1}
        held = {node.proc.pid: process_inodes(node.proc.pid) for node in cluster.nodes}
        for found in doubled.values():
            for sock in found:
                # Accepted by the gateway, or still in the kernel's listen queue (inode 0)?
                sock["in_process"] = sock["inode"] in held[sock.pop("pid")]
        statuses = cluster.statuses()
    finally:
        for process in processes:
            process.stop()
        codes = cluster.stop()
    # After the stop: every close the nodes made is in their logs by now.
    logs = {
        node_name: node.log_path
        for node_name, node in zip(cluster.names, cluster.nodes, strict=True)
        if node.log_path is not None
    }
    detail = describe(doubled, history, trials, logs)
    connack = [t["connack_ms"] for t in trials if t["connack_ms"] is not None]
    gone = [t["gone_ms"] for t in trials if t["gone_ms"] is not None]
    figures = {
        "devices": args.devices,
        "online": online,
        "trials": len(trials),
        "connack_ok": len(connack),
        "connack_p50_ms": round_or_none(quantile(connack, 0.5), 2),
        "connack_p99_ms": round_or_none(quantile(connack, 0.99), 2),
        "old_gone": len(gone),
        "old_not_gone": len(connack) - len(gone),
        "takeover_p50_ms": round_or_none(quantile(gone, 0.5), 2),
        "takeover_p99_ms": round_or_none(quantile(gone, 0.99), 2),
        "takeover_max_ms": round_or_none(max(gone) if gone else None, 2),
        "devices_doubled": len(doubled),
        "established": sum(len(found) for found in per_device.values()),
        "close_wait": close_wait,
        "census_duplicates": repeated,
        "idle": idle,
        "rebooting": rebooting,
        "remote_takeovers": sum(
            s.get("cluster", {}).get("remote_takeovers", 0) for s in statuses
        ),  # fmt: skip
        "node_exit": codes,
    }
    return {
        "name": name,
        "figures": figures,
        "connack_ms": connack,
        "gone_ms": gone,
        "doubled": detail,
    }


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """CDFs of takeover latency (old socket gone) and CONNACK latency; doubled devices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for result in results:
        for key, style in (("gone_ms", "-"), ("connack_ms", "--")):
            values = sorted(result[key])
            if values:
                ys = [(i + 1) / result["figures"]["trials"] for i in range(len(values))]
                label = f"{result['name']}: {'old socket gone' if key == 'gone_ms' else 'CONNACK'}"
                left.step(values, ys, style, where="post", label=label)
    left.set_xscale("log")
    left.set_xlabel("ms after the CONNECT on the new node")
    left.set_ylabel("fraction of reboots")
    left.set_ylim(0, 1.02)
    left.legend(fontsize=8, loc="lower right")
    left.set_title("cross-node takeover")
    names = [r["name"] for r in results]
    right.bar(names, [r["figures"]["devices_doubled"] for r in results])
    right.set_ylabel("devices with > 1 ESTABLISHED socket, all nodes")
    right.set_title(f"after settling ({results[0]['figures']['trials']} reboots)")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    names = args.only or ["cluster", "independent"]
    print(
        f"cluster benchmark: {args.devices} devices over 3 nodes, {args.trials} reboots onto "
        f"another node at {args.rate:g}/s, keepalive {args.keepalive} s, {args.backend} gateways",
        flush=True,
    )
    results = []
    with sigterm_as_exit():
        for name in names:
            with tempfile.TemporaryDirectory(prefix=f"keepconn-cluster-{name}-") as work:
                results.append(run_one(name, args, Path(work)))
    header = ["contender", "online", "CONNACK p50/p99 ms", "old gone p50/p99 ms", "not gone",
              "doubled", "CLOSE_WAIT", "census repeats", "store rt/s idle", "store rt/s reboots",
              "redis CPU % idle/reboots"]  # fmt: skip
    body = []
    for r in results:
        f = r["figures"]
        body.append([
            r["name"], f"{f['online']}/{f['devices']}",
            f"{f['connack_p50_ms']}/{f['connack_p99_ms']}",
            f"{f['takeover_p50_ms']}/{f['takeover_p99_ms']}", str(f["old_not_gone"]),
            str(f["devices_doubled"]), str(f["close_wait"]), str(f["census_duplicates"]),
            str(f["idle"].get("store_round_trips_per_s", "-")),
            str(f["rebooting"].get("store_round_trips_per_s", "-")),
            f"{f['idle'].get('redis_cpu_percent', '-')}/"
            f"{f['rebooting'].get('redis_cpu_percent', '-')}",
        ])  # fmt: skip
    print(grid(header, body))
    for r in results:
        if 0 < r["figures"]["devices_doubled"] <= 20:  # an anomaly to explain, not the baseline
            print(f"{r['name']}: doubled devices")
            for one in r["doubled"]:
                print(f"  {one['id']}: connects {one['connects']}, trial {one['trial']}")
                for sock in one["sockets"]:
                    print(f"    socket {sock}")
                for node, lines in one["log"].items():
                    for line in lines:
                        print(f"    {node}: {line}")
    title = (
        f"{args.devices} devices over 3 gateway nodes ({args.backend}), "
        f"{args.trials} cross-node reboots"
    )
    try:
        plot(results, args.png, title)
        print(f"plot: {args.png}")
    except Exception as exc:  # noqa: BLE001 - the figures stand without the picture
        print(f"plot not drawn: {exc}")
    report = {
        "benchmark": "cluster",
        "quick": args.quick,
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
        "results": results,
    }
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`make demo-cluster`: three gateway nodes sharing one Redis, under a fleet whose rebooting
devices always land on a different node, watched live.

What it does, in about a minute:

1. Starts a throwaway redis-server (loopback, no persistence: ``keepconn.testing.RedisServer``)
   and three gateway nodes from the documented command line (``--cluster redis://...
   --node-id node-N``), each on its own port with its own data file and status page.
2. Starts a few hundred simulated devices spread over the nodes. Every reboot (a device that
   vanishes without FIN and reconnects with the same id) lands on another node: the new node
   claims the device in Redis and the old node resets the old connection (a cross-node
   takeover). Some devices go dark for longer than 1.5 x keepalive (their node must reap them)
   and, with namespaces (root), every cell loses power at once (a reconnect storm).
3. Churn stops; the demo waits until the cluster has settled, read from every node's kernel
   table: exactly one server-side ESTABLISHED socket per device cluster-wide, no CLOSE_WAIT, no
   phantom on any node, and each device owned by exactly one node in the store.
4. Devices disconnect, everything it started is stopped by pid, a summary is printed and the
   timeline drawn to ``out/demo-cluster.png`` (``--json`` writes the numbers).

Exit status: 0 when every device came online, devices did move between nodes, and the cluster
settled with one socket per device and nothing left over; 1 otherwise; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from device_gateway.cluster_nodes import NodeCluster
from device_gateway.fleet import DeviceProfile, Fleet, make_cells, netns_reason, write_users

REAP_REASONS = ("IDLE_TIMEOUT", "HEARTBEAT_TIMEOUT", "KEEPALIVE_TIMEOUT")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Three gateway nodes on one Redis, under churn.")
    p.add_argument("--seconds", type=float, default=50.0, help="length of the run (>= 20)")
    p.add_argument("--devices", type=int, default=300, help="simulated devices")
    p.add_argument("--nodes", type=int, default=3, help="gateway nodes (>= 2)")
    p.add_argument("--keepalive", type=int, default=4, help="devices' CONNECT keepalive, s")
    p.add_argument("--reboot-rate", type=float, default=1.0, help="per device per minute")
    p.add_argument("--loss-rate", type=float, default=0.1, help="per device per minute")
    p.add_argument("--node-ttl", type=float, default=5.0, help="the nodes' --node-ttl")
    p.add_argument("--cells", type=int, default=2, help="namespaces for devices (root)")
    p.add_argument("--no-netns", action="store_true", help="loopback only, even as root")
    p.add_argument("--no-storm", action="store_true", help="skip the reconnect storm")
    p.add_argument("--out", type=Path, default=Path("out/demo-cluster.png"), help="timeline")
    p.add_argument("--json", type=Path, help="write the summary JSON here")
    p.add_argument("--settle-timeout", type=float, default=30.0, help="seconds to settle")
    args = p.parse_args(argv)
    if args.seconds < 20:
        p.error("--seconds must be at least 20")
    if args.devices < 1 or args.nodes < 2:
        p.error("--devices must be >= 1 and --nodes >= 2")
    return args


def _view(elapsed: float, phase: str, statuses: list[dict[str, Any]], kernel: dict[str, Any],
          fleet: dict[str, int], devices: int, tty: bool) -> list[str]:  # fmt: skip
    """One frame of the live view: a row per node, then the cluster-wide kernel census."""
    rows = [
        f"{elapsed:5.1f} s  {phase:<9} devices online {fleet.get('online', 0)}/{devices}, "
        f"moved {fleet.get('moves', 0)}, reboots {fleet.get('reboots', 0)}, "
        f"losses {fleet.get('losses', 0)}",
        f"  {'node':<8}{'store':>7}{'sessions':>10}{'owned':>7}{'ESTAB':>7}{'CL_WAIT':>8}"
        f"{'local':>7}{'in':>6}{'out':>6}{'reaped':>8}{'phantoms':>9}",
    ]
    for status, counts in zip(statuses, kernel["per_node"], strict=True):
        cluster = status.get("cluster", {})
        closed = status.get("closed", {})
        rows.append(
            f"  {status.get('node_id', '?'):<8}"
            f"{('up' if cluster.get('store_healthy') else 'DOWN'):>7}"
            f"{status.get('sessions', '?'):>10}{cluster.get('owned', '?'):>7}"
            f"{counts.get('ESTABLISHED', 0):>7}{counts.get('CLOSE_WAIT', 0):>8}"
            f"{cluster.get('local_takeovers', '?'):>7}{cluster.get('took_from_remote', '?'):>6}"
            f"{cluster.get('remote_takeovers', '?'):>6}"
            f"{sum(closed.get(r, 0) for r in REAP_REASONS):>8}"
            f"{status.get('phantoms', {}).get('established_without_session', '?'):>9}"
        )
    rows.append(
        f"  cluster-wide: {kernel['established']} ESTABLISHED for {devices} devices, "
        f"{kernel['close_wait']} CLOSE_WAIT   (in/out: cross-node takeovers)"
    )
    del tty
    return rows


class LiveView:
    """Redraws in place on a terminal; one line every 5 s otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self._lines = 0
        self._last = -1e9

    def show(self, elapsed: float, rows: list[str]) -> None:
        if not self.tty:
            if elapsed - self._last >= 5.0:
                self._last = elapsed
                print(rows[0] + " | " + rows[-1].strip(), flush=True)
            return
        if self._lines:
            sys.stdout.write(f"\x1b[{self._lines}F\x1b[J")
        sys.stdout.write("\n".join(rows) + "\n")
        sys.stdout.flush()
        self._lines = len(rows)


def _row(t: float, statuses: list[dict[str, Any]], kernel: dict[str, Any],
         fleet: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    return {
        "t": round(t, 2),
        "sessions": [s.get("sessions", 0) for s in statuses],
        "owned": [s.get("cluster", {}).get("owned", 0) for s in statuses],
        "established": kernel["established"],
        "close_wait": kernel["close_wait"],
        "phantoms": sum(
            s.get("phantoms", {}).get("established_without_session", 0) for s in statuses
        ),  # fmt: skip
        "cross_node": sum(s.get("cluster", {}).get("took_from_remote", 0) for s in statuses),
        "local": sum(s.get("cluster", {}).get("local_takeovers", 0) for s in statuses),
        "reaped": sum(s.get("closed", {}).get(r, 0) for s in statuses for r in REAP_REASONS),
        "online": fleet.get("online", 0),
    }


def _settled(statuses: list[dict[str, Any]], kernel: dict[str, Any], fleet: dict[str, int],
             devices: int) -> bool:  # fmt: skip
    if not all(s.get("phantoms") for s in statuses):
        return False
    return (
        fleet.get("online", -1) == devices
        and kernel["established"] == devices
        and kernel["close_wait"] == 0
        and sum(s["sessions"] for s in statuses) == devices
        and sum(s["cluster"]["owned"] for s in statuses) == devices
        and all(s["phantoms"]["established_without_session"] == 0 for s in statuses)
    )


def plot(timeline: list[dict[str, Any]], marks: dict[str, float], names: list[str],
         path: Path, title: str) -> None:  # fmt: skip
    """Sessions per node and sockets cluster-wide; takeovers and reaps; leftovers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [row["t"] for row in timeline]
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    ax = axes[0]
    per_node = list(zip(*(row["sessions"] for row in timeline), strict=True))
    ax.stackplot(ts, *per_node, labels=[f"{n} sessions" for n in names], alpha=0.6)
    ax.plot(ts, [row["established"] for row in timeline], "k", lw=1,
            label="ESTABLISHED, all nodes (kernel)")  # fmt: skip
    ax.plot(ts, [row["online"] for row in timeline], "--", lw=0.8, label="devices online")
    ax.set_ylabel("count")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
    ax = axes[1]
    ax.plot(ts, [row["cross_node"] for row in timeline], label="cross-node takeovers")
    ax.plot(ts, [row["local"] for row in timeline], label="same-node takeovers")
    ax.plot(ts, [row["reaped"] for row in timeline], label="reaped (silent devices)")
    ax.set_ylabel("cumulative")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[2]
    ax.plot(ts, [row["established"] - row["online"] for row in timeline],
            label="ESTABLISHED minus devices online")  # fmt: skip
    ax.plot(ts, [row["close_wait"] for row in timeline], label="CLOSE_WAIT")
    ax.plot(ts, [row["phantoms"] for row in timeline], label="phantoms (audit)")
    ax.set_ylabel("sockets")
    ax.set_xlabel("seconds")
    ax.legend(loc="upper left", fontsize=8)
    for ax in axes:
        if "churn_start" in marks:
            ax.axvspan(marks["churn_start"], marks.get("churn_end", ts[-1]), alpha=0.08)
        if "storm" in marks:
            ax.axvline(marks["storm"], color="red", lw=0.8, ls=":")
        if "settled" in marks:
            ax.axvline(marks["settled"], color="green", lw=0.8, ls=":")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """The whole demo; returns the exit status."""
    reason = "--no-netns given" if args.no_netns else netns_reason()
    mode = "loopback" if reason else "netns"
    print(
        f"keepconn cluster demo: {args.nodes} nodes on one Redis, {args.devices} devices, "
        f"{args.seconds:.0f} s; every reboot lands on another node"
    )
    if reason:
        print(f"  no namespaces ({reason}): a rebooted device's old socket is only silent")
    namespaces: list[Any] = []
    cluster: NodeCluster | None = None
    fleet: Fleet | None = None
    tmp = tempfile.TemporaryDirectory(prefix="keepconn-demo-cluster-")
    work = Path(tmp.name)
    try:
        cells = []
        if mode == "netns":
            count = max(args.cells, Fleet.workers_needed(args.devices))
            namespaces, cells = make_cells(count)
        users = write_users(work / "users.txt")
        host = cells[0].host_addr if cells else "127.0.0.1"
        cluster = NodeCluster(
            work, work / "users.txt", nodes=args.nodes, host=host, node_ttl=args.node_ttl,
            extra=["--hello-timeout", "5"],
        )  # fmt: skip
        assert cluster.redis is not None
        print(f"  redis-server pid {cluster.redis.pid} on {cluster.redis.url}")
        for name, node in zip(cluster.names, cluster.nodes, strict=True):
            print(
                f"  {name}: pid {node.proc.pid} on {host}:{node.port}, "
                f"http://127.0.0.1:{node.status_port}/status"
            )
        profile = DeviceProfile(
            keepalive=args.keepalive, telemetry_interval=2.0, qos1_fraction=0.5,
            reboot_rate=args.reboot_rate, loss_rate=args.loss_rate, boot_time=1.0,
        )  # fmt: skip
        fleet = Fleet(
            devices=args.devices, host=host, port=cluster.nodes[0].port, users=users,
            profile=profile, cells=cells, ramp=3.0, endpoints=cluster.endpoints,
        )  # fmt: skip
        settle_window = profile.dark_seconds + 4.0
        churn_start = 5.0
        churn_end = max(churn_start + 5.0, args.seconds - settle_window)
        storm_at = None
        if not args.no_storm and cells:
            storm_at = churn_start + 0.45 * (churn_end - churn_start)
        marks: dict[str, float] = {}
        timeline: list[dict[str, Any]] = []
        view = LiveView()
        fleet.start()
        started = time.monotonic()
        phase = "ramp-up"
        settled = False
        settle_deadline = None
        statuses: list[dict[str, Any]] = []
        kernel: dict[str, Any] = {}
        totals: dict[str, int] = {}
        while True:
            elapsed = time.monotonic() - started
            if "churn_start" not in marks and elapsed >= churn_start:
                fleet.command("churn")
                marks["churn_start"], phase = elapsed, "churn"
            if storm_at is not None and "storm" not in marks and elapsed >= storm_at:
                fleet.command("storm")
                marks["storm"], phase = elapsed, "STORM"
            if "churn_end" not in marks and elapsed >= churn_end:
                fleet.command("calm")
                marks["churn_end"], phase = elapsed, "settling"
            if elapsed >= args.seconds and settle_deadline is None:
                settle_deadline = time.monotonic() + args.settle_timeout
            if not fleet.alive():
                raise RuntimeError("a fleet worker died; see its traceback above")
            statuses, kernel, totals = cluster.statuses(), cluster.census(), fleet.totals()
            timeline.append(_row(elapsed, statuses, kernel, totals))
            view.show(elapsed, _view(elapsed, phase, statuses, kernel, totals, args.devices,
                                     view.tty))  # fmt: skip
            if settle_deadline is not None:
                if _settled(statuses, kernel, totals, args.devices):
                    settled, marks["settled"] = True, elapsed
                    break
                if time.monotonic() > settle_deadline:
                    break
            time.sleep(0.5)
        at_settle = {"statuses": statuses, "kernel": kernel}
        summary = fleet.finish()
        final_kernel: dict[str, Any] = {}
        for _ in range(20):
            final_kernel = cluster.census()
            if final_kernel["established"] == 0 and final_kernel["close_wait"] == 0:
                break
            time.sleep(0.5)
        final = cluster.statuses()
        codes = cluster.stop()
        ok = (
            settled
            and summary["ever_online"] == args.devices
            and summary["moves"] > 0
            and final_kernel["established"] == 0
            and final_kernel["close_wait"] == 0
        )
        cross = sum(s.get("cluster", {}).get("took_from_remote", 0) for s in final)
        resets = sum(s.get("cluster", {}).get("remote_takeovers", 0) for s in final)
        print()
        print(f"summary ({mode}{'' if reason is None else ': ' + reason})")
        print(f"  devices online at least once   {summary['ever_online']}/{args.devices}")
        print(f"  moves to another node          {summary['moves']}")
        print(f"  cross-node takeovers           {cross} claimed, {resets} old sockets reset")
        print(f"  takeover reconnect ms          {summary['takeover_ms']}")
        print(f"  device-side failures           {summary['failures'] or '-'}")
        text = f"after {marks['settled']:.1f} s" if settled else "NOT settled"
        print(
            f"  settled                        {text}: {kernel.get('established')} ESTABLISHED "
            f"for {args.devices} devices over {args.nodes} nodes, CLOSE_WAIT "
            f"{kernel.get('close_wait')}"
        )
        print(f"  after clean disconnects        {final_kernel}; node exit codes {codes}")
        title = f"keepconn cluster demo: {args.devices} devices over {args.nodes} nodes ({mode})"
        try:
            plot(timeline, marks, cluster.names, args.out, title)
            print(f"  timeline                       {args.out}")
        except Exception as exc:  # noqa: BLE001 - a missing plot must not hide the verdict
            print(f"  timeline not drawn: {exc}")
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            brief = {k: v for k, v in summary.items() if k != "per_device"}
            args.json.write_text(json.dumps({
                "ok": ok, "mode": mode, "settled": settled, "marks": marks, "fleet": brief,
                "at_settle": at_settle, "final": final, "final_kernel": final_kernel,
                "timeline": timeline,
            }, indent=1))  # fmt: skip
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        if fleet is not None:
            fleet.kill()
        if cluster is not None:
            cluster.stop()
        for ns in namespaces:
            ns.close()
        tmp.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options and run; SIGTERM is turned into the same clean-up as Ctrl-C."""
    args = _parse(argv)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return run(args)
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            print("\ninterrupted; namespaces and subprocesses cleaned up")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

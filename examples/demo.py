"""`make demo`: the example MQTT gateway under a churning device fleet, watched live.

What it does, in about a minute:

1. Starts ``examples/device_gateway/gateway.py`` from its documented command line (a users file
   and a SQLite file in a temporary directory; the status page on loopback).
2. Starts a few hundred simulated devices (``examples/device_gateway/fleet.py``). As root they
   live in network namespaces ("cells") joined to this one by veth pairs, so a device that
   reboots or loses power leaves a truly half-open connection behind; without root they use
   loopback and a lost device is only silent (the kernel still ACKs), and the demo says so.
3. Churn: devices reboot (vanish without FIN, reconnect with the same id: a takeover), some go
   dark for longer than the gateway's 1.5 x keepalive (the gateway must reap them), and once
   every cell loses power at the same moment (a reconnect storm).
4. Churn stops; the demo waits for things to settle and checks the kernel's socket table, as
   the gateway's /status reports it: no ESTABLISHED socket without a session, no CLOSE_WAIT.
5. Devices disconnect cleanly, the gateway is stopped, a summary is printed, the timeline is
   drawn to a PNG (``out/demo.png``) and the numbers written as JSON with ``--json``.

Exit status: 0 when every device came online and no phantom socket remained after settling;
1 otherwise; 130 on Ctrl-C. Namespaces are removed and every subprocess is ended by its pid
whatever happens.
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

from device_gateway.fleet import (
    DeviceProfile,
    Fleet,
    GatewayProcess,
    make_cells,
    netns_reason,
    write_users,
)

# The reasons a gateway *reaps* (decides a peer is dead) as opposed to merely closing.
REAP_REASONS = ("IDLE_TIMEOUT", "HEARTBEAT_TIMEOUT", "KEEPALIVE_TIMEOUT")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run the gateway under a churning device fleet.")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the run (>= 20)")
    p.add_argument("--devices", type=int, default=300, help="simulated devices")
    p.add_argument("--keepalive", type=int, default=4, help="devices' CONNECT keepalive, s")
    p.add_argument("--reboot-rate", type=float, default=0.4, help="per device per minute")
    p.add_argument("--loss-rate", type=float, default=0.1, help="per device per minute")
    p.add_argument("--cells", type=int, default=2, help="namespaces for devices (root)")
    p.add_argument("--no-netns", action="store_true", help="loopback only, even as root")
    p.add_argument("--no-storm", action="store_true", help="skip the reconnect storm")
    p.add_argument("--out", type=Path, default=Path("out/demo.png"), help="timeline PNG")
    p.add_argument("--json", type=Path, help="write the summary JSON here")
    p.add_argument("--settle-timeout", type=float, default=30.0, help="seconds to settle")
    args = p.parse_args(argv)
    if args.seconds < 20:
        p.error("--seconds must be at least 20 (churn, a storm and settling need the time)")
    if args.devices < 1:
        p.error("--devices must be at least 1")
    return args


class LiveView:
    """A progress bar and a table, redrawn in place on a terminal (one line a while if not)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.tty = sys.stdout.isatty()
        self._lines = 0
        self._last_plain = -1e9

    def show(self, elapsed: float, phase: str, status: dict[str, Any], fleet: dict[str, int]):
        """Draw one frame."""
        closed = status.get("closed", {})
        phantoms = status.get("phantoms", {})
        if not self.tty:
            if elapsed - self._last_plain >= 5.0:
                self._last_plain = elapsed
                print(
                    f"t={elapsed:5.1f}s {phase:<8} sessions={status.get('sessions', '?')} "
                    f"online={fleet.get('online', 0)} takeovers={status.get('takeovers', '?')} "
                    f"reaped={sum(closed.get(r, 0) for r in REAP_REASONS)} "
                    f"phantoms={phantoms.get('established_without_session', '?')}/"
                    f"{phantoms.get('close_wait', '?')}",
                    flush=True,
                )
            return
        width = 40
        done = min(1.0, elapsed / self.seconds)
        bar = "#" * int(done * width) + "-" * (width - int(done * width))
        reaps = "  ".join(f"{r} {closed.get(r, 0)}" for r in REAP_REASONS)
        others = "  ".join(
            f"{name} {n}" for name, n in closed.items() if n and name not in REAP_REASONS
        )
        rows = [
            f"[{bar}] {elapsed:5.1f}/{self.seconds:.0f} s  {phase}",
            "",
            f"  {'sessions':<22}{status.get('sessions', '?'):>7}   devices online "
            f"{fleet.get('online', 0)}, dark {fleet.get('dark', 0)}, "
            f"connecting {fleet.get('connecting', 0)}",
            f"  {'connections':<22}{status.get('connections', '?'):>7}   pending hellos "
            f"{status.get('pending_hellos', '?')}",
            f"  {'reaps by reason':<22}{reaps}",
            f"  {'other closes':<22}{others or '-'}",
            f"  {'takeovers':<22}{status.get('takeovers', '?'):>7}   reboots "
            f"{fleet.get('reboots', 0)}, losses {fleet.get('losses', 0)}, storm drops "
            f"{fleet.get('storm_drops', 0)}",
            f"  {'phantom sockets':<22}{phantoms.get('established_without_session', '?'):>7}"
            f"   ESTABLISHED without a session (kernel table)",
            f"  {'':<22}{phantoms.get('close_wait', '?'):>7}   CLOSE_WAIT",
            f"  {'telemetry stored':<22}{status.get('telemetry_stored', '?'):>7}   published "
            f"{fleet.get('published', 0)}, QoS 1 acked {fleet.get('acked', 0)}",
        ]
        if self._lines:
            sys.stdout.write(f"\x1b[{self._lines}F\x1b[J")
        sys.stdout.write("\n".join(rows) + "\n")
        sys.stdout.flush()
        self._lines = len(rows)


def _sample(gateway: GatewayProcess) -> dict[str, Any]:
    try:
        return gateway.status()
    except OSError:
        # One slow answer under a storm is not a failure; the next poll will do.
        return {}


def plot(timeline: list[dict[str, Any]], marks: dict[str, float], path: Path, title: str) -> None:
    """Draw the run: sessions and devices, closes by reason and takeovers, phantom sockets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [row["t"] for row in timeline]
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    ax = axes[0]
    ax.plot(ts, [row["sessions"] for row in timeline], label="gateway sessions")
    ax.plot(ts, [row["connections"] for row in timeline], label="gateway connections", lw=0.8)
    ax.plot(ts, [row["online"] for row in timeline], "--", label="devices online", lw=0.8)
    ax.set_ylabel("count")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
    ax = axes[1]
    reasons = sorted({r for row in timeline for r, n in row["closed"].items() if n})
    for reason in reasons:
        ax.plot(ts, [row["closed"].get(reason, 0) for row in timeline], label=reason)
    ax.set_ylabel("closes (cumulative)")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[2]
    ax.plot(ts, [row["phantom_established"] for row in timeline], label="ESTABLISHED w/o session")
    ax.plot(ts, [row["phantom_close_wait"] for row in timeline], label="CLOSE_WAIT")
    ax.set_ylabel("phantom sockets")
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


def _row(t: float, status: dict[str, Any], fleet: dict[str, int]) -> dict[str, Any]:
    phantoms = status.get("phantoms", {})
    return {
        "t": round(t, 2),
        "sessions": status.get("sessions", 0),
        "connections": status.get("connections", 0),
        "takeovers": status.get("takeovers", 0),
        "closed": dict(status.get("closed", {})),
        "phantom_established": phantoms.get("established_without_session", 0),
        "phantom_close_wait": phantoms.get("close_wait", 0),
        "online": fleet.get("online", 0),
        "dark": fleet.get("dark", 0),
    }


def _settled(status: dict[str, Any], fleet: dict[str, int], devices: int) -> bool:
    phantoms = status.get("phantoms")
    if not phantoms:
        return False
    return (
        phantoms.get("established_without_session", 1) == 0
        and phantoms.get("close_wait", 1) == 0
        and fleet.get("online", -1) == devices
        and status.get("sessions") == devices
        and status.get("connections") == devices
    )


def run(args: argparse.Namespace) -> int:
    """The whole demo; returns the exit status."""
    reason = "--no-netns given" if args.no_netns else netns_reason()
    mode = "loopback" if reason else "netns"
    print(
        f"keepconn demo: {args.devices} devices, {args.seconds:.0f} s, keepalive "
        f"{args.keepalive} s (the gateway reaps at 1.5 x = {1.5 * args.keepalive:g} s)"
    )
    if reason:
        print(f"  no namespaces ({reason}): devices use loopback and a rebooted or lost device")
        print("  is simulated by dropping its socket silently; the kernel still ACKs, so this")
        print("  shows hung devices, not truly half-open ones. Run as root for the real thing.")
    namespaces: list[Any] = []
    gateway: GatewayProcess | None = None
    fleet: Fleet | None = None
    tmp = tempfile.TemporaryDirectory(prefix="keepconn-demo-")
    work = Path(tmp.name)
    try:
        cells = []
        if mode == "netns":
            count = max(args.cells, Fleet.workers_needed(args.devices))
            namespaces, cells = make_cells(count)
            print(
                f"  {len(cells)} device cells (network namespaces): "
                + ", ".join(f"{c.name} {c.dev_addr}" for c in cells)
            )
        users = write_users(work / "users.txt")
        host = cells[0].host_addr if cells else "127.0.0.1"
        gateway = GatewayProcess(
            host=host,
            users=work / "users.txt",
            data=work / "telemetry.sqlite3",
            hello_timeout=5.0,
            log=work / "gateway.log",
        )
        print(
            f"  gateway pid {gateway.proc.pid} on {host}:{gateway.port}, status on "
            f"http://127.0.0.1:{gateway.status_port}/status"
        )
        profile = DeviceProfile(
            keepalive=args.keepalive,
            telemetry_interval=2.0,
            qos1_fraction=0.5,
            reboot_rate=args.reboot_rate,
            loss_rate=args.loss_rate,
            boot_time=1.0,
        )
        fleet = Fleet(
            devices=args.devices,
            host=host,
            port=gateway.port,
            users=users,
            profile=profile,
            cells=cells,
            ramp=3.0,
        )
        # Churn stops early enough for the last lost device to return and be settled.
        settle_window = profile.dark_seconds + 4.0
        churn_start = 5.0
        churn_end = max(churn_start + 5.0, args.seconds - settle_window)
        storm_at = None if args.no_storm else churn_start + 0.45 * (churn_end - churn_start)
        marks: dict[str, float] = {}
        timeline: list[dict[str, Any]] = []
        view = LiveView(args.seconds)
        fleet.start()
        started = time.monotonic()
        phase = "ramp-up"
        status: dict[str, Any] = {}
        while (elapsed := time.monotonic() - started) < args.seconds:
            if "churn_start" not in marks and elapsed >= churn_start:
                fleet.command("churn")
                marks["churn_start"] = elapsed
                phase = "churn"
            if storm_at is not None and "storm" not in marks and elapsed >= storm_at:
                fleet.command("storm")
                marks["storm"] = elapsed
                phase = "STORM"
            elif "storm" in marks and phase == "STORM" and elapsed > marks["storm"] + 3:
                phase = "churn"
            if "churn_end" not in marks and elapsed >= churn_end:
                fleet.command("calm")
                marks["churn_end"] = elapsed
                phase = "settling"
            if not fleet.alive():
                raise RuntimeError("a fleet worker died; see its traceback above")
            status = _sample(gateway) or status
            totals = fleet.totals()
            timeline.append(_row(elapsed, status, totals))
            view.show(elapsed, phase, status, totals)
            time.sleep(0.5)
        # Settling: every device back online, one session and one socket each, no phantoms.
        deadline = time.monotonic() + args.settle_timeout
        settled = False
        while time.monotonic() < deadline:
            elapsed = time.monotonic() - started
            status = _sample(gateway) or status
            totals = fleet.totals()
            timeline.append(_row(elapsed, status, totals))
            view.show(elapsed, "settling", status, totals)
            if _settled(status, totals, args.devices):
                settled = True
                marks["settled"] = elapsed
                break
            time.sleep(0.5)
        at_settle = status
        fleet_summary = fleet.finish()
        # After every device said DISCONNECT the gateway should hold nothing at all.
        final: dict[str, Any] = {}
        for _ in range(20):
            final = _sample(gateway) or final
            timeline.append(_row(time.monotonic() - started, final, {}))
            if final.get("sessions") == 0 and final.get("phantoms", {}).get("close_wait") == 0:
                break
            time.sleep(0.5)
        exit_code = gateway.stop()
        gateway_stopped = exit_code
        return _report(
            args,
            mode,
            reason,
            fleet_summary,
            at_settle,
            final,
            settled,
            marks,
            timeline,
            gateway_stopped,
        )
    finally:
        if fleet is not None:
            fleet.kill()
        if gateway is not None:
            gateway.stop()
        for ns in namespaces:
            ns.close()
        tmp.cleanup()


def _report(
    args: argparse.Namespace,
    mode: str,
    reason: str | None,
    fleet: dict[str, Any],
    at_settle: dict[str, Any],
    final: dict[str, Any],
    settled: bool,
    marks: dict[str, float],
    timeline: list[dict[str, Any]],
    gateway_exit: int | None,
) -> int:
    phantoms = at_settle.get("phantoms", {})
    final_phantoms = final.get("phantoms", {})
    leftover = (
        phantoms.get("established_without_session", 1)
        + phantoms.get("close_wait", 1)
        + final_phantoms.get("established_without_session", 1)
        + final_phantoms.get("close_wait", 1)
    )
    all_online = fleet["ever_online"] == args.devices
    ok = settled and leftover == 0 and all_online
    closed = {k: v for k, v in final.get("closed", {}).items() if v}
    print()
    print(f"summary ({mode}{'' if reason is None else ': ' + reason})")
    print(f"  devices online at least once   {fleet['ever_online']}/{args.devices}")
    print(f"  connects / takeover reconnects {fleet['connects']} / {fleet['takeovers']}")
    print(f"  connect latency ms             {fleet['connect_ms']}")
    print(f"  takeover latency ms            {fleet['takeover_ms']}")
    print(
        f"  reboots, losses, storm drops   {fleet['reboots']}, {fleet['losses']}, "
        f"{fleet['storm_drops']}"
    )
    print(
        f"  published QoS0/QoS1, acked     {fleet['published']['qos0']}/"
        f"{fleet['published']['qos1']}, {fleet['acked']}"
    )
    print(f"  device-side failures           {fleet['failures'] or '-'}")
    print(f"  gateway takeovers              {final.get('takeovers', '?')}")
    print(f"  gateway closes by reason       {closed}")
    print(f"  telemetry stored               {final.get('telemetry_stored', '?')}")
    settle_text = f"after {marks['settled']:.1f} s" if settled else "NOT settled"
    print(
        f"  settled                        {settle_text}: phantoms ESTABLISHED w/o session "
        f"{phantoms.get('established_without_session', '?')}, CLOSE_WAIT "
        f"{phantoms.get('close_wait', '?')}"
    )
    print(
        f"  after clean disconnects        sessions {final.get('sessions', '?')}, phantoms "
        f"{final_phantoms.get('established_without_session', '?')}/"
        f"{final_phantoms.get('close_wait', '?')}; gateway exit code {gateway_exit}"
    )
    title = f"keepconn demo: {args.devices} devices ({mode}), keepalive {args.keepalive} s"
    try:
        plot(timeline, marks, args.out, title)
        print(f"  timeline                       {args.out}")
    except Exception as exc:  # noqa: BLE001 - a missing plot must not hide the verdict
        print(f"  timeline not drawn: {exc}")
    if args.json is not None:
        summary = {
            "ok": ok,
            "mode": mode,
            "netns_unavailable": reason,
            "devices": args.devices,
            "seconds": args.seconds,
            "settled": settled,
            "marks": marks,
            "phantoms_at_settle": phantoms,
            "status_at_settle": at_settle,
            "status_final": final,
            "gateway_exit": gateway_exit,
            "fleet": fleet,
            "timeline": timeline,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1))
        print(f"  summary JSON                   {args.json}")
    print("PASS" if ok else "FAIL: " + ("phantoms remain" if leftover else "did not settle"))
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options and run; SIGTERM is turned into the same clean-up as Ctrl-C."""
    args = _parse(argv)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # A shell starts background jobs with SIGINT ignored; Ctrl-C must still clean up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return run(args)
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            print("\ninterrupted; namespaces and subprocesses cleaned up")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

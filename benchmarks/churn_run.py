"""One churn run: the plan (fleet and timeline, quick or full), and one system measured under it."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from churn_servers import KeepconnServer, MosquittoServer, NaiveServer
from churn_watch import Sampler, Watcher
from device_gateway.fleet import DeviceProfile, Fleet
from harness import quantile, round_or_none


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


# ----------------------------------------------------------------------------------------------
# One system, one run.


def run_system(
    system: str,
    plan: Plan,
    *,
    host: str,
    cells: Sequence[Any],
    workdir: Path,
    users: Sequence[tuple[str, str]],
    users_path: Path,
    plain_users_path: Path,
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
            server = NaiveServer(host, workdir, plain_users_path)
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
    # Each takeover with when it began (against the churn's clock) and whether a burst struck
    # it: a tail that is one stall shows as slow takeovers at one moment, a slow path as many.
    timed = sorted(
        (round(at - churn_start, 3), ms, burst)
        for r in summary["per_device"]
        for ms, at, burst in zip(
            r["takeover_ms"], r["takeover_at"], r["takeover_burst"], strict=True
        )
    )
    in_burst = [ms for _, ms, burst in timed if burst]
    outside_burst = [ms for _, ms, burst in timed if not burst]
    result = {
        "system": system,
        "connections": connections,
        "detect_p50_s": round_or_none(quantile(detect, 0.50), 3),
        "detect_p99_s": round_or_none(quantile(detect, 0.99), 3),
        "detect_max_s": round_or_none(max(detect) if detect else None, 3),
        "bound_s": round(bound, 3),
        "phantom_established_max_after_settle": max(after_settle) if after_settle else None,
        "close_wait_max": max((row["close_wait"] for row in timeline), default=0),
        "takeover_p99_ms": round_or_none(quantile(takeover, 0.99), 1),
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
        "detect_mean_s": round_or_none(statistics.fmean(detect), 3) if detect else None,
        "estimate_halfwidth_max_s": round_or_none(max((d[3] for d in losses), default=0.0), 3),
        "reboot_old_socket_closed_p50_s": round_or_none(quantile(reboots_closed, 0.5), 3),
        "reboot_old_socket_closed_p99_s": round_or_none(quantile(reboots_closed, 0.99), 3),
        "reboots_old_socket_closed": len(reboots_closed),
        "vanish_reports": watcher.vanished,
        "census_s_p50": round_or_none(quantile(watcher.census_s, 0.5), 4),
        "census_s_max": round_or_none(max(watcher.census_s, default=0.0), 4),
        "takeover_ms_p50": round_or_none(quantile(takeover, 0.5), 1),
        "takeovers": len(takeover),
        "takeovers_timed": timed,
        "slowest_takeovers": [
            {"ms": ms, "t": t, "burst": burst}
            for t, ms, burst in sorted(timed, key=lambda x: x[1], reverse=True)[:20]
        ],
        "takeovers_in_burst": len(in_burst),
        "takeover_in_burst_p99_ms": round_or_none(quantile(in_burst, 0.99), 1),
        "takeover_outside_burst_p99_ms": round_or_none(quantile(outside_burst, 0.99), 1),
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

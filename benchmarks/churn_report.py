"""The churn benchmark's output: the terminal table and the two plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from churn_run import Plan


def print_table(results: Sequence[dict[str, Any]], details: dict[str, Any], plan: Plan) -> None:
    """The terminal table: one row per system."""
    head = (
        f"{'system':<10} {'conns':>6} {'det p50':>8} {'det p99':>8} {'det max':>8} {'bound':>6} "
        f"{'undet':>5} {'phantom':>7} {'CL_WAIT':>7} {'tkov p99':>9} {'cpu s':>7} "
        f"{'MB/1k':>6} {'lost':>5}"
    )
    print()
    print(
        f"churn: {plan.devices} devices, keepalive {plan.keepalive} s, "
        f"{plan.reboots_per_s:g} reboots/s + {plan.losses_per_s:g} losses/s "
        f"for {plan.churn_s:g} s, "
        f"burst of {plan.burst} at {plan.burst_at_s:g} s; census every {plan.poll_s:g} s"
    )
    print(head)
    print("-" * len(head))

    def cell(value: Any, width: int, fmt: str = "") -> str:
        return f"{'-' if value is None else format(value, fmt):>{width}}"

    for r in results:
        d = details[r["system"]]
        print(
            f"{r['system']:<10} {r['connections']:>6} {cell(r['detect_p50_s'], 8, '.2f')} "
            f"{cell(r['detect_p99_s'], 8, '.2f')} {cell(r['detect_max_s'], 8, '.2f')} "
            f"{r['bound_s']:>6.1f} {d['losses_undetected']:>5} "
            f"{cell(r['phantom_established_max_after_settle'], 7)} {r['close_wait_max']:>7} "
            f"{cell(r['takeover_p99_ms'], 9, '.1f')} {r['cpu_s']:>7.1f} "
            f"{r['rss_mb_per_1k']:>6.2f} {r['lost_messages']:>5}"
        )
    for r in results:
        d = details[r["system"]]
        slowest = ", ".join(
            f"{x['ms']:.0f} ms at {x['t']:.1f} s" for x in d["slowest_takeovers"][:5]
        )
        print(
            f"{r['system']:<10} takeover p99 ms: {cell(d['takeover_in_burst_p99_ms'], 0, '.1f')} "
            f"in the burst ({d['takeovers_in_burst']}), "
            f"{cell(d['takeover_outside_burst_p99_ms'], 0, '.1f')} outside; slowest: {slowest}"
        )
    print(
        "det = seconds from a device's silence to its server socket leaving ESTABLISHED "
        "(lost devices; undet = never left); phantom = vanished devices' sockets still "
        "ESTABLISHED after the settle point; tkov = reconnect to CONNACK after a reboot (ms)"
    )


def plot(details: dict[str, Any], out_dir: Path) -> list[Path]:
    """Detection-latency distribution and phantoms over time, one PNG each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"keepconn": "tab:green", "mosquitto": "tab:blue", "naive": "tab:red"}
    paths = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for system, d in details.items():
        values = d["detect_s"]
        if not values:
            continue
        ys = [(i + 1) / len(values) for i in range(len(values))]
        ax.step(values, ys, where="post", color=colors[system], label=f"{system} (n={len(values)})")
        ax.axvline(d["result"]["bound_s"], color=colors[system], linestyle=":", linewidth=1)
    ax.set_xlabel("detection latency of a half-open peer (s); dotted: configured bound")
    ax.set_ylabel("fraction of lost devices")
    ax.set_title("Half-open peers: silence to server close (CDF)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / "churn-detection.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for system, d in details.items():
        xs = [row["t"] for row in d["timeline"]]
        top.plot(xs, [row["phantoms"] for row in d["timeline"]], color=colors[system], label=system)
        bottom.plot(
            xs, [row["close_wait"] for row in d["timeline"]], color=colors[system], label=system
        )
        top.axvline(d["settle_at_s"], color=colors[system], linestyle=":", linewidth=1)
    any_d = next(iter(details.values()))
    for ax in (top, bottom):
        ax.axvline(any_d["calm_at_s"], color="grey", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
    top.set_ylabel("phantom ESTABLISHED")
    top.set_title("Server sockets of vanished devices (dashed: churn stops; dotted: settle point)")
    top.legend()
    bottom.set_ylabel("CLOSE_WAIT")
    # A flat zero line should read as zero, not as matplotlib's +/-0.05 default range.
    bottom.set_ylim(bottom=-0.5, top=max(5.0, bottom.get_ylim()[1]))
    bottom.set_xlabel("seconds since the churn started")
    fig.tight_layout()
    path = out_dir / "churn-phantoms.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths

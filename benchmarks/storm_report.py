"""The storm benchmark's output: the terminal table and the timeline plot."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import grid


def _by_limit(figures: dict[str, Any]) -> str:
    """The admission refusals by limit, the non-zero ones ("-" without admission)."""
    counts = (figures.get("admission_refused") or {}).get("refused")
    if counts is None:
        return "-"
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v) or "0"


def table(results: list[dict[str, Any]]) -> str:
    """The terminal table: one column per server."""

    def show(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    def lag(f: dict[str, Any]) -> str:
        return "/".join(show(f[k]) for k in ("lag_p50_ms", "lag_p99_ms", "lag_max_ms"))

    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("devices back", lambda f: f"{f['back']}/{f['devices']}"),
        ("time until all back, s", lambda f: show(f["time_to_all_back_s"])),
        ("back after, p50 / p99, s", lambda f: f"{show(f['back_p50_s'])}/{show(f['back_p99_s'])}"),
        ("accepts/s in storm, peak", lambda f: show(f["accept_rate_peak"])),
        ("accepts/s in storm, mean", lambda f: show(f["accept_rate_mean"])),
        ("loop lag p50/p99/max, ms", lag),
        ("loop lag before cut p50, ms", lambda f: show(f["lag_before_cut_p50_ms"])),
        ("server CPU in storm, s", lambda f: show(f["cpu_s_in_storm"])),
        ("server CPU peak, %", lambda f: show(f["cpu_pct_peak"])),
        ("server RSS peak, MB", lambda f: show(f["rss_peak_mb"])),
        ("server fds peak", lambda f: show(f["fds_peak"])),
        ("connections made/s in storm, peak", lambda f: show(f.get("handshake_rate_peak"))),
        ("sessions dropped under devices", lambda f: show(f.get("sessions_dropped"))),
        ("... device loop stalled", lambda f: show(f.get("device_stalled"))),
        ("false reaps", lambda f: show(f["false_reaps"])),
        (
            "device loop lag p99/max, ms",
            lambda f: f"{show(f.get('device_lag_p99_ms'))}/{show(f.get('device_lag_max_ms'))}",
        ),
        ("OVERLOADED closes", lambda f: show(f.get("overloaded_closes"))),
        ("... by limit (admission)", _by_limit),
        ("retry hints given", lambda f: show(f.get("retry_hints"))),
        ("server timeout closes", lambda f: show(f["server_timeout_closes"])),
        ("phantom ESTABLISHED, peak", lambda f: show(f["phantom_established_peak"])),
        ("phantom ESTABLISHED, settled", lambda f: show(f["phantom_established_end"])),
        ("in hello, settled (audit)", lambda f: show(f.get("in_hello_end"))),
        ("old conns still open, settled", lambda f: show(f["old_connections_open_end"])),
        ("... replaced before a sweep could", lambda f: show(f.get("replaced_before_timeout"))),
        ("CLOSE_WAIT, peak", lambda f: show(f["close_wait_peak"])),
        ("CLOSE_WAIT, settled", lambda f: show(f["close_wait_end"])),
        ("... not yet accepted", lambda f: show(f.get("close_wait_unaccepted_end"))),
        ("connect attempts", lambda f: show(f["attempts"])),
        (
            "failed attempts",
            lambda f: ", ".join(f"{k} {v}" for k, v in sorted(f["failed_attempts"].items())) or "0",
        ),
    ]
    header = ["", *[r["name"] for r in results]]
    body = [[name, *[fn(r["figures"]) for r in results]] for name, fn in rows]
    return grid(header, body)


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """A timeline per measure, one line per server, time 0 = the cut."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("devices online", "t", "online", "linear"),
        ("server accepts per second", "accept_t", "accept_rate", "linear"),
        ("loop lag (probe ping, worst per 0.25 s), ms", "lag_t", "lag_max_ms", "log"),
        ("phantom ESTABLISHED (kernel)", "census_t", "phantom_established", "linear"),
        ("CLOSE_WAIT (kernel)", "census_t", "close_wait", "linear"),
        ("old connections the server holds open", "t", "old_connections_open", "linear"),
        ("server CPU, %", "t", "cpu_pct", "linear"),
        ("server RSS, MB", "t", "rss_mb", "linear"),
    ]
    fig, axes = plt.subplots(4, 2, figsize=(13, 13), sharex=True)
    for ax, (name, xs, ys, scale) in zip(axes.flat, panels, strict=True):
        for r in results:
            tl = r["timeline"]
            values = [v if v is not None else float("nan") for v in tl[ys]]
            ax.plot(tl[xs], values, label=r["label"])
        ax.set_title(name, fontsize=10)
        ax.set_yscale(scale)
        ax.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
        ax.grid(True, alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("seconds since the cut")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)

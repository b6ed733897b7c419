"""The runtime benchmark's report: the table on the terminal and the PNG of per-connection
costs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness import grid

HEADER = (
    "server",
    "RSS B/conn",
    "objects/conn",
    "CPU s/1k pings",
    "gc.collect ms @N2",
    "loop lag p99 ms",
    "takeover CONNACK p50/p99 ms",
)


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def row(result: dict[str, Any]) -> list[str]:
    f = result["figures"]
    if f["lag_source"] == "server_loop":
        lag = _num(f["lag_p99_ms"], 2)
    else:
        lag = f"{_num(f['rtt_p99_ms'], 2)} (client rtt)"
    takeover = "-"
    if "takeover_connack_p99_ms" in f:
        p50 = _num(f["takeover_connack_p50_ms"], 1)
        takeover = f"{p50} / {_num(f['takeover_connack_p99_ms'], 1)}"
    return [
        result["name"],
        _num(f["rss_per_conn"]),
        _num(f["objects_per_conn"], 1),
        _num(f["cpu_s_per_1k_pings"], 3),
        _num(f["gc_ms_n2"], 1),
        lag,
        takeover,
    ]


def table(results: Sequence[dict[str, Any]], n1: int, n2: int) -> str:
    """One row per server, then what the columns mean."""
    body = [row(r) for r in results]
    notes = [
        "",
        f"per connection: the change from {n1:,} to {n2:,} idle connections / the difference;",
        "objects: tracked objects after a full collection, inside the server, frozen ones too;",
        "gc.collect: a full collection, which walks no frozen object;",
        f"CPU: the server's user+system seconds over the window at {n2:,}, per 1,000 pings;",
        "loop lag: overshoot of a 20 ms sleep on the server's loop; (client rtt): PING round",
        "trip measured by the clients, for a server with no probe inside;",
        "takeover: CONNECT -> CONNACK of rebooted devices, the old connection left silent.",
    ]
    for r in results:
        frozen = r["figures"].get("frozen_n2")
        if frozen:
            notes.append(f"note [{r['name']}]: {frozen:,} of its objects at {n2:,} frozen")
        for note in r["notes"]:
            notes.append(f"note [{r['name']}]: {note}")
    return grid(HEADER, body) + "\n" + "\n".join(notes)


def plot(results: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Bars of RSS per connection and tracked objects per connection, one bar per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in results]
    colours = ["tab:blue" if r["python"] else "tab:gray" for r in results]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True)
    for axis, key, label, digits in (
        (top, "rss_per_conn", "RSS bytes per connection", 0),
        (bottom, "objects_per_conn", "tracked objects per connection", 1),
    ):
        raw = [r["figures"][key] for r in results]
        bars = axis.bar(names, [v or 0.0 for v in raw], color=colours)
        # Mosquitto is C: it has no Python objects to count.
        texts = ["n/a" if v is None else f"{v:,.{digits}f}" for v in raw]
        axis.bar_label(bars, labels=texts, fontsize=8)
        axis.set_ylabel(label)
        axis.grid(axis="y", alpha=0.3)
        axis.margins(y=0.15)
    bottom.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

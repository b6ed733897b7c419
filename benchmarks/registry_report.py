"""The registry benchmark's verdicts and output: the performance targets (PASS/FAIL/SKIP), the
terminal table and the plot.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from registry_measure import IMPLS, LIMIT


def _value(rows: list[dict[str, Any]], impl: str, n: int, field: str) -> float | None:
    for row in rows:
        if row["impl"] == impl and row["sessions"] == n:
            return row.get(field)  # type: ignore[no-any-return]
    return None


def _target(name: str, passed: bool | None, detail: str) -> dict[str, Any]:
    status = "SKIP" if passed is None else ("PASS" if passed else "FAIL")
    return {"target": name, "status": status, "detail": detail}


def evaluate_targets(rows: list[dict[str, Any]], sizes: Sequence[int]) -> list[dict[str, Any]]:
    targets = []
    for n in (100_000, 1_000_000):
        kc = _value(rows, "keepconn", n, "touch_ns")
        peers = {
            "floor": ("touch within 1.3x of the floor (e)", 1.3, False),
            "asyncio_timer": ("touch >= 30x cheaper than asyncio timers (c)", 30.0, True),
            "ordered_lru": ("touch >= 2x cheaper than OrderedDict move_to_end (b)", 2.0, True),
        }
        for impl, (label, bound, cheaper) in peers.items():
            other = _value(rows, impl, n, "touch_ns")
            name = f"{label} at N={n:,}"
            if kc is None or other is None:
                targets.append(_target(name, None, f"N={n:,} not measured"))
            elif cheaper:
                ratio = other / kc
                detail = f"{impl} {other:.1f} ns / keepconn {kc:.1f} ns = {ratio:.1f}x"
                targets.append(_target(name, ratio >= bound, detail))
            else:
                ratio = kc / other
                detail = f"keepconn {kc:.1f} ns / {impl} {other:.1f} ns = {ratio:.2f}x"
                targets.append(_target(name, ratio <= bound, detail))

    name = "reap cost per expired session within 2x from N=1e3 to N=1e6"
    costs = {n: _value(rows, "keepconn", n, "reap_ns_per_expired") for n in sizes}
    if costs.get(1_000) is None or costs.get(1_000_000) is None:
        targets.append(_target(name, None, "needs N=1e3 and N=1e6"))
    else:
        known = {n: c for n, c in costs.items() if c is not None}
        spread = max(known.values()) / min(known.values())
        detail = (
            ", ".join(f"{n:,}: {c:.0f} ns" for n, c in known.items()) + f"; max/min = {spread:.2f}x"
        )
        targets.append(_target(name, spread <= 2.0, detail))

    name = "empty sweep at N=1e6 under 0.1 ms"
    empty = _value(rows, "keepconn", 1_000_000, "empty_sweep_ns")
    if empty is None:
        targets.append(_target(name, None, "N=1e6 not measured"))
    else:
        targets.append(_target(name, empty < 100_000, f"{empty / 1000:.2f} us"))

    for n in (100_000, 1_000_000):
        name = f"<= 150 bytes per session at N={n:,}"
        size = _value(rows, "keepconn", n, "bytes_per_session")
        if size is None:
            targets.append(_target(name, None, f"N={n:,} not measured"))
        else:
            targets.append(_target(name, size <= 150, f"{size:.1f} B"))

    name = f"no single reap call over 10 ms with limit={LIMIT:,} (mass expiry, every N)"
    worst: tuple[float, int, str] | None = None
    parts = []
    for n in sizes:
        mass = _value(rows, "keepconn", n, "mass")
        if not mass:
            continue
        for phase, summary in mass["phases"].items():  # type: ignore[attr-defined]
            parts.append(f"{n:,}/{phase}: {summary['max_call_ms']:.2f} ms")
            if worst is None or summary["max_call_ms"] > worst[0]:
                worst = (summary["max_call_ms"], n, phase)
    if worst is None:
        targets.append(_target(name, None, "nothing measured"))
    else:
        detail = f"worst {worst[0]:.2f} ms at N={worst[1]:,} ({worst[2]}); " + ", ".join(parts)
        targets.append(_target(name, worst[0] <= 10.0, detail))
    return targets


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value / scale:,.{digits}f}{unit}"


def _fmt_time(ns: float | None) -> str:
    if ns is None:
        return "-"
    if ns >= 1e6:
        return f"{ns / 1e6:,.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:,.2f} us"
    return f"{ns:,.0f} ns"


def format_table(rows: list[dict[str, Any]], sizes: Sequence[int]) -> str:
    header = (
        f"{'implementation':<15} {'N':>9} {'touch ns':>9} {'x floor':>8} "
        f"{'reap ns/exp':>11} {'empty sweep':>12} {'B/session':>10} "
        f"{'mass max call':>14} {'calls':>6}"
    )
    lines = [header, "-" * len(header)]
    for n in sizes:
        floor = _value(rows, "floor", n, "touch_ns")
        for impl in IMPLS:
            row = next((r for r in rows if r["impl"] == impl and r["sessions"] == n), None)
            if row is None:
                continue
            if row["skipped"]:
                lines.append(f"{impl:<15} {n:>9,} {row['skipped']}")
                continue
            touch = row["touch_ns"]
            ratio = f"{touch / floor:.2f}" if touch and floor else "-"
            mass = row["mass"]
            if mass is None:
                mass_max, calls = "-", "-"
            else:
                mass_max = _fmt_time(mass["max_call_ms"] * 1e6)
                calls = str(mass["calls"]) if mass["limit"] else "1 (no limit)"
            empty = _fmt_time(row["empty_sweep_ns"])
            if row["empty_sweep_kind"] == "event-loop iteration":
                empty += "*"
            lines.append(
                f"{impl:<15} {n:>9,} {_fmt(touch):>9} {ratio:>8} "
                f"{_fmt(row['reap_ns_per_expired'], digits=0):>11} {empty:>12} "
                f"{_fmt(row['bytes_per_session']):>10} {mass_max:>14} {calls:>6}"
            )
        lines.append("")
    lines.append("* one event-loop iteration (asyncio and trio sweep inside their loop).")
    lines.append(
        f"mass max call: longest reap call draining all N at once with limit={LIMIT:,}; "
        "keepconn: worst of now=next_deadline() and now mid-step."
    )
    for row in rows:
        if row["impl"] == "keepconn" and row["mass"]:
            phases = row["mass"]["phases"]
            lines.append(
                f"  keepconn N={row['sessions']:>9,}: "
                + ", ".join(
                    f"{phase} {_fmt_time(s['max_call_ms'] * 1e6)} max over {s['calls']} calls"
                    for phase, s in phases.items()
                )
            )
    return "\n".join(lines)


def draw(rows: list[dict[str, Any]], targets: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("touch_ns", "touch (ns/op)", 1.0),
        ("reap_ns_per_expired", "reap (ns per expired session)", 1.0),
        ("empty_sweep_ns", "empty sweep (us)", 1e3),
        ("bytes_per_session", "memory (bytes/session)", 1.0),
        ("mass", f"longest reap call, mass expiry (ms; limit={LIMIT:,})", 1.0),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9.5))
    for ax, (field, label, scale) in zip(axes.flat, panels, strict=False):
        series: dict[str, list[tuple[int, float]]] = {}
        for row in rows:
            if row["skipped"]:
                continue
            value = row[field]
            if field != "mass":
                if value:
                    series.setdefault(row["impl"], []).append((row["sessions"], value / scale))
            elif value and value["phases"]:
                # keepconn: one line per phase of `now`, so the mid-step cost shows.
                for phase, summary in value["phases"].items():
                    name = f"{row['impl']} ({phase})"
                    series.setdefault(name, []).append((row["sessions"], summary["max_call_ms"]))
            elif value:
                name = row["impl"] + (" (no limit)" if value["limit"] is None else "")
                series.setdefault(name, []).append((row["sessions"], value["max_call_ms"]))
        for name, points in series.items():
            points.sort()
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
        if field == "mass":
            ax.axhline(10.0, color="grey", linestyle="--", linewidth=1)
            ax.legend(fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sessions")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    text_ax = axes.flat[5]
    text_ax.axis("off")
    text = "\n".join(f"{t['status']:<4}  {t['target']}" for t in targets)
    text_ax.text(0, 1, text, va="top", family="monospace", fontsize=7.5, wrap=True)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

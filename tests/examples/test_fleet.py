"""Smoke test of `make demo`: a tiny fleet under churn against the real gateway, end to end.

Runs ``examples/demo.py`` as `make demo` does (a subprocess that starts the gateway from its
documented command), with a few dozen devices for the shortest run it allows, and reads its
``--json`` summary: every device came online, reboots happened and were taken over, the storm
ran, and after settling the kernel's table held no phantom socket. The namespace variant is
marked ``netns``: it skips without root (or fails when KEEPCONN_REQUIRE_NETNS=1, as CI sets).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"
DEVICES = 30


def run_demo(
    tmp_path: Path, *extra: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run the demo with tiny parameters; return the process result and its JSON summary."""
    summary = tmp_path / "summary.json"
    argv = [
        sys.executable,
        str(DEMO),
        "--seconds",
        "20",
        "--devices",
        str(DEVICES),
        # Short keepalive so a lost device is reaped (1.5 x 2 s) and returns inside the run.
        "--keepalive",
        "2",
        # Rates high enough that a 5-second churn window surely sees reboots and a loss.
        "--reboot-rate",
        "4",
        "--loss-rate",
        "1",
        "--json",
        str(summary),
        "--out",
        str(tmp_path / "demo.png"),
        *extra,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=150, check=False)
    assert summary.exists(), f"no summary written\n{done.stdout}\n{done.stderr}"
    assert (tmp_path / "demo.png").stat().st_size > 0, "no timeline drawn"
    return done, json.loads(summary.read_text())


def check(done: subprocess.CompletedProcess[str], summary: dict[str, Any]) -> None:
    """What every variant must show."""
    context = f"\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, context
    assert summary["ok"], context
    fleet = summary["fleet"]
    assert fleet["ever_online"] == DEVICES, context
    assert fleet["reboots"] > 0, context
    # Every reboot and storm drop comes back under the same id: a takeover, as the gateway saw.
    assert fleet["takeovers"] > 0, context
    assert summary["status_final"]["closed"]["TAKEN_OVER"] > 0, context
    assert fleet["storm_drops"] > 0, context
    assert summary["settled"], context
    settled = summary["phantoms_at_settle"]
    assert (settled["established_without_session"], settled["close_wait"]) == (0, 0), context
    final = summary["status_final"]
    assert final["sessions"] == 0, context
    phantoms = final["phantoms"]
    assert (phantoms["established_without_session"], phantoms["close_wait"]) == (0, 0), context
    assert summary["gateway_exit"] == 0, context


def test_demo_loopback(tmp_path: Path) -> None:
    """Without namespaces (as any user runs it): silent drops, takeovers, no phantoms."""
    done, summary = run_demo(tmp_path, "--no-netns")
    assert summary["mode"] == "loopback"
    check(done, summary)


@pytest.mark.netns
def test_demo_netns(tmp_path: Path) -> None:
    """Devices in namespaces: reboots leave truly half-open connections that the gateway takes
    over or reaps, and a storm of cable-pulled cells; nothing left behind."""
    done, summary = run_demo(tmp_path)
    assert summary["mode"] == "netns", summary.get("netns_unavailable")
    check(done, summary)
    # A lost device stays dark past 1.5 x keepalive: the gateway must have reaped it itself.
    if summary["fleet"]["losses"]:
        closed = summary["status_final"]["closed"]
        reaped = closed["IDLE_TIMEOUT"] + closed["HEARTBEAT_TIMEOUT"] + closed["KEEPALIVE_TIMEOUT"]
        assert reaped > 0, summary["status_final"]

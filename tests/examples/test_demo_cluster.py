"""Smoke test of `make demo-cluster`: three nodes on a throwaway Redis under a small fleet whose
rebooting devices land on another node; the run must settle with one ESTABLISHED socket per
device over all nodes' kernel tables and nothing left once the devices leave."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from keepconn.testing import redis_unavailable_reason
from keepconn.testing.pytest_plugin import require_redis

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo_cluster.py"
DEVICES = 30


def test_demo_cluster_settles_with_one_socket_per_device_cluster_wide(tmp_path: Path) -> None:
    reason = redis_unavailable_reason()
    if reason is not None:
        require_redis(reason)
    summary_path = tmp_path / "summary.json"
    argv = [
        sys.executable, str(DEMO), "--seconds", "20", "--devices", str(DEVICES),
        "--keepalive", "2", "--reboot-rate", "6", "--loss-rate", "0.5", "--no-netns",
        "--json", str(summary_path), "--out", str(tmp_path / "demo.png"),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=150, check=False)
    context = f"\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert summary_path.exists(), context
    assert (tmp_path / "demo.png").stat().st_size > 0, context
    summary = json.loads(summary_path.read_text())
    assert done.returncode == 0, context
    assert summary["ok"] and summary["settled"], context
    fleet = summary["fleet"]
    assert fleet["ever_online"] == DEVICES, context
    assert fleet["moves"] > 0, context
    kernel = summary["at_settle"]["kernel"]
    assert (kernel["established"], kernel["close_wait"]) == (DEVICES, 0), context
    statuses = summary["at_settle"]["statuses"]
    assert sum(s["cluster"]["owned"] for s in statuses) == DEVICES, context
    # Devices that moved were taken over across nodes: claimed on one, reset on the other.
    final = summary["final"]
    took = sum(s["cluster"]["took_from_remote"] for s in final)
    reset = sum(s["cluster"]["remote_takeovers"] for s in final)
    assert took > 0 and reset > 0, context
    assert (summary["final_kernel"]["established"], summary["final_kernel"]["close_wait"]) == (
        0,
        0,
    ), context

"""Smoke test of benchmarks/cluster.py: in its --quick run every device gets online on three
nodes, every reboot onto another node is taken over there and its old socket reset on the
first node, and no device keeps two ESTABLISHED sockets across the nodes' kernel tables; the
independent gateways, which share no store, leave every rebooted device doubled.

Correctness only: the latencies and store figures are the benchmark's output for
docs/benchmarks.md, never a pass/fail of the test suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from keepconn.testing import redis_unavailable_reason
from keepconn.testing.pytest_plugin import require_redis

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "cluster.py"

pytestmark = pytest.mark.slow


def test_quick_cluster_run_takes_over_across_nodes_and_leaves_no_device_doubled(
    tmp_path: Path,
) -> None:
    reason = redis_unavailable_reason()
    if reason is not None:
        require_redis(reason)
    out_json, out_png = tmp_path / "cluster.json", tmp_path / "cluster.png"
    argv = [sys.executable, str(BENCHMARK), "--quick", "--json", str(out_json)]
    proc = subprocess.run(
        [*argv, "--png", str(out_png)], capture_output=True, text=True, timeout=280
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out_png.stat().st_size > 0
    report = json.loads(out_json.read_text())
    assert report["quick"] is True
    results = {r["name"]: r["figures"] for r in report["results"]}
    assert set(results) == {"cluster", "independent"}
    for name, figures in results.items():
        assert figures["online"] == figures["devices"], (name, figures)
        assert figures["connack_ok"] == figures["trials"] == 100, (name, figures)
        assert figures["close_wait"] == 0, (name, figures)
        assert figures["node_exit"] == [0, 0, 0], (name, figures)
    cluster = results["cluster"]
    assert cluster["old_gone"] == cluster["trials"], cluster
    assert cluster["devices_doubled"] == 0, cluster
    assert cluster["established"] == cluster["devices"], cluster
    assert cluster["remote_takeovers"] == cluster["trials"], cluster
    assert cluster["idle"]["store_round_trips_per_s"] > 0, cluster
    # Without a shared store no node learns of the move: each rebooted device is doubled.
    independent = results["independent"]
    assert independent["old_gone"] == 0, independent
    assert independent["devices_doubled"] == independent["trials"], independent

"""Smoke test of benchmarks/storm.py: its --quick run must get every device back, leave no
phantom behind the keepconn gateway once settled, and reap no live device.

Correctness only: the run's timings (time until all back, accept rate, loop lag, CPU) are the
benchmark's output for docs/benchmarks.md, never a pass/fail of the test suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "storm.py"

pytestmark = pytest.mark.slow


def test_quick_storm_recovers_without_phantoms_or_false_reaps(tmp_path: Path) -> None:
    out_json = tmp_path / "storm.json"
    out_png = tmp_path / "storm.png"
    argv = [sys.executable, str(BENCHMARK), "--quick", "--json", str(out_json)]
    proc = subprocess.run(
        [*argv, "--png", str(out_png)], capture_output=True, text=True, timeout=280
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out_png.stat().st_size > 0

    report = json.loads(out_json.read_text())
    assert report["quick"] is True
    params = report["params"]
    assert params["workers"] >= 2
    results = {r["name"]: r for r in report["results"]}
    assert set(results) == {"keepconn", "keepconn-open", "naive"}

    for name, result in results.items():
        figures = result["figures"]
        assert result["notes"] == [], (name, result["notes"])
        # Every device came back after the cut, and none of them lost a live session.
        assert figures["all_back"], (name, figures)
        assert figures["back"] == params["devices"]
        assert figures["false_reaps"] == 0, (name, figures)
        assert figures["lag_samples"] > 0 and not figures["probe_lost"], (name, figures)

    for name in ("keepconn", "keepconn-open"):
        figures = results[name]["figures"]
        # Settled: the kernel holds nothing for devices the gateway no longer serves.
        assert figures["phantom_established_end"] == 0, (name, figures)
        assert figures["close_wait_end"] == 0, (name, figures)
        assert figures["old_connections_open_end"] == 0, (name, figures)
    assert report["keepconn_ok"] is True

    # The measurement can see phantoms: the naive gateway never closes a replaced connection
    # whose peer went silent (its documented tutorial takeover), so every cut connection is
    # still open after settling, and the kernel census counts exactly those.
    naive = results["naive"]["figures"]
    assert naive["old_connections_open_end"] == params["devices"]
    assert naive["phantom_established_end"] == params["devices"]

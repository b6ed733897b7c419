"""Smoke test of benchmarks/registry.py: its --quick run must reap exactly the right sessions.

Correctness only: no timing is asserted here (the benchmark's own targets are ratios from one
run, printed by the program, never a pass/fail of the test suite).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "registry.py"
IMPLS = {"keepconn", "dict_scan", "ordered_lru", "asyncio_timer", "trio_scope", "floor"}
REAPING = IMPLS - {"floor"}
SIZES = [1_000, 10_000]


def test_quick_run_reaps_exactly_the_expected_sessions(tmp_path: Path) -> None:
    out_json = tmp_path / "registry.json"
    out_png = tmp_path / "registry.png"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--json", str(out_json), "--png", str(out_png)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WRONG RESULT" not in proc.stderr
    assert out_png.stat().st_size > 0

    report = json.loads(out_json.read_text())
    assert report["quick"] is True
    assert report["ok"] is True
    assert report["errors"] == []
    assert report["sizes"] == SIZES
    assert set(report["implementations"]) == IMPLS

    rows = {(row["impl"], row["sessions"]): row for row in report["results"]}
    assert set(rows) == {(impl, n) for impl in IMPLS for n in SIZES}
    for (impl, n), row in rows.items():
        assert row["skipped"] is None, (impl, n)
        assert row["touch_ns"] > 0
        assert row["bytes_per_session"] > 0
        if impl not in REAPING:
            assert row["reap_ns_per_expired"] is None
            assert row["mass"] is None
            continue
        # 10% of the sessions go idle; exactly those are reaped, by every implementation.
        assert row["reap_expected"] == n // 10
        assert row["reap_reaped"] == row["reap_expected"], (impl, n)
        assert row["reap_ns_per_expired"] > 0
        assert row["empty_sweep_ns"] > 0
        # The mass expiry removes every session exactly once.
        assert row["mass"]["reaped"] == n, (impl, n)
        if impl in {"keepconn", "dict_scan", "ordered_lru"}:
            assert row["mass"]["limit"] == 10_000
            assert row["mass"]["calls"] >= n // 10_000
        if impl == "keepconn":
            assert set(row["mass"]["phases"]) == {"next_deadline", "mid_step"}
            for phase in row["mass"]["phases"].values():
                assert phase["reaped"] == n

    statuses = {target["status"] for target in report["targets"]}
    assert statuses <= {"PASS", "FAIL", "SKIP"}
    assert len(report["targets"]) >= 10

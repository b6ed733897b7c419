"""Behaviour check of benchmarks/churn.py: its --quick run against keepconn, Mosquitto and the
naive gateway, read back from the JSON it writes.

What is asserted are properties of one measured run, not speed targets: keepconn finds every
half-open peer within its configured bound (1.5 x keepalive + its reaping resolution) and
sooner than the other two at the 99th percentile, and leaves no phantom ESTABLISHED socket, no
CLOSE_WAIT and no lost QoS 1 message behind. Truly half-open peers need network namespaces, so
the test is marked ``netns``: without root it skips (or fails under KEEPCONN_REQUIRE_NETNS=1,
as in CI), like every fault test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from keepconn.testing.pytest_plugin import REQUIRE_ENV

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "churn.py"
KEYS = {
    "system",
    "connections",
    "detect_p50_s",
    "detect_p99_s",
    "detect_max_s",
    "bound_s",
    "phantom_established_max_after_settle",
    "close_wait_max",
    "takeover_p99_ms",
    "cpu_s",
    "rss_mb_per_1k",
    "lost_messages",
}

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def _require_mosquitto() -> None:
    # The broker lives in /usr/sbin on Debian, often off a non-root PATH.
    broker = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
    )
    missing = [name for name in ("mosquitto_sub", "mosquitto_pub") if shutil.which(name) is None]
    if broker is None:
        missing.append("mosquitto")
    if not missing:
        return
    why = f"{', '.join(missing)} not installed; `make setup` installs them (as root, with apt)"
    if os.geteuid() == 0 or os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(why)
    pytest.skip(why)


@pytest.mark.timeout(300)
def test_quick_churn_keepconn_reaps_within_bound_and_first(tmp_path: Path) -> None:
    _require_mosquitto()
    out_json = tmp_path / "churn.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCHMARK),
            "--quick",
            "--json",
            str(out_json),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "loopback only" not in proc.stdout, proc.stdout
    assert (tmp_path / "out" / "churn-detection.png").stat().st_size > 0
    assert (tmp_path / "out" / "churn-phantoms.png").stat().st_size > 0

    report = json.loads(out_json.read_text())
    assert set(report) == {"results"}
    rows = {row["system"]: row for row in report["results"]}
    assert set(rows) == {"keepconn", "mosquitto", "naive"}
    for row in rows.values():
        assert set(row) == KEYS, row
        # Devices online when the churn began: the whole quick fleet, give or take a straggler.
        assert 190 <= row["connections"] <= 200, row
        # Every system saw lost devices and found each of them (None would mean none measured).
        assert row["detect_p99_s"] is not None, row

    keepconn, mosquitto, naive = rows["keepconn"], rows["mosquitto"], rows["naive"]
    assert keepconn["detect_max_s"] <= keepconn["bound_s"], keepconn
    assert keepconn["detect_p99_s"] <= keepconn["bound_s"], keepconn
    assert keepconn["detect_p99_s"] < mosquitto["detect_p99_s"], (keepconn, mosquitto)
    assert keepconn["detect_p99_s"] < naive["detect_p99_s"], (keepconn, naive)
    assert keepconn["phantom_established_max_after_settle"] == 0, keepconn
    assert keepconn["close_wait_max"] == 0, keepconn
    assert keepconn["lost_messages"] == 0, keepconn
    # The measurement can see phantoms: the naive gateway's tutorial takeover leaves the old
    # socket of every rebooted device ESTABLISHED (benchmarks/naive_gateway.py explains why).
    assert naive["phantom_established_max_after_settle"] > 0, naive

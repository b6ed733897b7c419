"""Smoke test of benchmarks/runtime.py: its --quick run measures every server and writes every
figure where it belongs, in the JSON schema the docs read.

Correctness only: how big the figures are (bytes, objects, CPU, lag, CONNACK latency) is the
benchmark's output, never a pass/fail of the test suite. What must hold is that each one was
measured: present, and positive where nothing but a positive value can be a measurement.
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

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "runtime.py"
SERVERS = [
    "asyncio-protocol",
    "anyio-asyncio",
    "anyio-trio",
    "keepconn-asyncio",
    "keepconn-asyncio-anyio",
    "keepconn-uvloop",
    "keepconn-trio",
    "keepconn-trio-anyio",
    "gateway",
    "naive",
    "mosquitto",
]
MQTT = {"gateway", "naive", "mosquitto"}
FIGURES = {
    "n1",
    "n2",
    "rss_per_conn",
    "objects_per_conn",
    "cpu_s_per_1k_pings",
    "gc_ms_n2",
    "frozen_n2",
    "rss_n2_mb",
    "lag_p50_ms",
    "lag_p99_ms",
    "lag_max_ms",
    "lag_samples",
    "lag_source",
    "rtt_p50_ms",
    "rtt_p99_ms",
    "pings_answered",
    "window_s",
}
TAKEOVER = {
    "takeover_devices",
    "takeover_reboots",
    "takeover_connack_p50_ms",
    "takeover_connack_p99_ms",
    "takeover_connack_max_ms",
    "takeover_failed",
    "takeover_old_closed",
}
PARAMS = {
    "n1",
    "n2",
    "takeover_devices",
    "reboots",
    "reboot_rate",
    "interval",
    "keepalive",
    "window",
    "settle",
    "rate",
    "processes",
    "connect_timeout",
    "seed",
}

pytestmark = pytest.mark.slow


def _require_mosquitto() -> None:
    # Debian puts the broker in /usr/sbin, often off a non-root PATH.
    if shutil.which("mosquitto") or os.access("/usr/sbin/mosquitto", os.X_OK):
        return
    why = "mosquitto is not installed; `make setup` installs it (as root, with apt)"
    if os.geteuid() == 0 or os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(why)
    pytest.skip(why)


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and value > 0


@pytest.mark.timeout(420)
def test_quick_runtime_measures_every_server(tmp_path: Path) -> None:
    _require_mosquitto()
    out_json, out_png = tmp_path / "runtime.json", tmp_path / "runtime.png"
    argv = [sys.executable, str(BENCHMARK), "--quick", "--json", str(out_json)]
    proc = subprocess.run(
        [*argv, "--png", str(out_png)], capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out_png.stat().st_size > 0
    # The table: a header and one row per server.
    rows = [line.split(" | ")[0].strip() for line in proc.stdout.splitlines() if " | " in line]
    assert rows[0] == "server" and rows[1:] == SERVERS, proc.stdout

    report = json.loads(out_json.read_text())
    assert report["benchmark"] == "runtime" and report["quick"] is True
    assert set(report["params"]) == PARAMS
    params = report["params"]
    assert params["n1"] < params["n2"] and params["processes"] >= 2
    assert {"python", "platform", "cpus"} <= set(report["machine"])
    assert len(report["load_before"]) == len(report["load_after"]) == 3
    assert _positive(report["duration_s"])
    assert [r["name"] for r in report["results"]] == SERVERS

    for result in report["results"]:
        name, f = result["name"], result["figures"]
        assert result["notes"] == [], (name, result["notes"])
        assert set(f) == FIGURES | (TAKEOVER if name in MQTT else set()), name
        # Every connection asked for was up at both sizes and answered pings in the window.
        assert (f["n1"], f["n2"]) == (params["n1"], params["n2"]), (name, f)
        assert result["window"]["connections_end"] == params["n2"], name
        for key in ("rss_per_conn", "cpu_s_per_1k_pings", "pings_answered", "window_s"):
            assert _positive(f[key]), (name, key, f[key])
        assert _positive(f["rtt_p99_ms"]), (name, f)
        if name == "mosquitto":
            # C: no Python objects, no collector, no probe on its loop.
            assert result["python"] is False
            assert f["objects_per_conn"] is None and f["gc_ms_n2"] is None
            assert f["frozen_n2"] is None
            assert f["lag_source"] == "client_rtt" and f["lag_p99_ms"] is None
        else:
            assert result["python"] is True
            for key in ("objects_per_conn", "lag_samples"):
                assert _positive(f[key]), (name, key, f[key])
            # A server that froze its objects (the gateway's GcPacing.freeze after a burst)
            # may have next to nothing left for a collection to walk.
            frozen = f["frozen_n2"]
            assert isinstance(frozen, int) and frozen >= 0, (name, f)
            assert f["gc_ms_n2"] > 0 or (frozen and f["gc_ms_n2"] >= 0), (name, f)
            assert f["lag_source"] == "server_loop"
            assert f["lag_p99_ms"] is not None and f["lag_p99_ms"] >= 0, (name, f)
            assert f["lag_max_ms"] >= f["lag_p99_ms"] >= f["lag_p50_ms"], (name, f)
            for size in ("n1", "n2"):
                sample = result["samples"][size]
                assert _positive(sample["rss"]) and _positive(sample["objects"]), name
        if name in MQTT:
            took = result["takeover"]
            assert f["takeover_devices"] == params["takeover_devices"], (name, f)
            assert f["takeover_reboots"] == params["reboots"] and f["takeover_failed"] == 0
            assert took["connacks"] == params["reboots"], (name, took)
            assert _positive(f["takeover_connack_p50_ms"]), (name, f)
            assert f["takeover_connack_p99_ms"] >= f["takeover_connack_p50_ms"], (name, f)
        else:
            assert result["takeover"] is None

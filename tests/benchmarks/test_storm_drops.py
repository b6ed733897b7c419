"""benchmarks/storm_drops.py: a session dropped under a device is a false reap unless the
device's own evidence (silent past the server's timeout, its worker's loop stalled) excuses it.

Plain numbers, no processes: the classifier is a function of the two sides' records.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "storm_drops.py"
KEEPALIVE = 10.0  # server timeout 15 s, margin 5 s
CUT = 1000.0


@pytest.fixture(scope="module")
def storm_drops() -> ModuleType:
    # The benchmarks are scripts run from their own folder, not a package: load the module by
    # its path (it imports nothing of its siblings).
    spec = importlib.util.spec_from_file_location("storm_drops", PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _drop(local: str, pings: list[list[float]], lost: float, lag: float) -> dict[str, Any]:
    return {
        "client_id": "storm-000001",
        "local": local,
        "hello_sent_at": 1010.0,
        "connack_at": 1012.0,
        "pings": pings,
        "lost_at": lost,
        "lost_by": "ConnectionResetError",
        "worker_lag_max": lag,
    }


def _trace(local: str, reason: str, closed: float, detail: str = "") -> dict[str, Any]:
    return {
        "events": [
            {"kind": "opened", "t": 1012.0, "peer": local, "client_id": "storm-000001"},
            {"kind": "reaped", "t": closed, "peer": local, "lateness": 0.2}
            if reason == "IDLE_TIMEOUT"
            else {"kind": "other", "t": 0.0, "peer": local},
            {"kind": "closed", "t": closed, "peer": local, "reason": reason, "detail": detail},
        ],
        "retry_hints": {"count": 0},
    }


def test_a_device_that_pinged_on_time_and_was_reaped_is_a_false_reap(
    storm_drops: ModuleType,
) -> None:
    local = "127.0.1.1:40000"
    # CONNACK at 1012, pings on time at 1022 and 1032; the server reaps at 1040 (8 s after the
    # last ping: well inside its 15 s timeout).
    drop = _drop(local, [[1022.0, 1022.01], [1032.0, 1032.01]], 1040.01, 0.05)
    result = storm_drops.classify([drop], _trace(local, "IDLE_TIMEOUT", 1040.0), KEEPALIVE, CUT)
    assert result["false_reaps"] == 1 and result["device_stalled"] == 0
    row = result["drops"][0]
    assert row["server_reason"] == "IDLE_TIMEOUT"
    assert row["device_silence_at_close"] == pytest.approx(7.99)
    assert row["server_closed"] == pytest.approx(40.0)
    assert row["reap_lateness"] == 0.2


def test_a_device_whose_loop_stalled_past_the_timeout_is_classified_as_stalled(
    storm_drops: ModuleType,
) -> None:
    local = "127.0.1.2:40001"
    # The first ping was due at 1022; the worker's loop stalled 7 s, so the device was silent
    # from its CONNECT (1010) to the reap at 1027.5 and sent that ping only afterwards.
    drop = _drop(local, [[1022.0, 1029.0]], 1027.6, 7.0)
    result = storm_drops.classify([drop], _trace(local, "IDLE_TIMEOUT", 1027.5), KEEPALIVE, CUT)
    assert result["device_stalled"] == 1 and result["false_reaps"] == 0
    row = result["drops"][0]
    assert row["verdict"] == "device_stalled"
    assert row["ping_lateness_max"] == pytest.approx(7.0)
    assert row["device_silence_at_close"] == pytest.approx(17.5)


def test_silence_without_a_stall_of_the_device_is_the_server_s_doing(
    storm_drops: ModuleType,
) -> None:
    local = "127.0.1.3:40002"
    # Silent long enough, but the device's loop ran on time throughout: the late CONNACK (the
    # server's) pushed the schedule, so it stays a false reap.
    drop = _drop(local, [], 1026.0, 0.05)
    result = storm_drops.classify([drop], _trace(local, "IDLE_TIMEOUT", 1026.0), KEEPALIVE, CUT)
    assert result["false_reaps"] == 1


def test_a_takeover_and_a_missing_trace_are_false_reaps(storm_drops: ModuleType) -> None:
    local = "127.0.1.4:40003"
    drop = _drop(local, [[1022.0, 1029.0]], 1027.6, 7.0)
    trace = _trace(local, "TAKEN_OVER", 1027.5, "by ('127.0.1.4', 40100)")
    taken = storm_drops.classify([drop], trace, KEEPALIVE, CUT)
    assert taken["false_reaps"] == 1
    assert taken["drops"][0]["server_detail"] == "by ('127.0.1.4', 40100)"
    untraced = storm_drops.classify([drop], None, KEEPALIVE, CUT)
    assert untraced["false_reaps"] == 1 and untraced["traced"] is False
    assert untraced["drops"][0]["server_reason"] is None

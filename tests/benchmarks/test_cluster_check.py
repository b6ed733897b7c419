"""The cluster acceptance check (benchmarks/cluster_check.py) in its --quick run: three example
gateways from the documented command on a throwaway redis-server, raw MQTT devices, and issue
12's properties read from its JSON report, one by one, so that a failure names the property.

The program starts and stops every process itself (by pid, in a finally); this test only runs
it and reads what it found.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from keepconn.testing import redis_unavailable_reason
from keepconn.testing.pytest_plugin import require_redis
from tests.timing import slack

PROGRAM = Path(__file__).resolve().parents[2] / "benchmarks" / "cluster_check.py"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(slack(150)) + 30)]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    reason = redis_unavailable_reason()
    if reason is not None:
        require_redis(reason)
    out = tmp_path_factory.mktemp("cluster-check") / "check.json"
    proc = subprocess.run(
        [sys.executable, str(PROGRAM), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=slack(150),
    )
    assert out.exists(), proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["quick"] is True
    results = {r["name"]: r for r in data["results"]}
    assert set(results) == set("abcdef"), proc.stdout + proc.stderr
    return results


def _passed(result: dict[str, Any]) -> None:
    assert result["passed"], json.dumps(result["failures"], indent=1)


def test_cross_node_takeover_resets_the_old_socket(report: dict[str, Any]) -> None:
    a = report["a"]
    _passed(a)
    trials = a["figures"]["trials"]
    assert a["figures"]["connack_codes"] == {"0": trials}
    assert a["figures"]["old_socket_end"] == {"reset": trials}
    assert a["figures"]["gone_ms"]["p99"] is not None


def test_one_winner_among_concurrent_connects_with_flapping_detection_on(
    report: dict[str, Any],
) -> None:
    b = report["b"]
    assert [f for f in b["failures"] if not f.startswith("bounce")] == []
    for round_ in b["figures"]["same_id"] + b["figures"]["distinct_ids"]:
        assert round_["established_cluster_wide"] == 1, round_
        assert round_["pings"] == [True], round_
        assert round_["winner"]["node"] == round_["store_owner"], round_


def test_a_device_bouncing_past_the_flapping_limit_keeps_one_live_session(
    report: dict[str, Any],
) -> None:
    # 20 reconnects in a row over node 1, 2, 3, 1, ...: over the limit (15 a window)
    # cluster-wide, under it on each node. Those past the limit are refused; the live session
    # must survive them.
    b = report["b"]
    assert [f for f in b["failures"] if f.startswith("bounce")] == []
    for step in b["figures"]["bounce"]["live_after_each"]:
        assert len(step["live"]) == 1, b["figures"]["bounce"]


def test_bad_credentials_never_evict(report: dict[str, Any]) -> None:
    c = report["c"]
    _passed(c)
    assert c["figures"]["owner"] == "node-1"
    assert set(c["figures"]["connack"]) == {
        "wrong password: 4",
        "unknown user: 4",
        "no username: 5",
    }


def test_sigkilled_node_frees_its_devices_and_its_lease(report: dict[str, Any]) -> None:
    d = report["d"]
    _passed(d)
    moved = d["figures"]["devices_on_victim"]
    assert moved > 0
    assert d["figures"]["reconnect_connack"] == {"0": moved}
    assert d["figures"]["lease_gone_s"] <= d["figures"]["node_ttl"] + slack(0.1)


def test_stalled_store_drops_nothing(report: dict[str, Any]) -> None:
    e = report["e"]
    _passed(e)
    for how in ("SIGSTOP", "DEBUG SLEEP", "CLIENT PAUSE WRITE"):
        stall = e["figures"][how]
        assert stall["no_pingresp_after"] == [] and stall["ownership_problems"] == [], stall
        assert stall["move_during_stall_connack"] != 0, stall


def test_lost_store_closes_everything_by_node_ttl_and_recovers(report: dict[str, Any]) -> None:
    f = report["f"]
    _passed(f)
    for how in ("SIGSTOP", "killed"):
        lost = f["figures"][how]
        assert lost["closed"] == lost["devices"], lost
        assert sum(lost["ownership_lost_in_logs"].values()) == lost["devices"], lost
        assert lost["connack_new_at_1s"] == 3 and lost["connack_new_after_closes"] == 3, lost
        assert lost["established_at_outage_end"] == 0, lost

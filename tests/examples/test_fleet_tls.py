"""The fleet simulator over TLS (``fleet.py --spawn-gateway --tls``): a small fleet under churn
and one storm against the real gateway, every device speaking MQTT over TLS with throwaway
certificates (device_gateway.devcerts) made with the openssl command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tlscerts import require_openssl

pytestmark = pytest.mark.slow

FLEET = Path(__file__).resolve().parents[2] / "examples" / "device_gateway" / "fleet.py"
DEVICES = 20


def test_a_fleet_churns_and_storms_over_tls(tmp_path: Path) -> None:
    require_openssl()
    summary = tmp_path / "fleet.json"
    argv = [sys.executable, str(FLEET), "--spawn-gateway", "--tls", "--no-netns",
            "--devices", str(DEVICES), "--seconds", "8", "--keepalive", "2",
            "--reboot-rate", "6", "--loss-rate", "0", "--storm-at", "4",
            "--json", str(summary)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    context = f"\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, context
    assert "over TLS" in done.stdout, context
    result = json.loads(summary.read_text())
    assert result["ever_online"] == DEVICES, context
    assert result["reboots"] > 0 and result["takeovers"] > 0, context
    assert result["storm_drops"] > 0, context
    # Every device trusted the gateway's certificate, every time.
    assert "tls_failed" not in result["failures"], result["failures"]
    assert result["acked"] > 0, context

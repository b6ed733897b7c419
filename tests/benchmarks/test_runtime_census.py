"""Smoke test of benchmarks/runtime_census.py: its --quick run counts a server's tracked
objects by type at two sizes and reports them per connection.

Correctness only (how many objects a connection costs is the benchmark's output): the counts
come from inside the server, the connection's own object is among them exactly once per
connection with the references it holds, and only types that changed by at least ``--min``
(0.05) per connection, in count or in referents, are listed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CENSUS = Path(__file__).resolve().parents[2] / "benchmarks" / "runtime_census.py"

pytestmark = pytest.mark.slow


@pytest.mark.timeout(240)
def test_quick_census_counts_a_connection_by_type(tmp_path: Path) -> None:
    out = tmp_path / "census.json"
    argv = [sys.executable, str(CENSUS), "--quick", "--only", "keepconn-asyncio"]
    proc = subprocess.run([*argv, "--json", str(out)], capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("keepconn-asyncio: "), proc.stdout

    report = json.loads(out.read_text())
    assert report["benchmark"] == "runtime_census" and report["n1"] < report["n2"]
    found = report["keepconn-asyncio"]
    assert found["objects_per_conn"] > 0 and found["getsizeof_per_conn"] > 0
    rows = {row["type"]: row for row in found["types"]}
    # One connection object per connection, whatever else a connection holds.
    native = rows["keepconn._asyncio.connection.NativeConnection"]
    assert native["objects"] == pytest.approx(1.0), native
    assert native["bytes"] > 0
    # It refers at least to its transport, its framer and its session.
    assert native["referents"] >= 3, native
    assert found["referents_per_conn"] > 0
    listed = (max(abs(row["objects"]), abs(row["referents"])) for row in found["types"])
    assert all(change >= 0.05 for change in listed), found

"""The real-fault harness itself: namespaces are cleaned up on failure; skips turn into failures
when KEEPCONN_REQUIRE_NETNS=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from keepconn.testing import NetNs
from tests.timing import slack


def ours() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in out.stdout.splitlines() if line.startswith("keepconn-")}


def run_pytest(tmp_path: Path, body: str, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["keepconn.testing.pytest_plugin"]\n')
    (tmp_path / "test_inner.py").write_text(body)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=slack(120),
        check=False,
        cwd=tmp_path,
        env={**os.environ, **env},
    )


SKIPPING = """
from keepconn.testing.pytest_plugin import require_netns

def test_needs_netns():
    require_netns("no namespaces in this sandbox")
"""


def test_skip_reason_is_clear(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, SKIPPING, KEEPCONN_REQUIRE_NETNS="0")
    assert result.returncode == 0, result.stdout
    assert "1 skipped" in result.stdout
    assert "needs network namespaces: no namespaces in this sandbox" in result.stdout


def test_required_netns_turns_the_skip_into_a_failure(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, SKIPPING, KEEPCONN_REQUIRE_NETNS="1")
    assert result.returncode == 1, result.stdout
    assert "1 failed" in result.stdout
    assert "KEEPCONN_REQUIRE_NETNS=1" in result.stdout


@pytest.mark.netns
@pytest.mark.timeout(slack(120))
def test_namespaces_are_removed_when_a_test_fails(tmp_path: Path) -> None:
    before = ours()
    result = run_pytest(
        tmp_path,
        """
import pytest

@pytest.mark.netns
def test_fails_midway(netns_factory):
    a = netns_factory()
    b = netns_factory()
    a.blackhole()
    b.cable_pull()
    assert a.host_addr != b.host_addr
    raise RuntimeError("boom")
""",
    )
    assert "1 failed" in result.stdout, result.stdout
    assert "boom" in result.stdout
    assert ours() == before


@pytest.mark.netns
def test_each_namespace_gets_its_own_names_and_subnet(netns: NetNs) -> None:
    with NetNs() as other:
        assert len({netns.name, other.name}) == 2
        assert len({netns.host_if, other.host_if, netns.dev_if, other.dev_if}) == 4
        assert netns.host_addr.startswith("198.1") and other.host_addr.startswith("198.1")
        assert len({netns.host_addr, other.host_addr}) == 2
        assert f"{os.getpid()}" in netns.name
    assert other.name not in ours()
    # Device sockets are made inside the namespace: they see its interfaces, not ours.
    names = netns.run(lambda: {name for _, name in socket_if_names()})
    assert netns.dev_if in names and netns.host_if not in names


def socket_if_names() -> list[tuple[int, str]]:
    import socket

    return socket.if_nameindex()

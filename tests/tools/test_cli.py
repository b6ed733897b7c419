"""The keepconn CLI, run as a real subprocess: doctor's findings and exit codes, sockets."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.timing import slack


def keepconn(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keepconn", *args],
        capture_output=True,
        text=True,
        timeout=slack(60),
        check=False,
    )


def fake_sysctls(root: Path, values: dict[str, str]) -> str:
    for key, value in values.items():
        path = root.joinpath(*key.split("."))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    return str(root)


DEFAULTS = {
    "net.ipv4.tcp_keepalive_time": "7200",
    "net.ipv4.tcp_keepalive_intvl": "75",
    "net.ipv4.tcp_keepalive_probes": "9",
    "net.ipv4.tcp_retries2": "15",
    "net.ipv4.tcp_fin_timeout": "60",
    "net.ipv4.tcp_syncookies": "1",
    "net.core.somaxconn": "4096",
    "net.ipv4.tcp_max_syn_backlog": "2048",
    "net.ipv4.ip_local_port_range": "32768\t60999",
    "net.ipv4.tcp_tw_reuse": "2",
}


def test_doctor_on_this_machine_exits_zero_and_explains() -> None:
    done = keepconn("doctor")
    assert done.returncode == 0, done.stderr
    assert "tcp_keepalive_time" in done.stdout
    assert "TcpKeepalive(idle=60, interval=10, count=6)" in done.stdout


def test_doctor_explains_the_numbers(tmp_path: Path) -> None:
    done = keepconn("doctor", "--strict", "--sysctl-root", fake_sysctls(tmp_path, DEFAULTS))
    assert done.returncode == 0, done.stdout
    out = done.stdout
    assert "2h11m15s" in out  # 7200 + 75 * 9
    assert "15m25s" in out  # tcp_retries2 = 15 at the minimum RTO
    assert "removed in Linux 4.12" in out and "NAT" in out


def test_doctor_strict_fails_on_real_problems(tmp_path: Path) -> None:
    bad = {
        **DEFAULTS,
        "net.ipv4.tcp_syncookies": "0",
        "net.ipv4.tcp_tw_recycle": "1",
        "net.core.somaxconn": "128",
    }
    root = fake_sysctls(tmp_path, bad)
    relaxed = keepconn("doctor", "--sysctl-root", root)
    assert relaxed.returncode == 0
    assert "3 problem(s)" in relaxed.stdout
    strict = keepconn("doctor", "--strict", "--sysctl-root", root)
    assert strict.returncode == 1
    flagged = [line for line in strict.stdout.splitlines() if line.startswith("[PROBLEM]")]
    assert len(flagged) == 3
    for key, line in zip(("tcp_syncookies", "somaxconn", "tcp_tw_recycle"), flagged, strict=True):
        assert key in line


def test_doctor_is_friendly_where_files_are_missing(tmp_path: Path) -> None:
    done = keepconn("doctor", "--strict", "--sysctl-root", str(tmp_path / "nothing"))
    assert done.returncode == 0
    assert "not readable here" in done.stdout
    assert "Traceback" not in done.stderr


def test_doctor_recommendation_follows_the_target() -> None:
    done = keepconn("doctor", "--detect-within", "30")
    assert "TcpKeepalive(idle=15, interval=2, count=6)" in done.stdout


def test_sockets_summarises_and_flags_close_wait() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        with conn:
            client.close()
            time.sleep(slack(0.1))
            done = keepconn("sockets", "--port", str(port))
    assert done.returncode == 0, done.stderr
    assert f"TCP sockets on port {port}: 2" in done.stdout
    assert "CLOSE_WAIT" in done.stdout and "LISTEN" in done.stdout
    assert "! 1 CLOSE_WAIT" in done.stdout


def test_unknown_subcommand_is_a_usage_error() -> None:
    done = keepconn("frobnicate")
    assert done.returncode == 2
    assert "invalid choice" in done.stderr


@pytest.mark.parametrize("args", [["--help"], ["sockets", "--help"], ["doctor", "--help"]])
def test_help(args: list[str]) -> None:
    assert keepconn(*args).returncode == 0

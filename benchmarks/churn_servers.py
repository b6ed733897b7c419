"""The three servers the churn benchmark compares, each a child process started here and ended
by its pid: the example gateway, Mosquitto and the naive gateway; and the detection bound each
one is held to (1.5 x keepalive plus its own sweep resolution).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from device_gateway.fleet import GatewayProcess
from harness import NAIVE_GATEWAY, free_port, start_listening, stop_process, wait_listening

#: The example gateway's default reaping resolution (``--resolution``: min(1, idle_timeout/10)).
KEEPCONN_RESOLUTION = 1.0
#: The naive gateway's sweep period.
NAIVE_SWEEP = 5.0
#: Mosquitto 2.0.x: the check runs when more than 5 whole seconds have passed since the last
#: one (so every 6 s), and a client's last activity is kept in whole seconds (up to 1 s more).
MOSQUITTO_20_RESOLUTION = 7.0
#: Later Mosquitto releases check every second, still against whole-second timestamps.
MOSQUITTO_RESOLUTION = 2.0
#: Same --max-keepalive for both servers that have one (the example gateway's default).
MAX_KEEPALIVE = 1800


def mosquitto_binary() -> str | None:
    """Debian installs the broker in /usr/sbin, which is not on every PATH."""
    found = shutil.which("mosquitto")
    if found is None and os.access("/usr/sbin/mosquitto", os.X_OK):
        found = "/usr/sbin/mosquitto"
    return found


def mosquitto_resolution(binary: str) -> tuple[float, str]:
    """The keepalive-check resolution of this Mosquitto, from its version line."""
    done = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10, check=False)
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", done.stdout + done.stderr)
    version = ".".join(m.groups()) if m else "unknown"
    if m and (int(m.group(1)), int(m.group(2))) < (2, 1):
        return MOSQUITTO_20_RESOLUTION, version
    return MOSQUITTO_RESOLUTION, version


def bound_for(system: str, keepalive: int, mosq_resolution: float) -> float:
    """1.5 x keepalive plus the system's sweep resolution."""
    resolution = {
        "keepconn": KEEPCONN_RESOLUTION,
        "naive": NAIVE_SWEEP,
        "mosquitto": mosq_resolution,
    }[system]
    return 1.5 * keepalive + resolution


# ----------------------------------------------------------------------------------------------
# The servers. Each is a child process, started here and ended by its pid.


class KeepconnServer:
    """The example gateway, from its documented command line (via the fleet's helper)."""

    name = "keepconn"

    def __init__(self, host: str, workdir: Path, users: Path) -> None:
        self.data = workdir / "keepconn.sqlite3"
        self.gateway = GatewayProcess(
            host=host,
            users=users,
            data=self.data,
            # One log line per close is the default; 15,000 of them would be measured too.
            extra=["--log-level", "warning", "--max-keepalive", str(MAX_KEEPALIVE)],
            log=workdir / "keepconn.log",
        )
        self.pid = self.gateway.proc.pid
        self.port = self.gateway.port

    def stored_qos1(self) -> dict[str, int]:
        """QoS 1 rows per client id; read after stop(), once the gateway has flushed."""
        with sqlite3.connect(self.data) as db:
            rows = db.execute(
                "SELECT client_id, COUNT(*) FROM telemetry WHERE qos = 1 GROUP BY client_id"
            ).fetchall()
        return {cid: n for cid, n in rows}

    def before_stop(self) -> None:
        """Nothing to collect before the gateway stops: it flushes on SIGTERM."""

    def stop(self) -> None:
        self.gateway.stop()


class NaiveServer:
    """benchmarks/naive_gateway.py as a subprocess."""

    name = "naive"

    def __init__(self, host: str, workdir: Path, users: Path) -> None:
        self.status_port = free_port("127.0.0.1")
        self._log = open(workdir / "naive.log", "w")  # noqa: SIM115 - closed in stop()
        argv = [sys.executable, str(NAIVE_GATEWAY), "--host", host, "--port", "0"]
        argv += ["--users", str(users), "--status-port", str(self.status_port)]
        try:
            self.proc, self.port = start_listening(
                argv, stderr=self._log, timeout=20.0, what="naive_gateway.py"
            )
        except BaseException:
            self._log.close()
            raise
        self.pid = self.proc.pid
        self._stored: dict[str, int] = {}

    def before_stop(self) -> None:
        url = f"http://127.0.0.1:{self.status_port}/telemetry"
        with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310 - loopback
            per_client = json.load(reply)
        self._stored = {cid: counts[1] for cid, counts in per_client.items()}

    def stored_qos1(self) -> dict[str, int]:
        return self._stored

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


class MosquittoServer:
    """Debian's broker with a configuration written here, plus a QoS 1 subscriber that counts
    what it delivers."""

    name = "mosquitto"

    def __init__(
        self,
        host: str,
        workdir: Path,
        users: Sequence[tuple[str, str]],
        binary: str,
    ) -> None:
        self.proc: subprocess.Popen[Any] | None = None
        self.sub: subprocess.Popen[Any] | None = None
        self._logs: list[Any] = []
        self.port = free_port(host)
        passwd = workdir / "mosquitto.passwd"
        tool = shutil.which("mosquitto_passwd")
        if tool is not None:
            passwd.touch()
            for username, password in users:
                subprocess.run(
                    [tool, "-b", str(passwd), username, password],
                    check=True,
                    capture_output=True,
                    timeout=20,
                )
            auth = f"allow_anonymous false\npassword_file {passwd}\n"
        else:
            # Without the tool, run anonymous: authentication is not what is being compared.
            auth = "allow_anonymous true\n"
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {host}\n"
            + auth
            + f"max_keepalive {MAX_KEEPALIVE}\n"
            + "persistence false\n"
            # Unlimited queue for the one subscriber, so that a burst cannot make Mosquitto
            # drop telemetry that this benchmark would then count as lost.
            + "max_queued_messages 0\n"
            # Run as the user that started it (root here): the files above are private to it.
            + "user root\n"
            # Same log volume as the gateways: problems only, not one line per connection.
            + "log_dest stderr\nlog_type error\nlog_type warning\n"
        )
        log = open(workdir / "mosquitto.log", "w")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
        self.pid = self.proc.pid
        try:
            wait_listening(host, self.port, self.proc, 10.0)
            self._start_subscriber(host, users[0], workdir)
        except BaseException:
            self.stop()
            raise

    def _start_subscriber(self, host: str, user: tuple[str, str], workdir: Path) -> None:
        self.sub_out = workdir / "mosquitto-sub.txt"
        out = open(self.sub_out, "w")  # noqa: SIM115 - closed in stop()
        self._logs.append(out)
        base = ["-h", host, "-p", str(self.port), "-u", user[0], "-P", user[1]]
        self.sub = subprocess.Popen(
            ["mosquitto_sub", *base, "-i", "churn-counter", "-q", "1", "-k", "30"]
            + ["-t", "telemetry/#", "-F", "%q %t"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        # A probe message proves the subscription is in place before any device publishes.
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            subprocess.run(
                ["mosquitto_pub", *base, "-i", "churn-probe", "-q", "1"]
                + ["-t", "telemetry/probe", "-m", "probe"],
                capture_output=True,
                timeout=10,
                check=False,
            )
            time.sleep(0.2)
            if "telemetry/probe" in self.sub_out.read_text():
                return
        raise RuntimeError("mosquitto_sub did not receive the probe message")

    def _received(self) -> int:
        with open(self.sub_out) as f:
            return sum(1 for _ in f)

    def before_stop(self) -> None:
        # Let the subscriber drain what Mosquitto still queues for it.
        last, deadline = -1, time.monotonic() + 15.0
        while time.monotonic() < deadline:
            now = self._received()
            if now == last:
                break
            last = now
            time.sleep(1.0)

    def stored_qos1(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        with open(self.sub_out) as f:
            for line in f:
                qos, _, topic = line.strip().partition(" ")
                if qos == "1" and topic.startswith("telemetry/"):
                    cid = topic[len("telemetry/") :]
                    counts[cid] = counts.get(cid, 0) + 1
        return counts

    def stop(self) -> None:
        stop_process(self.sub)
        stop_process(self.proc)
        for f in self._logs:
            f.close()

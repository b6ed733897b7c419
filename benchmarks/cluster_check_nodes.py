"""The processes of the cluster acceptance check: a throwaway redis-server and three example
gateways started from the README's documented command, each ended by its pid.

The users file is written by the gateway's own ``passwd -b`` subcommand; each node gets its own
``--port``, ``--data`` and ``--status-port`` and the same ``--cluster URL --node-id NAME
--node-ttl S``, and nothing else beyond what the caller asks for (the gateway's defaults are
what is checked, flapping detection included). Each node's stderr, which carries one
``closed peer=... identity=... reason=...`` line per closed connection, goes to a log file that
:meth:`Node.closes` reads back.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness import ROOT, free_port, start_listening, stop_process
from keepconn.testing import RedisServer

__all__ = ["GATEWAY", "Cluster", "Node", "USER", "PASSWORD"]

GATEWAY = ROOT / "examples" / "device_gateway" / "gateway.py"
USER = "fleet"
PASSWORD = "s3cret-fleet"
_CLOSE_LINE = re.compile(
    r"closed peer=\('[^']*', (?P<port>\d+)\) identity=(?P<identity>.*?) reason=(?P<r>\w+)"
)


class Node:
    """One gateway node process."""

    def __init__(self, name: str, work: Path, users: Path, url: str, extra: Sequence[str]) -> None:
        self.name = name
        self.port = free_port()
        self.status_port = free_port()
        self.log_path = work / f"{name}.log"
        self.argv = [
            sys.executable,
            str(GATEWAY),
            "--port",
            str(self.port),
            "--users",
            str(users),
            "--data",
            str(work / f"{name}.sqlite3"),
            "--status-port",
            str(self.status_port),
            "--cluster",
            url,
            "--node-id",
            name,
            *extra,
        ]
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        try:
            self.proc, _ = start_listening(
                self.argv, stderr=self._log, timeout=30.0, what=f"gateway {name}"
            )
        except RuntimeError as exc:
            # The log lives in a temporary directory, gone by the time anyone reads the error.
            self._log.close()
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"{exc}; its log ends:\n{tail}") from exc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def status(self, timeout: float = 3.0) -> dict[str, Any]:
        """GET /status from the node's loopback status page."""
        url = f"http://127.0.0.1:{self.status_port}/status"
        with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 - loopback
            return dict(json.load(reply))

    def log_lines(self) -> list[str]:
        self._log.flush()
        return self.log_path.read_text(errors="replace").splitlines()

    def mark(self) -> int:
        """How many log lines there are now: pass it as ``since`` to read only later ones (a
        peer port is reused by later connections)."""
        return len(self.log_lines())

    def closes(self, peers: set[int] | None = None, since: int = 0) -> Counter[str]:
        """Close reasons from the node's log lines after ``since`` (only connections from these
        peer ports, if given)."""
        found: Counter[str] = Counter()
        for line in self.log_lines()[since:]:
            m = _CLOSE_LINE.search(line)
            if m is None:
                continue
            if peers is not None and int(m["port"]) not in peers:
                continue
            found[m["r"]] += 1
        return found

    def close_reason_by_peer(self, peers: set[int], since: int = 0) -> dict[int, str]:
        """Peer port -> the close reason of the last connection from it logged after
        ``since``."""
        found = {}
        for line in self.log_lines()[since:]:
            m = _CLOSE_LINE.search(line)
            if m is not None and int(m["port"]) in peers:
                found[int(m["port"])] = m["r"]
        return found

    def kill(self) -> None:
        """SIGKILL by pid: no shutdown, no goodbye to the store."""
        if self.alive:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        code = stop_process(self.proc)
        self._log.close()
        return code


class Cluster:
    """A redis-server and ``count`` gateway nodes (node-1 ...), every process ended by
    :meth:`stop`, which a ``finally`` always reaches."""

    def __init__(self, work: Path, *, count: int = 3, extra: Sequence[str] = ()) -> None:
        self.work = work
        self.extra = list(extra)
        self.nodes: list[Node] = []
        self.redis = RedisServer()
        self.redis.start()
        try:
            self.users = work / "users.txt"
            subprocess.run(
                [sys.executable, str(GATEWAY), "passwd", "-b", str(self.users), USER, PASSWORD],
                check=True,
                timeout=60,
                capture_output=True,
            )
            for i in range(count):
                self.nodes.append(
                    Node(f"node-{i + 1}", work, self.users, self.redis.url, self.extra)
                )
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def live_nodes(self) -> list[Node]:
        return [node for node in self.nodes if node.alive]

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Until every live node's status page says its store is healthy."""
        deadline = time.monotonic() + timeout
        for node in self.live_nodes():
            while True:
                try:
                    if node.status()["cluster"]["store_healthy"]:
                        break
                except (OSError, KeyError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{node.name}: store not healthy after {timeout:g} s")
                time.sleep(0.05)

    def stop(self) -> list[int | None]:
        """SIGTERM each node by pid (SIGKILL if it lingers), then end the redis-server."""
        codes = []
        for node in self.nodes:
            try:
                codes.append(node.stop())
            except Exception:  # noqa: BLE001 - keep stopping the others
                codes.append(None)
        self.redis.close()
        return codes

"""The example gateway as a subprocess: started from its documented command line, stopped by its
pid. Used by ``fleet.py --spawn-gateway``, the demo, the churn benchmark and the smoke test."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from device_gateway.users import hash_password

__all__ = ["GATEWAY_SCRIPT", "GatewayProcess", "write_users", "write_users_file"]

GATEWAY_SCRIPT = Path(__file__).resolve().parent / "gateway.py"


def write_users(path: Path, count: int = 8) -> list[tuple[str, str]]:
    """Write a (hashed) users file with ``count`` fleet accounts; return the clear (username,
    password) pairs, which the devices need."""
    rng = random.Random()
    users = [(f"fleet{i}", f"pw-{rng.getrandbits(48):012x}") for i in range(count)]
    write_users_file(path, users)
    return users


def write_users_file(path: Path, users: Sequence[tuple[str, str]], *, hashed: bool = True) -> None:
    """Write ``users`` as a users file: hashed, as the gateway wants it, or in clear text (for
    the naive benchmark gateway, or the devices' own credentials)."""
    path.write_text(
        "".join(f"{u}:{hash_password(p) if hashed else p}\n" for u, p in users), encoding="utf-8"
    )


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayProcess:
    """The example gateway started from its documented command line, stopped by its pid."""

    def __init__(
        self,
        *,
        host: str,
        users: Path,
        data: Path,
        hello_timeout: float = 5.0,
        extra: Sequence[str] = (),
        log: Path | None = None,
        ready_timeout: float = 20.0,
    ) -> None:
        self.host = host
        self.status_port = _free_loopback_port()
        argv = [
            sys.executable,
            str(GATEWAY_SCRIPT),
            "--host",
            host,
            "--port",
            "0",
            "--users",
            str(users),
            "--data",
            str(data),
            "--hello-timeout",
            str(hello_timeout),
            "--status-port",
            str(self.status_port),
            *extra,
        ]
        #: The file the gateway's stderr (its log) goes to, if any.
        self.log_path = log
        self._log = open(log, "w") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1
        )
        self._port: int | None = None
        self._bound = threading.Event()
        # One thread reads stdout for the process's whole life: it spots "listening on" and
        # keeps draining afterwards, so a chatty gateway never blocks on a full pipe.
        threading.Thread(target=self._read_stdout, daemon=True).start()
        if not self._bound.wait(ready_timeout) or self._port is None:
            self.stop()
            raise RuntimeError(
                f"the gateway did not report 'listening on' within {ready_timeout:g} s "
                f"(exit code {self.proc.returncode})"
            )
        self.port: int = self._port

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if self._port is None and line.startswith("listening on "):
                self._port = int(line.split()[2].rsplit(":", 1)[1])
                self._bound.set()
        self._bound.set()

    def status(self, timeout: float = 3.0) -> dict[str, Any]:
        """GET /status from the gateway's loopback status page."""
        url = f"http://127.0.0.1:{self.status_port}/status"
        with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 - loopback
            return dict(json.load(reply))

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM by pid, then SIGKILL if it lingers; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return self.proc.returncode

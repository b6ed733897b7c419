"""What the benchmarks share: free ports, helper processes started and ended by their pid,
quantiles, report files and the machine a run was measured on.

Every benchmark runs as a script (``python benchmarks/NAME.py``) and Python puts a script's own
folder first on ``sys.path``, so the benchmarks import this module by its plain name
(``import harness``), as they import each other's parts.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "NAIVE_GATEWAY",
    "OUT",
    "ROOT",
    "free_port",
    "grid",
    "loadavg",
    "machine",
    "quantile",
    "round_or_none",
    "sigterm_as_exit",
    "start_listening",
    "stop_process",
    "wait_listening",
    "write_json",
]

ROOT = Path(__file__).resolve().parent.parent
#: Where the end-to-end benchmarks put their plots and reports unless told otherwise.
OUT = ROOT / "out"
#: The tutorial-style baseline gateway that churn.py and storm.py compare keepconn with.
NAIVE_GATEWAY = ROOT / "benchmarks" / "naive_gateway.py"


# ----------------------------------------------------------------------------------------------
# Ports and processes. Every process a benchmark starts is ended by its pid in a finally block.


#: Lowest port free_port picks (it picks below the kernel's ephemeral range).
LOWEST_FREE_PORT = 10000


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port of ``host`` that nothing is bound to now, for a server started next.

    Picked below the kernel's ephemeral range, not as the kernel's pick for port 0: that range
    is also where every outgoing connection gets its source port, so a port chosen there can be
    taken by any connection made before the server binds it (a cluster node's connections to
    Redis, say), and the server then cannot listen. Falls back on the kernel's pick when
    nothing below the range is free."""
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(100 if low > LOWEST_FREE_PORT else 0):
        port = rng.randrange(LOWEST_FREE_PORT, low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any] | None, grace: float = 10.0) -> int | None:
    """SIGTERM by pid, SIGKILL if it lingers past ``grace`` seconds; the exit code (None when
    there is no process). Safe to call again on a process already ended."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def start_listening(
    argv: Sequence[str], *, stderr: Any, timeout: float, what: str, **popen: Any
) -> tuple[subprocess.Popen[str], int]:
    """Start a server that prints ``listening on HOST:PORT`` once it accepts connections (the
    example gateway and the naive one do, and ``--port 0`` makes them pick a free port); return
    the process and that port.

    One thread reads its stdout for the process's whole life: it spots the line and keeps
    draining afterwards, so a chatty server never blocks on a full pipe. A server that exits, or
    says nothing for ``timeout`` seconds, is stopped and RuntimeError names it as ``what``.
    """
    proc = subprocess.Popen(
        list(argv), stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1, **popen
    )
    found: list[int] = []
    bound = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not found and line.startswith("listening on "):
                found.append(int(line.split()[2].rsplit(":", 1)[1]))
                bound.set()
        bound.set()

    threading.Thread(target=read, daemon=True).start()
    if not bound.wait(timeout) or not found:
        stop_process(proc)
        raise RuntimeError(
            f"{what} did not report 'listening on' within {timeout:g} s "
            f"(exit code {proc.returncode})"
        )
    return proc, found[0]


def wait_listening(host: str, port: int, proc: subprocess.Popen[Any], timeout: float) -> None:
    """Wait until ``host:port`` accepts a TCP connection, for a server that prints nothing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout:g} s")


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Make SIGTERM raise SystemExit while the block runs.

    A SIGTERM (a time limit, a CI cancel) would otherwise end the interpreter without the
    finally blocks that stop the servers, workers and namespaces a benchmark started.
    """

    def raise_exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------------
# Figures.


def quantile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile by nearest rank (a value that was measured, never an interpolation);
    None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def round_or_none(value: float | None, digits: int = 1) -> float | None:
    """``round(value, digits)``, passing None (a figure that was not measured) through."""
    return None if value is None else round(value, digits)


# ----------------------------------------------------------------------------------------------
# Reports.


def write_json(path: Path, data: Any, indent: int | None = 1) -> None:
    """Write ``data`` to ``path`` as JSON ending in a newline, creating its folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent) + "\n")


def grid(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A plain-text table: every column as wide as its widest cell, `` | `` between columns and
    a rule under the header."""
    lines = [header, *body]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def machine() -> dict[str, Any]:
    """What a run was measured on: the Python, the platform and the CPU count."""
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


def loadavg() -> tuple[float, float, float]:
    """The machine's 1, 5 and 15 minute load averages: read before and after a run, they show
    whether something else shared the CPUs while it was measured."""
    return os.getloadavg()

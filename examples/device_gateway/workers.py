"""``gateway.py --workers N``: N gateway processes on one host sharing one port (SO_REUSEPORT).

One Python process is one core (and, on the machine this was written on, 20,000 descriptors),
so a host with more cores or more devices runs several gateway processes. The kernel spreads
new connections over every socket bound to the port with SO_REUSEPORT, so each worker is a
whole gateway of its own, started from the same command line with ``--worker-index I`` added;
nothing else is shared unless ``--cluster`` gives them a store (without one, a device that
reconnects to another worker leaves its old session on the first until that one's timeout).

What each worker gets of its own, derived from the command line (I = 1..N):

* ``--data telemetry.sqlite3`` becomes ``telemetry.wI.sqlite3`` (one SQLite writer per file);
* ``--status-port P`` and ``--metrics-port P`` become ``P + I - 1`` (0 stays off);
* ``--node-id NAME`` becomes ``NAME-wI`` (the default, host and pid, differs anyway).

The supervisor (this module) relays each worker's output prefixed ``worker I:``, prints
``N workers ready`` and then ``listening on HOST:PORT`` once every worker is listening,
forwards SIGINT and SIGTERM to each worker by pid and exits once they all have (status 1 if
any did not exit 0). A worker that dies is
logged and not restarted (a supervisor such as systemd restarts the whole unit).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["for_worker", "supervise"]

#: Seconds every worker has to print "listening on" before the supervisor gives up.
READY_TIMEOUT = 60.0
#: Seconds workers have to exit after SIGTERM (their own --shutdown-grace included) before
#: they are killed.
STOP_TIMEOUT = 30.0


def for_worker(args: argparse.Namespace) -> None:
    """Give worker ``args.worker_index`` its own data file, status and metrics ports and node
    id (in place), as the module docstring lists."""
    index = args.worker_index
    path = Path(args.data)
    args.data = str(path.with_name(f"{path.stem}.w{index}{path.suffix}"))
    if args.status_port:
        args.status_port += index - 1
    if args.metrics_port:
        args.metrics_port += index - 1
    if getattr(args, "node_id", None):
        args.node_id = f"{args.node_id}-w{index}"
    args.reuse_port = True


def _reserve_port(host: str, port: int) -> socket.socket:
    """A bound, never listening SO_REUSEPORT socket: it picks the port for ``--port 0`` and
    holds it until the workers have bound it too (they are the only ones that can)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host or "", port))
    return sock


def supervise(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run ``args.workers`` workers of the gateway command ``argv`` until a signal or until
    they have all exited; return the exit status."""
    try:
        reserved = _reserve_port(args.host, args.port)
    except OSError as exc:
        print(f"gateway: cannot listen: {exc}", file=sys.stderr)
        return 1
    port = reserved.getsockname()[1]
    script = str(Path(__file__).resolve().parent / "gateway.py")
    procs: list[subprocess.Popen[str]] = []
    ready = threading.Semaphore(0)
    stopping = threading.Event()

    def relay(index: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        told = False
        for line in proc.stdout:
            print(f"worker {index}: {line}", end="", flush=True)
            if not told and line.startswith("listening on "):
                told = True
                ready.release()
        if not told:
            ready.release()  # the supervisor's wait ends; it sees the exit code

    def forward(signum: int, frame: object) -> None:
        del frame
        stopping.set()
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    relays = []
    try:
        for index in range(1, args.workers + 1):
            command = [sys.executable, script, *argv, "--port", str(port)]
            command += ["--worker-index", str(index)]
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1)
            procs.append(proc)
            relays.append(threading.Thread(target=relay, args=(index, proc), daemon=True))
            relays[-1].start()
        answered = 0
        while answered < len(procs) and ready.acquire(timeout=READY_TIMEOUT):
            answered += 1
        failed = [i for i, p in enumerate(procs, 1) if p.poll() is not None]
        if failed or answered < len(procs):
            print(f"gateway: worker(s) {failed or 'all'} did not start", file=sys.stderr)
            forward(signal.SIGTERM, None)
        else:
            host = args.host or "0.0.0.0"
            shown = f"[{host}]" if ":" in host else host
            print(f"{len(procs)} workers ready", flush=True)
            print(f"listening on {shown}:{port}", flush=True)
        reserved.close()
        statuses = [_wait(proc, stopping, index) for index, proc in enumerate(procs, 1)]
    finally:
        reserved.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return 1 if any(s != 0 for s in statuses) else 0


def _wait(proc: subprocess.Popen[str], stopping: threading.Event, index: int) -> int:
    """Wait for one worker; once a signal has been forwarded, give it STOP_TIMEOUT more seconds
    and then kill it."""
    stop_by: float | None = None
    while True:
        if stop_by is None and stopping.is_set():
            stop_by = time.monotonic() + STOP_TIMEOUT
        try:
            code = proc.wait(1.0)
        except subprocess.TimeoutExpired:
            if stop_by is not None and time.monotonic() > stop_by:
                print(f"gateway: worker {index} did not stop; killing it", file=sys.stderr)
                proc.kill()
                return proc.wait()
            continue
        if code != 0 or not stopping.is_set():
            print(f"gateway: worker {index} exited with status {code}", file=sys.stderr)
        # A worker that shut down cleanly on SIGTERM exits 0; a killed one has a negative code.
        return code

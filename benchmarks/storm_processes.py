"""The processes one storm run starts, seen from the coordinator (benchmarks/storm.py): the
server under test (the keepconn gateway through storm_wrap.py, which traces its sessions), the
device workers (storm_devices.py), the loop-lag probe (storm_probe.py) and a poller of the
server's status page. Every one is ended by its pid in a finally block.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from device_gateway.devcerts import DevPki
from harness import NAIVE_GATEWAY, ROOT, free_port, start_listening, stop_process
from storm_wrap import TRACE_ENV

if TYPE_CHECKING:
    from storm_run import Contender

DEVICES = ROOT / "benchmarks" / "storm_devices.py"
PROBE = ROOT / "benchmarks" / "storm_probe.py"
WRAP = ROOT / "benchmarks" / "storm_wrap.py"
PROBE_INTERVAL = 0.02
#: Seconds between GET /status. Not more often: the keepconn gateway's status page parses the
#: kernel's socket table on every request (tens of milliseconds of its CPU at 30,000 sockets),
#: a cost the naive gateway's page does not have, which would bias the loop-lag comparison.
STATUS_EVERY = 5.0


def _raise_nofile() -> None:
    # Runs in the server's child process before exec: 15,000 devices plus hellos need more than
    # a conservative soft limit, and the hard limit is what the process may have.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Server:
    """A gateway process started from its documented command line."""

    def __init__(
        self, contender: Contender, users: Path, workdir: Path, tls: DevPki | None = None
    ) -> None:
        self.status_port = free_port()
        gateway = contender.server == "gateway"
        script = WRAP if gateway else NAIVE_GATEWAY
        argv = [sys.executable, str(script), "--host", "127.0.0.1", "--port", "0"]
        argv += ["--users", str(users), "--status-port", str(self.status_port)]
        if tls is not None:
            argv += ["--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key)]
        env = dict(os.environ)
        #: The gateway's session trace (storm_wrap.py), written when it exits.
        self.trace_path: Path | None = None
        if gateway:
            # warning: the per-close info lines would cost the keepconn gateway 30,000 log
            # writes a storm that the naive gateway (which logs nothing) does not pay.
            argv += ["--data", str(workdir / f"{contender.name}.sqlite3"), "--log-level", "warning"]
            self.trace_path = workdir / f"{contender.name}.trace.json"
            env[TRACE_ENV] = str(self.trace_path)
        argv += list(contender.extra)
        self.argv = argv
        self.log_path = workdir / f"{contender.name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        try:
            self.proc, self.port = start_listening(
                argv,
                stderr=self._log,
                timeout=30.0,
                what=f"{script.name} (see {self.log_path})",
                preexec_fn=_raise_nofile,  # noqa: PLW1509 - no threads of ours touch the child
                env=env,
            )
        except BaseException:
            self._log.close()
            raise
        self.ps = psutil.Process(self.proc.pid)

    def status(self) -> dict[str, Any] | None:
        url = f"http://127.0.0.1:{self.status_port}/status"
        try:
            with urllib.request.urlopen(url, timeout=5.0) as reply:  # noqa: S310 - loopback
                return dict(json.load(reply))
        except (OSError, ValueError):
            return None

    def stop(self) -> int | None:
        code = stop_process(self.proc)
        self._log.close()
        return code

    def trace(self) -> dict[str, Any] | None:
        """The gateway's session trace, once it has exited (None for the naive gateway)."""
        if self.trace_path is None:
            return None
        try:
            return dict(json.loads(self.trace_path.read_text()))
        except (OSError, ValueError):
            return None


class Lines:
    """A child process speaking JSON lines on stdout, read by one thread."""

    def __init__(self, argv: list[str], on_message: Callable[[dict[str, Any]], None]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.done = threading.Event()
        self._on_message = on_message
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            self._on_message(message)
        self.done.set()

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def stop(self) -> None:
        stop_process(self.proc, grace=5.0)


class Fleet:
    """The device workers of one run."""

    def __init__(self, spec: dict[str, Any], devices: int, workers: int) -> None:
        self.ticks: list[dict[str, Any]] = [{} for _ in range(workers)]
        self.finals: list[dict[str, Any] | None] = [None] * workers
        self.procs: list[Lines] = []
        base, extra = divmod(devices, workers)
        first = 0
        for w in range(workers):
            count = base + (1 if w < extra else 0)
            one = dict(spec, first=first, count=count, seed=spec["seed"] * 7919 + w)
            first += count
            self.procs.append(
                Lines([sys.executable, str(DEVICES), json.dumps(one)], self._receiver(w))
            )

    def _receiver(self, w: int) -> Callable[[dict[str, Any]], None]:
        def receive(message: dict[str, Any]) -> None:
            if message.get("kind") == "tick":
                self.ticks[w] = message
            elif message.get("kind") == "final":
                self.finals[w] = message

        return receive

    def totals(self) -> dict[str, Any]:
        total: Counter[str] = Counter()
        failures: Counter[str] = Counter()
        for tick in self.ticks:
            for key, value in tick.items():
                if key != "t" and isinstance(value, int):
                    total[key] += value
            failures.update(tick.get("failures", {}))
        return dict(total, failures=dict(failures))

    def alive(self) -> bool:
        return all(p.proc.poll() is None for p in self.procs)

    def command(self, word: str) -> None:
        for p in self.procs:
            p.send(word)

    def finish(self, wait: float) -> list[dict[str, Any]]:
        self.command("quit")
        deadline = time.monotonic() + wait
        for p in self.procs:
            p.done.wait(max(0.0, deadline - time.monotonic()))
        self.stop()
        return [f for f in self.finals if f is not None]

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


class Probe:
    """The loop-lag probe session (storm_probe.py)."""

    def __init__(self, port: int, user: tuple[str, str], ca: str | None = None) -> None:
        self.ready = threading.Event()
        self.samples: dict[str, Any] | None = None
        argv = [sys.executable, str(PROBE), "127.0.0.1", str(port), *user, str(PROBE_INTERVAL)]
        if ca is not None:
            argv.append(ca)  # TLS, trusting this CA
        self.lines = Lines(argv, self._receive)
        if not self.ready.wait(30.0):
            self.lines.stop()
            raise RuntimeError("the probe session did not open")

    def _receive(self, message: dict[str, Any]) -> None:
        if message.get("kind") == "ready":
            self.ready.set()
        elif message.get("kind") == "samples":
            self.samples = message

    def finish(self) -> dict[str, Any]:
        self.lines.send("quit")
        self.lines.done.wait(15.0)
        self.lines.stop()
        return self.samples or {"sent": [], "lag": [], "lost": True}


class StatusPoller:
    """GET /status every STATUS_EVERY seconds on its own thread, so a stalled server never
    stalls sampling."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.samples: list[tuple[float, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            status = self.server.status()
            if status is not None:
                self.samples.append((time.monotonic(), status))
            self._stop.wait(max(0.0, STATUS_EVERY - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10.0)

"""The servers the runtime benchmark measures, and the processes it starts: each server, and the
client processes (benchmarks/runtime_clients.py) that hold its connections. Every process is
ended by its pid in a finally block (harness.stop_process).
"""

from __future__ import annotations

import json
import os
import queue
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import psutil

from churn_servers import mosquitto_binary
from harness import ROOT, free_port, start_listening, stop_process, wait_listening
from runtime_probe import CONTROL_ENV

BENCH = ROOT / "benchmarks"
LINES = BENCH / "runtime_lines.py"
WRAP = BENCH / "runtime_wrap.py"
CLIENTS = BENCH / "runtime_clients.py"
#: A sample runs four full collections at N2 (about a second each for the gateway).
CONTROL_TIMEOUT = 180.0
#: The example gateway drains its sessions for --shutdown-grace (5 s) on SIGTERM.
STOP_GRACE = 30.0


@attrs.frozen
class Contender:
    """One server: how to start it and what it speaks."""

    name: str
    label: str
    program: str  # "lines", "gateway", "naive" or "mosquitto"
    proto: str  # "line" or "mqtt"
    args: tuple[str, ...] = ()

    @property
    def python(self) -> bool:
        """Whether the probe runs inside it (every server but Mosquitto)."""
        return self.program != "mosquitto"


CONTENDERS = (
    Contender(
        "asyncio-protocol",
        "bare asyncio.Protocol line server",
        "lines",
        "line",
        ("protocol", "--backend", "asyncio"),
    ),
    Contender("anyio-asyncio", "bare anyio listener on asyncio", "lines", "line", ("anyio",)),
    Contender(
        "anyio-trio",
        "bare anyio listener on trio",
        "lines",
        "line",
        ("anyio", "--backend", "trio"),
    ),
    Contender(
        "keepconn-asyncio", "keepconn.Server, LineFramer, asyncio", "lines", "line", ("keepconn",)
    ),
    Contender(
        "keepconn-asyncio-anyio",
        "keepconn.Server, LineFramer, asyncio, anyio transport",
        "lines",
        "line",
        ("keepconn", "--transport", "anyio"),
    ),
    Contender(
        "keepconn-uvloop",
        "keepconn.Server, LineFramer, uvloop",
        "lines",
        "line",
        ("keepconn", "--backend", "uvloop"),
    ),
    Contender(
        "keepconn-trio",
        "keepconn.Server, LineFramer, trio",
        "lines",
        "line",
        ("keepconn", "--backend", "trio"),
    ),
    Contender(
        "keepconn-trio-anyio",
        "keepconn.Server, LineFramer, trio, anyio transport",
        "lines",
        "line",
        ("keepconn", "--backend", "trio", "--transport", "anyio"),
    ),
    Contender("gateway", "example MQTT gateway, default options", "gateway", "mqtt"),
    Contender("naive", "benchmarks/naive_gateway.py, defaults", "naive", "mqtt"),
    Contender("mosquitto", "Debian's mosquitto broker", "mosquitto", "mqtt"),
)
NAMES = tuple(c.name for c in CONTENDERS)


def _raise_nofile() -> None:
    # In the child before exec: the hard limit is what a server may hold.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _mosquitto_conf(path: Path, port: int) -> None:
    path.write_text(
        f"listener {port} 127.0.0.1\n"
        # Authentication is not what is compared: anonymous, and the devices' credentials are
        # accepted as they are.
        "allow_anonymous true\n"
        "max_connections -1\n"
        "max_keepalive 65535\n"
        "persistence false\n"
        # Run as the user that started it (root here) rather than drop to "mosquitto".
        "user root\n"
        "log_dest stderr\nlog_type error\nlog_type warning\n"
    )


@attrs.frozen
class Account:
    #: The gateway's users file (hashed, as it requires) and the naive gateway's (clear text,
    #: as a tutorial gateway keeps it), both for the one account the clients use.
    users_file: Path
    clear_users_file: Path
    user: tuple[str, str]


class ServerProcess:
    """One server under test, started fresh for one phase of one contender."""

    def __init__(self, contender: Contender, workdir: Path, account: Account, tag: str) -> None:
        self.contender = contender
        self.control_port = free_port() if contender.python else None
        self.log_path = workdir / f"{contender.name}-{tag}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self._control: socket.socket | None = None
        self._control_lines: Any = None
        try:
            self.proc, self.port = self._start(workdir, account, tag)
        except BaseException:
            self._log.close()
            raise
        self.ps = psutil.Process(self.proc.pid)

    def _start(
        self, workdir: Path, account: Account, tag: str
    ) -> tuple[subprocess.Popen[Any], int]:
        c = self.contender
        if c.program == "mosquitto":
            binary = mosquitto_binary()
            if binary is None:
                raise RuntimeError("mosquitto is not installed (make setup installs it as root)")
            port = free_port()
            conf = workdir / f"mosquitto-{tag}.conf"
            _mosquitto_conf(conf, port)
            self.argv = [binary, "-c", str(conf)]
            proc = subprocess.Popen(
                self.argv,
                stdout=self._log,
                stderr=self._log,
                preexec_fn=_raise_nofile,  # noqa: PLW1509 - no threads of ours touch the child
            )
            try:
                wait_listening("127.0.0.1", port, proc, 15.0)
            except BaseException:
                stop_process(proc)
                raise
            return proc, port
        base = ["--host", "127.0.0.1", "--port", "0"]
        if c.program == "lines":
            argv = [sys.executable, str(LINES), *c.args, *base]
        elif c.program == "gateway":
            data = workdir / f"gateway-{tag}.sqlite3"
            argv = [sys.executable, str(WRAP), "gateway", *base, "--users", str(account.users_file)]
            argv += ["--data", str(data), *c.args]
        else:
            users = str(account.clear_users_file)
            argv = [sys.executable, str(WRAP), "naive", *base, "--users", users, *c.args]
        self.argv = argv
        env = {**os.environ, CONTROL_ENV: str(self.control_port)}
        return start_listening(
            argv,
            stderr=self._log,
            timeout=60.0,
            what=f"{c.name} (see {self.log_path})",
            env=env,
            preexec_fn=_raise_nofile,  # noqa: PLW1509 - no threads of ours touch the child
        )

    # -- figures

    def cpu(self) -> float:
        """User plus system CPU seconds of the server process so far."""
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def ask(self, cmd: str) -> dict[str, Any]:
        """One command to the probe inside the server (runtime_probe), its answer."""
        if self.control_port is None:
            raise RuntimeError(f"{self.contender.name} has no probe")
        if self._control is None:
            self._control = socket.create_connection(
                ("127.0.0.1", self.control_port), timeout=CONTROL_TIMEOUT
            )
            self._control_lines = self._control.makefile("rwb")
        self._control_lines.write(json.dumps({"cmd": cmd}).encode() + b"\n")
        self._control_lines.flush()
        line = self._control_lines.readline()
        if not line:
            raise RuntimeError(f"the probe of {self.contender.name} closed its control socket")
        answer = dict(json.loads(line))
        if not answer.get("ok"):
            raise RuntimeError(f"the probe of {self.contender.name}: {answer.get('error')}")
        return answer

    def stop(self) -> int | None:
        if self._control_lines is not None:
            self._control_lines.close()
        if self._control is not None:
            self._control.close()
        try:
            return stop_process(self.proc, grace=STOP_GRACE)
        finally:
            self._log.close()


class Clients:
    """The client processes holding one server's connections; commands go to all of them."""

    def __init__(self, spec: dict[str, Any], total: int, processes: int) -> None:
        self.shares = split(total, processes)
        self.procs: list[subprocess.Popen[str]] = []
        self.inboxes: list[queue.Queue[dict[str, Any]]] = []
        first = 0
        try:
            for i, share in enumerate(self.shares):
                one = dict(spec, first=first, count=share, seed=spec["seed"] * 7919 + i)
                one["rate"] = spec["rate"] / processes
                first += share
                self._spawn(one)
            self.collect("ready", 60.0)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, spec: dict[str, Any]) -> None:
        proc = subprocess.Popen(
            [sys.executable, str(CLIENTS), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        inbox: queue.Queue[dict[str, Any]] = queue.Queue()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    inbox.put(json.loads(line))
                except ValueError:
                    continue
            inbox.put({"kind": "exited"})

        threading.Thread(target=read, daemon=True).start()
        self.procs.append(proc)
        self.inboxes.append(inbox)

    def send(self, index: int, command: dict[str, Any]) -> None:
        stdin = self.procs[index].stdin
        assert stdin is not None
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()

    def collect(self, kind: str, timeout: float) -> list[dict[str, Any]]:
        """One ``kind`` answer from every process, within ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        answers = []
        for i, inbox in enumerate(self.inboxes):
            # Bounded in count as in time: a process says little besides its answers.
            for _ in range(1000):
                left = deadline - time.monotonic()
                try:
                    if left <= 0:
                        raise queue.Empty
                    message = inbox.get(timeout=left)
                except queue.Empty:
                    why = f"client process {i} gave no {kind!r} in {timeout:g} s"
                    raise RuntimeError(why) from None
                if message.get("kind") == "exited":
                    raise RuntimeError(f"client process {i} exited waiting for {kind!r}")
                if message.get("kind") == kind:
                    answers.append(message)
                    break
            else:
                raise RuntimeError(f"client process {i}: too many messages before {kind!r}")
        return answers

    def grow(self, total: int, timeout: float) -> list[dict[str, Any]]:
        """Grow to ``total`` connections up, spread over the processes as their shares."""
        for i, share in enumerate(split(total, len(self.procs))):
            self.send(i, {"cmd": "grow", "to": min(share, self.shares[i])})
        return self.collect("grown", timeout)

    def stop(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is None:
                try:
                    self.send(i, {"cmd": "quit"})
                except (BrokenPipeError, OSError, ValueError):
                    pass
        for proc in self.procs:
            stop_process(proc, grace=10.0)


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` shares differing by at most one."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]

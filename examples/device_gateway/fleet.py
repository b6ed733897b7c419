"""A device-fleet simulator: thousands of MQTT devices that heartbeat, send telemetry, reboot,
vanish half-open and reconnect in storms, aimed at the example gateway.

Run it standalone against a gateway it starts itself (``--spawn-gateway``) or one already
listening on loopback (``--host``/``--port``); ``examples/demo.py`` drives it with a live view.

How a device dies, and why this is honest
-----------------------------------------
A real device that loses power sends nothing: no FIN, no RST. Its old connection stays
ESTABLISHED on the server (half-open) until the server's heartbeat or the kernel's keepalive
gives up, or until the device comes back and takes its session over. Loopback cannot produce
this -- the kernel always answers -- so, when run as root, devices live in *cells*: network
namespaces built with :mod:`keepconn.testing`, joined to the root namespace by a veth pair. One
worker process serves one cell and enters its namespace before it opens a socket, so every
device socket it makes is on the far side of a real link.

* Reboot and half-open loss (one device at a time). Cutting a cell's link would silence every
  device in it, so a single device is silenced by its source port instead: two policy-routing
  rules in the cell (``ip rule add ipproto tcp sport P blackhole`` and the same with
  ``dport P``) drop everything the device's socket would send and everything the server sends
  to it, in the device's own namespace. The device then stops using the socket (the file stays
  open, so the kernel sends no FIN either). For the server this is exactly a powered-off
  device: its packets -- data, keepalive probes, the RST of a takeover -- go out on the wire
  and nothing ever comes back. Two details make the rules bite: the cell's ``local`` rule is
  moved below them (it sits at priority 0 by default and would match first), and TCP early
  demux is turned off in the cell, because it hands established sockets their cached route
  without consulting the rules. A rebooted device comes back after a short boot time with the
  same client id (a takeover); a lost one stays dark for longer than the gateway's 1.5 x
  keepalive, so the gateway has to reap it. The abandoned socket is closed much later (with an
  RST that the rules still drop) and only then are its rules removed.
* Reconnect storm (a whole cell at once, like a site's power cut). The cell's link goes down
  (``keepconn.testing``'s cable pull), every device aborts its socket while no route exists (so
  its RST never leaves), the link comes back up, and all of them reconnect at the same moment
  with their old ids: hundreds of takeovers of half-open connections in one burst.

Without root (or with ``--no-netns``) there are no namespaces: devices use loopback, and a
reboot, loss or storm abandons the socket silently -- nothing is sent, but the kernel still
ACKs, so the server sees a hung device (the SIGSTOP case) rather than a truly half-open one.
The simulator says so when it starts.

Processes: one worker holds at most ``--per-worker`` devices (default 4000; the hard limit is
20,000 descriptors per process and abandoned sockets also hold one each). Workers report JSON
lines on stdout (a tick every half second, then per-device records) and take commands on stdin
(``churn``, ``calm``, ``storm``, ``burst N FAULT``, ``quit``).

Vanish reports (opt-in, for benchmarks that time the server's side): with ``Fleet(on_event=...)``
every worker also reports each device connection the moment it has gone silent -- after the
blackhole rules are in place, or after the aborted socket of a storm -- as ``{"kind": "vanish",
"fault", "id", "addr", "port", "t"}``, where (addr, port) is the device's end of the 4-tuple as
the server sees it and ``t`` is ``time.monotonic()`` (one clock for every process on the host).

What it reports, per device and in aggregate: connect latency (TCP connect to CONNACK),
takeover latency (the same for a reconnect after a reboot or storm, while the old connection is
still half-open on the server), disconnects by reason, QoS 0/1 messages published and QoS 1
messages acknowledged, CONNACK refusals by return code.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import math
import os
import random
import resource
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs

from device_gateway.mqtt_codec import (
    Connack,
    Connect,
    Decoder,
    Disconnect,
    MQTTProtocolError,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Role,
    Subscribe,
    encode,
)
from keepconn import Backoff

__all__ = [
    "Cell",
    "DeviceProfile",
    "Fleet",
    "GatewayProcess",
    "make_cells",
    "netns_reason",
    "write_users",
]

GATEWAY_SCRIPT = Path(__file__).resolve().parent / "gateway.py"
#: Devices one worker process holds by default, well under the 20,000-descriptor limit so that
#: abandoned sockets waiting to be retired fit too.
DEFAULT_PER_WORKER = 4000
_FD_LIMIT = 20_000
_TICK = 0.5
_CLONE_NEWNET = 0x40000000
# Priority of the per-port blackhole rules; the cell's "local" rule is moved below them.
_RULE_PREF = "10"
_LOCAL_PREF = "100"


def _check_positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _check_non_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen
class DeviceProfile:
    """How every device in the fleet behaves. Rates are per device per minute."""

    #: CONNECT keepalive in seconds; the device sends PINGREQ after this long without sending.
    keepalive: int = attrs.field(default=10, validator=_check_positive)
    #: Mean seconds between telemetry publishes (jittered +/- 30 %).
    telemetry_interval: float = attrs.field(default=2.0, validator=_check_positive)
    #: Fraction of publishes sent at QoS 1 (acknowledged once stored); the rest are QoS 0.
    qos1_fraction: float = attrs.field(default=0.5, validator=_check_non_negative)
    #: Reboots per device per minute: vanish without FIN, reconnect after ``boot_time``.
    reboot_rate: float = attrs.field(default=0.0, validator=_check_non_negative)
    #: Half-open losses per device per minute: vanish without FIN, stay dark ``loss_offline``.
    loss_rate: float = attrs.field(default=0.0, validator=_check_non_negative)
    #: Mean seconds a rebooting device takes before it reconnects.
    boot_time: float = attrs.field(default=1.0, validator=_check_non_negative)
    #: Seconds a lost device stays dark; None means 1.5 x keepalive + 3 s, so the gateway must
    #: reap the old connection before the device returns.
    loss_offline: float | None = None
    #: Seconds a connect (TCP + CONNECT/CONNACK) may take before it counts as failed.
    connect_timeout: float = attrs.field(default=10.0, validator=_check_positive)
    #: Subscribe to ``devices/<id>/commands`` after connecting, as command-taking devices do.
    subscribe: bool = True

    @property
    def dark_seconds(self) -> float:
        """How long a lost device stays offline."""
        if self.loss_offline is not None:
            return self.loss_offline
        return 1.5 * self.keepalive + 3.0

    @property
    def retire_after(self) -> float:
        """Seconds an abandoned socket is kept (silent) before it is closed for good: long after
        any correct gateway has reaped it, so closing it can never hide a phantom."""
        return 3.0 * 1.5 * self.keepalive + 10.0


# ----------------------------------------------------------------------------------------------
# Cells: network namespaces the devices live in (root only).


@attrs.frozen
class Cell:
    """A namespace a worker enters: its name, the device-side interface and the veth addresses."""

    name: str
    dev_if: str
    dev_addr: str
    host_addr: str


def netns_reason() -> str | None:
    """Why device cells cannot be built here, or None when they can."""
    try:
        from keepconn.testing import netns_unavailable_reason
    except ImportError as exc:  # pragma: no cover - keepconn is installed with the example
        return f"keepconn.testing is not importable: {exc}"
    return netns_unavailable_reason()


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=20, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: {done.stderr.strip()}")
    return done


def _tune_cell_sysctls() -> None:
    # Runs on a thread inside the cell: /proc/sys/net resolves to the opener's namespace. Early
    # demux gives established sockets their cached route and skips the policy rules that
    # silence one device, so it is turned off here (and only here).
    for knob in ("tcp_early_demux", "ip_early_demux"):
        with open(f"/proc/sys/net/ipv4/{knob}", "w") as f:
            f.write("0")


def make_cells(count: int) -> tuple[list[Any], list[Cell]]:
    """Build ``count`` cells (namespaces + veth pairs, via keepconn.testing) ready for devices.

    Returns the :class:`keepconn.testing.NetNs` objects (the caller closes them; an atexit
    hook in keepconn.testing also does) and the picklable :class:`Cell` descriptions. The
    gateway must listen on ``cells[0].host_addr``; every other cell gets a route to it.
    """
    from keepconn.testing import NetNs

    made: list[Any] = []
    try:
        for _ in range(count):
            ns = NetNs()
            made.append(ns)
            ns.run(_tune_cell_sysctls)
            # The local table must come after the per-port blackhole rules (see module doc).
            _ip("-n", ns.name, "rule", "add", "pref", _LOCAL_PREF, "lookup", "local")
            _ip("-n", ns.name, "rule", "del", "pref", "0")
        gateway_addr = made[0].host_addr
        for ns in made[1:]:
            _ip("-n", ns.name, "route", "add", f"{gateway_addr}/32", "via", ns.host_addr)
    except BaseException:
        for ns in made:
            ns.close()
        raise
    cells = [Cell(ns.name, ns.dev_if, ns.dev_addr, ns.host_addr) for ns in made]
    return made, cells


def _enter_netns(name: str) -> None:
    # Python 3.12 has os.setns; 3.10/3.11 need libc. Called on the main thread before any
    # socket or thread exists, so the whole worker lives in the cell.
    with open(f"/var/run/netns/{name}", "rb") as f:
        setns = getattr(os, "setns", None)
        if setns is not None:
            setns(f.fileno(), _CLONE_NEWNET)
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(f.fileno(), _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


# ----------------------------------------------------------------------------------------------
# The gateway as a subprocess (used by --spawn-gateway, the demo and the smoke test).


def write_users(path: Path, count: int = 8) -> list[tuple[str, str]]:
    """Write a users file with ``count`` fleet accounts; return the (username, password) pairs."""
    rng = random.Random()
    users = [(f"fleet{i}", f"pw-{rng.getrandbits(48):012x}") for i in range(count)]
    path.write_text("".join(f"{u}:{p}\n" for u, p in users))
    return users


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


# ----------------------------------------------------------------------------------------------
# The worker: one process, one cell (or loopback), many devices.


@attrs.define
class DeviceRecord:
    """What happened to one device."""

    client_id: str
    connects: int = 0
    connect_ms: list[float] = attrs.Factory(list)
    takeover_ms: list[float] = attrs.Factory(list)
    disconnects: Counter[str] = attrs.Factory(Counter)
    failures: Counter[str] = attrs.Factory(Counter)
    refused: Counter[int] = attrs.Factory(Counter)
    qos0: int = 0
    qos1: int = 0
    acked: int = 0
    pings: int = 0
    commands: int = 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (latencies rounded to 0.1 ms)."""
        return {
            "id": self.client_id,
            "connects": self.connects,
            "connect_ms": [round(x, 1) for x in self.connect_ms],
            "takeover_ms": [round(x, 1) for x in self.takeover_ms],
            "disconnects": dict(self.disconnects),
            "failures": dict(self.failures),
            "refused": {str(k): v for k, v in self.refused.items()},
            "qos0": self.qos0,
            "qos1": self.qos1,
            "acked": self.acked,
            "pings": self.pings,
            "commands": self.commands,
        }


class _Closed(Exception):
    """The connection ended; ``args[0]`` names why (a disconnect reason)."""


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await anyio.wait_writable(sock)
            continue
        except OSError as exc:
            gone = exc.errno in (errno.ECONNRESET, errno.EPIPE)
            raise _Closed("reset" if gone else "error") from None
        view = view[sent:]


class Device:
    """One simulated MQTT device: connect, heartbeat, publish; die and return on command."""

    def __init__(self, worker: Worker, index: int, username: str, password: str) -> None:
        self.worker = worker
        self.record = DeviceRecord(f"{worker.id_prefix}-{index:06d}")
        self.username = username
        self.password = password.encode()
        self.rng = random.Random(worker.seed * 1_000_003 + index)
        self.state = "offline"
        #: Set by the worker to make the device die: "reboot", "loss" or "storm".
        self.fault: str | None = None
        self._wait: anyio.CancelScope | None = None
        self._packet_id = 0

    def strike(self, fault: str) -> bool:
        """Make an online device die now (returns False if it is not online)."""
        if self.state != "online" or self.fault is not None:
            return False
        self.fault = fault
        if self._wait is not None:
            self._wait.cancel()
        return True

    async def run(self) -> None:
        """Connect, stay online, come back after every death, until the worker quits."""
        profile = self.worker.profile
        await self.worker.nap(self.rng.uniform(0, self.worker.ramp))
        backoff = Backoff(initial=0.5, max_delay=8.0).delays(self.rng)
        returning = False  # the previous connection may still be half-open on the server
        while not self.worker.quitting:
            await self.worker.storm_gate.wait()
            self.state = "connecting"
            started = time.monotonic()
            try:
                sock, decoder, early = await self._connect()
            except _Closed as exc:
                self.record.failures[exc.args[0]] += 1
                self.state = "offline"
                await self.worker.nap(backoff.next_delay())
                continue
            latency = (time.monotonic() - started) * 1000.0
            backoff.reset()
            self.record.connects += 1
            (self.record.takeover_ms if returning else self.record.connect_ms).append(latency)
            self.state = "online"
            reason = await self._session(sock, decoder, early)
            self.record.disconnects[reason] += 1
            self.fault = None
            returning = reason in ("reboot", "storm", "loss")
            if reason == "quit":
                break
            self.state = "dark" if returning else "offline"
            if reason == "reboot":
                await self.worker.nap(self.rng.uniform(0.5, 1.5) * profile.boot_time)
            elif reason == "loss":
                # Back only after the gateway had to reap the old connection by itself.
                returning = False
                await self.worker.nap(profile.dark_seconds)
            elif reason == "storm":
                pass  # the storm gate holds everyone until the cell's link is back
            else:
                await self.worker.nap(backoff.next_delay())
        self.state = "offline"

    async def _connect(self) -> tuple[socket.socket, Decoder, list[Any]]:
        worker = self.worker
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            with anyio.fail_after(worker.profile.connect_timeout):
                err = sock.connect_ex((worker.host, worker.port))
                if err not in (0, errno.EINPROGRESS):
                    raise _Closed(f"connect_{errno.errorcode.get(err, err)}")
                await anyio.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise _Closed(f"connect_{errno.errorcode.get(err, err)}")
                hello = Connect(
                    client_id=self.record.client_id,
                    clean_session=True,
                    keepalive=worker.profile.keepalive,
                    username=self.username,
                    password=self.password,
                )
                await _send_all(sock, encode(hello))
                decoder = Decoder(role=Role.CLIENT)
                packets: list[Any] = []
                while not packets:
                    await anyio.wait_readable(sock)
                    packets = self._receive(sock, decoder)
        except TimeoutError:
            _abort(sock)
            raise _Closed("connect_timeout") from None
        except _Closed as exc:
            _abort(sock)
            # A close before CONNACK is how an overloaded or banning server says no.
            raise _Closed(
                "closed_before_connack"
                if exc.args[0] in ("server_closed", "reset")
                else exc.args[0]
            ) from None
        except BaseException:
            _abort(sock)
            raise
        first, rest = packets[0], packets[1:]
        if not isinstance(first, Connack) or first.return_code != 0:
            _abort(sock)
            code = first.return_code if isinstance(first, Connack) else -1
            self.record.refused[code] += 1
            raise _Closed(f"connack_{code}")
        return sock, decoder, rest

    def _receive(self, sock: socket.socket, decoder: Decoder) -> list[Any]:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return []
        except OSError as exc:
            raise _Closed("reset" if exc.errno == errno.ECONNRESET else "error") from None
        if not data:
            raise _Closed("server_closed")
        try:
            return decoder.feed(data)
        except MQTTProtocolError:
            raise _Closed("protocol_error") from None

    def _next_id(self) -> int:
        self._packet_id = self._packet_id % 65535 + 1
        return self._packet_id

    async def _session(self, sock: socket.socket, decoder: Decoder, early: list[Any]) -> str:
        """Run one connection until it ends; return the reason. The socket is gone after."""
        profile = self.worker.profile
        keepalive = float(profile.keepalive)
        now = time.monotonic()
        last_sent = now
        ping_sent: float | None = None
        next_publish = now + self.rng.uniform(0, profile.telemetry_interval)
        inflight: set[int] = set()
        pending = list(early)
        try:
            if profile.subscribe:
                topic = f"devices/{self.record.client_id}/commands"
                await _send_all(sock, encode(Subscribe(self._next_id(), [(topic, 1)])))
                last_sent = time.monotonic()
            while True:
                for packet in pending:
                    if isinstance(packet, Pingresp):
                        ping_sent = None
                    elif isinstance(packet, Puback):
                        if packet.packet_id in inflight:
                            inflight.discard(packet.packet_id)
                            self.record.acked += 1
                    elif isinstance(packet, Publish):
                        self.record.commands += 1
                        if packet.qos == 1 and packet.packet_id is not None:
                            await _send_all(sock, encode(Puback(packet.packet_id)))
                pending = []
                if self.worker.quitting:
                    await _send_all(sock, encode(Disconnect()))
                    _close_gracefully(sock)
                    return "quit"
                if self.fault is not None:
                    await self.worker.abandon(sock, self.fault, self.record.client_id)
                    return self.fault
                now = time.monotonic()
                if ping_sent is not None and now - ping_sent > keepalive:
                    _abort(sock)
                    return "ping_timeout"
                if now >= next_publish:
                    qos = 1 if self.rng.random() < profile.qos1_fraction else 0
                    packet_id = self._next_id() if qos else None
                    payload = json.dumps({"t": round(time.time(), 3), "v": self.rng.random()})
                    topic = f"telemetry/{self.record.client_id}"
                    await _send_all(
                        sock, encode(Publish(topic, payload.encode(), qos=qos, packet_id=packet_id))
                    )
                    if packet_id is not None:
                        inflight.add(packet_id)
                        self.record.qos1 += 1
                    else:
                        self.record.qos0 += 1
                    last_sent = now
                    next_publish = now + profile.telemetry_interval * self.rng.uniform(0.7, 1.3)
                if now - last_sent >= keepalive and ping_sent is None:
                    await _send_all(sock, encode(Pingreq()))
                    self.record.pings += 1
                    ping_sent = last_sent = now
                wake = min(next_publish, last_sent + keepalive)
                if ping_sent is not None:
                    wake = min(wake, ping_sent + keepalive)
                with anyio.move_on_after(max(0.0, wake - time.monotonic())) as scope:
                    self._wait = scope
                    if self.fault is None and not self.worker.quitting:
                        await anyio.wait_readable(sock)
                        pending = self._receive(sock, decoder)
                self._wait = None
        except _Closed as exc:
            _abort(sock)
            return str(exc.args[0])
        except BaseException:
            _abort(sock)
            raise


def _abort(sock: socket.socket) -> None:
    # Linger 0: close without FIN_WAIT leftovers on the device side (sends an RST if routable).
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _close_gracefully(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()


@attrs.define
class _Abandoned:
    sock: socket.socket
    port: int
    since: float
    silenced: bool


class Worker:
    """One process's share of the fleet: its devices, churn, storms and abandoned sockets."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.host: str = spec["host"]
        self.port: int = spec["port"]
        self.profile = DeviceProfile(**spec["profile"])
        self.seed: int = spec["seed"]
        self.ramp: float = spec["ramp"]
        self.id_prefix: str = spec["id_prefix"]
        self.cell: Cell | None = Cell(**spec["cell"]) if spec.get("cell") else None
        self.report_vanish: bool = bool(spec.get("report_vanish", False))
        users = spec["users"]
        first = spec["first"]
        self.devices = [
            Device(self, i, *users[i % len(users)]) for i in range(first, first + spec["count"])
        ]
        self.rng = random.Random(self.seed)
        self.quitting = False
        self.churning = False
        self.storm_gate = anyio.Event()
        self.storm_gate.set()
        self.quit_event = anyio.Event()
        self.abandoned: list[_Abandoned] = []
        self.counts: Counter[str] = Counter()
        self._storm_left = 0
        self._storm_dropped = anyio.Event()

    async def nap(self, seconds: float) -> None:
        """Sleep, but wake at once when the worker quits."""
        with anyio.move_on_after(seconds):
            await self.quit_event.wait()

    # -- dying -----------------------------------------------------------------------------

    async def _rules(self, action: str, port: int) -> None:
        for direction in ("sport", "dport"):
            cmd = ["ip", "rule", action, "pref", _RULE_PREF, "ipproto", "tcp", direction]
            await anyio.run_process([*cmd, str(port), "blackhole"], check=False)

    async def abandon(self, sock: socket.socket, fault: str, client_id: str = "") -> None:
        """Make ``sock``'s connection vanish without a FIN (see the module doc for how)."""
        self.counts[fault] += 1
        if fault == "storm":
            self._storm_left -= 1
            if self._storm_left <= 0:
                self._storm_dropped.set()
        try:
            addr, port = sock.getsockname()[:2]
        except OSError:
            addr, port = "", 0
        if fault == "storm" and self.cell is not None:
            # The cell's link is down: no route, so the RST of this abort never leaves.
            _abort(sock)
            self._report_vanish(fault, client_id, addr, port)
            return
        silenced = False
        if self.cell is not None:
            await self._rules("add", port)
            silenced = True
        # Reported only now: until the rules are in place the device could still be heard.
        self._report_vanish(fault, client_id, addr, port)
        # Keep the socket open and never touch it again: closing would send a FIN.
        self.abandoned.append(_Abandoned(sock, port, time.monotonic(), silenced))

    def _report_vanish(self, fault: str, client_id: str, addr: str, port: int) -> None:
        if self.report_vanish and port:
            _emit(
                {
                    "kind": "vanish",
                    "fault": fault,
                    "id": client_id,
                    "addr": addr,
                    "port": port,
                    "t": time.monotonic(),
                }
            )

    async def burst(self, count: int, fault: str) -> None:
        """``count`` random online devices of this worker die at once with ``fault``."""
        online = [d for d in self.devices if d.state == "online" and d.fault is None]
        for device in self.rng.sample(online, min(count, len(online))):
            device.strike(fault)

    async def retire_loop(self) -> None:
        """Close abandoned sockets once no correct gateway could still hold their connection."""
        while True:
            await anyio.sleep(1.0)
            await self._retire(time.monotonic() - self.profile.retire_after)

    async def _retire(self, before: float) -> None:
        keep = []
        for item in self.abandoned:
            if item.since <= before or (not item.silenced and _peer_gone(item.sock)):
                # Linger 0: the RST is dropped by the rules still in place (cells), or lands on
                # a server socket that is already gone (loopback).
                _abort(item.sock)
                if item.silenced:
                    await self._rules("del", item.port)
            else:
                keep.append(item)
        self.abandoned = keep

    async def storm(self) -> None:
        """Every online device dies at once and all reconnect together."""
        self.storm_gate = anyio.Event()
        if self.cell is not None:
            await anyio.run_process(["ip", "link", "set", self.cell.dev_if, "down"])
        self._storm_dropped = anyio.Event()
        self._storm_left = sum(1 for d in self.devices if d.strike("storm"))
        if self._storm_left:
            # Wait (briefly) until every struck device has dropped its socket.
            with anyio.move_on_after(5.0):
                await self._storm_dropped.wait()
        await anyio.sleep(0.3)
        if self.cell is not None:
            await anyio.run_process(["ip", "link", "set", self.cell.dev_if, "up"])
            if self.host != self.cell.host_addr:
                # Link down took the route to the gateway with it.
                route = ["ip", "route", "replace", f"{self.host}/32", "via", self.cell.host_addr]
                await anyio.run_process(route, check=False)
        self.counts["storms"] += 1
        self.storm_gate.set()

    async def churn_loop(self) -> None:
        """Reboots and losses as a Poisson process over the whole worker."""
        profile = self.profile
        per_second = (profile.reboot_rate + profile.loss_rate) / 60.0 * len(self.devices)
        if per_second <= 0:
            return
        reboot_share = profile.reboot_rate / (profile.reboot_rate + profile.loss_rate)
        while True:
            await anyio.sleep(self.rng.expovariate(per_second))
            if not self.churning or self.quitting:
                continue
            online = [d for d in self.devices if d.state == "online" and d.fault is None]
            if online:
                fault = "reboot" if self.rng.random() < reboot_share else "loss"
                self.rng.choice(online).strike(fault)

    # -- reporting and control ---------------------------------------------------------------

    def tick(self) -> dict[str, Any]:
        """Counters for the coordinator's live view."""
        states = Counter(d.state for d in self.devices)
        records = [d.record for d in self.devices]
        return {
            "kind": "tick",
            "online": states["online"],
            "connecting": states["connecting"] + states["offline"],
            "dark": states["dark"],
            "connects": sum(r.connects for r in records),
            "takeovers": sum(len(r.takeover_ms) for r in records),
            "reboots": self.counts["reboot"],
            "losses": self.counts["loss"],
            "storm_drops": self.counts["storm"],
            "published": sum(r.qos0 + r.qos1 for r in records),
            "acked": sum(r.acked for r in records),
            "failures": sum(sum(r.failures.values()) for r in records),
            "abandoned": len(self.abandoned),
        }

    async def report_loop(self) -> None:
        """A tick line every half second."""
        while True:
            _emit(self.tick())
            await anyio.sleep(_TICK)

    async def control_loop(self, done: anyio.Event) -> None:
        """Commands from the coordinator on stdin."""
        while True:
            line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            word = line.strip()
            if word == "churn":
                self.churning = True
            elif word == "calm":
                self.churning = False
            elif word == "storm":
                await self.storm()
            elif word.startswith("burst "):
                # "burst N FAULT": a one-off wave of reboots or losses (benchmarks/churn.py).
                _, count, fault = word.split()
                if fault in ("reboot", "loss"):
                    await self.burst(int(count), fault)
            elif word == "quit" or not line:
                self.quitting = True
                self.quit_event.set()
                self.storm_gate.set()
                for device in self.devices:
                    if device._wait is not None:
                        device._wait.cancel()
                done.set()
                return


def _peer_gone(sock: socket.socket) -> bool:
    # Readable means EOF or an error is waiting: the server has let go of this connection.
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def _worker_main(spec: dict[str, Any]) -> None:
    worker = Worker(spec)
    done = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.control_loop, done)
        tg.start_soon(worker.report_loop)
        tg.start_soon(worker.churn_loop)
        tg.start_soon(worker.retire_loop)
        async with anyio.create_task_group() as devices:
            for device in worker.devices:
                devices.start_soon(device.run)
        # Every device has sent DISCONNECT (or given up) after "quit".
        await worker._retire(float("inf"))
        _emit(worker.tick())
        _emit({"kind": "final", "devices": [d.record.to_json() for d in worker.devices]})
        tg.cancel_scope.cancel()


def run_worker(spec: dict[str, Any]) -> None:
    """Entry point of a worker process (``fleet.py --worker SPEC_JSON``)."""
    if spec.get("cell"):
        _enter_netns(spec["cell"]["name"])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, _FD_LIMIT) if hard != resource.RLIM_INFINITY else _FD_LIMIT
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    anyio.run(_worker_main, spec)


# ----------------------------------------------------------------------------------------------
# The coordinator: spawns workers, merges their reports, aggregates the summary.


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 1)

    return {
        "n": len(ordered),
        "p50": pick(0.50),
        "p95": pick(0.95),
        "max": round(ordered[-1], 1),
        "mean": round(statistics.fmean(ordered), 1),
    }


class _WorkerHandle:
    def __init__(
        self,
        proc: subprocess.Popen[str],
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.proc = proc
        self.on_event = on_event
        self.tick: dict[str, Any] = {}
        self.final: list[dict[str, Any]] | None = None
        self.done = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("kind") == "tick":
                self.tick = message
            elif message.get("kind") == "final":
                self.final = message["devices"]
            elif self.on_event is not None:
                self.on_event(message)
        self.done.set()

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass


class Fleet:
    """N devices spread over worker processes (one per cell when cells are given)."""

    def __init__(
        self,
        *,
        devices: int,
        host: str,
        port: int,
        users: Sequence[tuple[str, str]],
        profile: DeviceProfile,
        cells: Sequence[Cell] = (),
        per_worker: int = DEFAULT_PER_WORKER,
        ramp: float = 3.0,
        seed: int = 1,
        id_prefix: str = "dev",
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """``on_event`` (optional) is called, on a reader thread, with every worker message
        that is neither a tick nor the final report: the vanish reports (module doc)."""
        self.devices = devices
        self._on_event = on_event
        self.cells = list(cells)
        self.mode = "netns" if self.cells else "loopback"
        workers = max(1, math.ceil(devices / per_worker))
        if self.cells and len(self.cells) < workers:
            raise ValueError(f"{devices} devices need {workers} cells, got {len(self.cells)}")
        workers = max(workers, len(self.cells))
        self._specs = []
        base, extra = divmod(devices, workers)
        first = 0
        for w in range(workers):
            count = base + (1 if w < extra else 0)
            self._specs.append(
                {
                    "host": host,
                    "port": port,
                    "users": [list(u) for u in users],
                    "profile": attrs.asdict(profile),
                    "seed": seed * 7919 + w,
                    "ramp": ramp,
                    "id_prefix": id_prefix,
                    "first": first,
                    "count": count,
                    "cell": attrs.asdict(self.cells[w]) if self.cells else None,
                    "report_vanish": on_event is not None,
                }
            )
            first += count
        self._workers: list[_WorkerHandle] = []

    @staticmethod
    def workers_needed(devices: int, per_worker: int = DEFAULT_PER_WORKER) -> int:
        """How many worker processes (and cells) ``devices`` devices need."""
        return max(1, math.ceil(devices / per_worker))

    def start(self) -> None:
        """Spawn the workers; devices start connecting over the ramp."""
        for spec in self._specs:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                bufsize=1,
            )
            self._workers.append(_WorkerHandle(proc, self._on_event))

    def command(self, word: str) -> None:
        """Send ``churn``, ``calm``, ``storm``, ``burst N FAULT`` or ``quit`` to every worker
        (a burst's N is per worker)."""
        for handle in self._workers:
            handle.send(word)

    def totals(self) -> dict[str, int]:
        """The workers' latest counters, summed."""
        total: Counter[str] = Counter()
        for handle in self._workers:
            for key, value in handle.tick.items():
                if isinstance(value, int):
                    total[key] += value
        return dict(total)

    def alive(self) -> bool:
        """True while every worker process runs."""
        return all(h.proc.poll() is None for h in self._workers)

    def finish(self, timeout: float = 20.0) -> dict[str, Any]:
        """Quit every device cleanly (DISCONNECT), collect and aggregate their records."""
        self.command("quit")
        deadline = time.monotonic() + timeout
        for handle in self._workers:
            handle.done.wait(max(0.0, deadline - time.monotonic()))
        self.kill()
        records = [r for h in self._workers for r in (h.final or [])]
        return self._aggregate(records)

    def kill(self) -> None:
        """End every worker by its pid (SIGTERM, then SIGKILL)."""
        for handle in self._workers:
            if handle.proc.poll() is None:
                handle.proc.terminate()
        for handle in self._workers:
            try:
                handle.proc.wait(5)
            except subprocess.TimeoutExpired:
                handle.proc.kill()
                handle.proc.wait(5)

    def _aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        disconnects: Counter[str] = Counter()
        failures: Counter[str] = Counter()
        refused: Counter[str] = Counter()
        for r in records:
            disconnects.update(r["disconnects"])
            failures.update(r["failures"])
            refused.update(r["refused"])
        connect_ms = [x for r in records for x in r["connect_ms"]]
        takeover_ms = [x for r in records for x in r["takeover_ms"]]
        return {
            "mode": self.mode,
            "devices": self.devices,
            "workers": len(self._workers),
            "cells": [c.name for c in self.cells],
            "reported": len(records),
            "ever_online": sum(1 for r in records if r["connects"]),
            "connects": sum(r["connects"] for r in records),
            "connect_ms": _percentiles(connect_ms),
            "takeovers": len(takeover_ms),
            "takeover_ms": _percentiles(takeover_ms),
            "reboots": disconnects["reboot"],
            "losses": disconnects["loss"],
            "storm_drops": disconnects["storm"],
            "disconnects": dict(disconnects),
            "failures": dict(failures),
            "refused": dict(refused),
            "published": {
                "qos0": sum(r["qos0"] for r in records),
                "qos1": sum(r["qos1"] for r in records),
            },
            "acked": sum(r["acked"] for r in records),
            "pings": sum(r["pings"] for r in records),
            "per_device": records,
        }


# ----------------------------------------------------------------------------------------------
# Standalone command line.


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=60.0, help="churn duration")
    p.add_argument("--keepalive", type=int, default=10)
    p.add_argument("--telemetry", type=float, default=2.0, help="seconds between publishes")
    p.add_argument("--qos1", type=float, default=0.5, help="fraction of QoS 1 publishes")
    p.add_argument("--reboot-rate", type=float, default=0.2, help="per device per minute")
    p.add_argument("--loss-rate", type=float, default=0.05, help="per device per minute")
    p.add_argument("--storm-at", type=float, action="append", default=[], help="seconds")
    p.add_argument("--per-worker", type=int, default=DEFAULT_PER_WORKER)
    p.add_argument("--cells", type=int, default=2, help="namespaces (root only)")
    p.add_argument("--no-netns", action="store_true", help="loopback only, even as root")
    p.add_argument("--host", help="an already running gateway (loopback only)")
    p.add_argument("--port", type=int)
    p.add_argument("--users", type=Path, help="users file of that gateway")
    p.add_argument("--spawn-gateway", action="store_true", help="start examples' gateway.py")
    p.add_argument("--json", type=Path, help="write the summary here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker and not args.spawn_gateway and not (args.host and args.port and args.users):
        p.error("give --spawn-gateway, or --host, --port and --users of a running gateway")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run a fleet for ``--seconds`` and print (and optionally write) its summary."""
    args = _parse(argv)
    if args.worker:
        run_worker(json.loads(args.worker))
        return 0
    profile = DeviceProfile(
        keepalive=args.keepalive,
        telemetry_interval=args.telemetry,
        qos1_fraction=args.qos1,
        reboot_rate=args.reboot_rate,
        loss_rate=args.loss_rate,
    )
    reason = "--no-netns given" if args.no_netns else netns_reason()
    if args.host and not args.spawn_gateway:
        reason = reason or "an external gateway on loopback cannot be reached from a namespace"
    print(f"fleet: {args.devices} devices, keepalive {args.keepalive} s")
    if reason:
        print(f"fleet: loopback only ({reason}); reboots abandon sockets silently, which the")
        print("       kernel still ACKs: a hung device, not a truly half-open one")
    namespaces: list[Any] = []
    gateway: GatewayProcess | None = None
    fleet: Fleet | None = None
    tmp = tempfile.TemporaryDirectory(prefix="keepconn-fleet-")
    try:
        cells: list[Cell] = []
        if reason is None:
            count = max(args.cells, Fleet.workers_needed(args.devices, args.per_worker))
            namespaces, cells = make_cells(count)
            print(f"fleet: {len(cells)} cells: " + ", ".join(c.name for c in cells))
        if args.spawn_gateway:
            users_path = Path(tmp.name) / "users.txt"
            users = write_users(users_path)
            host = cells[0].host_addr if cells else "127.0.0.1"
            gateway = GatewayProcess(host=host, users=users_path, data=Path(tmp.name) / "t.db")
            port = gateway.port
        else:
            host, port = args.host, args.port
            users = [tuple(line.split(":", 1)) for line in args.users.read_text().split()]
        fleet = Fleet(
            devices=args.devices,
            host=host,
            port=port,
            users=users,
            profile=profile,
            cells=cells,
            per_worker=args.per_worker,
        )
        fleet.start()
        started = time.monotonic()
        fleet.command("churn")
        storms = sorted(args.storm_at)
        while (elapsed := time.monotonic() - started) < args.seconds:
            if storms and elapsed >= storms[0]:
                storms.pop(0)
                fleet.command("storm")
            t = fleet.totals()
            print(
                f"\r{elapsed:5.1f}s online={t.get('online', 0):6d} "
                f"reboots={t.get('reboots', 0):5d} losses={t.get('losses', 0):5d} "
                f"takeovers={t.get('takeovers', 0):5d} acked={t.get('acked', 0):7d}",
                end="",
                flush=True,
            )
            time.sleep(0.5)
        print()
        fleet.command("calm")
        summary = fleet.finish()
        brief = {k: v for k, v in summary.items() if k != "per_device"}
        print(json.dumps(brief, indent=2))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(summary, indent=1))
        return 0
    finally:
        if fleet is not None:
            fleet.kill()
        if gateway is not None:
            gateway.stop()
        for ns in namespaces:
            ns.close()
        tmp.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())

"""The fleet's worker process: one process, one cell (or loopback), many devices.

``fleet.py --worker SPEC_JSON`` runs :func:`run_worker`: it enters its cell's namespace when it
has one, raises its descriptor limit and runs a :class:`Worker`, which holds the devices
(:mod:`device_gateway.fleet_device`), strikes them with reboots, losses and storms, and keeps the
sockets they abandon open and silent until no correct gateway could still hold their connection.
It reports JSON lines on stdout (a ``tick`` every half second, ``vanish`` reports when asked, and
one ``final`` line with every device's record) and takes commands on stdin (``churn``, ``calm``,
``storm``, ``burst N FAULT``, ``quit``).
"""

from __future__ import annotations

import json
import random
import resource
import select
import socket
import ssl
import sys
import time
from collections import Counter
from typing import Any

import anyio
import attrs

from device_gateway.fleet_cells import Blackholes, Cell, enter_netns
from device_gateway.fleet_device import Device, DeviceProfile, abort

__all__ = ["DEFAULT_PER_WORKER", "Worker", "run_worker"]

#: Devices one worker process holds by default, well under the 20,000-descriptor limit so that
#: abandoned sockets waiting to be retired fit too.
DEFAULT_PER_WORKER = 4000
_FD_LIMIT = 20_000
_TICK = 0.5


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
        #: Every gateway node the devices may connect to (one, unless the fleet was given a
        #: cluster's): each device starts on one and moves to another on every reboot.
        self.endpoints: list[tuple[str, int]] = [
            (str(h), int(p)) for h, p in spec.get("endpoints") or [(self.host, self.port)]
        ]
        self.profile = DeviceProfile(**spec["profile"])
        self.seed: int = spec["seed"]
        self.ramp: float = spec["ramp"]
        self.id_prefix: str = spec["id_prefix"]
        self.cell: Cell | None = Cell(**spec["cell"]) if spec.get("cell") else None
        self.report_vanish: bool = bool(spec.get("report_vanish", False))
        #: The devices' TLS context (None: plain MQTT) and the name the gateway's certificate
        #: must carry; one context for the worker, as one device's firmware would have.
        self.tls: ssl.SSLContext | None = None
        self.tls_hostname: str = self.host
        tls = spec.get("tls")
        if tls is not None:
            self.tls = ssl.create_default_context(cafile=tls.get("ca"))
            self.tls_hostname = tls.get("hostname") or self.host
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
        self.blackholes = Blackholes()
        self.counts: Counter[str] = Counter()
        self._storm_left = 0
        self._storm_dropped = anyio.Event()

    async def nap(self, seconds: float) -> None:
        """Sleep, but wake at once when the worker quits."""
        with anyio.move_on_after(seconds):
            await self.quit_event.wait()

    # -- dying -----------------------------------------------------------------------------

    async def abandon(self, sock: socket.socket, fault: str, client_id: str = "") -> None:
        """Make ``sock``'s connection vanish without a FIN (:mod:`device_gateway.fleet_cells`
        says how)."""
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
            abort(sock)
            self._report_vanish(fault, client_id, addr, port)
            return
        silenced = False
        if self.cell is not None:
            await self.blackholes.change("add", port)
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
            device.strike(fault, burst=True)

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
                abort(item.sock)
                if item.silenced:
                    await self.blackholes.change("del", item.port)
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
            for host in sorted({h for h, _ in self.endpoints}):
                if host != self.cell.host_addr:
                    # Link down took the route to the gateway with it.
                    route = ["ip", "route", "replace", f"{host}/32", "via", self.cell.host_addr]
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
            "moves": sum(r.moves for r in records),
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
        enter_netns(spec["cell"]["name"])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, _FD_LIMIT) if hard != resource.RLIM_INFINITY else _FD_LIMIT
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    anyio.run(_worker_main, spec)

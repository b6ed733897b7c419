"""Cells: the network namespaces the fleet's devices live in (root only), and the kernel rules
that silence one device inside its cell.

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
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from typing import Any

import anyio
import attrs

__all__ = ["Blackholes", "Cell", "enter_netns", "make_cells", "netns_reason"]

_CLONE_NEWNET = 0x40000000
# Priority of the per-port blackhole rules; the cell's "local" rule is moved below them.
_RULE_PREF = "10"
_LOCAL_PREF = "100"


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
            # The local table must come after the per-port blackhole rules (module doc).
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


def enter_netns(name: str) -> None:
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


class Blackholes:
    """The per-port blackhole rules of this namespace (see the module doc), added and removed in
    batches: every change asked for while one ``ip -batch`` runs goes into the next one.

    Why batches. Two ``ip rule`` processes per vanishing device made a burst of 800 devices some
    1,600 process starts in a second, on a machine that also runs the server being measured:
    every system's slowest takeovers were the ones that came during it (500-800 ms, Mosquitto's
    as much as the gateway's), a measure of the fleet, not of the servers.
    """

    def __init__(self) -> None:
        self._queued: list[tuple[str, int, anyio.Event]] = []
        self._running = False

    async def change(self, action: str, port: int) -> None:
        """Add (``"add"``) or remove (``"del"``) the two rules that drop everything TCP port
        ``port`` sends and everything sent to it; returns once the kernel has them."""
        done = anyio.Event()
        self._queued.append((action, port, done))
        if not self._running:
            # The first caller runs batches until nothing is queued; shielded, since the others
            # wait on it (a device cancelled at quit must not strand them).
            self._running = True
            try:
                with anyio.CancelScope(shield=True):
                    while self._queued:
                        batch, self._queued = self._queued, []
                        await self._apply(batch)
            finally:
                self._running = False
        await done.wait()

    @staticmethod
    async def _apply(batch: list[tuple[str, int, anyio.Event]]) -> None:
        lines = [
            f"rule {action} pref {_RULE_PREF} ipproto tcp {direction} {port} blackhole\n"
            for action, port, _ in batch
            for direction in ("sport", "dport")
        ]
        try:
            # -force: one rule that is already gone (or there) does not stop the rest.
            await anyio.run_process(
                ["ip", "-force", "-batch", "-"], input="".join(lines).encode(), check=False
            )
        finally:
            for *_, done in batch:
                done.set()

"""Network namespaces with a veth pair: truly half-open peers on one machine.

Loopback cannot lose a packet, so it cannot make a peer vanish. A namespace joined to the root
namespace by a veth pair can: bring the namespace's end down (the cable is pulled: no FIN, no
RST, nothing answers) or make the link drop every frame while it stays up (a blackhole).

Every namespace and interface carries this process's pid and a counter in its name, lives on a
/30 of 198.18.0.0/15 (RFC 2544's benchmarking range, never routed on the Internet) chosen under
a file lock so concurrent test processes never share a subnet, and is deleted by
:meth:`NetNs.close` -- which the pytest fixtures and an atexit hook always call.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import ipaddress
import itertools
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .._core.errors import KeepconnError

__all__ = ["NetNs", "NetnsError", "cleanup_stale", "netns_unavailable_reason"]

logger = logging.getLogger("keepconn.testing")

T = TypeVar("T")

_NET = ipaddress.IPv4Network("198.18.0.0/15")
_BLOCKS = _NET.num_addresses // 4
_LOCK_PATH = "/tmp/keepconn-netns.lock"
_PREFIX = "keepconn-"
_NAME_RE = re.compile(r"^keepconn-(\d+)-(\d+)$")
_CLONE_NEWNET = 0x40000000
# A locally administered unicast MAC that no interface here owns: frames sent to it reach the
# peer veth, which discards them as addressed to another host.
_NOWHERE_MAC = "02:00:5e:00:00:01"

_counter = itertools.count(1)
_live: dict[str, NetNs] = {}
_live_lock = threading.Lock()


class NetnsError(KeepconnError):
    """An ``ip``/``tc`` command or a setns call failed while building or faulting a namespace."""


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be built here (None when they can, as far as a cheap check sees)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (see scripts/sysdeps.sh)"
    if not os.path.exists("/proc/self/ns/net"):
        return "this kernel has no network namespaces (/proc/self/ns/net is missing)"
    return None


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(argv)}: {exc}") from exc
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Delete keepconn namespaces left behind by processes that no longer exist (a SIGKILLed
    test run cannot run its finalisers). Returns the names deleted."""
    if netns_unavailable_reason() is not None:
        return []
    removed = []
    listing = _run(["ip", "netns", "list"], check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    # A host-side veth whose namespace went away takes its peer with it, but one created
    # before its namespace existed (a crash mid-setup) may linger.
    links = _run(["ip", "-o", "link", "show"], check=False).stdout
    for m in re.finditer(r"^\d+: (kc(\d+)h\d+)[@:]", links, re.MULTILINE):
        if not _pid_alive(int(m.group(2))):
            _run(["ip", "link", "del", m.group(1)], check=False)
            removed.append(m.group(1))
    return removed


def _used_blocks() -> set[int]:
    used = set()
    out = _run(["ip", "-4", "-o", "addr", "show"], check=False).stdout
    for m in re.finditer(r"inet (\d+\.\d+\.\d+\.\d+)/", out):
        addr = ipaddress.IPv4Address(m.group(1))
        if addr in _NET:
            used.add((int(addr) - int(_NET.network_address)) // 4)
    return used


class NetNs:
    """One network namespace joined to this (the root) namespace by a veth pair.

    ``host_addr`` is the root-namespace end (bind servers there), ``dev_addr`` the device end
    inside the namespace. Use :meth:`device_socket` / :meth:`connect` to make device sockets inside
    it, :meth:`cable_pull`, :meth:`blackhole` and :meth:`restore` to inject faults, and
    :meth:`close` (or ``with``) to delete everything.

    Building one needs Linux, root and iproute2; every name it makes carries this process's
    pid, so :func:`cleanup_stale` can remove what a killed run left behind.

    :raises keepconn.testing.NetnsError: namespaces cannot be built here (the message says
        why, as :func:`netns_unavailable_reason` does), or an ``ip`` command failed; whatever
        was built by then is removed first.
    """

    def __init__(self) -> None:
        reason = netns_unavailable_reason()
        if reason is not None:
            raise NetnsError(reason)
        pid = os.getpid()
        n = next(_counter)
        #: The namespace's name (``ip netns``), unique to this process.
        self.name = f"{_PREFIX}{pid}-{n}"
        # Interface names are limited to 15 bytes: "kc" + pid (<= 7 digits) + h/d + counter.
        #: The veth end in the root namespace.
        self.host_if = f"kc{pid}h{n}"
        #: The veth end inside the namespace.
        self.dev_if = f"kc{pid}d{n}"
        #: The root-namespace end's IPv4 address: bind the server under test here.
        self.host_addr = ""
        #: The device end's IPv4 address, inside the namespace.
        self.dev_addr = ""
        #: How the last :meth:`blackhole` was made: "netem" or "neighbour".
        self.blackhole_method: str | None = None
        self._faults: set[str] = set()
        self._closed = False
        with _live_lock:
            _live[self.name] = self
        try:
            self._build(pid, n)
        except BaseException:
            self.close()
            raise

    def _build(self, pid: int, n: int) -> None:
        _run(["ip", "netns", "add", self.name])
        with open(_LOCK_PATH, "a") as lock:
            # Choosing a free /30 and claiming it must be atomic across test processes.
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = _used_blocks()
            start = (pid * 131 + n) % _BLOCKS
            block = next(
                (b % _BLOCKS for b in range(start, start + _BLOCKS) if b % _BLOCKS not in used),
                None,
            )
            if block is None:
                raise NetnsError("no free /30 left in 198.18.0.0/15")
            base = int(_NET.network_address) + 4 * block
            self.host_addr = str(ipaddress.IPv4Address(base + 1))
            self.dev_addr = str(ipaddress.IPv4Address(base + 2))
            _run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.dev_if])
            _run(["ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_if])
        _disable_ipv6(self.host_if)
        _run(["ip", "link", "set", self.dev_if, "netns", self.name])
        self.run(_disable_ipv6, self.dev_if)
        _run(["ip", "-n", self.name, "addr", "add", f"{self.dev_addr}/30", "dev", self.dev_if])
        _run(["ip", "-n", self.name, "link", "set", "lo", "up"])
        _run(["ip", "-n", self.name, "link", "set", self.dev_if, "up"])
        _run(["ip", "link", "set", self.host_if, "up"])

    # -- device side -------------------------------------------------------------------------

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn(*args)`` on a fresh thread that has entered the namespace; return its result.

        Namespaces belong to threads, so the caller's thread is never moved; and a socket keeps
        the namespace it was created in, so sockets made here stay device-side afterwards.
        """
        result: list[T] = []
        error: list[BaseException] = []

        def target() -> None:
            try:
                with open(f"/var/run/netns/{self.name}", "rb") as f:
                    _setns(f.fileno())
                result.append(fn(*args))
            except BaseException as exc:  # handed to the caller's thread below
                error.append(exc)

        thread = threading.Thread(target=target, name=f"setns-{self.name}", daemon=True)
        thread.start()
        thread.join()
        if error:
            raise error[0]
        return result[0]

    def device_socket(
        self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM
    ) -> socket.socket:
        """A new socket that lives inside the namespace (a device-side socket)."""
        return self.run(socket.socket, family, type)

    def connect(
        self,
        address: tuple[str, int],
        *,
        timeout: float = 5.0,
        setup: Callable[..., Any] | None = None,
    ) -> socket.socket:
        """A blocking TCP socket inside the namespace, connected to ``address`` (which should be
        this namespace's ``host_addr``). ``setup(sock)`` runs before connect."""

        def dial() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                if setup is not None:
                    setup(sock)
                sock.settimeout(timeout)
                sock.connect(address)
                sock.settimeout(None)
            except BaseException:
                sock.close()
                raise
            return sock

        return self.run(dial)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a whole process inside the namespace (``ip netns exec``)."""
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kwargs)

    # -- faults ------------------------------------------------------------------------------

    def cable_pull(self) -> None:
        """Take the device's link down: nothing it sends or should receive gets through, and it
        sends no FIN or RST (its routes are gone with the link)."""
        _run(["ip", "-n", self.name, "link", "set", self.dev_if, "down"])
        self._faults.add("cable")

    def blackhole(self) -> str:
        """Drop every frame in both directions while the link stays up; return the method.

        netem ``loss 100%`` on both ends where the kernel has sch_netem; otherwise each side's
        neighbour entry for the other is pinned to a MAC nobody owns, so frames are discarded
        by the receiving veth. Either way neither end sees an error: pure silence.
        """
        if shutil.which("tc") is not None:
            first = _run(
                ["tc", "-n", self.name, "qdisc", "add", "dev", self.dev_if, "root"]
                + ["netem", "loss", "100%"],
                check=False,
            )
            if first.returncode == 0:
                self._faults.add("netem")
                _run(["tc", "qdisc", "add", "dev", self.host_if, "root", "netem", "loss", "100%"])
                self.blackhole_method = "netem"
                return "netem"
            logger.info("netem unavailable (%s); blackholing via neighbours", first.stderr.strip())
        self._faults.add("neighbour")
        for prefix, addr, dev in (
            ([], self.dev_addr, self.host_if),
            (["-n", self.name], self.host_addr, self.dev_if),
        ):
            _run(
                ["ip", *prefix, "neigh", "replace", addr, "lladdr", _NOWHERE_MAC]
                + ["nud", "permanent", "dev", dev]
            )
        self.blackhole_method = "neighbour"
        return "neighbour"

    def restore(self) -> None:
        """Lift every fault: link up, qdiscs and pinned neighbours removed."""
        if "cable" in self._faults:
            _run(["ip", "-n", self.name, "link", "set", self.dev_if, "up"])
        if "netem" in self._faults:
            _run(["tc", "-n", self.name, "qdisc", "del", "dev", self.dev_if, "root"], check=False)
            _run(["tc", "qdisc", "del", "dev", self.host_if, "root"], check=False)
        if "neighbour" in self._faults:
            # Deleting the pinned entries lets ARP learn the real addresses again.
            _run(["ip", "neigh", "del", self.dev_addr, "dev", self.host_if], check=False)
            _run(
                ["ip", "-n", self.name, "neigh", "del", self.host_addr, "dev", self.dev_if],
                check=False,
            )
        self._faults.clear()

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Delete the namespace and both veth ends. Idempotent; never raises for leftovers."""
        if self._closed:
            return
        self._closed = True
        with _live_lock:
            _live.pop(self.name, None)
        # Deleting the namespace destroys the veth end inside it, and with it the pair.
        _run(["ip", "netns", "del", self.name], check=False)
        _run(["ip", "link", "del", self.host_if], check=False)

    def __enter__(self) -> NetNs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<NetNs {self.name} {self.host_if}={self.host_addr} {self.dev_if}={self.dev_addr}>"


def _disable_ipv6(dev: str) -> None:
    # A veth with IPv6 on sends router solicitations and MLD reports: noise on the test link.
    # /proc/sys/net is per namespace, resolved for the thread that opens the file.
    with (
        contextlib.suppress(OSError),
        open(f"/proc/sys/net/ipv6/conf/{dev}/disable_ipv6", "w") as f,
    ):
        f.write("1")


@atexit.register
def _close_leftovers() -> None:
    # Last line of defence when a finaliser never ran (KeyboardInterrupt mid-fixture).
    with _live_lock:
        leftovers = list(_live.values())
    for ns in leftovers:
        ns.close()

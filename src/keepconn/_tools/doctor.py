"""``keepconn doctor``: what this kernel's TCP settings mean for a server of long-lived peers.

Each finding is one sentence with the number it implies ("a dead idle peer is found after
2h11m15s"), because a bare sysctl value tells an operator nothing. The advice prefers per-socket
settings (:class:`keepconn.tcp.TcpKeepalive`) to system-wide ones: a sysctl changes every
program on the host and, in a container, usually cannot be changed at all.
"""

from __future__ import annotations

import enum
import math
import os
import resource
from collections.abc import Callable

import attrs

from ..tcp import TcpKeepalive

__all__ = ["Finding", "Severity", "diagnose", "recommend", "report"]

# Linux's TCP_RTO_MIN and TCP_RTO_MAX, in seconds: the retransmission timer starts at (at least)
# the first and doubles up to the second.
_RTO_MIN = 0.2
_RTO_MAX = 120.0


class Severity(enum.IntEnum):
    """How much a finding matters; ``--strict`` fails on PROBLEM."""

    OK = 0
    INFO = 1
    WARN = 2
    PROBLEM = 3


@attrs.frozen
class Finding:
    """One setting, its value (None when unreadable here) and what it implies."""

    key: str
    value: str | None
    severity: Severity
    message: str


def duration(seconds: float) -> str:
    """Seconds as "2h11m15s" / "15m25s" / "4s"."""
    total = round(seconds)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def retries_timeout(retries: int) -> float:
    """Seconds the kernel retransmits before giving up after ``retries`` backoffs, at the
    minimum RTO (the kernel's tcp_model_timeout): doubling until 120 s, then linear."""
    threshold = int(math.log2(_RTO_MAX / _RTO_MIN))
    if retries <= threshold:
        return ((2 << retries) - 1) * _RTO_MIN
    return ((2 << threshold) - 1) * _RTO_MIN + (retries - threshold) * _RTO_MAX


def recommend(detect_within: float = 120.0) -> TcpKeepalive:
    """A TcpKeepalive that finds a dead idle peer in about ``detect_within`` seconds: half the
    time idle, the rest split over up to six probes (enough to ride out a lossy radio link)."""
    target = max(3, int(detect_within))
    idle = max(1, target // 2)
    count = max(1, min(6, target - idle))
    interval = max(1, (target - idle) // count)
    return TcpKeepalive(idle=idle, interval=interval, count=count)


def _reader(root: str) -> Callable[[str], str | None]:
    def read(key: str) -> str | None:
        try:
            with open(os.path.join(root, *key.split(".")), encoding="ascii") as f:
                return " ".join(f.read().split())
        except OSError:
            return None

    return read


def _int(value: str | None) -> int | None:
    try:
        return None if value is None else int(value.split()[0])
    except ValueError:
        return None


def diagnose(sysctl_root: str = "/proc/sys") -> list[Finding]:
    """Read the kernel's TCP settings under ``sysctl_root`` and explain each one."""
    read = _reader(sysctl_root)
    out: list[Finding] = []

    def missing(key: str) -> None:
        out.append(
            Finding(key, None, Severity.INFO, "not readable here (not Linux, or a container)")
        )

    ka_keys = ("net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_keepalive_intvl")
    time_, intvl, probes = (_int(read(k)) for k in (*ka_keys, "net.ipv4.tcp_keepalive_probes"))
    if time_ is None or intvl is None or probes is None:
        missing("net.ipv4.tcp_keepalive_*")
    else:
        bound = time_ + intvl * probes
        sev = Severity.WARN if bound > 600 else Severity.OK
        out.append(
            Finding(
                "net.ipv4.tcp_keepalive_time/intvl/probes",
                f"{time_}/{intvl}/{probes}",
                sev,
                f"a dead idle peer is found after {duration(bound)} ({time_} + {intvl} x "
                f"{probes} s), and only on sockets with SO_KEEPALIVE on, which is off by "
                "default; set it per socket with TcpKeepalive instead",
            )
        )

    r2 = _int(read("net.ipv4.tcp_retries2"))
    if r2 is None:
        missing("net.ipv4.tcp_retries2")
    else:
        t = retries_timeout(r2)
        out.append(
            Finding(
                "net.ipv4.tcp_retries2",
                str(r2),
                Severity.WARN if t > 300 else Severity.OK,
                f"a peer that vanishes with data in flight holds its socket about {duration(t)} "
                "(keepalive does not probe while data is unacknowledged); bound it per socket "
                "with TCP_USER_TIMEOUT (TcpKeepalive's user_timeout)",
            )
        )

    fin = _int(read("net.ipv4.tcp_fin_timeout"))
    if fin is None:
        missing("net.ipv4.tcp_fin_timeout")
    else:
        out.append(
            Finding(
                "net.ipv4.tcp_fin_timeout",
                str(fin),
                Severity.OK,
                f"a socket the application closed waits at most {duration(fin)} in FIN_WAIT2 "
                "for the peer's FIN; it does not limit CLOSE_WAIT, which only the application "
                "ends by closing",
            )
        )

    cookies = _int(read("net.ipv4.tcp_syncookies"))
    if cookies is None:
        missing("net.ipv4.tcp_syncookies")
    else:
        out.append(
            Finding(
                "net.ipv4.tcp_syncookies",
                str(cookies),
                Severity.PROBLEM if cookies == 0 else Severity.OK,
                "off: a reconnect storm or SYN flood that fills the SYN backlog drops new "
                "connections"
                if cookies == 0
                else "on: a full SYN backlog falls back to cookies instead of dropping SYNs",
            )
        )

    somax = _int(read("net.core.somaxconn"))
    if somax is None:
        missing("net.core.somaxconn")
    else:
        sev = Severity.PROBLEM if somax < 512 else Severity.WARN if somax < 4096 else Severity.OK
        out.append(
            Finding(
                "net.core.somaxconn",
                str(somax),
                sev,
                f"listen() backlogs are capped at {somax} connections waiting for accept(); "
                "a fleet reconnecting at once needs thousands",
            )
        )

    syn = _int(read("net.ipv4.tcp_max_syn_backlog"))
    if syn is None:
        missing("net.ipv4.tcp_max_syn_backlog")
    else:
        out.append(
            Finding(
                "net.ipv4.tcp_max_syn_backlog",
                str(syn),
                Severity.WARN if syn < 1024 else Severity.OK,
                f"at most {syn} half-open handshakes are queued per listener before SYN "
                "cookies (or drops) take over",
            )
        )

    ports = read("net.ipv4.ip_local_port_range")
    bounds = [int(p) for p in ports.split()] if ports else []
    if len(bounds) != 2:
        missing("net.ipv4.ip_local_port_range")
    else:
        n = bounds[1] - bounds[0] + 1
        out.append(
            Finding(
                "net.ipv4.ip_local_port_range",
                ports,
                Severity.WARN if n < 10000 else Severity.OK,
                f"{n} ephemeral ports per destination address and port: the most outbound "
                "connections (a device simulator, a proxy) one host can hold to one server",
            )
        )

    reuse = _int(read("net.ipv4.tcp_tw_reuse"))
    if reuse is None:
        missing("net.ipv4.tcp_tw_reuse")
    else:
        meaning = {0: "off", 1: "on for outgoing connections", 2: "on for loopback only"}
        out.append(
            Finding(
                "net.ipv4.tcp_tw_reuse",
                str(reuse),
                Severity.OK,
                f"{meaning.get(reuse, 'unknown mode')}: lets a client reuse a TIME_WAIT port "
                "safely (timestamps); servers never need it",
            )
        )

    recycle = _int(read("net.ipv4.tcp_tw_recycle"))
    if recycle is None:
        out.append(
            Finding(
                "net.ipv4.tcp_tw_recycle",
                None,
                Severity.OK,
                "absent, as it should be: it was removed in Linux 4.12 because it dropped "
                "connections from clients behind NAT; guides that say to enable it are obsolete",
            )
        )
    else:
        out.append(
            Finding(
                "net.ipv4.tcp_tw_recycle",
                str(recycle),
                Severity.PROBLEM if recycle else Severity.OK,
                "on: clients behind one NAT are refused at random (removed in Linux 4.12); "
                "turn it off"
                if recycle
                else "off (this kernel predates 4.12, which removed it); keep it off",
            )
        )

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    shown = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
    out.append(
        Finding(
            "RLIMIT_NOFILE (this process)",
            f"{shown}/{'unlimited' if hard == resource.RLIM_INFINITY else hard}",
            Severity.WARN if 0 <= soft < 16384 else Severity.OK,
            f"one process can hold about {shown} connections (one descriptor each); raise the "
            "soft limit (ulimit -n, LimitNOFILE=) for a large fleet",
        )
    )
    return out


def report(findings: list[Finding], *, detect_within: float = 120.0, strict: bool = False) -> int:
    """Print the findings and the recommended per-socket settings; return the exit status."""
    width = max(len(f.key) for f in findings)
    for f in findings:
        value = "-" if f.value is None else f.value
        print(f"[{f.severity.name:<7}] {f.key:<{width}} = {value}")
        print(f"          {f.message}.")
    ka = recommend(detect_within)
    print()
    print("Recommended per socket (no sysctl needed, works in containers):")
    print()
    print("    from keepconn.tcp import TcpKeepalive")
    print(f"    ka = TcpKeepalive(idle={ka.idle}, interval={ka.interval}, count={ka.count})")
    print("    ka.apply(sock)  # or stream.extra(SocketAttribute.raw_socket)")
    print()
    print(
        f"    # a dead idle peer fails the socket within {duration(ka.detection_bound())}; "
        f"unacknowledged data within {ka.user_timeout_ms} ms (user_timeout='auto')"
    )
    problems = [f for f in findings if f.severity is Severity.PROBLEM]
    if problems:
        print()
        print(f"{len(problems)} problem(s): {', '.join(f.key for f in problems)}")
    return 1 if strict and problems else 0

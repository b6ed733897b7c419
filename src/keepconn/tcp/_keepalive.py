"""Per-socket TCP keepalive and TCP_USER_TIMEOUT, set and read back portably.

Linux has every knob. macOS calls the idle time TCP_KEEPALIVE and has no user timeout. Windows
gained TCP_KEEPIDLE/KEEPINTVL/KEEPCNT in Windows 10 1709; older releases only take the
SIO_KEEPALIVE_VALS ioctl, which sets idle and interval but fixes the probe count at 10.
Whatever a platform lacks is reported in :class:`AppliedKeepalive` and logged, never dropped
in silence; ``strict=True`` turns it into :class:`UnsupportedOption`.
"""

from __future__ import annotations

import logging
import math
import socket
import sys
from collections.abc import Mapping
from typing import Any, Literal, Protocol, TypeAlias

import attrs

from .._core.errors import ConfigError, KeepconnError
from .._core.validate import check_number, number

__all__ = [
    "AppliedKeepalive",
    "KeepaliveReading",
    "SocketLike",
    "TcpKeepalive",
    "UnsupportedOption",
    "socket_of",
]

logger = logging.getLogger("keepconn.tcp")

#: Largest value Linux accepts for TCP_KEEPIDLE and TCP_KEEPINTVL (MAX_TCP_KEEPIDLE/KEEPINTVL).
MAX_IDLE = 32767
#: Largest value Linux accepts for TCP_KEEPCNT (MAX_TCP_KEEPCNT).
MAX_COUNT = 127
#: TCP_USER_TIMEOUT is an unsigned int in the kernel but must fit a C int through setsockopt.
MAX_USER_TIMEOUT_MS = 2**31 - 1

# macOS defines these in <netinet/tcp.h>; older Pythons do not export them.
_DARWIN_TCP_KEEPALIVE = 0x10
_DARWIN_TCP_KEEPINTVL = 0x101
_DARWIN_TCP_KEEPCNT = 0x102

UserTimeout: TypeAlias = int | None | Literal["auto"]


class UnsupportedOption(KeepconnError):
    """The platform lacks a socket option the configuration asked for (raised when strict)."""


class SocketLike(Protocol):
    """Anything with the BSD socket option calls: socket.socket, trio sockets, asyncio's
    TransportSocket."""

    def setsockopt(self, level: int, optname: int, value: int, /) -> None: ...

    def getsockopt(self, level: int, optname: int, /) -> int: ...


def socket_of(obj: object) -> SocketLike:
    """The OS-level socket behind ``obj``.

    Accepts a :class:`socket.socket`, an anyio stream or listener (through
    ``SocketAttribute.raw_socket``), an asyncio transport (through
    ``get_extra_info("socket")``) or a trio socket. Raises TypeError for anything else, so a
    mistaken argument fails loudly instead of leaving keepalive off.
    """
    if isinstance(obj, socket.socket):
        return obj
    # An anyio stream can only exist once anyio is imported, so look it up instead of
    # importing it: plain-socket users never pay for anyio, and this layer stays below it.
    anyio = sys.modules.get("anyio")
    anyio_abc = sys.modules.get("anyio.abc")
    if anyio is not None and anyio_abc is not None:
        if isinstance(obj, anyio.TypedAttributeProvider):
            try:
                raw: socket.socket = obj.extra(anyio_abc.SocketAttribute.raw_socket)
            except anyio.TypedAttributeLookupError:
                raise TypeError(f"{obj!r} is not backed by a socket") from None
            return raw
    get_extra_info = getattr(obj, "get_extra_info", None)
    if callable(get_extra_info):
        sock = get_extra_info("socket")
        if sock is None:
            raise TypeError(f"transport {obj!r} has no socket")
        return sock  # type: ignore[no-any-return]
    if callable(getattr(obj, "setsockopt", None)) and callable(getattr(obj, "getsockopt", None)):
        return obj  # type: ignore[return-value]
    raise TypeError(f"cannot find a socket behind {obj!r}")


def _check_user_timeout(instance: object, attribute: Any, value: Any) -> None:
    """a whole number of milliseconds in [0, 2147483647], None or ``'auto'``"""
    if value is None or value == "auto":
        return
    if isinstance(value, str):
        raise ConfigError(f"user_timeout must be milliseconds, None or 'auto', got {value!r}")
    check_number(
        "user_timeout",
        value,
        minimum=0,
        maximum=MAX_USER_TIMEOUT_MS,
        min_inclusive=True,
        integer=True,
    )


@attrs.frozen
class AppliedKeepalive:
    """What :meth:`TcpKeepalive.apply` set on a socket.

    ``applied`` maps option names ("SO_KEEPALIVE", "TCP_KEEPIDLE", ...) to the value set;
    ``unsupported`` names the options this platform could not take.
    """

    #: Option name -> the value set.
    applied: Mapping[str, int]
    #: The options this platform lacks.
    unsupported: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """True when every requested option was set."""
        return not self.unsupported


@attrs.frozen
class KeepaliveReading:
    """The keepalive settings a socket has right now, as the kernel reports them.

    A field is None where the platform cannot report it. On Linux an option never set on the
    socket reads back as the system-wide default (the sysctl), which is what applies to it.
    ``user_timeout`` is in milliseconds; 0 means "not set" (the kernel's retry counts rule).
    """

    #: SO_KEEPALIVE.
    enabled: bool
    #: TCP_KEEPIDLE, seconds.
    idle: int | None
    #: TCP_KEEPINTVL, seconds.
    interval: int | None
    #: TCP_KEEPCNT.
    count: int | None
    #: TCP_USER_TIMEOUT, milliseconds (0: not set).
    user_timeout: int | None


@attrs.frozen
class TcpKeepalive:
    """Per-socket TCP keepalive: find a dead idle peer in ``detection_bound()`` seconds.

    After ``idle`` seconds without anything received, the kernel sends a probe every
    ``interval`` seconds, and gives up after ``count`` unanswered probes: the socket then fails
    with ETIMEDOUT. ``user_timeout`` (TCP_USER_TIMEOUT, Linux) bounds how long *sent data* may
    stay unacknowledged, which keepalive alone never covers (the kernel does not probe while
    data is in flight, and retransmits for ~15 minutes by default). "auto" derives it from the
    keepalive settings, just below ``idle + interval * count`` (Cloudflare's advice in "When TCP
    sockets refuse to die"), so both failure modes end at the same time. None leaves it unset.

    Values are checked when the object is built: idle and interval 1..32767 s, count 1..127,
    user_timeout a whole number of milliseconds >= 0, None or "auto"; a bad one raises
    :class:`~keepconn.ConfigError`.

    >>> import socket
    >>> ka = TcpKeepalive(idle=60, interval=10, count=6)
    >>> ka.user_timeout_ms, ka.detection_bound()
    (119999, 120.0)
    >>> with socket.socket() as sock:
    ...     applied = ka.apply(sock)
    ...     reading = TcpKeepalive.read(sock)
    >>> reading.enabled, reading.idle, reading.interval
    (True, 60, 10)
    """

    #: Seconds without anything received before the first probe (TCP_KEEPIDLE).
    idle: int = attrs.field(
        validator=number(minimum=1, maximum=MAX_IDLE, min_inclusive=True, integer=True)
    )
    #: Seconds between unanswered probes (TCP_KEEPINTVL).
    interval: int = attrs.field(
        validator=number(minimum=1, maximum=MAX_IDLE, min_inclusive=True, integer=True)
    )
    #: Unanswered probes before the kernel gives up (TCP_KEEPCNT).
    count: int = attrs.field(
        validator=number(minimum=1, maximum=MAX_COUNT, min_inclusive=True, integer=True)
    )
    #: TCP_USER_TIMEOUT in milliseconds, "auto" (just below the keepalive bound) or None.
    user_timeout: UserTimeout = attrs.field(default="auto", validator=_check_user_timeout)

    @property
    def user_timeout_ms(self) -> int | None:
        """TCP_USER_TIMEOUT in milliseconds as it will be set (None: left unset)."""
        if self.user_timeout == "auto":
            # One millisecond below the keepalive bound: the kernel checks the user timeout only
            # when a keepalive timer fires, and with it set the probe count is ignored, so a
            # value even slightly above the bound would add one whole extra interval.
            return (self.idle + self.interval * self.count) * 1000 - 1
        return self.user_timeout

    def detection_bound(self) -> float:
        """Worst-case seconds from a peer's last sign of life to the socket failing, when the
        connection is idle (nothing unacknowledged) and the peer silently vanished.

        Linux semantics: probes go out at ``idle + k * interval``; with TCP_USER_TIMEOUT set
        the kernel ignores ``count`` and gives up at the first probe time at or past the user
        timeout (but never before the first probe has been answered-or-not).
        """
        ut = self.user_timeout_ms
        if not ut:
            return float(self.idle + self.interval * self.count)
        probes = max(1, math.ceil((ut / 1000 - self.idle) / self.interval))
        return float(self.idle + self.interval * probes)

    def apply(self, sock: object, *, strict: bool = False) -> AppliedKeepalive:
        """Turn keepalive on for ``sock`` with these settings and return what was set.

        ``sock`` is anything :func:`socket_of` accepts. An option this platform lacks is listed
        in the result's ``unsupported`` and logged as a warning; with ``strict=True`` it raises
        :class:`UnsupportedOption` instead (after setting what it could).
        """
        s = socket_of(sock)
        applied: dict[str, int] = {}
        unsupported: list[str] = []
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        applied["SO_KEEPALIVE"] = 1

        idle_opt = _option("TCP_KEEPIDLE") or _option("TCP_KEEPALIVE", _DARWIN_TCP_KEEPALIVE)
        intvl_opt = _option("TCP_KEEPINTVL", _DARWIN_TCP_KEEPINTVL)
        cnt_opt = _option("TCP_KEEPCNT", _DARWIN_TCP_KEEPCNT)
        if idle_opt is not None:
            s.setsockopt(socket.IPPROTO_TCP, idle_opt[1], self.idle)
            applied[idle_opt[0]] = self.idle
            if intvl_opt is not None:
                s.setsockopt(socket.IPPROTO_TCP, intvl_opt[1], self.interval)
                applied["TCP_KEEPINTVL"] = self.interval
            else:
                unsupported.append("TCP_KEEPINTVL")
        elif sys.platform == "win32" and hasattr(socket, "SIO_KEEPALIVE_VALS"):
            # Pre-1709 Windows: one ioctl sets on/idle/interval, in milliseconds.
            s.ioctl(  # type: ignore[attr-defined]
                socket.SIO_KEEPALIVE_VALS, (1, self.idle * 1000, self.interval * 1000)
            )
            applied["SIO_KEEPALIVE_VALS"] = 1
        else:
            unsupported += ["TCP_KEEPIDLE", "TCP_KEEPINTVL"]
        if cnt_opt is not None and idle_opt is not None:
            s.setsockopt(socket.IPPROTO_TCP, cnt_opt[1], self.count)
            applied["TCP_KEEPCNT"] = self.count
        else:
            unsupported.append("TCP_KEEPCNT")

        ut = self.user_timeout_ms
        if ut is not None:
            ut_opt = getattr(socket, "TCP_USER_TIMEOUT", None)
            if ut_opt is not None:
                s.setsockopt(socket.IPPROTO_TCP, ut_opt, ut)
                applied["TCP_USER_TIMEOUT"] = ut
            else:
                unsupported.append("TCP_USER_TIMEOUT")

        result = AppliedKeepalive(applied=applied, unsupported=tuple(unsupported))
        if unsupported:
            if strict:
                raise UnsupportedOption(
                    f"{sys.platform} lacks {', '.join(unsupported)}; set {sorted(applied)}"
                )
            logger.warning(
                "keepalive options not supported on %s and left at system defaults: %s",
                sys.platform,
                ", ".join(unsupported),
            )
        return result

    @staticmethod
    def read(sock: object) -> KeepaliveReading:
        """Read back the keepalive settings in effect on ``sock`` (a :class:`KeepaliveReading`)."""
        s = socket_of(sock)
        enabled = bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))

        def get(opt: tuple[str, int] | None) -> int | None:
            if opt is None:
                return None
            try:
                return int(s.getsockopt(socket.IPPROTO_TCP, opt[1]))
            except OSError:
                # Windows answers some of these only for set options; "unknown" is honest.
                return None

        idle_opt = _option("TCP_KEEPIDLE") or _option("TCP_KEEPALIVE", _DARWIN_TCP_KEEPALIVE)
        ut_opt = getattr(socket, "TCP_USER_TIMEOUT", None)
        return KeepaliveReading(
            enabled=enabled,
            idle=get(idle_opt),
            interval=get(_option("TCP_KEEPINTVL", _DARWIN_TCP_KEEPINTVL)),
            count=get(_option("TCP_KEEPCNT", _DARWIN_TCP_KEEPCNT)),
            user_timeout=get(("TCP_USER_TIMEOUT", ut_opt)) if ut_opt is not None else None,
        )


def _option(name: str, darwin_value: int | None = None) -> tuple[str, int] | None:
    """(name, value) of a TCP option on this platform, or None when it has none."""
    value = getattr(socket, name, None)
    if value is None and darwin_value is not None and sys.platform == "darwin":
        value = darwin_value
    return None if value is None else (name, int(value))

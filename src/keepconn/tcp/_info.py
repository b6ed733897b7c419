"""TCP_INFO (Linux): the kernel's own view of one connection, and what it says about the peer.

``struct tcp_info`` (include/uapi/linux/tcp.h) only ever grows at the end, and getsockopt
returns as many bytes as the running kernel knows. Fields are therefore parsed up to the
returned length; the ones past it are None, so old kernels read correctly and new kernels'
extra bytes are ignored.
"""

from __future__ import annotations

import enum
import socket
import struct
import sys
from typing import Any

import attrs

from ._keepalive import UnsupportedOption, socket_of

__all__ = ["Liveness", "TcpInfo", "TcpState", "classify", "tcp_info"]


class TcpState(enum.IntEnum):
    """The kernel's TCP states (include/net/tcp_states.h); names match ``ss`` and /proc."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12
    BOUND_INACTIVE = 13


def state_name(code: int) -> str:
    """The name of a kernel TCP state number ("UNKNOWN_<n>" for one this code does not know)."""
    try:
        return TcpState(code).name
    except ValueError:
        return f"UNKNOWN_{code}"


# (field, struct code) in declaration order. The first eight bytes are u8s (the seventh holds two
# 4-bit window scales, the eighth two flag bitfields); everything else is u32/u64 with natural
# alignment, which native struct mode ("@") reproduces.
_LAYOUT: tuple[tuple[str, str], ...] = (
    ("state", "B"),
    ("ca_state", "B"),
    ("retransmits", "B"),
    ("probes", "B"),
    ("backoff", "B"),
    ("options", "B"),
    ("_wscale", "B"),
    ("_flags", "B"),
    ("rto", "I"),
    ("ato", "I"),
    ("snd_mss", "I"),
    ("rcv_mss", "I"),
    ("unacked", "I"),
    ("sacked", "I"),
    ("lost", "I"),
    ("retrans", "I"),
    ("fackets", "I"),
    ("last_data_sent", "I"),
    ("last_ack_sent", "I"),
    ("last_data_recv", "I"),
    ("last_ack_recv", "I"),
    ("pmtu", "I"),
    ("rcv_ssthresh", "I"),
    ("rtt", "I"),
    ("rttvar", "I"),
    ("snd_ssthresh", "I"),
    ("snd_cwnd", "I"),
    ("advmss", "I"),
    ("reordering", "I"),
    ("rcv_rtt", "I"),
    ("rcv_space", "I"),
    ("total_retrans", "I"),
    ("pacing_rate", "Q"),
    ("max_pacing_rate", "Q"),
    ("bytes_acked", "Q"),
    ("bytes_received", "Q"),
    ("segs_out", "I"),
    ("segs_in", "I"),
    ("notsent_bytes", "I"),
    ("min_rtt", "I"),
    ("data_segs_in", "I"),
    ("data_segs_out", "I"),
    ("delivery_rate", "Q"),
    ("busy_time", "Q"),
    ("rwnd_limited", "Q"),
    ("sndbuf_limited", "Q"),
    ("delivered", "I"),
    ("delivered_ce", "I"),
    ("bytes_sent", "Q"),
    ("bytes_retrans", "Q"),
    ("dsack_dups", "I"),
    ("reord_seen", "I"),
    ("rcv_ooopack", "I"),
    ("snd_wnd", "I"),
    ("rcv_wnd", "I"),
    ("rehash", "I"),
    ("total_rto", "H"),
    ("total_rto_recoveries", "H"),
    ("total_rto_time", "I"),
)


def _offsets() -> list[tuple[str, int, struct.Struct]]:
    out = []
    fmt = "@"
    for name, code in _LAYOUT:
        end = struct.calcsize(fmt + code)
        item = struct.Struct("@" + code)
        out.append((name, end - item.size, item))
        fmt += code
    return out


_FIELDS = _offsets()
#: Bytes every Linux since 2.6.x returns (up to and including total_retrans).
_BASE_LEN = next(off + item.size for name, off, item in _FIELDS if name == "total_retrans")
#: Room for future kernels' additions: we parse what we know and ignore the rest.
_BUFLEN = 512


def _opt(default: None = None) -> Any:
    return attrs.field(default=default, kw_only=True)


@attrs.frozen
class TcpInfo:
    """A snapshot of ``struct tcp_info`` for one socket.

    Times (``rto``, ``ato``, ``rtt``, ``rttvar``, ``min_rtt``, ``rcv_rtt``) are microseconds;
    ``last_*`` are milliseconds ago. Fields a kernel does not return are None; ``length`` is the
    number of bytes it returned.
    """

    length: int
    state: str
    state_code: int
    ca_state: int
    retransmits: int
    probes: int
    backoff: int
    options: int
    snd_wscale: int
    rcv_wscale: int
    rto: int
    ato: int
    snd_mss: int
    rcv_mss: int
    unacked: int
    sacked: int
    lost: int
    retrans: int
    fackets: int
    last_data_sent: int
    last_ack_sent: int
    last_data_recv: int
    last_ack_recv: int
    pmtu: int
    rcv_ssthresh: int
    rtt: int
    rttvar: int
    snd_ssthresh: int
    snd_cwnd: int
    advmss: int
    reordering: int
    rcv_rtt: int
    rcv_space: int
    total_retrans: int
    pacing_rate: int | None = _opt()
    max_pacing_rate: int | None = _opt()
    bytes_acked: int | None = _opt()
    bytes_received: int | None = _opt()
    segs_out: int | None = _opt()
    segs_in: int | None = _opt()
    notsent_bytes: int | None = _opt()
    min_rtt: int | None = _opt()
    data_segs_in: int | None = _opt()
    data_segs_out: int | None = _opt()
    delivery_rate: int | None = _opt()
    busy_time: int | None = _opt()
    rwnd_limited: int | None = _opt()
    sndbuf_limited: int | None = _opt()
    delivered: int | None = _opt()
    delivered_ce: int | None = _opt()
    bytes_sent: int | None = _opt()
    bytes_retrans: int | None = _opt()
    dsack_dups: int | None = _opt()
    reord_seen: int | None = _opt()
    rcv_ooopack: int | None = _opt()
    snd_wnd: int | None = _opt()
    rcv_wnd: int | None = _opt()
    rehash: int | None = _opt()
    total_rto: int | None = _opt()
    total_rto_recoveries: int | None = _opt()
    total_rto_time: int | None = _opt()

    @classmethod
    def from_bytes(cls, data: bytes) -> TcpInfo:
        """Parse the bytes getsockopt(TCP_INFO) returned (at least the 104-byte base).

        Raises ValueError when ``data`` is shorter than the base every kernel returns.
        """
        if len(data) < _BASE_LEN:
            raise ValueError(f"TCP_INFO too short: {len(data)} bytes, need {_BASE_LEN}")
        values: dict[str, int] = {}
        for name, offset, item in _FIELDS:
            if offset + item.size > len(data):
                break
            values[name] = item.unpack_from(data, offset)[0]
        wscale = values.pop("_wscale")
        values.pop("_flags")
        # C bitfields fill from the low bits on little-endian ABIs and from the high bits on
        # big-endian ones; snd_wscale is declared first.
        first, second = (wscale & 0x0F, wscale >> 4)
        if sys.byteorder == "big":
            first, second = second, first
        code = values.pop("state")
        return cls(
            length=len(data),
            state=state_name(code),
            state_code=code,
            snd_wscale=first,
            rcv_wscale=second,
            **values,
        )


def tcp_info(sock: object) -> TcpInfo:
    """Read TCP_INFO from a connected TCP socket (Linux).

    ``sock`` is anything :func:`keepconn.tcp.socket_of` accepts. Raises
    :class:`UnsupportedOption` on platforms without TCP_INFO and OSError from the kernel (for
    example EBADF on a closed socket).
    """
    opt = getattr(socket, "TCP_INFO", None)
    if opt is None or not sys.platform.startswith("linux"):
        raise UnsupportedOption(f"TCP_INFO is Linux-only (this is {sys.platform})")
    s: Any = socket_of(sock)
    data = s.getsockopt(socket.IPPROTO_TCP, opt, _BUFLEN)
    return TcpInfo.from_bytes(bytes(data))


class Liveness(enum.Enum):
    """What a TCP_INFO snapshot says about the peer (see :func:`classify`)."""

    #: Nothing suggests trouble: no data stuck, or the peer acknowledges what it is sent.
    ALIVE = "alive"
    #: The peer is there (it keeps acknowledging) but it does not read: its receive window is
    #: closed and our send queue is not draining. A busy or stuck application, not a dead host.
    SLOW_READER = "slow_reader"
    #: Data or probes have gone unacknowledged, retransmissions are climbing and no ACK has come
    #: back for a while: the peer, or the path to it, is probably gone.
    SUSPECTED_DEAD = "suspected_dead"
    #: The socket is no longer ESTABLISHED (the kernel already knows how the connection ends).
    CLOSED = "closed"


def classify(info: TcpInfo, *, silence: float = 1.0, min_retransmits: int = 2) -> Liveness:
    """Tell a dead peer from a slow reader from one :class:`TcpInfo` snapshot.

    Both look the same from the application (writes block, nothing comes back) but call for
    different actions: a dead peer's socket should be aborted, a slow reader's kept or shed by
    policy. The distinction is whether the peer still acknowledges:

    * SUSPECTED_DEAD: the last ACK is at least ``silence`` seconds old and either data is
      unacknowledged after ``min_retransmits`` retransmissions, or ``min_retransmits``
      keepalive or window probes in a row went unanswered. One unanswered probe is not enough:
      a receiver answers out-of-window probes at most every 500 ms (tcp_invalid_ratelimit),
      so a live slow reader sometimes shows one.
    * SLOW_READER: the peer advertised a zero window (or, on kernels without ``snd_wnd``, data
      waits unsent with nothing in flight) and answers the kernel's window probes.
    * CLOSED: the socket is not ESTABLISHED.
    * ALIVE otherwise (an idle connection with nothing outstanding is alive as far as TCP
      knows; only keepalive or a heartbeat can say more).

    :param info: a snapshot from :func:`tcp_info`.
    :param silence: seconds since the peer's last ACK before it may be suspected dead.
    :param min_retransmits: retransmissions (or unanswered probes) in a row that count as the
        peer not answering.
    """
    if info.state_code != TcpState.ESTABLISHED:
        return Liveness.CLOSED
    silent = info.last_ack_recv >= silence * 1000
    data_stuck = info.unacked > 0 and info.retransmits >= min_retransmits
    probes_unanswered = info.probes >= min_retransmits
    if silent and (data_stuck or probes_unanswered):
        return Liveness.SUSPECTED_DEAD
    if info.snd_wnd is not None:
        window_closed = info.snd_wnd == 0
    else:
        window_closed = (info.notsent_bytes or 0) > 0 and info.unacked == 0
    if window_closed:
        # Zero-window probes back off up to two minutes, so the last ACK may be old; but each
        # answered probe resets ``probes`` to 0, and repeated silence was caught above.
        return Liveness.SLOW_READER
    return Liveness.ALIVE

"""What the adapter asks of, and does to, one connected TCP socket beyond reading and writing.

Each function takes the raw socket (anyio's ``SocketAttribute.raw_socket``; under asyncio a
TransportSocket, which refuses some calls: see :func:`half_close`).
"""

from __future__ import annotations

import os
import socket
import struct
import sys

__all__ = [
    "abort_on_close",
    "half_close",
    "peer_gone",
    "queued",
    "unacknowledged_bytes",
    "unread_bytes",
]

_LINGER_ZERO = struct.pack("ii", 1, 0)


def abort_on_close(sock: socket.socket) -> None:
    """Make the coming close send a RST (SO_LINGER 0) instead of a FIN: for a peer that is dead
    or displaced, so the socket does not sit in FIN_WAIT1 retransmitting to no one."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)


def half_close(sock: socket.socket) -> None:
    """shutdown(SHUT_WR) on a stream's socket. asyncio hands out a TransportSocket that refuses
    shutdown(), so go through a duplicate descriptor: shutdown acts on the socket, not the fd."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except (TypeError, AttributeError):
        with socket.socket(fileno=os.dup(sock.fileno())) as dup:
            dup.shutdown(socket.SHUT_WR)


#: TCP states in which the peer has closed or reset its side (Linux's tcp_states.h numbering):
#: CLOSE, CLOSE_WAIT, LAST_ACK.
_PEER_GONE_STATES = frozenset({7, 8, 9})
_TCP_INFO = getattr(socket, "TCP_INFO", None)

try:  # Unix: how many received bytes wait unread in a socket (SIOCINQ)
    import fcntl
    import termios

    _FIONREAD: int | None = termios.FIONREAD
    # Linux: bytes in the send queue, sent or not, that the peer has not acknowledged (SIOCOUTQ).
    _OUTQ: int | None = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None
except ImportError:  # pragma: no cover - Windows
    _FIONREAD = None
    _OUTQ = None


def peer_gone(sock: socket.socket) -> bool:
    """Whether the kernel already knows the peer closed or reset this connection.

    One getsockopt(TCP_INFO) asking for just its first byte (the state); False where TCP_INFO
    does not exist, so other platforms simply skip the check.
    """
    if _TCP_INFO is None:
        return False
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)
    except (OSError, ValueError):
        return True  # the socket is already gone
    return bool(state) and state[0] in _PEER_GONE_STATES


#: struct tcp_info up to and including tcpi_last_data_recv: eight u8s, then u32s (rto .. ).
_LAST_DATA_RECV = struct.Struct("@8B11II")


def queued(sock: socket.socket) -> tuple[bool, float]:
    """For a socket just accepted: whether its peer has already closed or reset it, and how
    long, in seconds, since the kernel last heard from the peer (tcpi_last_data_recv).

    For a connection still unserved this is how long it waited in the listen queue: the
    kernel stamps the time when the handshake completes and again with every segment of data,
    and a client sends its first bytes (a ClientHello, a CONNECT) at once. One getsockopt;
    ``(False, 0.0)`` where TCP_INFO does not exist.
    """
    if _TCP_INFO is None:
        return False, 0.0
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _LAST_DATA_RECV.size)
    except (OSError, ValueError):
        return True, 0.0  # the socket is already gone
    if len(raw) < _LAST_DATA_RECV.size:
        return bool(raw) and raw[0] in _PEER_GONE_STATES, 0.0
    fields = _LAST_DATA_RECV.unpack(raw)
    return fields[0] in _PEER_GONE_STATES, fields[-1] / 1000.0


def unread_bytes(sock: socket.socket) -> int:
    """Bytes the kernel has received on the connection that nobody has read (FIONREAD); 0
    where the ioctl is not available."""
    if _FIONREAD is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), _FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int.from_bytes(raw, sys.byteorder, signed=True)


def unacknowledged_bytes(sock: socket.socket) -> int | None:
    """Bytes written to the connection that the peer's kernel has not acknowledged yet
    (SIOCOUTQ); None where the platform cannot say (then nobody can wait for an ACK)."""
    if _OUTQ is None:
        return None
    try:
        raw = fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return None
    return int.from_bytes(raw, sys.byteorder, signed=True)

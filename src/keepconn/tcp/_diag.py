"""The kernel's TCP table over netlink (sock_diag), the way ``ss`` reads it (Linux).

Same rows as /proc/net/tcp (see :mod:`keepconn.tcp._census`), at a fraction of the cost: the
kernel picks the port's sockets itself (a two-instruction filter program) and hands them over
as fixed binary records, so a server with 15,000 connections and as many client sockets on the
same host gets its 15,000 rows, not text for 30,000 to split. That matters because the census
runs in a worker thread of the server's own process: parsing /proc's text held the interpreter
lock for some 100 ms per 10,000 lines, time the event loop waited for the lock at every turn.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

from ._info import state_name
from ._rows import TIMERS, CensusRow

__all__ = ["diag_rows"]

#: From linux/netlink.h, linux/sock_diag.h and linux/inet_diag.h (stable kernel ABI).
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_INET_DIAG_REQ_BYTECODE = 1
_INET_DIAG_BC_S_GE = 2
_INET_DIAG_BC_S_LE = 3
#: Every state (1 << state for ESTABLISHED .. NEW_SYN_RECV), as /proc/net/tcp lists them.
_ALL_STATES = 0xFFFFFFFF

# struct nlmsghdr: length, type, flags, sequence, port id.
_HEADER = struct.Struct("=IHHII")
# struct inet_diag_req_v2: family, protocol, extensions, pad, states, then the socket id
# (ports and addresses in network order, interface, cookie): all zero asks for every socket.
_REQUEST = struct.Struct("=BBBBI48x")
# struct inet_diag_msg: family, state, timer, retransmits; ports (network order), source and
# destination addresses (16 bytes each), interface, cookie; then (host order, from byte 52)
# expires (ms), receive queue, send queue, uid, inode.
_MESSAGE = struct.Struct(">BBBBHH16s16s4x8x")
_COUNTS = struct.Struct("=IIIII")
# struct rtattr header and struct inet_diag_bc_op (code, yes, no).
_ATTR = struct.Struct("=HH")
_OP = struct.Struct("=BBH")

_RECEIVE = 1 << 18
#: Kernel state number -> name, made once: these rows come by the tens of thousands.
_STATES = {code: state_name(code) for code in range(1, 13)}


def diag_rows(family: int, port: int | None = None) -> list[CensusRow]:
    """Every TCP socket of address family 4 or 6 in this process's network namespace (only
    those whose local port is ``port``, when given), as :class:`CensusRow`.

    :raises OSError: netlink's sock_diag cannot be asked (not Linux, the module missing, a
        sandbox that forbids it); the caller falls back to /proc.
    """
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    size = 4 if family == 4 else 16
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE)
        nl.sendall(_request(af, port))
        rows: list[CensusRow] = []
        names: dict[bytes, str] = {}
        for payload in _messages(nl):
            fam, state, timer, retransmits, sport, dport, src, dst = _MESSAGE.unpack_from(payload)
            expires, rqueue, wqueue, uid, inode = _COUNTS.unpack_from(payload, _MESSAGE.size)
            if fam != af:
                continue
            local = names.get(src[:size])
            if local is None:
                local = names[src[:size]] = socket.inet_ntop(af, src[:size])
            remote = names.get(dst[:size])
            if remote is None:
                remote = names[dst[:size]] = socket.inet_ntop(af, dst[:size])
            name = _STATES.get(state) or state_name(state)
            rows.append(
                CensusRow(
                    family,
                    local,
                    sport,
                    remote,
                    dport,
                    name,
                    # As /proc/net/tcp: a listener's send queue is 0 there (the kernel's diag
                    # record gives its maximum backlog), its receive queue the accept backlog.
                    0 if name == "LISTEN" else wqueue,
                    rqueue,
                    TIMERS.get(timer, str(timer)),
                    expires / 1000.0 if timer else 0.0,
                    retransmits,
                    uid,
                    inode,
                )
            )
        return rows


def _request(af: int, port: int | None) -> bytes:
    body = _REQUEST.pack(af, socket.IPPROTO_TCP, 0, 0, _ALL_STATES)
    if port is not None:
        # The kernel's filter program: local port >= port, then <= port; each comparison's
        # "no" jumps past the end (the socket is skipped), the last "yes" lands on it exactly
        # (the socket is listed). Offsets are in bytes; each comparison takes two 4-byte ops,
        # the second carrying the port.
        program = (
            _OP.pack(_INET_DIAG_BC_S_GE, 8, 20)
            + _OP.pack(0, 0, port)
            + _OP.pack(_INET_DIAG_BC_S_LE, 8, 12)
            + _OP.pack(0, 0, port)
        )
        body += _ATTR.pack(_ATTR.size + len(program), _INET_DIAG_REQ_BYTECODE) + program
    header = _HEADER.pack(
        _HEADER.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
    )
    return header + body


def _messages(nl: socket.socket) -> Iterator[memoryview]:
    """The payloads of the dump's messages, until the kernel says it is done."""
    while True:
        data = memoryview(nl.recv(_RECEIVE))
        if not data:
            raise OSError("sock_diag: the kernel closed the dump")
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, kind, _, _, _ = _HEADER.unpack_from(data, offset)
            if length < _HEADER.size:
                raise OSError(f"sock_diag: malformed message length {length}")
            payload = data[offset + _HEADER.size : offset + length]
            if kind == _NLMSG_DONE:
                return
            if kind == _NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", payload)
                raise OSError(-code, f"sock_diag: {os.strerror(-code)}")
            if len(payload) >= _MESSAGE.size + _COUNTS.size:
                yield payload
            offset += (length + 3) & ~3  # messages are 4-byte aligned

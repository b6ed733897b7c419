"""keepconn.tcp: the kernel side of liveness.

* :class:`TcpKeepalive` tunes TCP keepalive and TCP_USER_TIMEOUT per socket (portable, with
  anything a platform lacks reported rather than ignored) and reads the settings back.
* :func:`tcp_info` reads Linux's TCP_INFO; :func:`classify` tells a dead peer from a slow reader.
* :func:`census` lists the kernel's TCP sockets on a port, by state (netlink, or /proc).

One-liners for each I/O stack (``ka = TcpKeepalive(idle=60, interval=10, count=6)``)::

    ka.apply(sock)                                            # socket.socket, trio socket
    ka.apply(stream.extra(anyio.abc.SocketAttribute.raw_socket))  # anyio SocketStream
    ka.apply(transport.get_extra_info("socket"))              # asyncio transport

``apply`` also accepts the anyio stream or asyncio transport itself (see :func:`socket_of`).
"""

from __future__ import annotations

from .._public import claim as _claim
from ._census import Census as Census
from ._census import CensusRow as CensusRow
from ._census import census as census
from ._info import Liveness as Liveness
from ._info import TcpInfo as TcpInfo
from ._info import TcpState as TcpState
from ._info import classify as classify
from ._info import tcp_info as tcp_info
from ._keepalive import AppliedKeepalive as AppliedKeepalive
from ._keepalive import KeepaliveReading as KeepaliveReading
from ._keepalive import SocketLike as SocketLike
from ._keepalive import TcpKeepalive as TcpKeepalive
from ._keepalive import UnsupportedOption as UnsupportedOption
from ._keepalive import socket_of as socket_of

__all__ = [
    "AppliedKeepalive",
    "Census",
    "CensusRow",
    "KeepaliveReading",
    "Liveness",
    "SocketLike",
    "TcpInfo",
    "TcpKeepalive",
    "TcpState",
    "UnsupportedOption",
    "census",
    "classify",
    "socket_of",
    "tcp_info",
]

_claim(__name__, __all__, globals())

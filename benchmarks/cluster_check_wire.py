"""The wire side of the cluster acceptance check: raw MQTT 3.1.1 devices on blocking sockets,
a few Redis commands in RESP, and the kernel's socket table read two ways.

Nothing here imports the gateway or keepconn's cluster code: the check is a black box that
sees what a device, an operator with ``ss`` and an operator with ``redis-cli`` see.

* :class:`Device`: one TCP connection speaking hand-made CONNECT / CONNACK / PINGREQ /
  PINGRESP / DISCONNECT bytes (MQTT 3.1.1, protocol level 4), with every wait bounded.
* :func:`established_peers`: ``ss -tnH state established '( sport = :PORT )'``, the
  server-side ESTABLISHED sockets on a node's port, as the set of their peers' ports.
* :func:`socket_present`: an exact sock_diag lookup of one server-side socket by its four
  addresses (a netlink round trip of microseconds, whatever else is in the table), for timing
  when a taken-over socket leaves the old node's table.
* :func:`redis_command`: one command to the store over a fresh connection.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import subprocess
import time

__all__ = [
    "CLOSED",
    "slack",
    "Device",
    "established_peers",
    "redis_command",
    "redis_send",
    "socket_present",
]


def slack(seconds: float) -> float:
    """An allowance written for a quiet machine, scaled by ``KEEPCONN_TIME_FACTOR`` as the test
    suite's are (tests/timing.py): upper bounds of measurement only, never the promises
    checked (node_ttl itself is never scaled)."""
    return seconds * max(1.0, float(os.environ.get("KEEPCONN_TIME_FACTOR", "1")))


#: What :meth:`Device.connack` returns when the connection closed (EOF or reset) instead.
CLOSED = -1
PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"
DISCONNECT = b"\xe0\x00"


def _string(value: str) -> bytes:
    data = value.encode()
    return struct.pack("!H", len(data)) + data


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        digit, n = n % 128, n // 128
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(
    client_id: str, username: str | None, password: str | None, keepalive: int = 60
) -> bytes:
    """A CONNECT with clean session and optional username and password."""
    flags = 0x02
    payload = _string(client_id)
    if username is not None:
        flags |= 0x80
        payload += _string(username)
    if password is not None:
        flags |= 0x40
        payload += _string(password)
    body = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload
    return b"\x10" + _remaining_length(len(body)) + body


class Device:
    """One raw MQTT device connection to ``127.0.0.1:port`` (blocking, bounded waits)."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.node_port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        #: The device's own port: the server-side socket's peer port in the kernel's table.
        self.port: int = self.sock.getsockname()[1]
        self._buffer = b""
        self.connect_sent_at = 0.0

    def send_connect(
        self, client_id: str, username: str | None, password: str | None, keepalive: int = 60
    ) -> None:
        self.connect_sent_at = time.monotonic()
        self.sock.sendall(connect_packet(client_id, username, password, keepalive))

    def _read(self, n: int, timeout: float) -> bytes | None:
        """``n`` bytes, or None when the peer closed or reset first; TimeoutError past
        ``timeout``."""
        deadline = time.monotonic() + timeout
        while len(self._buffer) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer within {timeout:g} s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                raise TimeoutError(f"no answer within {timeout:g} s") from None
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not chunk:
                return None
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def connack(self, timeout: float = 5.0) -> int:
        """The CONNACK's return code (0 accepted, 3 unavailable, 4 bad credentials, 5 not
        authorised), or CLOSED when the connection ended without one."""
        data = self._read(4, timeout)
        if data is None:
            return CLOSED
        if data[0] != 0x20 or data[1] != 2:
            raise ValueError(f"not a CONNACK: {data!r}")
        return data[3]

    def hello(
        self, client_id: str, username: str | None, password: str | None, timeout: float = 5.0
    ) -> int:
        """CONNECT and its CONNACK code (or CLOSED)."""
        self.send_connect(client_id, username, password)
        return self.connack(timeout)

    def ping(self, timeout: float = 3.0) -> bool:
        """PINGREQ; True when PINGRESP came back within ``timeout``."""
        try:
            self.sock.sendall(PINGREQ)
            return self._read(2, timeout) == PINGRESP
        except (OSError, TimeoutError):
            return False

    def wait_closed(self, timeout: float) -> str | None:
        """Wait until the gateway ends this connection: "reset" (ECONNRESET), "eof", or None
        when it is still open after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                return None
            except ConnectionResetError:
                return "reset"
            if not chunk:
                return "eof"

    def readable(self, timeout: float) -> bool:
        """True when a recv would not block (data, EOF or a reset arrived)."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        return bool(ready)

    def disconnect(self) -> None:
        """DISCONNECT (if the connection still takes it) and close."""
        try:
            self.sock.sendall(DISCONNECT)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        self.sock.close()


# ----------------------------------------------------------------------------------------------
# The kernel's socket table.


def established_peers(node_port: int, timeout: float = 5.0) -> set[int]:
    """Peer ports of the server-side ESTABLISHED sockets on ``node_port`` (``ss``, filtered in
    the kernel, so other programs' sockets on this shared host cost nothing)."""
    out = subprocess.run(
        ["ss", "-tnH", "state", "established", f"( sport = :{node_port} )"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    ).stdout
    peers = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            peers.add(int(fields[-1].rsplit(":", 1)[1]))
    return peers


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 1
_ALL_STATES = 0xFFFFFFFF
_NOCOOKIE = 0xFFFFFFFF
_diag: socket.socket | None = None


def socket_present(local_port: int, peer_port: int) -> bool:
    """Whether the kernel still has the TCP socket 127.0.0.1:local_port <-> 127.0.0.1:peer_port
    (any state but TIME_WAIT's absence of an owner: a reset socket is gone at once)."""
    global _diag
    if _diag is None:
        _diag = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG)
        _diag.settimeout(2.0)
    loopback = socket.inet_aton("127.0.0.1") + bytes(12)
    sockid = (
        struct.pack("!HH", local_port, peer_port)
        + loopback
        + loopback
        + struct.pack("=III", 0, _NOCOOKIE, _NOCOOKIE)
    )
    request = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, _ALL_STATES) + sockid
    header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0)
    _diag.send(header + request)
    reply = _diag.recv(65536)
    kind = struct.unpack_from("=H", reply, 4)[0]
    if kind == _NLMSG_ERROR:
        code = -struct.unpack_from("=i", reply, 16)[0]
        if code == errno.ENOENT:
            return False
        raise OSError(code, f"sock_diag lookup failed: {errno.errorcode.get(code, code)}")
    # inet_diag_msg: family, state, timer, retrans, then the socket's id. The kernel's lookup
    # falls back to the listener on the port once the connection is gone; TIME_WAIT (6) has no
    # owner left.
    state = reply[17]
    found_peer = struct.unpack_from("!H", reply, 22)[0]
    return found_peer == peer_port and state not in (6, 10)


# ----------------------------------------------------------------------------------------------
# The store, in RESP.


def _resp_value(f: object) -> object:
    read = f.readline  # type: ignore[attr-defined]
    line = read()
    if not line:
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)  # type: ignore[attr-defined]
        return data[:-2].decode(errors="replace")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_resp_value(f) for _ in range(n)]
    raise ValueError(f"bad RESP line {line!r}")


def redis_command(port: int, *args: str, timeout: float = 3.0) -> object:
    """Send one command to the redis-server on 127.0.0.1:port; its decoded reply (an error
    reply comes back as a RuntimeError instance, not raised)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        conn.sendall(b"".join(parts))
        with conn.makefile("rb") as f:
            return _resp_value(f)


def redis_send(port: int, *args: str, timeout: float = 3.0) -> socket.socket:
    """Send one command and return the open connection without reading the reply (for
    ``DEBUG SLEEP``, which answers only once the server wakes); the caller closes it."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    conn.sendall(b"".join(parts))
    return conn

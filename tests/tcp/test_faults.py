"""Real kernel faults: what TCP keepalive and TCP_USER_TIMEOUT actually do to a half-open peer.

The server socket lives in the root namespace, bound to the veth address; the device socket is
created inside a network namespace (see keepconn.testing). Faults are real: the device's link
goes down (cable pull) or every frame is dropped (blackhole). Measured times are attached to
each test's report (``record_property``) and written to stderr; docs/topics/keepalive.md
quotes them. Bounds carry the slack the issue allows for a loaded 2-core machine.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from keepconn.tcp import Liveness, TcpKeepalive, census, classify, tcp_info
from keepconn.testing import NetNs
from tests.timing import slack

pytestmark = [pytest.mark.netns, pytest.mark.slow]

FAULTS = ["cable_pull", "blackhole"]


def inject(ns: NetNs, fault: str) -> None:
    if fault == "cable_pull":
        ns.cable_pull()
    else:
        ns.blackhole()


@pytest.fixture
def server(netns: NetNs) -> Iterator[socket.socket]:
    sock = socket.create_server((netns.host_addr, 0))
    yield sock
    sock.close()


@pytest.fixture
def pair(
    netns: NetNs, server: socket.socket
) -> Iterator[Callable[..., tuple[socket.socket, socket.socket]]]:
    """Connect a device socket (inside the namespace) to the server; yield (server side, device
    side). Everything made is closed at the end."""
    made: list[socket.socket] = []

    def connect(**kwargs: object) -> tuple[socket.socket, socket.socket]:
        device = netns.connect(server.getsockname(), **kwargs)  # type: ignore[arg-type]
        conn, _ = server.accept()
        made.extend((device, conn))
        return conn, device

    yield connect
    for sock in made:
        sock.close()


def report(record: Callable[[str, object], None], name: str, seconds: float) -> None:
    record(name, round(seconds, 3))
    sys.stderr.write(f"\nmeasured {name} = {seconds:.3f} s\n")


def exchange(conn: socket.socket, device: socket.socket) -> float:
    """A byte from device to server: the peer's last sign of life. Returns its time."""
    device.sendall(b"!")
    assert conn.recv(1) == b"!"
    return time.monotonic()


def wait_for_error(sock: socket.socket, limit: float) -> tuple[int, float]:
    """Block in recv until the kernel fails the socket; return (errno, monotonic time)."""
    sock.settimeout(limit)
    try:
        data = sock.recv(1)
    except OSError as exc:
        # The kernel's ETIMEDOUT and Python's own socket timeout are both TimeoutError; only
        # the kernel's carries an errno.
        if exc.errno is None:
            pytest.fail(f"socket still alive after {limit} s")
        return exc.errno, time.monotonic()
    pytest.fail(f"recv returned {data!r} instead of failing")


@pytest.mark.timeout(slack(60))
@pytest.mark.parametrize("fault", FAULTS)
def test_idle_half_open_peer_found_by_keepalive(
    netns: NetNs,
    pair: Callable[..., tuple[socket.socket, socket.socket]],
    fault: str,
    record_property: Callable[[str, object], None],
) -> None:
    ka = TcpKeepalive(idle=1, interval=1, count=3)
    watched, device = pair()
    ka.apply(watched)
    unwatched, device2 = pair()
    exchange(unwatched, device2)
    last = exchange(watched, device)
    inject(netns, fault)

    code, failed_at = wait_for_error(watched, ka.detection_bound() + slack(5))
    took = failed_at - last
    report(record_property, f"idle_keepalive_{fault}", took)
    assert code == errno.ETIMEDOUT
    assert ka.detection_bound() - 0.5 <= took <= ka.detection_bound() + slack(1)

    # Without keepalive nothing ever probes the peer: the kernel keeps the phantom.
    time.sleep(max(0.0, last + 15 - time.monotonic()))
    info = tcp_info(unwatched)
    assert info.state == "ESTABLISHED"
    assert classify(info) is Liveness.ALIVE  # TCP has no way to know: that is the point
    port = unwatched.getsockname()[1]
    rows = [r for r in census(port).sockets if r.remote_address == netns.dev_addr]
    assert [r.state for r in rows if r.remote_port == unwatched.getpeername()[1]] == ["ESTABLISHED"]


@pytest.mark.timeout(slack(60))
@pytest.mark.parametrize("fault", FAULTS)
def test_unacked_data_needs_user_timeout(
    netns: NetNs,
    pair: Callable[..., tuple[socket.socket, socket.socket]],
    fault: str,
    record_property: Callable[[str, object], None],
) -> None:
    keepalive_only, dev1 = pair()
    TcpKeepalive(idle=1, interval=1, count=3, user_timeout=None).apply(keepalive_only)
    with_ut, dev2 = pair()
    TcpKeepalive(idle=1, interval=1, count=3, user_timeout=3000).apply(with_ut)
    exchange(keepalive_only, dev1)
    exchange(with_ut, dev2)
    inject(netns, fault)

    sent_at = time.monotonic()
    keepalive_only.sendall(b"x" * 100)
    with_ut.sendall(b"x" * 100)

    code, failed_at = wait_for_error(with_ut, 3.0 + slack(5))
    took = failed_at - sent_at
    report(record_property, f"unacked_user_timeout_3000_{fault}", took)
    assert code == errno.ETIMEDOUT
    assert 2.5 <= took <= 3.0 + slack(1.0)

    # Keepalive stays silent while data is in flight: the retransmission timer owns the socket
    # and tcp_retries2 (15, ~15 minutes) decides. No keepalive probe is ever sent.
    time.sleep(max(0.0, sent_at + 10 - time.monotonic()))
    info = tcp_info(keepalive_only)
    assert info.state == "ESTABLISHED"
    assert info.unacked > 0 and info.retransmits >= 3 and info.probes == 0
    assert classify(info) is Liveness.SUSPECTED_DEAD
    report(
        record_property, f"unacked_keepalive_only_alive_after_{fault}", time.monotonic() - sent_at
    )


@pytest.mark.timeout(slack(60))
def test_rebooted_peer_answers_probe_with_reset(
    netns: NetNs,
    pair: Callable[..., tuple[socket.socket, socket.socket]],
    record_property: Callable[[str, object], None],
) -> None:
    ka = TcpKeepalive(idle=3, interval=1, count=3)
    conn, device = pair()
    ka.apply(conn)
    exchange(conn, device)
    # The device "reboots": its link drops and its TCP state vanishes. The RST that the
    # abortive close would send cannot leave (no route with the link down), so the server
    # learns nothing until it next talks to the device.
    netns.cable_pull()
    device.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    device.close()
    netns.restore()
    back_at = time.monotonic()

    code, failed_at = wait_for_error(conn, ka.idle + slack(5))
    took = failed_at - back_at
    report(record_property, "rebooted_peer_reset", took)
    assert code == errno.ECONNRESET
    assert took <= ka.idle + slack(1)


@pytest.mark.timeout(slack(60))
def test_zero_window_is_a_slow_reader_and_user_timeout_kills_it(
    netns: NetNs,
    pair: Callable[..., tuple[socket.socket, socket.socket]],
    record_property: Callable[[str, object], None],
) -> None:
    def small_window(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    conns = {}
    for ut in (None, 3000):
        conn, device = pair(setup=small_window)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        TcpKeepalive(idle=1, interval=1, count=3, user_timeout=ut).apply(conn)
        exchange(conn, device)
        conns[ut] = conn

    # The devices never read: their receive buffers fill, their windows close, and the
    # servers' send buffers fill behind them.
    for conn in conns.values():
        conn.setblocking(False)
        with pytest.raises(BlockingIOError):
            while True:
                conn.send(b"z" * 4096)
    start = time.monotonic()
    deadline = start + slack(3)
    while tcp_info(conns[3000]).snd_wnd != 0:
        assert time.monotonic() < deadline, "the window never closed"
        time.sleep(0.05)
    closed_at = time.monotonic()

    time.sleep(1.0)
    for conn in conns.values():
        info = tcp_info(conn)
        assert info.snd_wnd == 0 and info.unacked == 0 and (info.notsent_bytes or 0) > 0
        assert classify(info) is Liveness.SLOW_READER

    # What the kernel does with TCP_USER_TIMEOUT here (Linux >= 5.11, "tcp: fix
    # TCP_USER_TIMEOUT with zero window"): the user timeout also bounds how long the window may
    # stay closed, counted from the first zero-window probe, although every probe is answered.
    # So a live peer that stops reading is aborted with ETIMEDOUT after ~user_timeout. Without a
    # user timeout RFC 1122 applies: the connection stays open as long as probes are answered,
    # and keepalive never fires because the probe timer owns the socket.
    victim = conns[3000]
    victim.setblocking(True)
    code, failed_at = wait_for_error(victim, 3.0 + slack(5))
    report(record_property, "zero_window_user_timeout_3000", failed_at - closed_at)
    assert code == errno.ETIMEDOUT
    assert 1.5 <= failed_at - closed_at <= 3.0 + slack(2.0)

    time.sleep(max(0.0, start + 10 - time.monotonic()))
    survivor = tcp_info(conns[None])
    assert survivor.state == "ESTABLISHED"
    assert classify(survivor) is Liveness.SLOW_READER


@pytest.mark.timeout(slack(30))
def test_census_sees_a_connected_device(
    netns: NetNs, pair: Callable[..., tuple[socket.socket, socket.socket]]
) -> None:
    conn, device = pair()
    port = conn.getsockname()[1]
    seen = census(port)
    assert seen.count("LISTEN") == 1
    rows = [r for r in seen.sockets if r.state == "ESTABLISHED"]
    assert [(r.local_address, r.remote_address) for r in rows] == [
        (netns.host_addr, netns.dev_addr)
    ]
    # The device's own socket lives in the namespace, so the root census does not list it.
    assert all(r.local_address != netns.dev_addr for r in census().sockets)

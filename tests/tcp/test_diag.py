"""census() over netlink (sock_diag): the same rows as /proc/net/tcp, filtered in the kernel."""

from __future__ import annotations

import os
import socket
import time

import pytest

from keepconn.tcp import CensusRow, census
from keepconn.tcp import _census as census_module
from keepconn.tcp._diag import diag_rows
from tests.timing import slack


def _comparable(rows: tuple[CensusRow, ...] | list[CensusRow]) -> list[CensusRow]:
    # The two sources read the timers at different moments and resolutions (ms, 1/100 s).
    return sorted(row._replace(timer_expires=0.0) for row in rows)


def _settled(port: int, limit: float = slack(3.0)) -> tuple[CensusRow, ...]:
    """The /proc census of ``port`` once it equals the netlink one (both read the same live
    table, a moment apart: a socket may change state in between)."""
    deadline = time.monotonic() + limit
    while True:
        proc = census(port, source="proc")
        netlink = census(port, source="netlink")
        if _comparable(proc.sockets) == _comparable(netlink.sockets):
            return netlink.sockets
        if time.monotonic() > deadline:
            assert _comparable(netlink.sockets) == _comparable(proc.sockets)
        time.sleep(0.02)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_netlink_lists_what_proc_lists_in_every_state(host: str) -> None:
    family = socket.getaddrinfo(host, 0)[0][0]
    with socket.create_server((host, 0), family=family) as server:
        port = server.getsockname()[1]
        clients = [socket.create_connection((host, port)) for _ in range(4)]
        served = [server.accept()[0] for _ in clients]
        unaccepted = socket.create_connection((host, port))  # in the accept queue
        clients[0].close()  # CLOSE_WAIT on the server's side
        served[1].close()  # FIN_WAIT2 on the server's side
        served[2].sendall(b"x" * 1000)  # unread by the client: nothing queued server-side
        clients[3].sendall(b"y" * 700)  # unread by the server: its receive queue
        try:
            rows = _settled(port)
            states = {row.state for row in rows}
            assert {"LISTEN", "ESTABLISHED", "CLOSE_WAIT", "FIN_WAIT2"} <= states, states
            assert {row.local_port for row in rows} == {port}
            queued = [row for row in rows if row.rx_queue == 700]
            assert len(queued) == 1 and queued[0].inode == os.fstat(served[3].fileno()).st_ino
            [listening] = [row for row in rows if row.state == "LISTEN"]
            assert listening.rx_queue == 1  # the unaccepted connection
            assert census(port).source == "netlink"
        finally:
            for sock in (*clients, *served, unaccepted):
                sock.close()


def test_the_kernel_filters_by_port_and_every_socket_comes_without_one() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        try:
            mine = diag_rows(4, port)
            assert {row.local_port for row in mine} == {port} and len(mine) == 2
            everything = diag_rows(4)
            # The client's own socket has another local port: only the unfiltered dump has it.
            ephemeral = client.getsockname()[1]
            assert any(row.local_port == ephemeral for row in everything)
            assert not any(row.local_port == ephemeral for row in mine)
        finally:
            client.close()
            conn.close()


def test_source_is_checked_and_other_namespaces_are_read_from_proc() -> None:
    with pytest.raises(ValueError, match="source"):
        census(source="ss")
    with pytest.raises(ValueError, match="own namespace"):
        census(pid=os.getpid(), source="netlink")
    assert census(pid=os.getpid()).source == "proc"
    assert census(source="proc").source == "proc"


def test_without_sock_diag_the_census_falls_back_to_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    # A kernel without the inet_diag module (or a sandbox forbidding netlink) answers the
    # request with an error; no such kernel is at hand, so the error is raised here.
    def refused(port: int | None) -> list[CensusRow]:
        raise OSError(2, "sock_diag: No such file or directory")

    monkeypatch.setattr(census_module, "_netlink_rows", refused)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        fallback = census(port)
        assert fallback.source == "proc" and fallback.count("LISTEN") == 1
        with pytest.raises(OSError, match="sock_diag"):
            census(port, source="netlink")

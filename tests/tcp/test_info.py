"""tcp_info on real loopback sockets, and the TCP_INFO parser against arbitrary bytes."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keepconn.tcp import Liveness, TcpInfo, classify, tcp_info
from keepconn.tcp._info import _BASE_LEN, _FIELDS
from tests.timing import slack


def test_tcp_info_on_loopback() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        with client, conn:
            client.sendall(b"hello")
            assert conn.recv(5) == b"hello"
            info = tcp_info(conn)
            assert info.state == "ESTABLISHED"
            assert info.length >= _BASE_LEN
            assert info.unacked == 0 and info.retransmits == 0
            assert info.rto >= 200_000  # microseconds: Linux's minimum RTO is 200 ms
            assert info.last_data_recv < 5_000
            assert info.bytes_received == 5
            assert classify(info) is Liveness.ALIVE

            client.close()  # the peer's FIN: conn goes to CLOSE_WAIT
            deadline = time.monotonic() + slack(2)
            while tcp_info(conn).state != "CLOSE_WAIT":
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert classify(tcp_info(conn)) is Liveness.CLOSED


def test_tcp_info_needs_a_socket() -> None:
    with pytest.raises(TypeError):
        tcp_info(42)


@given(st.binary(min_size=_BASE_LEN, max_size=400))
def test_parser_takes_whatever_length_the_kernel_returns(data: bytes) -> None:
    info = TcpInfo.from_bytes(data)
    assert info.length == len(data)
    assert info.state_code == data[0]
    for name, offset, item in _FIELDS:
        if name.startswith("_") or name == "state":
            continue
        value = getattr(info, name)
        if offset + item.size <= len(data):
            assert value == item.unpack_from(data, offset)[0]
        else:
            assert value is None
    assert 0 <= info.snd_wscale < 16 and 0 <= info.rcv_wscale < 16


@given(st.binary(max_size=_BASE_LEN - 1))
def test_parser_rejects_short_input(data: bytes) -> None:
    with pytest.raises(ValueError, match="too short"):
        TcpInfo.from_bytes(data)


def test_layout_offsets_match_the_uapi_header() -> None:
    # Spot checks against include/uapi/linux/tcp.h as laid out by a C compiler.
    offsets = {name: offset for name, offset, _ in _FIELDS}
    assert offsets["rto"] == 8
    assert offsets["last_ack_recv"] == 56
    assert offsets["rtt"] == 68
    assert offsets["total_retrans"] == 100 and _BASE_LEN == 104
    assert offsets["pacing_rate"] == 104
    assert offsets["notsent_bytes"] == 144
    assert offsets["snd_wnd"] == 228
    assert offsets["total_rto"] == 240


def _info(**fields: int) -> TcpInfo:
    data = bytearray(256)
    data[0] = fields.pop("state", 1)
    for name, offset, item in _FIELDS:
        if name in fields:
            item.pack_into(data, offset, fields[name])
    return TcpInfo.from_bytes(bytes(data))


def test_classify_rules() -> None:
    big = struct.unpack("I", b"\xff\xff\x00\x00")[0]
    assert classify(_info(snd_wnd=big)) is Liveness.ALIVE
    # Data stuck, retransmitting, no ACK for 3 s.
    dead = _info(unacked=1, retransmits=3, backoff=3, last_ack_recv=3000, snd_wnd=big)
    assert classify(dead) is Liveness.SUSPECTED_DEAD
    # The same but the peer ACKed a moment ago: not (yet) dead.
    assert classify(_info(unacked=1, retransmits=3, last_ack_recv=100, snd_wnd=big)) is (
        Liveness.ALIVE
    )
    # Keepalive probes unanswered.
    assert classify(_info(probes=2, last_ack_recv=5000, snd_wnd=big)) is Liveness.SUSPECTED_DEAD
    # Zero window with probes answered: a slow reader, even if the last ACK is old.
    assert classify(_info(snd_wnd=0, notsent_bytes=9000, last_ack_recv=30_000)) is (
        Liveness.SLOW_READER
    )
    # One unanswered window probe is not enough (receivers rate-limit those ACKs).
    assert classify(_info(snd_wnd=0, probes=1, last_ack_recv=1200)) is Liveness.SLOW_READER
    assert classify(_info(state=8)) is Liveness.CLOSED

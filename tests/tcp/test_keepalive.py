"""TcpKeepalive: validation when built, apply/read round-trips on real loopback sockets."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator

import anyio
import pytest
from anyio.abc import SocketAttribute

from keepconn import ConfigError
from keepconn.tcp import TcpKeepalive, UnsupportedOption, socket_of


@pytest.fixture
def loopback_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        yield conn, client
        conn.close()
        client.close()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"idle": 0}, "idle"),
        ({"idle": 32768}, "idle"),
        ({"idle": 1.5}, "idle"),
        ({"idle": True}, "idle"),
        ({"interval": 0}, "interval"),
        ({"interval": 40000}, "interval"),
        ({"count": 0}, "count"),
        ({"count": 128}, "count"),
        ({"user_timeout": -1}, "user_timeout"),
        ({"user_timeout": "soon"}, "user_timeout"),
        ({"user_timeout": 2.5}, "user_timeout"),
        ({"user_timeout": 2**31}, "user_timeout"),
    ],
)
def test_out_of_range_values_fail_when_built_naming_the_field(
    kwargs: dict[str, object], field: str
) -> None:
    args: dict[str, object] = {"idle": 10, "interval": 5, "count": 3, **kwargs}
    with pytest.raises(ConfigError, match=field) as info:
        TcpKeepalive(**args)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


def test_limits_are_inclusive() -> None:
    TcpKeepalive(idle=1, interval=1, count=1, user_timeout=0)
    TcpKeepalive(idle=32767, interval=32767, count=127, user_timeout=None)


def test_auto_user_timeout_sits_just_below_the_keepalive_bound() -> None:
    ka = TcpKeepalive(idle=60, interval=10, count=6)
    assert ka.detection_bound() == 120.0
    assert ka.user_timeout_ms == 119_999
    assert TcpKeepalive(idle=60, interval=10, count=6, user_timeout=None).user_timeout_ms is None


def test_detection_bound_follows_linux_when_user_timeout_overrides_count() -> None:
    # With TCP_USER_TIMEOUT set, Linux ignores the probe count and gives up at the first
    # keepalive timer at or after the user timeout (with at least one probe sent).
    assert TcpKeepalive(1, 1, 3, user_timeout=None).detection_bound() == 4.0
    assert TcpKeepalive(1, 1, 3, user_timeout=0).detection_bound() == 4.0
    assert TcpKeepalive(1, 1, 3, user_timeout=10_000).detection_bound() == 10.0
    assert TcpKeepalive(10, 5, 3, user_timeout=1000).detection_bound() == 15.0
    assert TcpKeepalive(10, 5, 3, user_timeout=16_000).detection_bound() == 20.0


def test_apply_then_read_round_trips(loopback_pair: tuple[socket.socket, socket.socket]) -> None:
    conn, client = loopback_pair
    ka = TcpKeepalive(idle=7, interval=3, count=4, user_timeout=2500)
    applied = ka.apply(conn)
    assert applied.complete and applied.unsupported == ()
    assert applied.applied == {
        "SO_KEEPALIVE": 1,
        "TCP_KEEPIDLE": 7,
        "TCP_KEEPINTVL": 3,
        "TCP_KEEPCNT": 4,
        "TCP_USER_TIMEOUT": 2500,
    }
    reading = TcpKeepalive.read(conn)
    assert (reading.enabled, reading.idle, reading.interval, reading.count) == (True, 7, 3, 4)
    assert reading.user_timeout == 2500
    # The other end is untouched: off, and the system defaults apply to it.
    other = TcpKeepalive.read(client)
    assert not other.enabled and other.user_timeout == 0


def test_user_timeout_none_is_left_unset(
    loopback_pair: tuple[socket.socket, socket.socket],
) -> None:
    conn, _ = loopback_pair
    applied = TcpKeepalive(5, 5, 5, user_timeout=None).apply(conn)
    assert "TCP_USER_TIMEOUT" not in applied.applied
    assert TcpKeepalive.read(conn).user_timeout == 0


def test_missing_option_is_reported_logged_or_raised(
    loopback_pair: tuple[socket.socket, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Stand in for macOS/Windows, which have no TCP_USER_TIMEOUT: hide the constant.
    conn, _ = loopback_pair
    monkeypatch.delattr(socket, "TCP_USER_TIMEOUT")
    with caplog.at_level(logging.WARNING, logger="keepconn.tcp"):
        applied = TcpKeepalive(5, 5, 5).apply(conn)
    assert applied.unsupported == ("TCP_USER_TIMEOUT",) and not applied.complete
    assert applied.applied["TCP_KEEPIDLE"] == 5
    assert "TCP_USER_TIMEOUT" in caplog.text
    with pytest.raises(UnsupportedOption, match="TCP_USER_TIMEOUT"):
        TcpKeepalive(5, 5, 5).apply(conn, strict=True)
    # Nothing to report when the user timeout was not asked for.
    assert TcpKeepalive(5, 5, 5, user_timeout=None).apply(conn, strict=True).complete


def test_socket_of_rejects_things_without_a_socket() -> None:
    with pytest.raises(TypeError):
        socket_of(object())


@pytest.mark.anyio
async def test_apply_to_an_anyio_stream() -> None:
    ka = TcpKeepalive(idle=11, interval=2, count=5)
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(SocketAttribute.local_port)
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            assert ka.apply(stream).complete
            assert TcpKeepalive.read(stream).idle == 11
            raw = stream.extra(SocketAttribute.raw_socket)
            assert TcpKeepalive.read(raw).count == 5


def test_apply_to_an_asyncio_transport() -> None:
    ka = TcpKeepalive(idle=13, interval=2, count=5)

    async def scenario() -> int | None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            ka.apply(writer.transport)
            return TcpKeepalive.read(writer.transport.get_extra_info("socket")).idle
        finally:
            writer.close()
            server.close()

    assert asyncio.run(scenario()) == 13


def test_apply_to_a_trio_socket() -> None:
    import trio

    ka = TcpKeepalive(idle=17, interval=2, count=5)

    async def scenario() -> int | None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            ka.apply(sock)
            return TcpKeepalive.read(sock).idle

    assert trio.run(scenario) == 17

"""The example gateway as a cluster: three nodes on one throwaway redis-server, each started
from the documented command line (``--cluster``, ``--node-id``, ``--node-ttl 3``), driven by
paho-mqtt, mosquitto_pub and raw MQTT, with the kernel's socket table read on every node's port.

Also ``--workers N`` (several processes sharing one port with SO_REUSEPORT), with and without a
store. Every gateway and redis-server is a child process ended by its pid.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from device_gateway import gateway as gateway_app
from device_gateway import mqtt_codec as mq
from keepconn.tcp import census
from keepconn.testing import ForwarderMode, RedisServer, TcpForwarder
from tests.examples import test_gateway as plain
from tests.examples.test_gateway import (
    USERS,
    Device,
    RawClient,
    RunningGateway,
    _stop,
    devices,
    require_tools,
    server_side,
)
from tests.timing import slack

pytestmark = pytest.mark.timeout(120)

users_file = plain.users_file
start_gateway = plain.start_gateway

NODE_TTL = 3.0
STORE_TIMEOUT = 0.5


def start_nodes(
    start: Callable[..., RunningGateway],
    url: str,
    count: int = 3,
    *urls: str,
    extra: tuple[str, ...] = (),
) -> list[RunningGateway]:
    """``count`` gateway nodes on the store at ``url`` (or node i on ``urls[i]`` if given)."""
    nodes = []
    for i in range(count):
        store = urls[i] if i < len(urls) else url
        nodes.append(
            start(
                "--cluster",
                store,
                "--node-id",
                f"node-{i + 1}",
                "--node-ttl",
                str(NODE_TTL),
                "--store-timeout",
                str(STORE_TIMEOUT),
                *extra,
            )  # fmt: skip
        )
    for node in nodes:
        node.wait_status(lambda s: s["cluster"]["store_healthy"], timeout=slack(10))
    return nodes


def established(*nodes: RunningGateway) -> int:
    """Server-side ESTABLISHED sockets on every node's port, from the kernel's table."""
    return sum(server_side(node.port, "ESTABLISHED") for node in nodes)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate`` until true; return the seconds it took (fail after ``timeout``)."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout:.1f} s"
        time.sleep(0.01)
    return time.monotonic() - started


def test_a_device_that_moves_to_another_node_resets_its_old_socket_there(
    start_gateway: Callable[..., RunningGateway], redis_server: RedisServer
) -> None:
    a, b, c = start_nodes(start_gateway, redis_server.url)
    first = Device(a.port, "pump-1")
    second = Device(b.port, "pump-1")
    with devices(first, second):
        assert str(first.start()) == "Success"
        assert server_side(a.port, "ESTABLISHED") == 1
        started = time.monotonic()
        assert str(second.start()) == "Success"
        # The old socket on A is gone from the kernel's table: reset, not left ESTABLISHED.
        wait_until(lambda: server_side(a.port, "ESTABLISHED") == 0, slack(1.0), "old socket")
        took = time.monotonic() - started
        assert first.disconnected.wait(slack(2)), "paho never saw its old connection end"
        assert server_side(b.port, "ESTABLISHED") == 1
        assert established(a, b, c) == 1
        assert server_side(a.port, "CLOSE_WAIT") == 0
        status_a = a.wait_status(lambda s: s["closed"]["TAKEN_OVER"] == 1)
        status_b = b.wait_status(lambda s: s["cluster"]["owned"] == 1)
        assert status_a["cluster"]["remote_takeovers"] == 1
        assert status_a["sessions"] == 0
        assert status_b["cluster"]["took_from_remote"] == 1
        assert status_b["node_id"] == "node-2"
        second.publish("devices/pump-1/flow", b"3.2")
    assert took < slack(1.0), took


def test_bad_credentials_on_any_node_never_evict_the_live_session(
    start_gateway: Callable[..., RunningGateway], redis_server: RedisServer
) -> None:
    require_tools("mosquitto_pub")
    a, b, c = start_nodes(start_gateway, redis_server.url)
    device = Device(a.port, "pump-2")
    with devices(device):
        assert str(device.start()) == "Success"
        wrong = subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(b.port), "-V", "mqttv311",
             "-i", "pump-2", "-u", "alice", "-P", "not-the-password", "-t", "x", "-m", "1"],
            capture_output=True, text=True, timeout=slack(10),
        )  # fmt: skip
        assert wrong.returncode != 0
        assert "bad user name or password" in (wrong.stderr + wrong.stdout).lower()
        for node, user, password, code in (
            (c, "alice", "wrong", mq.ConnackCode.BAD_USERNAME_OR_PASSWORD),
            (c, "mallory", USERS["alice"], mq.ConnackCode.BAD_USERNAME_OR_PASSWORD),
            (b, None, None, mq.ConnackCode.NOT_AUTHORIZED),
        ):
            intruder = RawClient(node.port)
            try:
                assert intruder.connect("pump-2", user, password) == code
                intruder.closed_by_gateway()
            finally:
                intruder.close()
        b.wait_status(lambda s: s["closed"]["AUTH_FAILED"] == 2)
        c.wait_status(lambda s: s["closed"]["AUTH_FAILED"] == 2)
        time.sleep(0.2)  # an eviction notice, were one sent, would have arrived by now
        assert not device.disconnected.is_set()
        assert server_side(a.port, "ESTABLISHED") == 1
        assert established(b, c) == 0
        status = a.status()
        assert status["cluster"]["remote_takeovers"] == 0
        assert status["sessions"] == 1
        device.publish("devices/pump-2/flow", b"still here")


def test_store_down_refuses_connects_with_connack_3_and_ends_sessions_by_the_lease(
    start_gateway: Callable[..., RunningGateway], redis_server: RedisServer
) -> None:
    a, b, _ = start_nodes(start_gateway, redis_server.url)
    live = RawClient(a.port)
    try:
        assert live.connect("pump-3") == 0
        redis_server.pause()  # SIGSTOP: the store's connections stay up, nothing answers
        try:
            started = time.monotonic()
            refused = Device(b.port, "pump-4")
            with devices(refused):
                reason = refused.start()
                # paho names the MQTT 3.1.1 return code 3 by its MQTT 5 reason.
                assert str(reason) == "Server unavailable", reason
            assert time.monotonic() - started < slack(STORE_TIMEOUT + 1.5)
            raw = RawClient(a.port)
            try:
                assert raw.connect("pump-5") == mq.ConnackCode.SERVER_UNAVAILABLE
            finally:
                raw.close()
            # The session that was live when the store went is closed by the end of the lease
            # (OWNERSHIP_LOST), not before the store timeout, and not left ESTABLISHED.
            live.closed_by_gateway(timeout=slack(NODE_TTL + 3))
            ended = time.monotonic() - started
            assert ended < slack(NODE_TTL + 1.5), ended
            status = a.wait_status(lambda s: s["closed"]["OWNERSHIP_LOST"] == 1)
            assert not status["cluster"]["store_healthy"]
            assert server_side(a.port, "ESTABLISHED") == 0
        finally:
            redis_server.resume()
        for node in (a, b):
            node.wait_status(lambda s: s["cluster"]["store_healthy"], timeout=slack(NODE_TTL))
        back = RawClient(b.port)
        try:
            assert back.connect("pump-3") == 0
        finally:
            back.close()
    finally:
        live.close()


def test_a_two_second_store_stall_drops_no_session(
    start_gateway: Callable[..., RunningGateway], redis_server: RedisServer
) -> None:
    nodes = start_nodes(start_gateway, redis_server.url)
    live = [RawClient(node.port) for node in nodes]
    try:
        for n, client in enumerate(live):
            assert client.connect(f"steady-{n}") == 0
        redis_server.pause()
        try:
            stalled = RawClient(nodes[1].port)
            try:
                assert stalled.connect("newcomer") == mq.ConnackCode.SERVER_UNAVAILABLE
            finally:
                stalled.close()
            time.sleep(2.0 - STORE_TIMEOUT)
        finally:
            redis_server.resume()
        # The stall was shorter than the lease: every session is still there and answers.
        for client in live:
            client.send(mq.Pingreq())
            assert isinstance(client.packet(), mq.Pingresp)
        assert established(*nodes) == 3
        for node in nodes:
            status = node.wait_status(lambda s: s["cluster"]["store_healthy"], timeout=slack(5))
            assert status["closed"]["OWNERSHIP_LOST"] == 0
        # And the store still knows who owns what: a move is a takeover, not a second session.
        moved = RawClient(nodes[2].port)
        live.append(moved)
        assert moved.connect("steady-0") == 0
        wait_until(lambda: server_side(nodes[0].port, "ESTABLISHED") == 0, slack(1), "moved")
        assert established(*nodes) == 3
    finally:
        for client in live:
            client.close()


def test_redis_lost_then_back_empty_closes_by_the_lease_and_serves_again(
    start_gateway: Callable[..., RunningGateway], redis_server: RedisServer
) -> None:
    a, b, c = start_nodes(start_gateway, redis_server.url)
    live = [RawClient(a.port), RawClient(b.port)]
    try:
        for n, client in enumerate(live):
            assert client.connect(f"kept-{n}") == 0
        redis_server.stop()  # killed: every store connection is refused from now on
        started = time.monotonic()
        refused = RawClient(c.port)
        try:
            assert refused.connect("late") == mq.ConnackCode.SERVER_UNAVAILABLE
        finally:
            refused.close()
        for client in live:
            client.closed_by_gateway(timeout=slack(NODE_TTL + 3))
        assert time.monotonic() - started < slack(NODE_TTL + 1.5)
        assert established(a, b, c) == 0
        for node in (a, b):
            assert node.wait_status(lambda s: s["closed"]["OWNERSHIP_LOST"] == 1)
        redis_server.start()  # the same port, and empty (no persistence)
        for node in (a, b, c):
            node.wait_status(lambda s: s["cluster"]["store_healthy"], timeout=slack(NODE_TTL))
        again = [RawClient(a.port), RawClient(c.port)]
        live += again
        assert again[0].connect("kept-0") == 0
        assert again[1].connect("kept-0") == 0  # a cross-node takeover on the new store
        wait_until(lambda: server_side(a.port, "ESTABLISHED") == 0, slack(1), "taken over")
        assert established(a, b, c) == 1
    finally:
        for client in live:
            client.close()


def concurrent_connects(clients: list[RawClient], client_id: str) -> list[Any]:
    """Every client sends CONNECT for ``client_id`` at once (threads released together);
    each one's CONNACK code, or the name of the error that ended it."""
    codes: list[Any] = [None] * len(clients)
    go = threading.Event()

    def hello(i: int) -> None:
        go.wait(5)
        try:
            codes[i] = clients[i].connect(client_id, keepalive=60)
        except (OSError, EOFError, AssertionError) as exc:
            codes[i] = type(exc).__name__

    threads = [threading.Thread(target=hello, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    go.set()
    for thread in threads:
        thread.join(slack(20))
    return codes


@pytest.mark.parametrize("flapping", [False, True], ids=["no-flapping", "flapping"])
def test_one_winner_among_concurrent_connects_of_one_client_id(
    start_gateway: Callable[..., RunningGateway], redis_server: RedisServer, flapping: bool
) -> None:
    # With flapping detection on (the default), 30 CONNECTs of one id in a second pass the
    # cluster-wide limit: the claims past it are refused, and the session the earlier ones
    # settled on must stay (a refused claim displaces nothing). A new id per round: the
    # first round bans its id for minutes, by design.
    extra = () if flapping else ("--no-flapping",)
    nodes = start_nodes(start_gateway, redis_server.url, extra=extra)
    for round_ in range(3):
        clients = [RawClient(nodes[i % 3].port) for i in range(30)]
        codes = concurrent_connects(clients, f"contested-{round_}")
        try:
            assert any(code == 0 for code in codes), codes
            wait_until(lambda: established(*nodes) == 1, slack(3), f"round {round_}")
            time.sleep(0.3)
            assert established(*nodes) == 1
            owned = sum(node.status()["cluster"]["owned"] for node in nodes)
            assert owned == 1
            assert sum(node.status()["sessions"] for node in nodes) == 1
        finally:
            for client in clients:
                client.close()
        wait_until(lambda: established(*nodes) == 0, slack(3), "clients closed")


def test_a_killed_node_s_devices_get_in_elsewhere_at_once(
    start_gateway: Callable[..., RunningGateway], redis_server: RedisServer
) -> None:
    a, b, _ = start_nodes(start_gateway, redis_server.url)
    victims = [RawClient(a.port) for _ in range(5)]
    try:
        for n, client in enumerate(victims):
            assert client.connect(f"orphan-{n}") == 0
        _stop(a.proc, signal.SIGKILL)
        for n in range(len(victims)):
            again = RawClient(b.port)
            try:
                started = time.monotonic()
                assert again.connect(f"orphan-{n}") == 0
                assert time.monotonic() - started < slack(1.0)
            finally:
                again.close()
    finally:
        for client in victims:
            client.close()


def test_a_node_cut_off_from_the_store_alone_stops_serving_while_the_others_go_on(
    start_gateway: Callable[..., RunningGateway], redis_server: RedisServer
) -> None:
    with TcpForwarder("127.0.0.1", redis_server.port) as path:
        cut = f"redis://127.0.0.1:{path.port}/0"
        a, b, _ = start_nodes(start_gateway, redis_server.url, 3, cut)
        on_a, on_b = RawClient(a.port), RawClient(b.port)
        try:
            assert on_a.connect("pump-a") == 0
            assert on_b.connect("pump-b") == 0
            for mode in (ForwarderMode.BLACKHOLE, ForwarderMode.RESET):
                path.mode = mode
                started = time.monotonic()
                on_a.closed_by_gateway(timeout=slack(NODE_TTL + 3))
                assert time.monotonic() - started < slack(NODE_TTL + 1.5)
                refused = RawClient(a.port)
                try:
                    assert refused.connect("pump-x") == mq.ConnackCode.SERVER_UNAVAILABLE
                finally:
                    refused.close()
                # The device moves to B, which serves it, and B's own device never noticed.
                on_a.close()
                on_a = RawClient(b.port)
                assert on_a.connect("pump-a") == 0
                assert server_side(b.port, "ESTABLISHED") == 2
                on_b.send(mq.Pingreq())
                assert isinstance(on_b.packet(), mq.Pingresp)
                path.mode = ForwarderMode.PASS
                a.wait_status(lambda s: s["cluster"]["store_healthy"], timeout=slack(NODE_TTL + 2))
                on_a.close()
                on_a = RawClient(a.port)
                assert on_a.connect("pump-a") == 0  # A serves again, taking it from B
                wait_until(lambda: server_side(b.port, "ESTABLISHED") == 1, slack(1), "moved")
            assert a.status()["closed"]["OWNERSHIP_LOST"] == 2
        finally:
            on_a.close()
            on_b.close()


def test_workers_share_one_port_each_with_its_own_status_page(
    start_gateway: Callable[..., RunningGateway], redis_server: RedisServer
) -> None:
    base = free_ports_in_a_row(3)
    gw = start_gateway(
        "--workers", "3", "--cluster", redis_server.url, "--node-id", "host1",
        "--status-port", str(base),
    )  # fmt: skip
    pages = [base + i for i in range(3)]
    statuses = [plain_status(port) for port in pages]
    assert [s["node_id"] for s in statuses] == ["host1-w1", "host1-w2", "host1-w3"]
    listeners = [r for r in census(gw.port).sockets if r.state == "LISTEN"]
    assert len(listeners) == 3
    clients = [RawClient(gw.port) for _ in range(30)]
    try:
        for n, client in enumerate(clients):
            assert client.connect(f"spread-{n}") == 0
        per_worker = [plain_status(port)["sessions"] for port in pages]
        assert sum(per_worker) == 30
        assert sum(1 for n in per_worker if n) >= 2, per_worker  # the kernel spread them
        # The same client ids again, landing on whichever worker: one socket each remains.
        again = [RawClient(gw.port) for _ in range(30)]
        clients += again
        for n, client in enumerate(again):
            assert client.connect(f"spread-{n}") == 0
        wait_until(lambda: server_side(gw.port, "ESTABLISHED") == 30, slack(2), "takeovers")
    finally:
        for client in clients:
            client.close()
    assert _stop(gw.proc) == 0


def free_ports_in_a_row(count: int) -> int:
    """A port P such that P .. P + count - 1 are free on loopback now (the workers' status
    pages); on a busy machine a random port's neighbour is often some client's ephemeral port."""
    for _ in range(100):
        base = plain.free_port()
        probes = []
        try:
            for port in range(base, base + count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        return base
    raise AssertionError(f"no {count} free ports in a row in 100 tries")


def plain_status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as reply:
        result: dict[str, Any] = json.load(reply)
    return result


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cluster", "redis://127.0.0.1:1/0", "--node-ttl", "1", "--store-timeout", "0.6"],
         "store_timeout"),
        (["--cluster", "http://127.0.0.1:6379"], "--cluster takes redis://"),
        (["--node-id", "lonely"], "--node-id needs --cluster"),
    ],
)  # fmt: skip
def test_bad_cluster_options_are_one_line_errors(
    users_file: Any, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gateway_app.main(["--users", str(users_file), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err

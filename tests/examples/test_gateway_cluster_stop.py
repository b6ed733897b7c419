"""How a gateway node leaves the cluster: a SIGTERMed node deletes its lease and releases its
sessions' records (only those still its own); a SIGKILLed node's records are collected by the
survivors once its lease is gone. Real gateway processes on a throwaway redis-server, on every
backend (asyncio and uvloop carry connections natively, trio on keepconn's own socket stream).
"""

from __future__ import annotations

import ast
import signal
import time
from collections.abc import Callable

import anyio
import coredis
import pytest

from device_gateway import mqtt_codec as mq
from keepconn.testing import RedisServer
from tests.examples import test_gateway as plain
from tests.examples.test_gateway import RawClient, RunningGateway, _stop
from tests.timing import slack

pytestmark = pytest.mark.timeout(120)

users_file = plain.users_file
start_gateway = plain.start_gateway

NODE_TTL = 3.0
BACKENDS = ["asyncio", "uvloop", "trio"]
#: What a node logs when it could not give up its lease or subscription at shutdown.
LEAVE_FAILED = ("lease not given up", "leave:", "subscription lost")


def records(url: str) -> dict[str, str]:
    """Every ``keepconn:`` string key of the store and its value, read with a fresh client."""

    async def read() -> dict[str, str]:
        client: coredis.Redis[str] = coredis.Redis.from_url(url, decode_responses=True)
        async with client:
            found: dict[str, str] = {}
            async for key in client.scan_iter(match="keepconn:*"):
                if await client.type(key) == "string":
                    value = await client.get(key)
                    if value is not None:
                        found[key] = value
            return found

    return anyio.run(read)


def owners(url: str) -> dict[str, str]:
    """client id -> node, from the owner records (the gateway's identity is (user, client id),
    its key that tuple's str())."""
    return {
        ast.literal_eval(key.removeprefix("keepconn:owner:"))[1]: value.split("\t")[1]
        for key, value in records(url).items()
        if key.startswith("keepconn:owner:")
    }


def start_node(
    start: Callable[..., RunningGateway], url: str, name: str, backend: str
) -> RunningGateway:
    node = start(
        "--cluster", url,
        "--node-id", name,
        "--node-ttl", str(NODE_TTL),
        "--store-timeout", "0.5",
        "--shutdown-grace", "0.5",
        backend=backend,
    )  # fmt: skip
    node.wait_status(lambda s: s["cluster"]["store_healthy"], timeout=slack(10))
    return node


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, url: str) -> float:
    """Poll ``predicate`` (bounded by ``timeout``); return the seconds it took. The failure
    shows the store's keys."""
    started = time.monotonic()
    while not predicate():
        elapsed = time.monotonic() - started
        assert elapsed < timeout, f"{what}: not within {timeout:.1f} s: {records(url)}"
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sigtermed_node_gives_up_its_lease_and_only_its_own_records(
    start_gateway: Callable[..., RunningGateway], redis_server: RedisServer, backend: str
) -> None:
    url = redis_server.url
    a = start_node(start_gateway, url, "node-a", backend)
    b = start_node(start_gateway, url, "node-b", backend)
    clients = [RawClient(a.port) for _ in range(4)] + [RawClient(b.port)]
    moved = RawClient(b.port)
    try:
        for n, client in enumerate(clients[:4]):
            assert client.connect(f"dev-{n}") == 0
        assert clients[4].connect("dev-b") == 0
        # dev-0 moves to B: A's record of it is overwritten, A's connection reset.
        assert moved.connect("dev-0") == 0
        clients[0].closed_by_gateway(timeout=slack(2))
        wait_for(
            lambda: owners(url)
            == {"dev-0": "node-b", "dev-1": "node-a", "dev-2": "node-a", "dev-3": "node-a",
                "dev-b": "node-b"},
            slack(3),
            "the records",
            url,
        )  # fmt: skip
        assert "keepconn:node:node-a" in records(url)

        assert _stop(a.proc, signal.SIGTERM) == 0
        # Gone the moment the process has exited: nothing waits for the lease to expire.
        left = records(url)
        assert "keepconn:node:node-a" not in left
        assert "keepconn:node:node-b" in left
        assert owners(url) == {"dev-0": "node-b", "dev-b": "node-b"}
        log = a.log.read_text()
        assert "SIGTERM: shutting down" in log
        assert not [line for line in log.splitlines() if any(s in line for s in LEAVE_FAILED)], log
        # B's devices never noticed.
        for client in (moved, clients[4]):
            client.send(mq.Pingreq())
            assert isinstance(client.packet(timeout=slack(2)), mq.Pingresp)
    finally:
        for client in [*clients, moved]:
            client.close()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_sigkilled_nodes_records_are_collected_once_its_lease_is_gone(
    start_gateway: Callable[..., RunningGateway], redis_server: RedisServer, backend: str
) -> None:
    url = redis_server.url
    doomed = start_node(start_gateway, url, "doomed", backend)
    survivor = start_node(start_gateway, url, "survivor", backend)
    clients = [RawClient(doomed.port) for _ in range(5)]
    kept = RawClient(survivor.port)
    try:
        for n, client in enumerate(clients):
            assert client.connect(f"gone-{n}") == 0
        assert kept.connect("kept") == 0
        wait_for(lambda: len(owners(url)) == 6, slack(3), "the records", url)
        _stop(doomed.proc, signal.SIGKILL)
        killed = time.monotonic()
        # These devices never come back; their records go once the lease has expired (within
        # node_ttl) and a collector step (one a second, cluster-wide) has passed over them.
        wait_for(lambda: owners(url) == {"kept": "survivor"}, NODE_TTL + slack(4), "collected", url)
        # Not before the lease can have expired (its last renewal was within node_ttl / 8).
        assert time.monotonic() - killed >= NODE_TTL * 7 / 8 - 0.1
        status = survivor.wait_status(lambda s: s["cluster"]["records_collected"] == 5)
        assert status["cluster"]["owned"] == 1
        kept.send(mq.Pingreq())
        assert isinstance(kept.packet(timeout=slack(2)), mq.Pingresp)
    finally:
        for client in [*clients, kept]:
            client.close()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_node_stopped_while_the_store_is_stalled_still_exits_promptly(
    start_gateway: Callable[..., RunningGateway], redis_server: RedisServer, backend: str
) -> None:
    url = redis_server.url
    node = start_node(start_gateway, url, "node-a", backend)
    client = RawClient(node.port)
    try:
        assert client.connect("dev-0") == 0
        redis_server.pause()  # SIGSTOP: connections stay up, nothing answers
        try:
            started = time.monotonic()
            assert _stop(node.proc, signal.SIGTERM) == 0
            # The grace (0.5 s), then one release and the leave, each cut at store_timeout.
            assert time.monotonic() - started < slack(4)
        finally:
            redis_server.resume()
        assert "lease not given up at shutdown" in node.log.read_text()
    finally:
        client.close()

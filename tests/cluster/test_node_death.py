"""A node killed with SIGKILL: its lease is gone within node_ttl, and its devices get in
elsewhere at once (nobody waits on the dead node)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from keepconn.testing import RedisServer
from tests.cluster.nodes import cluster, redis_client
from tests.lineapp import Client
from tests.timing import slack

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
TTL = 2.0


def start_node(redis: RedisServer, node_id: str) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.cluster.node_main", redis.url, node_id, str(TTL)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # blocks until the node serves (or dies)
    if not line.startswith("PORT "):
        process.kill()
        process.wait()
        raise AssertionError(f"node did not start: {line!r}")
    return process, int(line.split()[1])


async def test_a_killed_nodes_lease_goes_and_its_devices_get_in_elsewhere(
    redis_server: RedisServer,
) -> None:
    process, port = start_node(redis_server, "doomed")
    try:
        async with cluster(redis_server, 1, node_ttl=TTL) as (survivor,):
            devices = []
            with anyio.fail_after(slack(5)):
                while True:  # the node refuses hellos until its first renewal
                    client = await Client.connect(port)
                    if await client.hello("dev0") == b"OK":
                        break
                    await client.aclose()
                    await anyio.sleep(0.05)
            devices.append(client)
            for i in range(1, 5):
                client = await Client.connect(port)
                assert await client.hello(f"dev{i}") == b"OK"
                devices.append(client)
            os.kill(process.pid, signal.SIGKILL)
            killed = time.monotonic()
            process.wait(timeout=10)
            # Its devices reconnect to the survivor and get in at once.
            for i in range(5):
                start = time.perf_counter()
                moved = await Client.connect(survivor.port)
                assert await moved.hello(f"dev{i}") == b"OK"
                assert time.perf_counter() - start < slack(0.1)
                await moved.aclose()
            # Its lease is gone within node_ttl of its death.
            async with redis_client(redis_server) as redis:
                with anyio.fail_after(TTL + slack(1)):
                    while await redis.exists(["keepconn:node:doomed"]):
                        await anyio.sleep(0.02)
            assert time.monotonic() - killed <= TTL + slack(0.1)
            for client in devices:
                await client.aclose()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()

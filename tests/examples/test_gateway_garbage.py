"""A finished MQTT session is freed by reference counting: the gateway leaves no cycles (its
Device and connection refer to each other) for a full collection to find, however the session
ends. The gateway's GC pacing freezes what survives a storm (GcPacing.freeze) on this promise:
a garbage cycle among frozen objects would be kept until the thaw."""

from __future__ import annotations

import socket
from collections import Counter

import anyio
import pytest

from device_gateway import mqtt_codec as mq
from device_gateway import sessions
from device_gateway.sink import Recorder
from keepconn import CloseReason, ServerConfig
from tests.lineapp import cyclic_garbage, wait_for
from tests.timing import slack

from .test_gateway_delivery import NullSink

pytestmark = pytest.mark.anyio


async def test_a_session_the_device_closed_leaves_no_cyclic_garbage() -> None:
    garbage = await cyclic_garbage_of(200, "device_closed")
    assert sum(garbage.values()) < 200, garbage.most_common(8)


async def test_a_session_taken_over_leaves_no_cyclic_garbage() -> None:
    garbage = await cyclic_garbage_of(200, "taken_over")
    assert sum(garbage.values()) < 200, garbage.most_common(8)


async def test_a_session_reaped_for_silence_leaves_no_cyclic_garbage() -> None:
    garbage = await cyclic_garbage_of(200, "reaped")
    assert sum(garbage.values()) < 200, garbage.most_common(8)


async def test_a_session_closed_for_a_malformed_packet_leaves_no_cyclic_garbage() -> None:
    garbage = await cyclic_garbage_of(200, "malformed")
    assert sum(garbage.values()) < 200, garbage.most_common(8)


async def cyclic_garbage_of(count: int, ending: str) -> Counter[str]:
    """The cyclic garbage (by type) ``count`` sessions leave once they have ended."""
    gateway = sessions.Gateway(
        sessions.Users({"alice": b"s3cret"}),
        Recorder(NullSink()),
        ServerConfig(admission=None, flapping=None),
    )
    devices: list[socket.socket] = []
    async with anyio.create_task_group() as tasks:
        await tasks.start(gateway.recorder.run)
        await tasks.start(gateway.outbound.run)
        [(_, port)] = await tasks.start(gateway.server.serve_tcp, "127.0.0.1", 0)
        server = gateway.server
        try:
            with cyclic_garbage() as garbage:
                try:
                    for i in range(count):
                        # Blocking sockets: loopback connects complete in the kernel, and the
                        # client side makes no garbage of its own.
                        sock = socket.create_connection(("127.0.0.1", port))
                        client_id = "same" if ending == "taken_over" else f"d{i}"
                        # Keepalive 1 s: silent, the session is reaped after 1.5 s.
                        keepalive = 1 if ending == "reaped" else 60
                        hello = mq.Connect(
                            client_id, keepalive=keepalive, username="alice", password=b"s3cret"
                        )
                        sock.sendall(mq.encode(hello))
                        if ending == "malformed":
                            # A PUBLISH whose remaining length takes five bytes.
                            sock.sendall(b"\x30\xff\xff\xff\xff\x01")
                        devices.append(sock)
                    stats = server.stats
                    if ending == "taken_over":
                        await wait_for(lambda: stats().takeovers == count - 1, timeout=slack(10))
                    elif ending == "reaped":
                        idle = CloseReason.IDLE_TIMEOUT
                        await wait_for(lambda: stats().closed[idle] == count, timeout=slack(10))
                    elif ending == "malformed":
                        bad = CloseReason.PROTOCOL_ERROR
                        await wait_for(lambda: stats().closed[bad] == count, timeout=slack(10))
                    else:
                        await wait_for(lambda: len(server.registry) == count, timeout=slack(10))
                finally:
                    for sock in devices:
                        sock.close()
                await wait_for(lambda: not server.connections, timeout=slack(10))
        finally:
            await server.shutdown()
            await gateway.recorder.aclose()
            tasks.cancel_scope.cancel()
    return garbage

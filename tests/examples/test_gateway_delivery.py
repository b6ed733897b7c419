"""Deliveries in process (the Gateway class on a memory sink): they reach subscribers in order,
and a subscriber that stops reading misses messages instead of slowing its publisher down."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.abc
import pytest

from device_gateway import mqtt_codec as mq
from device_gateway import sessions
from device_gateway.sink import Recorder
from keepconn import ServerConfig
from tests.timing import slack

pytestmark = pytest.mark.anyio


class NullSink:
    def write(self, records: Any) -> None:
        pass

    def close(self) -> None:
        pass


class Peer:
    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.decoder = mq.Decoder(mq.Role.CLIENT)
        self.packets: list[mq.Packet] = []

    @classmethod
    async def connect(cls, port: int, client_id: str) -> Peer:
        peer = cls(await anyio.connect_tcp("127.0.0.1", port))
        await peer.send(mq.Connect(client_id, username="alice", password=b"s3cret"))
        assert await peer.packet() == mq.Connack()
        return peer

    async def send(self, packet: mq.Packet) -> None:
        await self.stream.send(mq.encode(packet))

    async def packet(self) -> mq.Packet:
        with anyio.fail_after(slack(10)):
            while not self.packets:
                self.packets.extend(self.decoder.feed(await self.stream.receive()))
        return self.packets.pop(0)


async def test_deliveries_arrive_in_order_and_a_stalled_subscriber_never_stalls_the_publisher() -> (
    None
):
    gateway = sessions.Gateway(
        sessions.Users({"alice": b"s3cret"}),
        Recorder(NullSink()),
        ServerConfig(admission=None, flapping=None),
    )
    async with anyio.create_task_group() as tasks:
        await tasks.start(gateway.recorder.run)
        await tasks.start(gateway.outbound.run)
        [(_, port)] = await tasks.start(gateway.server.serve_tcp, "127.0.0.1", 0)
        reader = await Peer.connect(port, "reader")
        stalled = await Peer.connect(port, "stalled")
        publisher = await Peer.connect(port, "publisher")
        try:
            for peer in (reader, stalled):
                await peer.send(mq.Subscribe(1, [("cmd/#", 0)]))
                assert await peer.packet() == mq.Suback(1, [0])

            # In order, to a subscriber that reads.
            for n in range(50):
                await publisher.send(mq.Publish("cmd/x", b"%d" % n))
            got = [await reader.packet() for _ in range(50)]
            assert [p.payload for p in got if isinstance(p, mq.Publish)] == [
                b"%d" % n for n in range(50)
            ]

            # "stalled" never reads again: far more than its socket buffers and its backlog
            # hold. The publisher is answered all along, and so is the reader.
            payload = b"z" * 20_000
            with anyio.fail_after(slack(30)):
                for n in range(2_000):
                    await publisher.send(mq.Publish("cmd/big", payload))
                    if n % 200 == 0:
                        await publisher.send(mq.Pingreq())
                        assert await publisher.packet() == mq.Pingresp()
                        while (await reader.packet()) != mq.Publish("cmd/big", payload):
                            pass
            assert gateway.dropped > 0
            await publisher.send(mq.Pingreq())
            assert await publisher.packet() == mq.Pingresp()
            assert ("alice", "stalled") in gateway.server.registry
        finally:
            for peer in (reader, stalled, publisher):
                await peer.stream.aclose()
            await gateway.server.shutdown()
            await gateway.recorder.aclose()
            tasks.cancel_scope.cancel()

"""The gateway's recorder: records that arrive together are written together (group commit),
and a recorder that cannot work fails when it is built."""

from __future__ import annotations

import math
from collections.abc import Sequence

import anyio
import anyio.lowlevel
import pytest

from device_gateway.sink import Recorder, Telemetry


class CountingSink:
    """Keeps every batch it is given, as given."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def write(self, records: Sequence[Telemetry]) -> None:
        self.batches.append([r.topic for r in records])

    def close(self) -> None:
        pass


def record(topic: str, qos: int) -> Telemetry:
    return Telemetry(received=0.0, username="u", client_id="c", topic=topic, payload=b"x", qos=qos)


async def store_spread_out(recorder: Recorder, count: int, gap: float) -> None:
    """``count`` QoS 1 records from as many publishers, one every ``gap`` seconds; returns once
    every one is stored (each publisher waits for its own, as a PUBACK does)."""
    async with anyio.create_task_group() as publishers:
        for i in range(count):
            publishers.start_soon(recorder.store, record(f"t/{i}", 1))
            await anyio.sleep(gap)


@pytest.mark.anyio
async def test_records_that_arrive_within_the_linger_share_one_write() -> None:
    # A record a millisecond, as the churn benchmark's fleet sends them: without the linger
    # each came alone to the sink (a thread hand-off and a fsync each).
    sinks: dict[float, CountingSink] = {}
    for linger in (0.05, 0.0):
        sink = sinks[linger] = CountingSink()
        recorder = Recorder(sink, linger=linger)
        async with anyio.create_task_group() as tasks:
            await tasks.start(recorder.run)
            await store_spread_out(recorder, 20, 0.001)
            await recorder.aclose()
        assert sorted(t for batch in sink.batches for t in batch) == sorted(
            f"t/{i}" for i in range(20)
        )
    # 20 records over 20-odd ms, a 50 ms linger: one batch, or two if the loop was slow.
    assert len(sinks[0.05].batches) <= 2, sinks[0.05].batches
    # The control: with no linger the same records take many more writes.
    assert len(sinks[0.0].batches) > 2 * len(sinks[0.05].batches), sinks[0.0].batches


@pytest.mark.anyio
async def test_a_queue_with_room_takes_a_record_without_a_turn_of_the_loop() -> None:
    # QoS 0: append() returns at once while the queue has room (anyio's send() would yield to
    # the event loop first, a task step for every message).
    sink = CountingSink()
    recorder = Recorder(sink, queue_size=4)
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            await anyio.lowlevel.checkpoint()
            turns += 1

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(count_turns)
        await anyio.lowlevel.checkpoint()
        before = turns
        for i in range(4):
            await recorder.append(record(f"q/{i}", 0))
        assert turns == before
        tasks.cancel_scope.cancel()
    async with anyio.create_task_group() as tasks:
        await tasks.start(recorder.run)
        await recorder.aclose()
    assert [t for batch in sink.batches for t in batch] == [f"q/{i}" for i in range(4)]


@pytest.mark.parametrize("linger", [-0.001, math.nan])
def test_an_invalid_linger_fails_when_the_recorder_is_built(linger: float) -> None:
    with pytest.raises(ValueError, match="linger"):
        Recorder(CountingSink(), linger=linger)

"""The pacing of full garbage collections on a real server: a burst of real connections holds
CPython's full collections (which a growth of long-lived objects would otherwise set off), the
burst's end releases them, and the server leaves the collector as it found it."""

from __future__ import annotations

import gc
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import attrs
import pytest

from keepconn import GcPacing, ServerConfig
from tests.lineapp import serving, wait_for
from tests.timing import slack

pytestmark = pytest.mark.anyio

PACING = GcPacing(interval=0.05, busy_rate=20.0, calm=0.3, max_hold=60.0)


@contextmanager
def full_collections() -> Iterator[list[float]]:
    """Every generation-2 collection started while the block runs (one entry each)."""
    started: list[float] = []

    def seen(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and info["generation"] == 2:
            started.append(1.0)

    gc.callbacks.append(seen)
    try:
        yield started
    finally:
        gc.callbacks.remove(seen)


async def grow_long_lived(count: int) -> list[list[int]]:
    """Make ``count`` tracked objects that survive: what a storm's new connections are to the
    collector. Made in chunks with a checkpoint between them, so the pacer keeps ticking."""
    kept: list[list[int]] = []
    while len(kept) < count:
        kept.extend([] for _ in range(20_000))
        await anyio.lowlevel.checkpoint()
    return kept


def connect_steadily(port: int, count: int, per_second: float, done: threading.Event) -> None:
    # Plain connects from a thread: accepted by the server, a burst to its pacer. The sockets
    # stay open until the test ends (they are in their hello: no session needed).
    held = []
    try:
        for _ in range(count):
            try:
                held.append(socket.create_connection(("127.0.0.1", port)))
            except OSError:
                break  # the server is gone (the test ended it mid-burst)
            done.wait(1 / per_second)
        done.wait()
    finally:
        for sock in held:
            sock.close()


@contextmanager
def burst(port: int) -> Iterator[None]:
    """400 connections at 200 a second while the block runs: a 2 s burst, ten times the busy
    rate; closed when the block ends."""
    stop = threading.Event()
    clients = threading.Thread(target=connect_steadily, args=(port, 400, 200.0, stop))
    clients.start()
    try:
        yield
    finally:
        stop.set()
        clients.join()


def holding(server: Any) -> bool:
    """Whether the server's pacer holds full collections now."""
    stats = server.stats().gc_pacing
    return stats is not None and bool(stats.holding)


async def test_a_burst_holds_full_collections_and_its_end_releases_them() -> None:
    normal = gc.get_threshold()
    survivors = max(200_000, len(gc.get_objects()) // 2)
    async with serving(ServerConfig(admission=None, flapping=None, gc_pacing=PACING)) as (
        server,
        port,
    ):
        with full_collections() as seen:
            with burst(port):
                await wait_for(lambda: holding(server), timeout=slack(5))
                assert gc.get_threshold()[:2] == normal[:2]
                assert gc.get_threshold()[2] > 1_000_000
                before = len(seen)
                kept = await grow_long_lived(survivors)
                during = len(seen) - before
                assert holding(server), "the burst went on: the hold must still be on"
            assert during == 0, "a full collection ran in the middle of the burst"
            await wait_for(lambda: not holding(server), timeout=slack(5))
            assert gc.get_threshold() == normal
            # Released, the collection the hold put off runs at once, with no more work to
            # set it off: not at the next burst of allocations.
            assert len(seen) > before, "the release did not run the collection put off"
        stats = server.stats().gc_pacing
        assert stats is not None and stats.holds >= 1 and stats.held_seconds > 0
        del kept


async def burst_until_released(server: Any, port: int) -> list[list[int]]:
    """A burst while the collector's survivors grow: a hold, then its release once the burst
    is over. Returns the survivors."""
    with burst(port):
        await wait_for(lambda: holding(server), timeout=slack(5))
        kept = await grow_long_lived(200_000)
    await wait_for(lambda: not holding(server), timeout=slack(5))
    return kept


async def test_with_freeze_a_release_freezes_the_survivors_and_the_stop_thaws_them() -> None:
    assert gc.get_freeze_count() == 0
    pacing = attrs.evolve(PACING, freeze=True)
    config = ServerConfig(admission=None, flapping=None, gc_pacing=pacing)
    async with serving(config) as (server, port):
        with full_collections() as seen:
            kept = await burst_until_released(server, port)
            # No full collection ran: what survived is frozen instead, at every look, where
            # no collection walks it.
            assert not seen, "a full collection ran"
            assert gc.get_freeze_count() > 200_000
            stats = server.stats().gc_pacing
            assert stats is not None and stats.freezes > 1 and stats.thaws == 0
            # CPython still owes its full collection; it now walks only what came after.
            gc.collect()
            assert gc.get_freeze_count() > 200_000
            # Freed by reference counting, frozen objects leave the permanent generation.
            frozen = gc.get_freeze_count()
            del kept
            assert gc.get_freeze_count() <= frozen - 200_000
    # The server stopped: what it froze is back with CPython's oldest generation.
    assert gc.get_freeze_count() == 0


async def test_with_freeze_a_look_after_thaw_after_thaws_and_collects() -> None:
    pacing = attrs.evolve(PACING, freeze=True, thaw_after=0.001)
    config = ServerConfig(admission=None, flapping=None, gc_pacing=pacing)
    async with serving(config) as (server, port):
        with full_collections() as seen:
            kept = await burst_until_released(server, port)
            assert seen, "the thaw did not run the full collection"
        stats = server.stats().gc_pacing
        # Every look outside the storm thaws (they all come thaw_after or more after the
        # last), none in it.
        assert stats is not None and stats.thaws >= 1 and stats.freezes >= 1
        del kept


async def test_the_server_leaves_the_collector_as_it_found_it_even_mid_hold() -> None:
    normal = gc.get_threshold()
    stop = threading.Event()
    clients: threading.Thread | None = None
    async with serving(ServerConfig(admission=None, flapping=None, gc_pacing=PACING)) as (
        server,
        port,
    ):
        clients = threading.Thread(target=connect_steadily, args=(port, 400, 200.0, stop))
        clients.start()
        held: Callable[[], bool] = lambda: gc.get_threshold()[2] > 1_000_000  # noqa: E731
        await wait_for(held, timeout=slack(5))
    # The server stopped while its pacer held full collections.
    stop.set()
    clients.join()
    assert gc.get_threshold() == normal


async def test_without_pacing_the_collector_is_left_alone() -> None:
    normal = gc.get_threshold()
    async with serving(ServerConfig(admission=None, flapping=None)) as (server, port):
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
        await wait_for(lambda: server.stats().accepted >= 50, timeout=slack(5))
        assert gc.get_threshold() == normal
        assert server.stats().gc_pacing is None
        for sock in socks:
            sock.close()


async def replace_one_for_one(kept: list[list[int]]) -> int:
    """Replace every one of ``kept`` (long-lived objects) with a new one, 500 between two
    sleeps: what a server's traffic does when each message a handler waits for makes a new
    future and frees the one before. Returns the most objects the youngest generation held
    at any sleep."""
    most = 0
    for start in range(0, len(kept), 500):
        for i in range(start, min(start + 500, len(kept))):
            kept[i] = [i]
        most = max(most, len(gc.get_objects(0)))
        await anyio.sleep(0.005)
    return most


@pytest.mark.parametrize("young", [True, False], ids=["young", "not-young"])
async def test_young_collections_at_every_look_bound_the_young_generation(young: bool) -> None:
    kept = [[i] for i in range(40_000)]
    gc.collect()  # long-lived now, in the oldest generation
    pacing = attrs.evolve(PACING, young=young)
    async with serving(ServerConfig(admission=None, flapping=None, gc_pacing=pacing)) as (
        server,
        _,
    ):
        most = await replace_one_for_one(kept)
        assert server.stats().gc_pacing is not None
    if young:
        # A look every 0.05 s: each young collection walks what the sleeps since the last
        # one made (at most about ten of them, 5,000 objects), whatever the count says.
        assert most < 15_000
    else:
        # CPython's count (allocations minus deallocations) never passed its threshold: the
        # new objects piled up in the youngest generation, for one collection to walk.
        assert most > 30_000

"""The pacing of full garbage collections, with explicit time: when a hold begins, when it ends,
and that a storm that lasts cannot hold them for ever."""

from __future__ import annotations

import attrs
import pytest

from keepconn import CollectionPacer, ConfigError, GcPacing

CONFIG = GcPacing(interval=0.25, busy_rate=100.0, calm=1.0, max_hold=10.0)


def ticks(pacer: CollectionPacer, start: float, end: float, rate: float, accepted: int) -> int:
    """Tick every 0.25 s from ``start`` to ``end`` with ``rate`` accepts a second; returns the
    accept count reached."""
    t = start
    while t < end - 1e-9:
        t += 0.25
        accepted += int(rate * 0.25)
        pacer.tick(t, accepted, full_collections=0)
    return accepted


def test_a_storm_holds_full_collections_and_its_end_releases_them() -> None:
    pacer = CollectionPacer(CONFIG)
    assert not pacer.tick(0.0, 0, 0)  # the first look has no rate to judge
    accepted = ticks(pacer, 0.0, 5.0, rate=20, accepted=0)  # an ordinary server's reconnects
    assert not pacer.holding
    assert pacer.tick(5.25, accepted + 100, 0)  # 400 a second: a storm
    assert pacer.holding and pacer.holds == 1
    accepted = ticks(pacer, 5.25, 8.0, rate=2000, accepted=accepted + 100)
    assert pacer.holding
    # 20 a second from 8.0 s on: over, once it has been quiet for `calm` (1 s).
    assert pacer.tick(8.25, accepted + 5, 0)
    assert pacer.tick(8.75, accepted + 15, 0)
    assert not pacer.tick(9.0, accepted + 20, 0)
    stats = pacer.stats(9.0)
    assert (stats.holding, stats.holds, stats.forced) == (False, 1, 0)
    assert stats.held_seconds == pytest.approx(3.75)


def test_a_lull_inside_a_storm_does_not_release_the_hold() -> None:
    # Admission and client backoff pace a storm in waves: a release in a lull would bring the
    # whole pending collection into the storm.
    pacer = CollectionPacer(CONFIG)
    pacer.tick(0.0, 0, 0)
    assert pacer.tick(0.25, 500, 0)
    assert pacer.tick(0.5, 500, 0)  # nothing for a quarter second
    assert pacer.tick(1.0, 505, 0)  # 10 a second for another half
    assert pacer.tick(1.25, 1005, 0)  # the next wave
    assert pacer.tick(2.0, 1010, 0)  # quiet since 1.25 s: 0.75 s, not yet calm
    assert not pacer.tick(2.25, 1011, 0)


def test_the_rate_is_judged_per_tick_not_since_start() -> None:
    # A thousand accepts at start-up, then quiet: the quiet ticks are not a storm.
    pacer = CollectionPacer(CONFIG)
    pacer.tick(0.0, 1000, 0)
    assert not pacer.tick(0.25, 1000, 0)
    assert not pacer.tick(0.5, 1010, 0)  # 40 a second


def test_a_hold_runs_out_and_waits_for_a_full_collection_before_the_next() -> None:
    pacer = CollectionPacer(CONFIG)
    pacer.tick(0.0, 0, 0)
    accepted = 0
    t = 0.0
    held_until = None
    while t < 12.0:
        t += 0.25
        accepted += 500
        if not pacer.tick(t, accepted, full_collections=3) and held_until is None and t > 1:
            held_until = t
    # Held from 0.25 s for max_hold (10 s), then released although the storm goes on.
    assert held_until == pytest.approx(10.25)
    assert pacer.forced == 1 and not pacer.holding
    # Still a storm, no full collection yet: no new hold (garbage stays bounded).
    assert not pacer.tick(t + 0.25, accepted + 500, full_collections=3)
    # CPython ran one: the next tick in the storm may hold again.
    assert pacer.tick(t + 0.5, accepted + 1000, full_collections=4)
    assert pacer.holds == 2


def test_stop_ends_a_hold_and_counts_its_time() -> None:
    pacer = CollectionPacer(CONFIG)
    pacer.tick(0.0, 0, 0)
    assert pacer.tick(1.0, 1000, 0)
    assert pacer.stats(2.0).held_seconds == pytest.approx(1.0)  # the current hold counts
    pacer.stop(3.0)
    assert not pacer.holding
    assert pacer.stats(9.0).held_seconds == pytest.approx(2.0)


def test_without_freeze_every_release_runs_the_collection() -> None:
    pacer = CollectionPacer(CONFIG)
    pacer.tick(0.0, 0, 0)
    assert not pacer.settle(5.0)
    assert not pacer.settle(5000.0)
    stats = pacer.stats(5000.0)
    assert (stats.freezes, stats.thaws) == (0, 0)


def test_with_freeze_releases_freeze_until_the_thaw_is_due() -> None:
    pacer = CollectionPacer(GcPacing(freeze=True, thaw_after=100.0))
    pacer.tick(10.0, 0, 0)  # the first look stands in for the last thaw
    assert pacer.settle(20.0)  # freeze
    assert pacer.settle(109.0)  # 99 s after the start: still freeze
    assert not pacer.settle(110.0)  # 100 s: thaw and collect
    assert pacer.settle(150.0)  # the clock starts again at the thaw
    assert not pacer.settle(210.0)
    stats = pacer.stats(210.0)
    assert (stats.freezes, stats.thaws) == (3, 2)


def test_with_freeze_no_thaw_comes_in_a_storm() -> None:
    pacer = CollectionPacer(attrs.evolve(CONFIG, freeze=True, thaw_after=1.0))
    pacer.tick(0.0, 0, 0)
    assert pacer.tick(1.0, 200, 0)  # 200 accepts a second: a storm
    assert pacer.settle(1.5)  # the thaw is due, but not in the storm: freeze
    pacer.tick(2.0, 200, 0)
    assert not pacer.tick(3.0, 200, 0)  # calm for 1 s: released
    assert not pacer.settle(3.0)  # now the thaw
    stats = pacer.stats(3.0)
    assert (stats.freezes, stats.thaws) == (1, 1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("interval", 0),
        ("busy_rate", -1.0),
        ("max_hold", float("inf")),
        ("max_hold", "30"),
        ("thaw_after", 0),
    ],
)
def test_a_bad_setting_fails_when_built_and_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        GcPacing(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["freeze", "young"])
def test_the_switches_must_be_bools(field: str) -> None:
    with pytest.raises(TypeError, match=field):
        GcPacing(**{field: "yes"})  # type: ignore[arg-type]


def test_young_collections_are_on_by_default() -> None:
    assert GcPacing().young and not GcPacing().freeze

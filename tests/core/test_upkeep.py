"""The server's one timer (keepconn._core.upkeep): how often it wakes, and what each job gets.

Driven as the adapter drives it (reap, let the pacer look, next_wake, wake up a little late), on an
explicit clock: no event loop, no sleeping.
"""

from __future__ import annotations

import pytest

from keepconn import GcPacing
from keepconn._core.gcpacing import CollectionPacer
from keepconn._core.lag import LagGauge
from keepconn._core.registry import SessionRegistry
from keepconn._core.upkeep import MIN_SLEEP, Upkeep

#: How late each simulated wake-up comes: the loop's own small lag.
LATE = 0.0007


def drive(upkeep: Upkeep, seconds: float, *, start: float = 100.0) -> dict[str, list[float]]:
    """Run the timer for ``seconds``: the times it woke, reaped, paced and what it reaped."""
    found: dict[str, list[float]] = {"wakes": [], "paced": [], "reaped": []}
    now = start
    upkeep.start(now)
    while now < start + seconds:
        for session in upkeep.registry.reap(now):
            found["reaped"].append(now - session.deadline)
        if upkeep.pace(now, 0, 0) is not None:
            found["paced"].append(now)
        wake = upkeep.next_wake(now)
        assert wake > now  # nothing here is ever behind
        now = wake + LATE
        upkeep.woke(now)
        found["wakes"].append(now)
    return found


def test_with_the_defaults_the_three_jobs_share_four_wake_ups_a_second() -> None:
    # The server's defaults: reaper resolution 0.25 s, lag samples every 0.25 s, pacer 0.25 s.
    # Three timers of their own woke 4 + 4 + 10 (the old 0.1 s probe) = 18 times a second.
    registry = SessionRegistry(timeout=60.0, resolution=0.25)
    for i in range(50):
        registry.open(i, now=100.0 + i * 0.37, timeout=45.0)
    gauge = LagGauge(0.25)
    upkeep = Upkeep(registry, gauge, CollectionPacer(GcPacing()))
    found = drive(upkeep, 20.0)
    assert len(found["wakes"]) <= 4 * 20 + 2
    # The pacer looked at every wake-up (its interval is the reaper's), the gauge got a sample
    # at each, and no gap between two samples is longer than its interval (plus the lateness).
    assert len(found["paced"]) >= 4 * 20 - 1
    gaps = [b - a for a, b in zip(found["wakes"], found["wakes"][1:], strict=False)]
    assert max(gaps) <= 0.25 + LATE + 1e-9


def test_every_session_is_reaped_within_the_resolution_of_its_deadline() -> None:
    registry = SessionRegistry(timeout=60.0, resolution=0.25)
    for i in range(40):
        registry.open(i, now=100.0 + i * 0.113, timeout=2.0 + (i % 7) * 0.31)
    upkeep = Upkeep(registry, LagGauge(0.1), CollectionPacer(GcPacing(interval=0.4)))
    found = drive(upkeep, 10.0)
    assert len(found["reaped"]) == 40
    assert all(0.0 <= late <= 0.25 + LATE for late in found["reaped"]), found["reaped"]


def test_a_shorter_lag_interval_is_kept_and_the_pacer_keeps_its_own() -> None:
    registry = SessionRegistry(timeout=60.0, resolution=0.25)
    upkeep = Upkeep(registry, LagGauge(0.1), CollectionPacer(GcPacing(interval=1.0)))
    found = drive(upkeep, 10.0)
    gaps = [b - a for a, b in zip(found["wakes"], found["wakes"][1:], strict=False)]
    assert max(gaps) <= 0.1 + LATE + 1e-9
    assert len(found["wakes"]) <= 10 * 10 + 2
    # About once a second: never more than an eighth of the interval early.
    looks = found["paced"]
    assert 9 <= len(looks) <= 12, looks
    assert all(b - a >= 0.875 - 1e-9 for a, b in zip(looks, looks[1:], strict=False)), looks


def test_lateness_is_measured_from_the_wake_up_planned_not_from_the_probe_interval() -> None:
    # The timer means to wake for the reaper 0.1 s before the probe's own deadline; it wakes
    # 0.3 s late: the loop was 0.3 s behind, which the gauge must say.
    registry = SessionRegistry(timeout=60.0, resolution=0.25)
    registry.open("a", now=0.0, timeout=1.1)  # its slot ends at 1.25
    gauge = LagGauge(0.5)
    upkeep = Upkeep(registry, gauge)
    upkeep.start(0.9)  # the probe's deadline: 1.4
    wake = upkeep.next_wake(0.9)
    assert wake == pytest.approx(1.15)  # 0.9 + resolution, before the slot's end
    # Stuck meanwhile: the lag is known before the wake-up comes.
    assert gauge.lag(1.35) == pytest.approx(0.2)
    upkeep.woke(wake + 0.3)
    assert gauge.lag(wake + 0.3) == pytest.approx(0.3)


def test_a_mass_expiry_is_reaped_in_batches_without_sleeping() -> None:
    registry = SessionRegistry(timeout=1.0, resolution=0.1)
    for i in range(100):
        registry.open(i, now=0.0)
    upkeep = Upkeep(registry, LagGauge(0.25))
    upkeep.start(5.0)
    assert len(registry.reap(5.0, limit=30)) == 30
    # Work is due at once: the adapter checkpoints and goes on.
    assert upkeep.next_wake(5.0) <= 5.0
    reaped = 30
    while upkeep.next_wake(5.0) <= 5.0:
        reaped += len(registry.reap(5.0, limit=30))
    assert reaped == 100


def test_an_empty_server_wakes_once_per_resolution_and_never_spins() -> None:
    registry = SessionRegistry(timeout=60.0, resolution=0.25)
    upkeep = Upkeep(registry)
    upkeep.start(0.0)
    assert upkeep.next_wake(0.0) == pytest.approx(0.25)
    assert upkeep.pace(0.0, 0, 0) is None  # no pacer
    # A deadline a hair away is met by a short sleep, not by a wake-up that is already due.
    registry.open("x", now=0.0, timeout=0.2499999)
    assert upkeep.next_wake(0.2499995) >= 0.2499995 + MIN_SLEEP

"""Load shedding on the listen queue's delay and on event-loop lag, through the sans-I/O core
with explicit ``now``."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keepconn import AdmissionConfig, CloseReason, ConfigError
from keepconn._core.admission import AdmissionController
from keepconn._core.lag import LagGauge


def controller(**fields: object) -> AdmissionController:
    # Rate, hello and queue-delay limits off: only the lag can refuse.
    fields.setdefault("max_accept_delay", None)
    config = AdmissionConfig(accept_rate=None, max_pending_hellos=None, **fields)  # type: ignore[arg-type]
    return AdmissionController(config, rng=random.Random(7))


def test_a_gauge_nobody_feeds_reads_no_lag() -> None:
    gauge = LagGauge(0.1)
    assert gauge.lag(1e9) == 0.0
    assert gauge.next_deadline() == math.inf


def test_the_gauge_measures_a_late_wake_up_and_an_overdue_one() -> None:
    gauge = LagGauge(0.1)
    gauge.start(10.0)
    assert gauge.next_deadline() == pytest.approx(10.1)
    assert gauge.tick(10.1) == pytest.approx(0.0)
    # The loop is stuck: the probe has not woken, but the lag is known to be at least this.
    assert gauge.lag(12.2) == pytest.approx(2.0)
    # It wakes 2.4 s late; until its next wake-up the gauge says so.
    assert gauge.tick(12.6) == pytest.approx(2.4)
    assert gauge.lag(12.6) == pytest.approx(2.4)
    assert gauge.lag(12.69) == pytest.approx(2.4)
    assert gauge.peak == pytest.approx(2.4)
    # Back on time: the lag is gone at once, the peak stays.
    assert gauge.tick(12.7) == pytest.approx(0.0)
    assert gauge.lag(12.75) == 0.0
    assert gauge.peak == pytest.approx(2.4)


def test_an_early_timer_is_no_lag() -> None:
    gauge = LagGauge(0.5)
    gauge.start(0.0)
    assert gauge.tick(0.499) == 0.0
    assert gauge.lag(0.5) == 0.0


def test_connections_are_refused_while_the_loop_is_behind_and_admitted_after() -> None:
    admission = controller(max_loop_lag=1.0, lag_probe_interval=0.1)
    gauge = admission.lag_gauge
    assert gauge is not None
    gauge.start(0.0)
    assert gauge.tick(0.1) == 0.0
    assert admission.admit(0.15).admitted
    # A 3 s stall: what is accepted right after it, before the probe's turn, is refused...
    refused = admission.admit(3.2)
    assert not refused.admitted
    assert (refused.reason, refused.limit) == (CloseReason.OVERLOADED, "loop_lag")
    # ...told to come back after about as long as the loop was behind...
    assert refused.retry_after is not None and 3.0 * 0.9 <= refused.retry_after <= 3.0 * 1.1
    # ...and so is what comes after the probe measured it, until it measures the loop on time.
    gauge.tick(3.2)
    assert not admission.admit(3.25).admitted
    gauge.tick(3.3)
    assert admission.admit(3.31).admitted
    stats = admission.stats(3.31)
    assert stats.refused["loop_lag"] == 2
    assert stats.admitted == 2
    assert stats.loop_lag == 0.0
    assert stats.loop_lag_peak == pytest.approx(3.0)


def test_a_lag_at_the_limit_is_not_over_it() -> None:
    admission = controller(max_loop_lag=0.5, lag_probe_interval=0.1)
    gauge = admission.lag_gauge
    assert gauge is not None
    gauge.start(0.0)
    gauge.tick(0.6)  # exactly 0.5 s late
    assert admission.admit(0.6).admitted


def test_a_refusal_for_lag_takes_no_token() -> None:
    config = AdmissionConfig(accept_rate=1.0, accept_burst=1, max_loop_lag=0.5)
    admission = AdmissionController(config, rng=random.Random(1))
    gauge = admission.lag_gauge
    assert gauge is not None
    gauge.start(0.0)
    gauge.tick(2.0)
    assert admission.admit(2.0).limit == "loop_lag"
    gauge.tick(2.1)
    assert admission.admit(2.1).admitted  # the bucket's one token was still there


def test_off_means_no_gauge_and_no_refusal() -> None:
    admission = controller(max_loop_lag=None)
    assert admission.lag_gauge is None
    assert admission.admit(1e6).admitted
    assert admission.stats(1e6).loop_lag == 0.0
    assert AdmissionConfig.unlimited().max_loop_lag is None


def test_the_defaults_shed_at_one_second() -> None:
    config = AdmissionConfig()
    assert (config.max_loop_lag, config.lag_probe_interval) == (1.0, 0.25)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"max_loop_lag": 0}, "max_loop_lag must be in (0, inf)"),
        ({"max_loop_lag": -1.0}, "max_loop_lag must be in (0, inf)"),
        ({"max_loop_lag": math.inf}, "max_loop_lag must be finite"),
        ({"lag_probe_interval": 0}, "lag_probe_interval must be in (0, 10]"),
        ({"lag_probe_interval": 11.0}, "lag_probe_interval must be in (0, 10]"),
        ({"max_loop_lag": 0.05}, "lag_probe_interval must be <= max_loop_lag (0.05)"),
    ],
)
def test_bad_lag_settings_fail_when_built_naming_the_field(
    fields: dict[str, object], words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        AdmissionConfig(**fields)  # type: ignore[arg-type]
    assert words in str(caught.value)


@given(
    interval=st.floats(0.01, 1.0),
    limit=st.floats(0.05, 5.0),
    delays=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=50),
)
def test_refused_exactly_while_the_known_lag_exceeds_the_limit(
    interval: float, limit: float, delays: list[float]
) -> None:
    """Whatever the probe's wake-ups: a connection is refused for lag if and only if the last
    wake-up was late by more than the limit, or the next one is overdue by more; the measured
    lag is never negative, and a probe always on time never refuses anything."""
    limit = max(limit, interval)
    admission = controller(max_loop_lag=limit, lag_probe_interval=interval)
    gauge = admission.lag_gauge
    assert gauge is not None
    now = 0.0
    gauge.start(now)
    last = 0.0
    for delay in delays:
        due = gauge.next_deadline()
        # Half-way through the wait (the accept loop's turn, before the probe's):
        probe_at = due + delay
        midway = now + (probe_at - now) / 2
        expected = max(last, midway - due)
        assert gauge.lag(midway) >= 0.0
        assert admission.admit(midway).admitted == (expected <= limit)
        now = probe_at
        last = gauge.tick(now)
        assert last == pytest.approx(delay, abs=1e-6)
        assert admission.admit(now).admitted == (last <= limit)
    assert gauge.peak == pytest.approx(max(delays), abs=1e-6)


@given(st.lists(st.floats(0.0, 0.05), min_size=1, max_size=50))
def test_a_probe_on_time_never_refuses(jitters: list[float]) -> None:
    admission = controller(max_loop_lag=0.1, lag_probe_interval=0.1)
    gauge = admission.lag_gauge
    assert gauge is not None
    gauge.start(0.0)
    for jitter in jitters:
        now = gauge.next_deadline() + jitter
        assert admission.admit(now).admitted
        gauge.tick(now)
        assert admission.admit(now).admitted
    assert admission.stats(0.0).refused["loop_lag"] == 0


def test_a_connection_that_waited_too_long_in_the_listen_queue_is_refused() -> None:
    config = AdmissionConfig(max_accept_delay=2.0, accept_rate=1.0, accept_burst=1)
    admission = AdmissionController(config, rng=random.Random(3))
    stale = admission.admit(10.0, waited=2.5)
    assert (stale.admitted, stale.reason, stale.limit) == (
        False,
        CloseReason.OVERLOADED,
        "accept_delay",
    )
    # Come back after about as long as the queue kept it.
    assert stale.retry_after is not None and 2.5 * 0.9 <= stale.retry_after <= 2.5 * 1.1
    # At the limit is not over it, and the refusal took no token: the fresh one gets it.
    assert admission.admit(10.0, waited=2.0).admitted
    stats = admission.stats(10.0)
    assert stats.refused["accept_delay"] == 1 and stats.admitted == 1


def test_the_queue_delay_limit_is_off_with_none_and_on_by_default() -> None:
    assert AdmissionConfig().max_accept_delay == 2.0
    assert AdmissionConfig.unlimited().max_accept_delay is None
    admission = AdmissionController(AdmissionConfig(max_accept_delay=None, accept_rate=None))
    assert admission.admit(0.0, waited=1e6).admitted
    with pytest.raises(ConfigError, match="max_accept_delay must be in"):
        AdmissionConfig(max_accept_delay=0)


@given(st.floats(0.001, 60.0), st.floats(0.0, 120.0))
def test_refused_for_queue_delay_exactly_when_it_waited_longer(limit: float, waited: float) -> None:
    config = AdmissionConfig(
        max_accept_delay=limit, accept_rate=None, max_pending_hellos=None, max_loop_lag=None
    )
    decision = AdmissionController(config, rng=random.Random(0)).admit(0.0, waited)
    assert decision.admitted == (waited <= limit)
    if not decision.admitted:
        assert decision.limit == "accept_delay"
        assert decision.retry_after is not None
        assert config.retry_after_min <= decision.retry_after <= config.retry_after_max

"""Admission control through the sans-I/O core, with explicit times."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keepconn import (
    AdmissionConfig,
    AdmissionController,
    CloseReason,
    ConfigError,
    TokenBucket,
)

# -- token bucket -----------------------------------------------------------------------------


def test_bucket_starts_full_then_refills_at_rate() -> None:
    bucket = TokenBucket(10.0, 3)
    assert [bucket.try_take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after(0.0) == pytest.approx(0.1)
    assert not bucket.try_take(0.05)
    assert bucket.try_take(0.1)
    assert not bucket.try_take(0.1)


def test_bucket_never_holds_more_than_burst() -> None:
    bucket = TokenBucket(10.0, 3)
    assert bucket.try_take(0.0)
    # A long quiet spell refills to the burst, not beyond.
    assert bucket.available(100.0) == 3.0
    assert [bucket.try_take(100.0) for _ in range(4)] == [True, True, True, False]


def test_bucket_takes_several_tokens() -> None:
    bucket = TokenBucket(2.0, 4)
    assert bucket.try_take(0.0, 3)
    assert not bucket.try_take(0.0, 2)
    assert bucket.retry_after(0.0, 2) == pytest.approx(0.5)
    assert bucket.try_take(0.5, 2)
    assert bucket.available(0.5) == pytest.approx(0.0)


def test_bucket_retry_after_is_zero_when_a_token_is_there() -> None:
    assert TokenBucket(1.0, 1).retry_after(5.0) == 0.0


def test_bucket_time_stepping_back_grants_nothing_extra() -> None:
    bucket = TokenBucket(1.0, 1)
    assert bucket.try_take(10.0)
    assert not bucket.try_take(9.0)
    assert not bucket.try_take(10.5)
    assert bucket.try_take(11.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rate": 0.0, "burst": 1}, "rate"),
        ({"rate": -1.0, "burst": 1}, "rate"),
        ({"rate": float("inf"), "burst": 1}, "rate"),
        ({"rate": 1.0, "burst": 0}, "burst"),
        ({"rate": 1.0, "burst": 1.5}, "burst"),
        ({"rate": "1", "burst": 1}, "rate"),
    ],
)
def test_bucket_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field} must"):
        TokenBucket(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [0, 4, 1.0, True])
def test_bucket_rejects_impossible_takes(n: object) -> None:
    bucket = TokenBucket(1.0, 3)
    with pytest.raises(ConfigError, match="^n must"):
        bucket.try_take(0.0, n)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="^n must"):
        bucket.retry_after(0.0, n)  # type: ignore[arg-type]


rates = st.floats(min_value=0.01, max_value=1e5, allow_nan=False, allow_infinity=False)
bursts = st.integers(min_value=1, max_value=50)
gaps = st.lists(st.floats(min_value=0.0, max_value=2.0), min_size=1, max_size=200)


@given(rate=rates, burst=bursts, gaps=gaps)
def test_bucket_never_grants_more_than_rate_times_elapsed_plus_burst(
    rate: float, burst: int, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate, burst)
    now = 1000.0
    granted: list[float] = []
    for gap in gaps:
        now += gap
        while bucket.try_take(now):
            granted.append(now)
    # Every interval between two grants (inclusive) holds at most rate * length + burst grants.
    for i, start in enumerate(granted):
        for j in range(i, len(granted)):
            count = j - i + 1
            assert count <= rate * (granted[j] - start) + burst + 1e-6 * count


@given(rate=rates, burst=bursts, start=st.floats(0.0, 1e6), takes=st.integers(1, 60))
def test_bucket_retry_after_is_exact(rate: float, burst: int, start: float, takes: int) -> None:
    bucket = TokenBucket(rate, burst)
    now = start
    for _ in range(takes):
        wait = bucket.retry_after(now)
        assert wait >= 0.0
        if wait > 0.0:
            assert not bucket.try_take(now)
        now += wait
        assert bucket.try_take(now)


# -- configuration ----------------------------------------------------------------------------


def test_default_config() -> None:
    cfg = AdmissionConfig()
    assert cfg.max_sessions is None
    assert cfg.accept_rate == 1000.0
    assert cfg.accept_burst == 3000
    # The slowloris test holds 2,000 hello-less connections: the cap must leave room above them,
    # and above a legitimate burst, so a restart storm never sheds its own hellos.
    assert cfg.max_pending_hellos is not None
    assert cfg.max_pending_hellos > max(2000, cfg.accept_burst)
    assert cfg.shed_oldest_hello


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_sessions": 0}, "max_sessions"),
        ({"max_sessions": 1.5}, "max_sessions"),
        ({"accept_rate": 0}, "accept_rate"),
        ({"accept_rate": float("nan")}, "accept_rate"),
        ({"accept_burst": 0}, "accept_burst"),
        ({"max_pending_hellos": 0}, "max_pending_hellos"),
        ({"shed_oldest_hello": 1}, "shed_oldest_hello"),
        ({"retry_after_min": 0.0}, "retry_after_min"),
        ({"retry_after_max": -1.0}, "retry_after_max"),
        ({"retry_after_min": 10.0, "retry_after_max": 5.0}, "retry_after_max"),
        ({"retry_after_jitter": 1.0}, "retry_after_jitter"),
        ({"retry_after_jitter": -0.1}, "retry_after_jitter"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises((ConfigError, TypeError), match=field):
        AdmissionConfig(**kwargs)  # type: ignore[arg-type]


def test_controller_rejects_a_wrong_config() -> None:
    with pytest.raises(TypeError, match="AdmissionConfig"):
        AdmissionController({"accept_rate": 1.0})  # type: ignore[arg-type]


# -- controller -------------------------------------------------------------------------------


def controller(**kwargs: object) -> AdmissionController:
    return AdmissionController(AdmissionConfig(**kwargs), rng=random.Random(7))  # type: ignore[arg-type]


def test_rate_refusal_is_overloaded_with_a_bounded_hint() -> None:
    ctl = controller(accept_rate=10.0, accept_burst=2)
    assert ctl.admit(0.0).admitted
    assert ctl.admit(0.0).admitted
    refused = ctl.admit(0.0)
    assert not refused.admitted
    assert refused.reason is CloseReason.OVERLOADED
    assert refused.limit == "accept_rate"
    assert refused.detail == f"accept_rate limit reached, retry after {refused.retry_after:.1f} s"
    assert refused.retry_after is not None
    assert 1.0 <= refused.retry_after <= 30.0
    stats = ctl.stats(0.0)
    assert stats.admitted == 2
    assert stats.refused["accept_rate"] == 1
    assert stats.total_refused == 1
    assert ctl.admit(100.0).detail is None


def test_rate_hints_book_future_tokens_so_a_crowd_spreads() -> None:
    ctl = AdmissionController(
        AdmissionConfig(
            accept_rate=100.0, accept_burst=1, retry_after_min=1.0, retry_after_jitter=0.0
        )
    )
    assert ctl.admit(0.0).admitted
    refusals = [ctl.admit(0.0) for _ in range(500)]
    hints = [r.retry_after for r in refusals if r.retry_after is not None]
    assert len(hints) == 500
    # One token every 10 ms from the minimum hint on: 500 refused devices spread over 5 s.
    assert hints[0] == pytest.approx(1.0)
    assert hints[-1] == pytest.approx(1.0 + 499 * 0.01)
    assert hints == sorted(hints)


def test_rate_hints_are_capped_at_the_maximum() -> None:
    ctl = AdmissionController(
        AdmissionConfig(
            accept_rate=1.0, accept_burst=1, retry_after_max=5.0, retry_after_jitter=0.0
        )
    )
    ctl.admit(0.0)
    hints = [ctl.admit(0.0).retry_after for _ in range(20)]
    assert max(h for h in hints if h is not None) == 5.0


@given(seed=st.integers(0, 2**32), jitter=st.floats(0.0, 0.99), n=st.integers(1, 300))
def test_hints_always_within_bounds(seed: int, jitter: float, n: int) -> None:
    cfg = AdmissionConfig(
        accept_rate=50.0,
        accept_burst=1,
        retry_after_min=0.5,
        retry_after_max=3.0,
        retry_after_jitter=jitter,
    )
    ctl = AdmissionController(cfg, rng=random.Random(seed))
    for i in range(n):
        decision = ctl.admit(i * 0.001)
        if not decision.admitted:
            assert decision.retry_after is not None
            assert 0.5 <= decision.retry_after <= 3.0


def test_refusals_take_no_tokens() -> None:
    ctl = controller(accept_rate=1.0, accept_burst=1)
    assert ctl.admit(0.0).admitted
    for _ in range(100):
        assert not ctl.admit(0.5).admitted
    assert ctl.admit(1.0).admitted


def test_unlimited_admits_everything() -> None:
    ctl = AdmissionController(AdmissionConfig.unlimited())
    assert all(ctl.admit(0.0).admitted for _ in range(10_000))
    assert all(ctl.hello_started(i) is None for i in range(10_000))
    assert ctl.admit_session(0.0, 10**9, takeover=False).admitted
    assert ctl.stats(0.0).tokens == float("inf")


def test_naive_fleet_is_admitted_within_30_seconds_by_default() -> None:
    # 15,000 devices that all retry every second, with no backoff and no regard for hints.
    ctl = AdmissionController()
    waiting = 15_000
    now = 0.0
    while waiting:
        waiting -= sum(ctl.admit(now).admitted for _ in range(waiting))
        if waiting:
            now += 1.0
    assert now <= 30.0


def test_slowloris_does_not_lock_out_a_real_device_by_default() -> None:
    # 2,000 hello-less connections opened at once, then a real device right behind them.
    ctl = AdmissionController()
    for i in range(2000):
        assert ctl.admit(0.0).admitted
        assert ctl.hello_started(("slow", i)) is None
    assert ctl.admit(0.001).admitted
    assert ctl.hello_started("device") is None
    assert ctl.hello_finished("device")


def test_hello_cap_sheds_the_oldest_pending_hello() -> None:
    ctl = controller(max_pending_hellos=3)
    assert [ctl.hello_started(c) for c in "abc"] == [None, None, None]
    assert ctl.admit(0.0).admitted
    assert ctl.hello_started("d") == "a"
    assert ctl.hello_finished("b")
    assert ctl.hello_started("e") is None
    assert ctl.hello_started("f") == "c"
    # The shed one is gone: finishing it later is a harmless no-op.
    assert not ctl.hello_finished("a")
    stats = ctl.stats(0.0)
    assert stats.shed_hellos == 2
    assert stats.pending_hellos == 3
    assert ctl.pending_hellos == 3


def test_hello_cap_can_refuse_newcomers_instead() -> None:
    ctl = controller(max_pending_hellos=2, shed_oldest_hello=False)
    for conn in "ab":
        assert ctl.admit(0.0).admitted
        assert ctl.hello_started(conn) is None
    refused = ctl.admit(0.0)
    assert not refused.admitted
    assert refused.limit == "max_pending_hellos"
    assert refused.reason is CloseReason.OVERLOADED
    ctl.hello_finished("a")
    assert ctl.admit(0.0).admitted


def test_hello_finished_is_idempotent() -> None:
    ctl = controller()
    ctl.hello_started("x")
    assert ctl.hello_finished("x")
    assert not ctl.hello_finished("x")
    assert not ctl.hello_finished("never")


def test_session_cap_refuses_new_identities_but_never_takeovers() -> None:
    ctl = controller(max_sessions=2, retry_after_jitter=0.0)
    assert ctl.admit_session(0.0, 1, takeover=False).admitted
    refused = ctl.admit_session(0.0, 2, takeover=False)
    assert not refused.admitted
    assert refused.limit == "max_sessions"
    assert refused.reason is CloseReason.OVERLOADED
    assert refused.retry_after == 30.0
    # A device replacing its own (maybe phantom) session must get in even at a full house.
    assert ctl.admit_session(0.0, 2, takeover=True).admitted
    assert ctl.stats(0.0).refused["max_sessions"] == 1


def test_stats_report_tokens() -> None:
    ctl = controller(accept_rate=10.0, accept_burst=5)
    assert ctl.stats(0.0).tokens == 5.0
    ctl.admit(0.0)
    ctl.admit(0.0)
    assert ctl.stats(0.0).tokens == pytest.approx(3.0)
    assert ctl.stats(0.1).tokens == pytest.approx(4.0)

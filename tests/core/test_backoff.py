"""Reconnect backoff and close jitter, with seeded randomness."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keepconn import Backoff, ConfigError, jitter


def test_defaults_are_grpcs() -> None:
    b = Backoff()
    assert (b.initial, b.multiplier, b.max_delay, b.jitter) == (1.0, 1.6, 120.0, 0.2)
    assert b.strategy == "full"


def test_ceiling_grows_then_caps() -> None:
    b = Backoff()
    assert b.ceiling(0) == 1.0
    assert b.ceiling(1) == pytest.approx(1.6)
    assert b.ceiling(2) == pytest.approx(2.56)
    assert b.ceiling(11) == 120.0  # 1.6 ** 11 = 175.9
    assert b.ceiling(10**6) == 120.0  # no OverflowError


def test_full_jitter_spreads_from_zero() -> None:
    delays = Backoff().delays(random.Random(1))
    first = [next(Backoff().delays(random.Random(seed))) for seed in range(200)]
    assert 0.0 <= min(first) < 0.1
    assert 0.9 < max(first) <= 1.0
    assert all(0.0 <= d <= 120.0 for d in itertools.islice(delays, 50))


def test_proportional_is_grpc_plus_minus_jitter() -> None:
    b = Backoff(strategy="proportional")
    assert b.bounds(0) == pytest.approx((0.8, 1.2))
    assert b.bounds(50) == (96.0, 120.0)
    state = b.delays(random.Random(3))
    for attempt in range(30):
        low, high = b.bounds(attempt)
        assert low <= state.next_delay() <= high


def test_reset_starts_over() -> None:
    state = Backoff(strategy="proportional", jitter=0.0).delays(random.Random(0))
    assert [state.next_delay() for _ in range(3)] == pytest.approx([1.0, 1.6, 2.56])
    assert state.attempt == 3
    state.reset()
    assert state.attempt == 0
    assert state.next_delay() == 1.0


def test_hint_is_never_undercut() -> None:
    state = Backoff(strategy="proportional", jitter=0.0).delays(random.Random(0))
    assert state.next_delay(hint=7.5) == 7.5
    # A hint shorter than the backoff does not shorten it.
    assert state.next_delay(hint=0.1) == pytest.approx(1.6)
    # A hint beyond the cap is cut to the cap.
    assert state.next_delay(hint=1e9) == 120.0


def test_same_seed_same_delays() -> None:
    a = Backoff().delays(random.Random(42))
    b = Backoff().delays(random.Random(42))
    assert list(itertools.islice(a, 20)) == list(itertools.islice(b, 20))


def test_default_streams_differ() -> None:
    a = list(itertools.islice(Backoff().delays(), 10))
    b = list(itertools.islice(Backoff().delays(), 10))
    assert a != b


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"initial": 0.0}, "initial"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"max_delay": float("inf")}, "max_delay"),
        ({"initial": 10.0, "max_delay": 5.0}, "max_delay"),
        ({"jitter": 1.5}, "jitter"),
        ({"jitter": -0.1}, "jitter"),
        ({"strategy": "equal"}, "strategy"),
    ],
)
def test_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field} must"):
        Backoff(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("hint", [-1.0, float("nan"), float("inf"), "3"])
def test_bad_hint_is_refused(hint: object) -> None:
    with pytest.raises(ConfigError, match="^hint must"):
        Backoff().delays(random.Random(0)).next_delay(hint)  # type: ignore[arg-type]


def test_bad_attempt_is_refused() -> None:
    with pytest.raises(ConfigError, match="^attempt must"):
        Backoff().ceiling(-1)


backoffs = st.builds(
    Backoff,
    initial=st.floats(0.001, 10.0),
    multiplier=st.floats(1.0, 5.0),
    max_delay=st.floats(10.0, 1000.0),
    jitter=st.floats(0.0, 1.0),
    strategy=st.sampled_from(["full", "proportional"]),
)


@given(
    b=backoffs,
    seed=st.integers(0, 2**32),
    hints=st.lists(st.none() | st.floats(0.0, 2000.0), min_size=1, max_size=60),
)
def test_delays_within_bounds_and_hints_respected(
    b: Backoff, seed: int, hints: list[float | None]
) -> None:
    state = b.delays(random.Random(seed))
    for attempt, hint in enumerate(hints):
        assert state.attempt == attempt
        low, high = b.bounds(attempt)
        delay = state.next_delay(hint)
        assert 0.0 <= delay <= b.max_delay
        assert delay >= low
        if hint is None:
            assert delay <= high
        else:
            assert delay >= min(hint, b.max_delay)


@given(b=backoffs, attempts=st.integers(1, 200))
def test_bounds_never_decrease(b: Backoff, attempts: int) -> None:
    previous = (0.0, 0.0)
    for attempt in range(attempts):
        low, high = b.bounds(attempt)
        assert 0.0 <= low <= high <= b.max_delay
        assert low >= previous[0]
        assert high >= previous[1]
        previous = (low, high)


# -- jitter for server-initiated closes -------------------------------------------------------


def test_jitter_defaults_to_ten_percent() -> None:
    values = [jitter(100.0, rng=random.Random(seed)) for seed in range(500)]
    assert all(90.0 <= v <= 110.0 for v in values)
    assert min(values) < 92.0
    assert max(values) > 108.0


def test_jitter_zero_fraction_is_identity() -> None:
    assert jitter(5.0, 0.0, random.Random(0)) == 5.0


@given(value=st.floats(0.0, 1e7), fraction=st.floats(0.0, 1.0), seed=st.integers(0, 2**32))
def test_jitter_stays_within_fraction(value: float, fraction: float, seed: int) -> None:
    result = jitter(value, fraction, random.Random(seed))
    spread = value * fraction
    assert value - spread - 1e-9 * value <= result <= value + spread + 1e-9 * value


@pytest.mark.parametrize(
    ("args", "field"),
    [((-1.0, 0.1), "value"), ((1.0, 1.5), "fraction"), ((float("nan"), 0.1), "value")],
)
def test_jitter_validation_names_the_field(args: tuple[float, float], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field} must"):
        jitter(*args)

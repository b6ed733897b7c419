"""The heartbeat state machines (Pinger, PingPolicer) and their policies, with explicit times."""

from __future__ import annotations

import itertools

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from keepconn import ActiveHeartbeat, ConfigError, PingAction, Pinger, PingPolicer, PingRateLimit

# -- ActiveHeartbeat ---------------------------------------------------------------------------


def test_timeout_longer_than_the_interval_is_refused_naming_both_fields() -> None:
    with pytest.raises(ConfigError) as info:
        ActiveHeartbeat(interval=4.0, timeout=5.0)
    assert str(info.value) == "timeout (5.0) must not exceed interval (4.0)"
    assert isinstance(info.value, ValueError)


def test_timeout_equal_to_the_interval_is_allowed() -> None:
    beat = ActiveHeartbeat(interval=2.0, timeout=2.0)
    assert (beat.interval, beat.timeout, beat.misses) == (2.0, 2.0, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"interval": 0, "timeout": 0.5}, "interval must be in (0, inf), got 0"),
        ({"interval": -1.0, "timeout": 0.5}, "interval must be in (0, inf), got -1.0"),
        ({"interval": float("inf"), "timeout": 0.5}, "interval must be finite, got inf"),
        ({"interval": 1.0, "timeout": 0}, "timeout must be in (0, inf), got 0"),
        ({"interval": 1.0, "timeout": "0.5"}, "timeout must be a number, got '0.5'"),
        ({"interval": 1.0, "timeout": 0.5, "misses": -1}, "misses must be in [0, inf), got -1"),
        ({"interval": 1.0, "timeout": 0.5, "misses": 1.5}, "misses must be a whole number"),
        ({"interval": 1.0, "timeout": 0.5, "misses": True}, "misses must be a number, got True"),
    ],
)
def test_active_heartbeat_fields_are_validated(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ActiveHeartbeat(**kwargs)  # type: ignore[arg-type]
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    ("interval", "timeout", "misses", "bound"),
    [(10.0, 4.0, 0, 14.0), (10.0, 4.0, 2, 34.0), (0.5, 0.5, 1, 1.5), (30.0, 10.0, 3, 130.0)],
)
def test_detection_bound(interval: float, timeout: float, misses: int, bound: float) -> None:
    beat = ActiveHeartbeat(interval=interval, timeout=timeout, misses=misses)
    assert beat.detection_bound == bound


# -- Pinger ------------------------------------------------------------------------------------


def test_first_ping_is_due_one_interval_after_the_start() -> None:
    pinger = Pinger(ActiveHeartbeat(interval=10.0, timeout=4.0), now=100.0)
    assert pinger.next_deadline() == 110.0
    assert pinger.misses == 0 and pinger.rtt is None
    assert pinger.poll(100.0) is PingAction.WAIT
    assert pinger.poll(109.999) is PingAction.WAIT
    assert pinger.poll(110.0) is PingAction.SEND_PING
    # Until the adapter says the ping went out, it stays due.
    assert pinger.poll(110.5) is PingAction.SEND_PING
    assert pinger.next_deadline() == 110.0


def test_ping_then_answer_then_next_ping() -> None:
    pinger = Pinger(ActiveHeartbeat(interval=10.0, timeout=4.0), now=0.0)
    assert pinger.poll(10.0) is PingAction.SEND_PING
    pinger.ping_sent(10.0)
    # The answer is due at 14; the next ping at 20.
    assert pinger.next_deadline() == 14.0
    assert pinger.poll(10.0) is PingAction.WAIT
    assert pinger.poll(13.999) is PingAction.WAIT
    assert pinger.pong_received(10.25) == 0.25
    assert pinger.rtt == 0.25 and pinger.misses == 0
    assert pinger.next_deadline() == 20.0
    assert pinger.poll(14.0) is PingAction.WAIT
    assert pinger.poll(19.999) is PingAction.WAIT
    assert pinger.poll(20.0) is PingAction.SEND_PING


def test_next_ping_is_counted_from_when_it_was_really_sent() -> None:
    # A late adapter (it polled at 13, not at 10) shifts the schedule, never bunches pings.
    pinger = Pinger(ActiveHeartbeat(interval=10.0, timeout=4.0), now=0.0)
    assert pinger.poll(13.0) is PingAction.SEND_PING
    pinger.ping_sent(13.0)
    assert pinger.next_deadline() == 17.0
    assert pinger.pong_received(13.5) == 0.5
    assert pinger.next_deadline() == 23.0


def test_without_tolerated_misses_the_first_unanswered_ping_is_fatal() -> None:
    beat = ActiveHeartbeat(interval=10.0, timeout=4.0)
    pinger = Pinger(beat, now=0.0)
    assert pinger.poll(10.0) is PingAction.SEND_PING
    pinger.ping_sent(10.0)
    assert pinger.poll(13.999) is PingAction.WAIT
    assert pinger.misses == 0
    assert pinger.poll(14.0) is PingAction.DEAD
    assert pinger.misses == 1
    assert 14.0 == beat.detection_bound


def test_a_spared_peer_gets_one_more_timeout_for_its_answer() -> None:
    # The adapter found unread bytes when poll() said DEAD: the miss is taken back and the
    # answer awaited one more timeout; it resets everything, its absence is fatal again.
    pinger = Pinger(ActiveHeartbeat(interval=10, timeout=5), now=0.0)
    assert pinger.poll(10.0) is PingAction.SEND_PING
    pinger.ping_sent(10.0)
    assert pinger.poll(15.0) is PingAction.DEAD
    pinger.spared(15.0)
    assert pinger.misses == 0 and pinger.next_deadline() == 20.0
    assert pinger.poll(19.9) is PingAction.WAIT
    assert pinger.pong_received(19.9) == pytest.approx(4.9)
    assert pinger.poll(20.0) is PingAction.SEND_PING  # the next ping is due on its schedule
    pinger.ping_sent(20.0)
    assert pinger.poll(25.0) is PingAction.DEAD
    pinger.spared(25.0)
    assert pinger.poll(30.0) is PingAction.DEAD  # still no answer


def test_misses_are_tolerated_and_the_next_one_is_fatal() -> None:
    beat = ActiveHeartbeat(interval=10.0, timeout=4.0, misses=2)
    pinger = Pinger(beat, now=0.0)
    seen: list[tuple[float, PingAction, int]] = []
    now = 0.0
    while True:
        now = pinger.next_deadline()
        action = pinger.poll(now)
        seen.append((now, action, pinger.misses))
        if action is PingAction.SEND_PING:
            pinger.ping_sent(now)
        elif action is PingAction.DEAD:
            break
    assert seen == [
        (10.0, PingAction.SEND_PING, 0),
        (14.0, PingAction.WAIT, 1),
        (20.0, PingAction.SEND_PING, 1),
        (24.0, PingAction.WAIT, 2),
        (30.0, PingAction.SEND_PING, 2),
        # The third unanswered timeout: misses + 1.
        (34.0, PingAction.DEAD, 3),
    ]
    assert now == beat.detection_bound


def test_with_timeout_equal_to_interval_a_miss_and_the_next_ping_fall_together() -> None:
    pinger = Pinger(ActiveHeartbeat(interval=5.0, timeout=5.0, misses=1), now=0.0)
    assert pinger.poll(5.0) is PingAction.SEND_PING
    pinger.ping_sent(5.0)
    assert pinger.next_deadline() == 10.0
    # One poll at 10 both counts the miss and asks for the next ping.
    assert pinger.poll(10.0) is PingAction.SEND_PING
    assert pinger.misses == 1
    pinger.ping_sent(10.0)
    assert pinger.next_deadline() == 15.0
    assert pinger.poll(15.0) is PingAction.DEAD
    assert pinger.misses == 2


def test_an_answer_resets_the_misses_and_measures_the_round_trip() -> None:
    pinger = Pinger(ActiveHeartbeat(interval=10.0, timeout=4.0, misses=1), now=0.0)
    assert pinger.poll(10.0) is PingAction.SEND_PING
    pinger.ping_sent(10.0)
    assert pinger.poll(14.0) is PingAction.WAIT
    assert pinger.misses == 1
    assert pinger.poll(20.0) is PingAction.SEND_PING
    pinger.ping_sent(20.0)
    assert pinger.pong_received(23.5) == 3.5
    assert pinger.misses == 0 and pinger.rtt == 3.5
    # The tolerance is whole again: one more miss is tolerated, as at the start.
    assert pinger.poll(30.0) is PingAction.SEND_PING
    pinger.ping_sent(30.0)
    assert pinger.poll(34.0) is PingAction.WAIT
    assert pinger.misses == 1
    assert pinger.poll(40.0) is PingAction.SEND_PING
    pinger.ping_sent(40.0)
    assert pinger.poll(44.0) is PingAction.DEAD


def test_a_pong_with_no_ping_outstanding_is_ignored() -> None:
    pinger = Pinger(ActiveHeartbeat(interval=10.0, timeout=4.0, misses=1), now=0.0)
    assert pinger.pong_received(1.0) is None
    assert pinger.rtt is None
    pinger.ping_sent(10.0)
    assert pinger.pong_received(11.0) == 1.0
    # A second answer to the same ping is not a second round trip.
    assert pinger.pong_received(11.5) is None
    assert pinger.rtt == 1.0
    # An answer that comes after its ping was counted as missed does not undo the miss.
    pinger.ping_sent(20.0)
    assert pinger.poll(24.0) is PingAction.WAIT
    assert pinger.misses == 1
    assert pinger.pong_received(24.5) is None
    assert pinger.misses == 1 and pinger.rtt == 1.0


# -- the detection promise, for any schedule of answers ----------------------------------------

# Every time is a multiple of 1/4096 s well below 2**40, so sums and comparisons are exact.
_policies = st.builds(
    lambda interval, share, misses: ActiveHeartbeat(
        interval=interval / 64, timeout=max(1, interval * share // 8) / 64, misses=misses
    ),
    st.integers(1, 640),  # interval: 1/64 s to 10 s
    st.integers(1, 8),  # timeout: 1/8 to 8/8 of the interval
    st.integers(0, 4),
)
#: One step per ping: the peer's answer after ``k / 64`` of the timeout (k in [0, 64), so always
#: within it) or None for no answer; and an early poll the adapter makes once before the next
#: deadline (at ``j / 64`` of the time left) or None.
_answer = st.integers(0, 63)
_early = st.none() | st.integers(0, 63)


@attrs.frozen
class Run:
    #: When the Pinger said DEAD, or None if the schedule ran out first.
    dead_at: float | None
    #: When each ping was sent.
    pings: list[float]
    #: The peer's last sign of life: the start, then each answer.
    last_life: float
    #: Pings unanswered in a row at the end.
    unanswered: int
    #: The Pinger's own count at the end.
    misses: int


def drive(
    beat: ActiveHeartbeat, steps: list[tuple[int | None, int | None]], *, then_silent: bool
) -> Run:
    """Run a Pinger the way the adapter does: sleep until next_deadline(), poll, and send a ping
    as soon as one is asked for. Ping number k is answered as ``steps[k]`` says; once the steps
    run out the peer falls silent for good (``then_silent``) or the run ends."""
    pinger = Pinger(beat, now=0.0)
    pings: list[float] = []
    last_life = now = 0.0
    unanswered = 0
    plan = iter(steps)
    while True:
        step = next(plan, None)
        if step is None and not then_silent:
            return Run(None, pings, last_life, unanswered, pinger.misses)
        answer, early = (None, None) if step is None else step
        # Until the next ping is asked for: timeouts of the outstanding one come due first.
        while True:
            deadline = pinger.next_deadline()
            assert deadline >= now
            if early is not None:
                probe = now + (deadline - now) * early / 64
                if probe < deadline:
                    # Polling early is harmless: nothing to do yet, and nothing changes.
                    assert pinger.poll(probe) is PingAction.WAIT
                    assert pinger.next_deadline() == deadline
                early = None
            now = deadline
            action = pinger.poll(now)
            if action is PingAction.DEAD:
                return Run(now, pings, last_life, unanswered, pinger.misses)
            if action is PingAction.SEND_PING:
                break
        pinger.ping_sent(now)
        pings.append(now)
        if answer is None:
            unanswered += 1
            continue
        rtt = beat.timeout * answer / 64
        now += rtt
        assert pinger.pong_received(now) == rtt
        assert pinger.rtt == rtt and pinger.misses == 0
        last_life = now
        unanswered = 0


@given(_policies, st.lists(st.tuples(_answer, _early), min_size=1, max_size=60))
def test_a_peer_answering_every_ping_within_the_timeout_is_never_declared_dead(
    beat: ActiveHeartbeat, steps: list[tuple[int | None, int | None]]
) -> None:
    run = drive(beat, steps, then_silent=False)
    assert run.dead_at is None
    assert len(run.pings) == len(steps)
    # Polled at next_deadline(), the pings go out exactly one interval apart.
    assert run.pings[0] == beat.interval
    assert all(b - a == beat.interval for a, b in itertools.pairwise(run.pings))


@given(_policies)
def test_a_peer_that_never_answers_is_dead_exactly_at_the_detection_bound(
    beat: ActiveHeartbeat,
) -> None:
    run = drive(beat, [], then_silent=True)
    assert run.dead_at == beat.detection_bound
    assert run.unanswered == run.misses == beat.misses + 1
    assert run.pings == [k * beat.interval for k in range(1, beat.misses + 2)]


@given(_policies, st.lists(st.tuples(st.none() | _answer, _early), max_size=40))
def test_dead_exactly_when_misses_plus_one_pings_in_a_row_went_unanswered(
    beat: ActiveHeartbeat, steps: list[tuple[int | None, int | None]]
) -> None:
    # Any mix of answered and unanswered pings, then silence. The invariant, precisely: DEAD
    # comes at the timeout of the first ping that completes a run of misses + 1 unanswered
    # pings in a row, never sooner; so, counted from the peer's last sign of life (the start
    # or its last answer), it comes after more than (misses + 1) intervals of silence and no
    # later than detection_bound.
    run = drive(beat, steps, then_silent=True)
    assert run.dead_at is not None
    assert run.unanswered == run.misses == beat.misses + 1
    assert run.dead_at == run.pings[-1] + beat.timeout
    silence = run.dead_at - run.last_life
    assert (beat.misses + 1) * beat.interval < silence <= beat.detection_bound
    assert all(b - a == beat.interval for a, b in itertools.pairwise(run.pings))


# -- PingRateLimit and PingPolicer -------------------------------------------------------------


def test_ping_rate_limit_defaults_and_validation() -> None:
    limit = PingRateLimit(min_interval=5.0)
    assert (limit.min_interval, limit.max_strikes) == (5.0, 2)
    assert PingRateLimit(min_interval=5.0, max_strikes=0).max_strikes == 0
    cases: list[tuple[dict[str, object], str]] = [
        ({"min_interval": 0}, "min_interval must be in (0, inf), got 0"),
        ({"min_interval": -5.0}, "min_interval must be in (0, inf), got -5.0"),
        ({"min_interval": float("nan")}, "min_interval must be finite, got nan"),
        ({"min_interval": None}, "min_interval must be a number, got None"),
        ({"min_interval": 1.0, "max_strikes": -1}, "max_strikes must be in [0, inf), got -1"),
        ({"min_interval": 1.0, "max_strikes": 2.0}, "max_strikes must be a whole number"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError) as info:
            PingRateLimit(**kwargs)  # type: ignore[arg-type]
        assert str(info.value).startswith(message), str(info.value)


def test_the_first_ping_is_always_allowed() -> None:
    policer = PingPolicer(PingRateLimit(min_interval=10.0, max_strikes=0))
    assert policer.ping(0.0) is True
    assert policer.strikes == 0


def test_strikes_up_to_max_strikes_are_tolerated_and_the_next_closes() -> None:
    policer = PingPolicer(PingRateLimit(min_interval=10.0, max_strikes=2))
    assert policer.ping(0.0) is True
    assert (policer.ping(5.0), policer.strikes) == (True, 1)
    assert (policer.ping(14.999), policer.strikes) == (True, 2)
    assert (policer.ping(15.0), policer.strikes) == (False, 3)


def test_without_tolerated_strikes_the_first_early_ping_closes() -> None:
    policer = PingPolicer(PingRateLimit(min_interval=10.0, max_strikes=0))
    assert policer.ping(0.0) is True
    assert policer.ping(9.999) is False
    assert policer.strikes == 1


def test_a_ping_exactly_min_interval_after_the_last_is_polite() -> None:
    policer = PingPolicer(PingRateLimit(min_interval=10.0, max_strikes=0))
    for now in (0.0, 10.0, 20.0, 30.0):
        assert policer.ping(now) is True
    assert policer.strikes == 0


def test_a_polite_ping_clears_the_strikes() -> None:
    policer = PingPolicer(PingRateLimit(min_interval=10.0, max_strikes=2))
    assert policer.ping(0.0)
    assert policer.ping(1.0) and policer.ping(2.0)
    assert policer.strikes == 2
    assert policer.ping(12.0) is True  # ten seconds after the last: the peer slowed down
    assert policer.strikes == 0
    # The full tolerance is back.
    assert policer.ping(13.0) and policer.ping(14.0)
    assert policer.strikes == 2
    assert policer.ping(15.0) is False


def test_the_interval_is_measured_from_the_previous_ping_early_or_not() -> None:
    policer = PingPolicer(PingRateLimit(min_interval=10.0, max_strikes=2))
    assert policer.ping(0.0)
    assert policer.ping(6.0) and policer.strikes == 1
    # Twelve seconds after the first ping but six after the last one: still too early.
    assert policer.ping(12.0) and policer.strikes == 2
    assert policer.ping(22.0) and policer.strikes == 0

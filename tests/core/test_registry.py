"""The session registry's rules, with explicit times (no sleeps, no clock)."""

from __future__ import annotations

import math

import pytest

from keepconn import CloseReason, ConfigError, KeepconnError, SessionRegistry


def make(timeout: float = 10.0, resolution: float = 1.0) -> SessionRegistry:
    return SessionRegistry(timeout=timeout, resolution=resolution)


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, -math.inf, "10", None, True])
def test_invalid_timeout_names_the_field(bad: object) -> None:
    with pytest.raises(ConfigError, match="timeout"):
        SessionRegistry(timeout=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -0.5, math.nan, math.inf])
def test_invalid_resolution_names_the_field(bad: float) -> None:
    with pytest.raises(ConfigError, match="resolution"):
        SessionRegistry(timeout=10, resolution=bad)


def test_resolution_above_timeout_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"resolution must be in \(0, 10\]"):
        SessionRegistry(timeout=10, resolution=11)


def test_config_error_is_a_value_error_and_a_keepconn_error() -> None:
    with pytest.raises(ValueError) as info:
        SessionRegistry(timeout=-1)
    assert isinstance(info.value, KeepconnError)


def test_default_resolution_is_a_tenth_of_the_timeout_capped_at_one_second() -> None:
    assert SessionRegistry(timeout=2).resolution == pytest.approx(0.2)
    assert SessionRegistry(timeout=600).resolution == 1.0


@pytest.mark.parametrize("bad", [0, -3, math.nan, math.inf])
def test_invalid_per_session_timeout(bad: float) -> None:
    with pytest.raises(ConfigError, match="timeout"):
        make().open("a", now=0.0, timeout=bad)


def test_non_finite_now_is_rejected_on_open() -> None:
    with pytest.raises(ConfigError, match="now"):
        make().open("a", now=math.nan)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_invalid_reap_limit(bad: object) -> None:
    with pytest.raises(ConfigError, match="limit"):
        make().reap(0.0, limit=bad)  # type: ignore[arg-type]


def test_close_needs_a_close_reason() -> None:
    registry = make()
    session = registry.open("a", now=0.0)
    with pytest.raises(TypeError, match="CloseReason"):
        registry.close(session, "idle")  # type: ignore[arg-type]


def test_close_rejects_a_session_of_another_registry() -> None:
    other = make().open("a", now=0.0)
    registry = make()
    registry.open("a", now=0.0)
    with pytest.raises(ValueError, match="does not belong"):
        registry.close(other, CloseReason.APPLICATION)


# -- deadlines -----------------------------------------------------------------------------------


def test_never_reaped_before_the_deadline_and_reaped_at_it() -> None:
    registry = make(timeout=10, resolution=1)
    session = registry.open("a", now=100.0)
    assert registry.reap(109.999) == []
    assert session.open
    assert registry.reap(110.0) == [session]
    assert session.reason is CloseReason.IDLE_TIMEOUT
    assert "a" not in registry


def test_touch_moves_the_deadline() -> None:
    registry = make(timeout=10, resolution=1)
    session = registry.open("a", now=0.0)
    session.touch(7.0)
    assert session.deadline == 17.0
    assert registry.reap(10.0) == []
    assert registry.reap(16.9) == []
    assert registry.reap(17.0) == [session]


def test_next_deadline_is_within_one_resolution_after_the_earliest_deadline() -> None:
    registry = make(timeout=10, resolution=1)
    assert registry.next_deadline() is None
    registry.open("a", now=0.25)
    wake = registry.next_deadline()
    assert wake is not None and 10.25 <= wake <= 11.25
    registry.reap(wake)
    assert len(registry) == 0


def test_reap_at_next_deadline_keeps_the_resolution_bound_for_touched_sessions() -> None:
    registry = make(timeout=10, resolution=1)
    session = registry.open("a", now=0.0)
    session.touch(4.5)  # deadline 14.5
    wakes = []
    while session.open:
        wake = registry.next_deadline()
        assert wake is not None
        wakes.append(wake)
        registry.reap(wake)
    assert 14.5 <= wakes[-1] <= 15.5


def test_per_session_timeouts_mix() -> None:
    registry = make(timeout=10, resolution=0.5)
    short = registry.open("short", now=0.0, timeout=2.0)
    long = registry.open("long", now=0.0, timeout=90.0)
    default = registry.open("default", now=0.0)
    assert registry.reap(2.0) == [short]
    assert registry.reap(10.0) == [default]
    assert registry.reap(89.9) == []
    assert registry.reap(90.0) == [long]


def test_reap_called_mid_slot_is_exact() -> None:
    # Calls at arbitrary phases, not at slot ends: each session goes at the first call at or
    # after its deadline.
    registry = make(timeout=10, resolution=1)
    sessions = [registry.open(i, now=i * 0.1) for i in range(10)]  # deadlines 10.0 .. 10.9
    # (Within one slot the registry promises no order, so compare as sets.)
    assert set(registry.reap(10.35)) == set(sessions[:4])
    assert registry.reap(10.35) == []
    assert set(registry.reap(10.6)) == set(sessions[4:7])
    sessions[9].touch(5.0)
    assert set(registry.reap(11.0)) == set(sessions[7:9])
    assert registry.reap(14.99) == []
    assert registry.reap(15.0) == [sessions[9]]


def test_touching_a_closed_session_is_harmless() -> None:
    registry = make()
    session = registry.open("a", now=0.0)
    registry.close(session, CloseReason.PEER_CLOSED)
    session.touch(5.0)
    assert registry.reap(100.0) == []
    assert session.reason is CloseReason.PEER_CLOSED


# -- limits --------------------------------------------------------------------------------------


def test_limit_bounds_each_call_and_the_rest_stay_due() -> None:
    registry = make(timeout=10, resolution=1)
    for i in range(25):
        registry.open(i, now=0.0)
    first = registry.reap(20.0, limit=10)
    assert len(first) == 10
    wake = registry.next_deadline()
    assert wake is not None and wake <= 20.0  # more work is due now
    second = registry.reap(20.0, limit=10)
    third = registry.reap(20.0, limit=10)
    assert len(second) == 10 and len(third) == 5
    assert {s.key for s in first + second + third} == set(range(25))
    assert registry.next_deadline() is None


def test_limit_also_bounds_refiling_work() -> None:
    registry = make(timeout=10, resolution=1)
    sessions = [registry.open(i, now=0.0) for i in range(100)]
    for session in sessions:
        session.touch(5.0)  # nothing will be due at 11, but all need re-filing
    assert registry.reap(11.0, limit=10) == []
    # Bounded work per call: a few calls finish the re-filing, none of them reaps anything.
    for _ in range(10):
        assert registry.reap(11.0, limit=10) == []
    assert registry.next_deadline() == pytest.approx(16.0)
    assert len(registry.reap(15.0)) == 100


# -- takeover, close, stats ----------------------------------------------------------------------


def test_open_on_a_live_key_takes_it_over() -> None:
    registry = make()
    old = registry.open("dev", now=0.0, conn="old transport")
    displaced = registry.get("dev")
    new = registry.open("dev", now=1.0, conn="new transport")
    assert displaced is old
    assert old.reason is CloseReason.TAKEN_OVER
    assert registry.get("dev") is new and new.open and new.conn == "new transport"
    assert len(registry) == 1
    # The old session's wheel entry is skipped: it is never reaped a second time.
    assert registry.reap(10.5) == []
    assert registry.reap(11.0) == [new]
    stats = registry.stats()
    assert stats.closed[CloseReason.TAKEN_OVER] == 1
    assert stats.closed[CloseReason.IDLE_TIMEOUT] == 1


def test_close_is_idempotent_and_keeps_the_first_reason() -> None:
    registry = make()
    session = registry.open("a", now=0.0)
    assert registry.close(session, CloseReason.PEER_RESET) is True
    assert registry.close(session, CloseReason.SHUTDOWN) is False
    assert session.reason is CloseReason.PEER_RESET
    assert registry.stats().closed[CloseReason.SHUTDOWN] == 0


def test_closing_a_taken_over_session_does_not_touch_the_new_one() -> None:
    registry = make()
    old = registry.open("a", now=0.0)
    new = registry.open("a", now=1.0)
    assert registry.close(old, CloseReason.PEER_CLOSED) is False
    assert registry.get("a") is new and new.open


def test_container_protocol_and_iteration_snapshot() -> None:
    registry = make()
    for key in "abc":
        registry.open(key, now=0.0)
    assert len(registry) == 3 and "b" in registry and "z" not in registry
    for session in registry:  # closing while iterating is safe
        registry.close(session, CloseReason.SHUTDOWN)
    assert len(registry) == 0 and list(registry) == []


def test_stats_add_up() -> None:
    registry = make(timeout=5, resolution=1)
    a = registry.open("a", now=0.0)
    registry.open("b", now=0.0)
    registry.open("b", now=1.0)
    registry.close(a, CloseReason.PEER_CLOSED)
    registry.reap(100.0)
    stats = registry.stats()
    assert stats.opened == 3
    assert stats.live == 0
    assert stats.total_closed == 3
    assert stats.closed[CloseReason.TAKEN_OVER] == 1
    assert stats.closed[CloseReason.IDLE_TIMEOUT] == 1
    assert stats.closed[CloseReason.PEER_CLOSED] == 1
    assert set(stats.closed) == set(CloseReason)


def test_session_repr_and_properties() -> None:
    registry = make(timeout=4)
    session = registry.open(("tenant", 7), now=1.0)
    assert session.last_seen == 1.0 and session.timeout == 4 and session.deadline == 5.0
    assert "open" in repr(session) and "('tenant', 7)" in repr(session)
    registry.close(session, CloseReason.AUTH_FAILED)
    assert "AUTH_FAILED" in repr(session)


def test_sessions_compare_by_identity() -> None:
    registry = make()
    first = registry.open("a", now=0.0)
    registry.close(first, CloseReason.APPLICATION)
    second = registry.open("a", now=0.0)
    assert first != second
    assert len({first, second}) == 2


def test_dead_reasons_are_the_timeouts() -> None:
    assert CloseReason.IDLE_TIMEOUT.dead and CloseReason.HEARTBEAT_TIMEOUT.dead
    assert CloseReason.KEEPALIVE_TIMEOUT.dead
    assert not CloseReason.PEER_CLOSED.dead and not CloseReason.TAKEN_OVER.dead


def test_reap_in_a_large_registry_touches_only_what_is_due() -> None:
    # A sweep with nothing due returns at once: it does not walk the live sessions.
    registry = make(timeout=60, resolution=1)
    for i in range(50_000):
        registry.open(i, now=0.0)
    assert registry.reap(30.0) == []
    assert registry.reap(59.99) == []
    assert len(registry.reap(60.0)) == 50_000


def test_a_limited_reap_inside_a_slot_moves_only_a_bounded_chunk() -> None:
    # All 1,000 sessions share one slot and `now` falls inside it: each call may examine at
    # most twice its limit, yet together the calls reap exactly the due sessions.
    registry = make(timeout=10, resolution=1)
    for i in range(1000):
        registry.open(i, now=i * 0.0004)  # deadlines 10.0 .. 10.3996
    got: list[int] = []
    calls = 0
    while True:
        batch = registry.reap(10.2, limit=10)
        calls += 1
        assert len(batch) <= 10
        got += [s.key for s in batch]  # type: ignore[misc]
        wake = registry.next_deadline()
        assert wake is not None
        if wake > 10.2:
            break
    assert sorted(got) == list(range(501))  # deadlines up to and including 10.2
    assert calls >= 1000 // 20
    assert len(registry.reap(10.3996)) == 499


def test_spare_keeps_a_due_session_open_as_if_touched_now() -> None:
    registry = make(timeout=10, resolution=1)
    alive = registry.open("behind", now=0.0)
    dead = registry.open("dead", now=0.0)
    asked: list[object] = []

    def spare(session: object) -> bool:
        asked.append(session)
        return session is alive

    assert registry.reap(11.0, spare=spare) == [dead]
    assert alive.open and alive.last_seen == 11.0 and set(asked) == {alive, dead}
    assert registry.reap(20.9, spare=spare) == []
    assert registry.reap(21.0) == [alive]  # no longer spared: reaped one timeout later
    assert registry.stats().closed[CloseReason.IDLE_TIMEOUT] == 2

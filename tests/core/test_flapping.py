"""Flapping, per-address and duplicate-identity detection, with explicit times."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keepconn import (
    AddressFlappingConfig,
    AddressFlappingDetector,
    CloseReason,
    ConfigError,
    FlappingConfig,
    FlappingDetector,
    VerdictKind,
)

# -- identities ---------------------------------------------------------------------------------


def test_defaults_follow_emqx() -> None:
    cfg = FlappingConfig()
    assert (cfg.enabled, cfg.max_hellos, cfg.window, cfg.ban) == (True, 15, 60.0, 300.0)
    assert AddressFlappingConfig().enabled is False


def test_sixteenth_hello_in_a_minute_bans_for_five_minutes() -> None:
    det = FlappingDetector()
    for i in range(15):
        assert det.record_hello("dev", float(i)).ok
    verdict = det.record_hello("dev", 15.0)
    assert verdict.kind is VerdictKind.BANNED
    assert verdict.reason is CloseReason.FLAPPING
    assert verdict.until == 315.0
    assert det.is_banned("dev", 314.999)
    assert det.banned_until("dev", 20.0) == 315.0
    # Hellos during the ban are refused and neither count nor extend it.
    assert det.record_hello("dev", 100.0).until == 315.0
    assert not det.is_banned("dev", 315.0)
    assert det.record_hello("dev", 315.0).ok
    stats = det.stats(315.0)
    assert stats.total_bans == 1
    assert stats.active_bans == 0


def test_other_identities_are_not_affected() -> None:
    det = FlappingDetector(FlappingConfig(max_hellos=1))
    det.record_hello("a", 0.0)
    assert not det.record_hello("a", 0.0).ok
    assert det.record_hello("b", 0.0).ok
    assert det.stats(0.0).active_bans == 1


def test_window_slides() -> None:
    det = FlappingDetector(FlappingConfig(max_hellos=2, window=10.0))
    assert det.record_hello("d", 0.0).ok
    assert det.record_hello("d", 5.0).ok
    # The hello at 0.0 has left the window at 10.0 exactly.
    assert det.record_hello("d", 10.0).ok
    assert not det.record_hello("d", 14.0).ok


def test_disabled_detector_never_bans_and_remembers_nothing() -> None:
    det = FlappingDetector(FlappingConfig(enabled=False))
    assert all(det.record_hello("d", 0.0).ok for _ in range(1000))
    assert not det.is_banned("d", 0.0)
    assert det.stats(0.0).tracked == 0


def test_prune_forgets_quiet_identities_and_ended_bans() -> None:
    det = FlappingDetector(FlappingConfig(max_hellos=1, window=10.0, ban=5.0))
    det.record_hello("quiet", 0.0)
    det.record_hello("busy", 0.0)
    det.record_hello("busy", 1.0)  # banned until 6.0
    det.record_hello("recent", 9.0)
    assert det.prune(10.0) == 2  # "quiet"'s window and "busy"'s ban
    assert det.stats(10.0).tracked == 1


def test_one_hello_and_then_more_count_alike_at_any_clock_value() -> None:
    # A key with one event holds it bare (no list): times 0 and integers count as any other.
    det = FlappingDetector(FlappingConfig(max_hellos=2, window=10.0, ban=5.0))
    assert det.record_hello("d", 0).ok
    assert det.prune(9) == 0  # 0 is still within the window at 9
    assert det.record_hello("d", 9.5).ok
    assert not det.record_hello("d", 9.9).ok  # the third within 10 s
    assert det.record_hello("e", 0.0).ok
    assert det.prune(10.0) == 1  # "e"'s one hello has left the window
    assert det.stats(10.0).tracked == 0


def test_memory_is_bounded_without_calling_prune() -> None:
    det = FlappingDetector(FlappingConfig(window=1.0))
    for i in range(100_000):
        det.record_hello(i, i * 0.01)
    # About 100 identities are within the last second; sweeps keep the table near that.
    assert det.stats(1000.0).tracked <= 2048


@given(
    limit=st.integers(1, 20),
    window=st.floats(0.5, 100.0),
    gaps=st.lists(st.floats(0.0, 20.0), min_size=1, max_size=80),
)
def test_bans_exactly_above_the_limit(limit: int, window: float, gaps: list[float]) -> None:
    ban = 1000.0
    det = FlappingDetector(FlappingConfig(max_hellos=limit, window=window, ban=ban))
    counted: list[float] = []  # hellos that counted since the last ban (the oracle's memory)
    now = 0.0
    banned_until: float | None = None
    for gap in gaps:
        now += gap
        verdict = det.record_hello("d", now)
        if banned_until is not None and now < banned_until:
            assert verdict.kind is VerdictKind.BANNED
            assert verdict.until == banned_until
            continue
        in_window = [t for t in counted if t > now - window]
        if len(in_window) + 1 > limit:
            assert verdict.kind is VerdictKind.BANNED
            assert verdict.until == now + ban
            banned_until = now + ban
            counted = []
        else:
            assert verdict.ok
            counted.append(now)


@given(start=st.floats(0.0, 1e6), ban=st.floats(0.001, 1e4), probe=st.floats(0.0, 1.0))
def test_bans_expire_exactly(start: float, ban: float, probe: float) -> None:
    det = FlappingDetector(FlappingConfig(max_hellos=1, ban=ban))
    det.record_hello("d", start)
    until = det.record_hello("d", start).until
    assert until == start + ban
    t = start + probe * 2 * ban
    assert det.is_banned("d", t) == (t < until)
    assert det.record_hello("d", until).ok


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"enabled": "yes"}, "enabled"),
        ({"max_hellos": 0}, "max_hellos"),
        ({"max_hellos": 2.5}, "max_hellos"),
        ({"window": 0.0}, "window"),
        ({"ban": -1.0}, "ban"),
        ({"ban": float("inf")}, "ban"),
        ({"detect_duplicates": None}, "detect_duplicates"),
        ({"duplicate_takeovers": 0}, "duplicate_takeovers"),
        ({"duplicate_window": 0}, "duplicate_window"),
        ({"duplicate_hold": "5"}, "duplicate_hold"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises((ConfigError, TypeError), match=field):
        FlappingConfig(**kwargs)  # type: ignore[arg-type]


def test_detectors_reject_the_wrong_config() -> None:
    with pytest.raises(TypeError, match="FlappingConfig"):
        FlappingDetector(AddressFlappingConfig())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="AddressFlappingConfig"):
        AddressFlappingDetector(FlappingConfig())  # type: ignore[arg-type]


# -- duplicate identities -----------------------------------------------------------------------


def test_two_devices_fighting_over_an_identity_are_detected() -> None:
    det = FlappingDetector()
    hosts = ["10.0.0.1", "10.0.0.2"]
    verdicts = [
        det.record_takeover("dev", hosts[i % 2], hosts[(i + 1) % 2], float(i)) for i in range(6)
    ]
    assert all(v.ok for v in verdicts[:5])
    dup = verdicts[5]
    assert dup.kind is VerdictKind.DUPLICATE
    assert dup.reason is CloseReason.FLAPPING
    assert dup.until == 5.0 + 300.0
    assert dup.peers == ("10.0.0.2", "10.0.0.1")
    # While held, every takeover of the identity is refused, from any host.
    assert det.record_takeover("dev", "10.0.0.1", "10.0.0.1", 6.0).kind is VerdictKind.DUPLICATE
    stats = det.stats(6.0)
    assert stats.total_duplicates == 1
    assert stats.active_duplicates == 1
    assert stats.active_bans == 0
    assert det.is_duplicate("dev", 304.9)
    assert not det.is_duplicate("dev", 305.0)
    assert det.record_takeover("dev", "10.0.0.1", "10.0.0.2", 305.0).ok


def test_a_device_replacing_its_own_phantom_is_never_a_duplicate() -> None:
    det = FlappingDetector()
    assert all(det.record_takeover("dev", "h", "h", i * 0.1).ok for i in range(1000))


def test_a_roaming_device_is_not_a_duplicate() -> None:
    det = FlappingDetector()
    # Wi-Fi, cellular and back, a few times a minute.
    hosts = ["wifi", "cell"]
    assert all(
        det.record_takeover("dev", hosts[i % 2], hosts[(i + 1) % 2], i * 15.0).ok for i in range(40)
    )


def test_duplicate_detection_can_be_switched_off() -> None:
    det = FlappingDetector(FlappingConfig(detect_duplicates=False))
    assert all(det.record_takeover("d", "a", "b", 0.0).ok for _ in range(100))
    assert not det.is_duplicate("d", 0.0)


@given(
    limit=st.integers(1, 10),
    moves=st.lists(st.tuples(st.floats(0.0, 5.0), st.booleans()), min_size=1, max_size=60),
)
def test_duplicate_only_above_the_limit_of_host_changes(
    limit: int, moves: list[tuple[float, bool]]
) -> None:
    window, hold = 30.0, 1000.0
    det = FlappingDetector(
        FlappingConfig(duplicate_takeovers=limit, duplicate_window=window, duplicate_hold=hold)
    )
    counted: list[float] = []
    held_until: float | None = None
    now = 0.0
    for gap, moved in moves:
        now += gap
        verdict = det.record_takeover("d", "a", "b" if moved else "a", now)
        if held_until is not None and now < held_until:
            assert verdict.kind is VerdictKind.DUPLICATE
            continue
        if not moved:
            assert verdict.ok
            continue
        if len([t for t in counted if t > now - window]) + 1 > limit:
            assert verdict.kind is VerdictKind.DUPLICATE
            held_until = now + hold
            counted = []
        else:
            assert verdict.ok
            counted.append(now)


# -- source addresses ---------------------------------------------------------------------------


def test_address_detector_is_off_by_default() -> None:
    det = AddressFlappingDetector()
    assert all(det.record_aborted("127.0.0.1", 0.0).ok for _ in range(10_000))
    assert not det.is_banned("127.0.0.1", 0.0)
    assert det.stats(0.0).tracked == 0


def test_address_detector_bans_an_address_that_never_says_hello() -> None:
    det = AddressFlappingDetector(AddressFlappingConfig(enabled=True, max_aborted=3, ban=60.0))
    assert all(det.record_aborted("10.1.1.1", float(i)).ok for i in range(3))
    verdict = det.record_aborted("10.1.1.1", 3.0)
    assert verdict.kind is VerdictKind.BANNED
    assert verdict.reason is CloseReason.FLAPPING
    assert det.banned_until("10.1.1.1", 3.0) == 63.0
    assert det.is_banned("10.1.1.1", 62.0)
    assert not det.is_banned("10.1.1.2", 3.0)
    stats = det.stats(4.0)
    assert (stats.active_bans, stats.total_bans, stats.total_duplicates) == (1, 1, 0)
    assert det.prune(100.0) == 1
    assert not det.is_banned("10.1.1.1", 63.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"enabled": 1}, "enabled"),
        ({"max_aborted": 0}, "max_aborted"),
        ({"window": -1.0}, "window"),
        ({"ban": 0.0}, "ban"),
    ],
)
def test_address_config_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises((ConfigError, TypeError), match=field):
        AddressFlappingConfig(**kwargs)  # type: ignore[arg-type]

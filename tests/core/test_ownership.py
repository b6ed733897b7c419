"""The cluster ownership rules with explicit times: epochs, notices, the lease, the store-down
policy (keepconn._core.ownership)."""

from __future__ import annotations

import pytest

from keepconn import ConfigError
from keepconn._core.ownership import ClusterConfig, Ownership

TTL = 3.0


def node(mode: str = "consistent", now: float = 0.0) -> Ownership:
    own = Ownership(ClusterConfig(node_id="a", node_ttl=TTL, mode=mode), now)  # type: ignore[arg-type]
    own.renewed(now, existed=False)  # the node's first renewal makes its lease
    return own


class Conn:
    """A stand-in for the adapter's connection: the core only keeps it and hands it back."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


@pytest.mark.parametrize(
    "options",
    [
        {"node_id": ""},
        {"node_id": "has space"},
        {"node_id": "a", "node_ttl": 0},
        {"node_id": "a", "node_ttl": 1.0, "store_timeout": 0.5},  # not under ttl/2
        {"node_id": "a", "store_timeout": 0},
        {"node_id": "a", "mode": "eventual"},
        {"node_id": "a", "reconcile_interval": 0},
        {"node_id": "a", "key_prefix": ""},
        {"node_id": "a", "collect_interval": 0},
        {"node_id": "a", "collect_batch": 0},
        {"node_id": "a", "collect_batch": 1.5},
        {"node_id": "a", "collect_batch": 1_000_000},
    ],
)
def test_a_bad_config_fails_when_built(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ClusterConfig(**options)  # type: ignore[arg-type]


def test_defaults() -> None:
    config = ClusterConfig(node_id="gw-1")
    assert (config.node_ttl, config.store_timeout, config.mode) == (10.0, 0.5, "consistent")
    assert config.renew_interval == 10.0 / 8 and config.spread == 1.0
    assert (config.collect_interval, config.collect_batch) == (1.0, 1000)
    assert ClusterConfig(node_id="gw-1", collect_interval=None).collect_interval is None


def test_collector_steps_count_as_store_calls_and_add_up() -> None:
    own = Ownership(ClusterConfig(node_id="a", node_ttl=TTL), 0.0)
    own.store_failed()
    own.collected(3)
    own.collected(0)
    stats = own.stats(0.0)
    assert (stats.records_collected, stats.store_round_trips, stats.store_healthy) == (3, 2, True)


def test_hellos_are_refused_before_the_first_renewal_and_while_the_store_fails() -> None:
    own = Ownership(ClusterConfig(node_id="a", node_ttl=TTL), 0.0)
    assert not own.admit(0.0)
    own.renewed(0.0, existed=False)
    assert own.admit(0.1)
    own.store_failed()
    assert not own.admit(0.2)
    own.store_ok()
    assert own.admit(0.3)
    # Healthy but past the lease (no renewal succeeded for ttl): refused too.
    assert not own.admit(TTL)
    assert own.refused == 3


def test_a_notice_before_the_claims_own_reply_makes_the_late_reply_lose() -> None:
    own = node()
    conn = Conn("c")
    own.claim_sent("dev", conn)
    assert own.notice("dev", 20) is None  # the claim is in flight: remembered, nothing closed
    outcome = own.claimed("dev", conn, 10, remote=False, now=0.0)
    assert not outcome.won
    assert own.closed("dev", conn) is None  # another node owns it: no release
    assert own.live("dev") is None and own.remote_takeovers == 1
    assert own.held() == []


def test_a_higher_local_epoch_ignores_an_older_notice() -> None:
    own = node()
    conn = Conn("c")
    own.claim_sent("dev", conn)
    assert own.claimed("dev", conn, 30, remote=True, now=0.0).won
    assert own.notice("dev", 20) is None  # stale: our claim is later
    assert own.live("dev") is conn
    assert own.notice("dev", 31) is conn  # a later claim elsewhere: close ours
    assert own.live("dev") is None
    assert own.closed("dev", conn) is None


def test_release_carries_the_nodes_highest_epoch_once_nothing_here_holds_it() -> None:
    own = node()
    first, second = Conn("first"), Conn("second")
    own.claim_sent("dev", first)
    assert own.claimed("dev", first, 10, remote=False, now=0.0).won
    own.claim_sent("dev", second)
    assert own.live("dev") is first  # first keeps the identity until second's claim wins
    assert own.claimed("dev", second, 12, remote=False, now=0.0).won
    assert own.live("dev") is second
    assert own.closed("dev", first) is None  # displaced locally: second holds the identity
    assert own.held() == [("dev", 12, second)]
    assert own.closed("dev", second) == 12
    assert own.closed("dev", second) is None  # once


def test_a_claim_that_won_for_a_connection_closed_meanwhile_is_released_by_its_close() -> None:
    own = node()
    conn = Conn("c")
    own.claim_sent("dev", conn)
    assert own.claimed("dev", conn, 7, remote=False, now=0.0).won
    assert own.closed("dev", conn) == 7


def test_a_claim_refused_or_failed_leaves_the_local_session_holding_the_identity() -> None:
    # With flapping counted cluster-wide, the refusal comes after the local checks: it must
    # not have displaced the session that serves the device.
    own = node()
    first, second, third = Conn("first"), Conn("second"), Conn("third")
    own.claim_sent("dev", first)
    own.claimed("dev", first, 5, remote=False, now=0.0)
    own.claim_sent("dev", second)
    assert own.claim_failed("dev", second, refused=True) is None
    assert own.live("dev") is first and own.held() == [("dev", 5, first)]
    own.claim_sent("dev", third)
    assert own.claim_failed("dev", third) is None  # the store is unreachable
    assert own.live("dev") is first and not own.healthy


def test_a_failed_claim_releases_the_epoch_held_before_once_nothing_here_holds_it() -> None:
    own = node()
    first, second = Conn("first"), Conn("second")
    own.claim_sent("dev", first)
    own.claimed("dev", first, 5, remote=False, now=0.0)
    own.claim_sent("dev", second)
    assert own.closed("dev", first) is None  # second's claim is still in flight
    assert own.claim_failed("dev", second) == 5
    assert not own.healthy


def test_a_check_that_finds_another_owner_closes_only_the_session_it_checked() -> None:
    own = node()
    old, new = Conn("old"), Conn("new")
    own.claim_sent("dev", old)
    own.claimed("dev", old, 5, remote=False, now=0.0)
    own.claim_sent("dev", new)  # claimed after the check was sent
    own.claimed("dev", new, 6, remote=False, now=0.0)
    assert not own.lost("dev", old)
    assert own.live("dev") is new


def test_sessions_close_over_the_last_spread_before_the_lease_could_expire() -> None:
    own = node()
    conns = [Conn(f"c{i}") for i in range(10)]
    for i, conn in enumerate(conns):
        own.claim_sent(f"d{i}", conn)
        own.claimed(f"d{i}", conn, 100 + i, remote=False, now=0.0)
    own.store_failed()  # no renewal succeeds from now on
    spread = own.config.spread
    start = TTL - spread
    assert own.next_deadline() == pytest.approx(start)
    assert own.due(start - 0.001) == []
    closed = own.due(start)
    assert closed == []  # the schedule begins; nothing due at its very start
    half = own.due(start + spread / 2)
    assert len(half) == 5
    rest = own.due(TTL)
    assert len(rest) == 5 and set(half + rest) == set(conns)
    assert own.ownership_lost == 10 and own.next_deadline() is None
    # Released: the node owns nothing, so nothing is left to lose.
    assert own.held() == []


def test_a_renewal_in_time_cancels_the_closing() -> None:
    own = node()
    conn = Conn("c")
    own.claim_sent("dev", conn)
    own.claimed("dev", conn, 1, remote=False, now=0.0)
    start = TTL - own.config.spread
    own.due(start + 0.01)
    own.renewed(start + 0.05, existed=True)
    assert own.due(TTL + 0.5) == []
    assert own.live("dev") is conn


def test_a_lease_found_gone_asks_to_reassert_every_confirmed_session() -> None:
    own = node()
    a, b = Conn("a"), Conn("b")
    own.claim_sent("x", a)
    own.claimed("x", a, 3, remote=False, now=0.0)
    own.claim_sent("y", b)  # in flight: its claim reply settles it
    assert own.renewed(1.0, existed=True) == []
    assert own.renewed(2.0, existed=False) == [("x", 3, a)]
    assert own.lease_lost == 1


def test_available_mode_keeps_serving_without_the_store() -> None:
    own = node("available")
    conn = Conn("c")
    own.store_failed()
    assert own.admit(100.0)
    own.claim_sent("dev", conn)
    assert own.claim_failed("dev", conn) is None
    assert own.live("dev") is conn and own.unclaimed() == [("dev", conn)]
    assert own.due(1000.0) == [] and own.next_deadline() is None


def test_stats() -> None:
    own = node()
    conn = Conn("c")
    own.claim_sent("dev", conn)
    stats = own.stats(1.0)
    assert (stats.node_id, stats.owned, stats.claiming) == ("a", 0, 1)
    own.claimed("dev", conn, 9, remote=True, now=0.0)
    stats = own.stats(1.0)
    assert (stats.owned, stats.claiming, stats.took_from_remote) == (1, 0, 1)
    assert stats.lease_left == pytest.approx(TTL - 1.0)


def test_a_claim_reply_after_the_lease_could_have_expired_opens_nothing() -> None:
    own = node()
    conn = Conn("c")
    own.claim_sent("dev", conn)
    outcome = own.claimed("dev", conn, 4, remote=False, now=TTL)  # no renewal since 0
    assert not outcome.won and outcome.lease_gone and outcome.release == 4
    assert own.live("dev") is None and own.held() == []

"""The Gatekeeper's verdicts before a session opens, with explicit times.

Real registries and detectors throughout; only the connection is a stand-in: all the gatekeeper
reads of one is its host and its accept order.
"""

from __future__ import annotations

import itertools
import random

import attrs
import pytest

from keepconn import (
    AddressFlappingConfig,
    AddressFlappingDetector,
    AdmissionConfig,
    AdmissionController,
    CloseReason,
    FlappingConfig,
    FlappingDetector,
    FlappingStats,
    SessionRegistry,
    Verdict,
    VerdictKind,
)
from keepconn._core.opening import PEER_ABORTS, Gatekeeper, Opening, Refusal

_accepts = itertools.count(1)


@attrs.define(eq=False)
class Conn:
    """A connection as the gatekeeper sees it; each one made is a later accept."""

    host: str
    order: int = attrs.field(factory=lambda: next(_accepts))


def registry() -> SessionRegistry:
    # Nothing is reaped in these tests (reap is never called); the timeout is only recorded.
    return SessionRegistry(timeout=30.0)


def opened(verdict: Opening | Refusal) -> Opening:
    assert isinstance(verdict, Opening), verdict
    return verdict


# -- opening and takeover ----------------------------------------------------------------------


def test_the_first_hello_opens_a_session() -> None:
    gate = Gatekeeper(registry())
    conn = Conn("10.0.0.1")
    opening = opened(gate.open_session(5.0, "dev", conn))
    session = opening.session
    assert opening.displaced is None
    assert gate.registry.get("dev") is session and len(gate.registry) == 1
    assert (session.key, session.conn, session.open, session.reason) == ("dev", conn, True, None)
    assert (session.last_seen, session.timeout, session.deadline) == (5.0, 30.0, 35.0)
    assert gate.takeovers == 0


def test_a_session_may_carry_its_own_idle_timeout() -> None:
    gate = Gatekeeper(registry())
    session = opened(gate.open_session(5.0, "mqtt", Conn("10.0.0.1"), timeout=90.0)).session
    assert (session.timeout, session.deadline) == (90.0, 95.0)


def test_with_every_check_off_every_connection_is_admitted() -> None:
    gate = Gatekeeper(registry())
    assert all(gate.admit_connection(0.0, "10.0.0.1") is None for _ in range(10_000))
    for _ in range(100):
        opened(gate.open_session(0.0, "dev", Conn("10.0.0.1")))
    assert gate.takeovers == 99


def test_a_second_hello_of_the_same_identity_takes_the_session_over() -> None:
    gate = Gatekeeper(registry(), AdmissionController(), FlappingDetector())
    first = opened(gate.open_session(0.0, "dev", Conn("10.0.0.1")))
    newer = Conn("10.0.0.1")
    second = opened(gate.open_session(10.0, "dev", newer))
    assert second.displaced is first.session
    assert first.session.reason is CloseReason.TAKEN_OVER and not first.session.open
    assert second.session.open and second.session.conn is newer
    assert second.session.deadline == 40.0
    assert gate.registry.get("dev") is second.session and len(gate.registry) == 1
    assert gate.takeovers == 1
    third = opened(gate.open_session(20.0, "dev", Conn("10.0.0.1")))
    assert third.displaced is second.session
    assert second.session.reason is CloseReason.TAKEN_OVER
    assert gate.takeovers == 2
    stats = gate.registry.stats()
    assert (stats.live, stats.opened, stats.closed[CloseReason.TAKEN_OVER]) == (1, 3, 2)


def test_a_hello_read_on_an_older_connection_takes_nothing_over() -> None:
    gate = Gatekeeper(registry(), AdmissionController(), FlappingDetector())
    older = Conn("10.0.0.1")  # accepted first; its hello is read late
    newer = Conn("10.0.0.1")
    current = opened(gate.open_session(1.0, "dev", newer)).session
    refusal = gate.open_session(2.0, "dev", older)
    assert refusal == Refusal(CloseReason.STALE_HELLO, "a newer connection holds 'dev''s session")
    assert gate.registry.get("dev") is current and current.open
    assert (gate.stale, gate.takeovers) == (1, 0)


# -- the session cap ---------------------------------------------------------------------------


def test_the_session_cap_refuses_a_new_identity_but_never_a_takeover() -> None:
    admission = AdmissionController(AdmissionConfig(max_sessions=2, retry_after_jitter=0.0))
    gate = Gatekeeper(registry(), admission)
    a = opened(gate.open_session(0.0, "a", Conn("10.0.0.1")))
    opened(gate.open_session(0.0, "b", Conn("10.0.0.2")))
    # A full house does not drain at a known rate: the hint is the longest one.
    refusal = gate.open_session(1.0, "c", Conn("10.0.0.3"))
    assert refusal == Refusal(CloseReason.OVERLOADED, "max_sessions", 30.0)
    assert "c" not in gate.registry and len(gate.registry) == 2
    # A takeover adds no session: admitted at the cap.
    takeover = opened(gate.open_session(2.0, "a", Conn("10.0.0.1")))
    assert takeover.displaced is a.session and a.session.reason is CloseReason.TAKEN_OVER
    assert len(gate.registry) == 2 and gate.takeovers == 1
    refused = admission.stats(2.0).refused
    assert refused == {
        "accept_delay": 0,
        "loop_lag": 0,
        "accept_rate": 0,
        "max_pending_hellos": 0,
        "max_sessions": 1,
    }
    # Once a place is free a new identity is admitted again.
    b = gate.registry.get("b")
    assert b is not None and gate.registry.close(b, CloseReason.PEER_CLOSED)
    assert opened(gate.open_session(3.0, "c", Conn("10.0.0.3"))).displaced is None


def test_the_session_cap_hint_is_jittered_below_the_longest_wait() -> None:
    admission = AdmissionController(AdmissionConfig(max_sessions=1), rng=random.Random(3))
    gate = Gatekeeper(registry(), admission)
    opened(gate.open_session(0.0, "a", Conn("10.0.0.1")))
    refusal = gate.open_session(0.0, "b", Conn("10.0.0.2"))
    assert isinstance(refusal, Refusal) and refusal.detail == "max_sessions"
    # 30 s +/- 10 %, then clamped to [1, 30]: the same draw from the same seed.
    assert refusal.retry_after == min(30.0, 30.0 + random.Random(3).uniform(-3.0, 3.0))


def test_a_hello_refused_by_the_cap_does_not_count_towards_a_flapping_ban() -> None:
    # The cap is checked first: a refused hello never reaches the flapping detector.
    admission = AdmissionController(AdmissionConfig(max_sessions=1))
    gate = Gatekeeper(registry(), admission, FlappingDetector(FlappingConfig(max_hellos=1)))
    a = opened(gate.open_session(0.0, "a", Conn("10.0.0.1"))).session
    for i in range(5):
        refusal = gate.open_session(float(i), "b", Conn("10.0.0.2"))
        assert isinstance(refusal, Refusal) and refusal.reason is CloseReason.OVERLOADED
    gate.registry.close(a, CloseReason.PEER_CLOSED)
    # b's first counted hello: within max_hellos=1, so it opens.
    opened(gate.open_session(5.0, "b", Conn("10.0.0.2")))


# -- flapping ----------------------------------------------------------------------------------


def test_the_sixteenth_hello_in_a_minute_is_refused_and_the_ban_ends_on_time() -> None:
    gate = Gatekeeper(registry(), flapping=FlappingDetector())
    for i in range(15):
        opening = opened(gate.open_session(float(i), "dev", Conn("10.0.0.1")))
    incumbent = opening.session
    assert gate.takeovers == 14
    ban = Refusal(CloseReason.FLAPPING, "banned for 300 s more")
    assert gate.open_session(15.0, "dev", Conn("10.0.0.1")) == ban
    # The ban refuses newcomers; the incumbent keeps its session.
    assert gate.registry.get("dev") is incumbent and incumbent.open
    assert gate.takeovers == 14
    # Refused hellos neither count nor extend the ban: it ends 300 s after it began.
    later = gate.open_session(100.0, "dev", Conn("10.0.0.1"))
    assert later == Refusal(CloseReason.FLAPPING, "banned for 215 s more")
    last = gate.open_session(314.0, "dev", Conn("10.0.0.1"))
    assert last == Refusal(CloseReason.FLAPPING, "banned for 1 s more")
    assert gate.registry.get("dev") is incumbent and incumbent.open
    # Other identities are not affected meanwhile.
    opened(gate.open_session(20.0, "other", Conn("10.0.0.1")))
    after = opened(gate.open_session(315.0, "dev", Conn("10.0.0.1")))
    assert after.displaced is incumbent and incumbent.reason is CloseReason.TAKEN_OVER
    assert gate.takeovers == 15


def test_takeovers_bouncing_between_two_hosts_are_refused_as_a_duplicate() -> None:
    gate = Gatekeeper(registry(), flapping=FlappingDetector())
    hosts = ("10.0.0.1", "10.0.0.2")
    opening = opened(gate.open_session(0.0, "dev", Conn(hosts[0])))
    # Five host-changing takeovers within a minute are allowed ...
    for i in range(1, 6):
        previous = opening.session
        opening = opened(gate.open_session(float(i), "dev", Conn(hosts[i % 2])))
        assert opening.displaced is previous
    incumbent = opening.session
    assert incumbent.conn.host == "10.0.0.2" and gate.takeovers == 5
    # ... the sixth is two devices fighting: the newcomer is refused for 5 minutes.
    refusal = gate.open_session(6.0, "dev", Conn("10.0.0.1"))
    assert refusal == Refusal(
        CloseReason.FLAPPING,
        "duplicate for 300 s more",
        duplicate=Verdict(VerdictKind.DUPLICATE, 306.0, ("10.0.0.2", "10.0.0.1")),
    )
    # The incumbent keeps its session.
    assert gate.registry.get("dev") is incumbent and incumbent.open
    assert gate.takeovers == 5
    assert gate.flapping is not None
    assert gate.flapping.stats(6.0).total_duplicates == 1
    held = gate.open_session(305.0, "dev", Conn("10.0.0.1"))
    assert isinstance(held, Refusal) and held.detail == "duplicate for 1 s more"
    assert held.duplicate == Verdict(VerdictKind.DUPLICATE, 306.0, ("10.0.0.2", "10.0.0.1"))
    # The hold ends on time: a device that really moved is only delayed.
    after = opened(gate.open_session(306.0, "dev", Conn("10.0.0.1")))
    assert after.displaced is incumbent and gate.takeovers == 6


def test_a_device_replacing_its_own_phantom_from_the_same_host_is_no_duplicate() -> None:
    gate = Gatekeeper(registry(), flapping=FlappingDetector(FlappingConfig(max_hellos=100)))
    for i in range(30):
        opened(gate.open_session(float(i), "dev", Conn("10.0.0.1")))
    assert gate.takeovers == 29
    assert gate.flapping is not None and gate.flapping.stats(30.0).total_duplicates == 0


# -- at accept: address bans and the accept rate -----------------------------------------------

_PEERS_OWN = [
    CloseReason.HELLO_TIMEOUT,
    CloseReason.AUTH_FAILED,
    CloseReason.PROTOCOL_ERROR,
    CloseReason.PEER_CLOSED,
    CloseReason.PEER_RESET,
    CloseReason.TLS_FAILED,  # a handshake the peer broke: a scanner or a misconfigured device
]


def test_only_the_peers_own_hello_aborts_are_counted() -> None:
    assert frozenset(_PEERS_OWN) == PEER_ABORTS


@pytest.mark.parametrize("reason", _PEERS_OWN, ids=lambda r: r.name)
def test_aborted_hellos_of_the_peers_own_doing_ban_its_address(reason: CloseReason) -> None:
    detector = AddressFlappingDetector(AddressFlappingConfig(enabled=True))
    gate = Gatekeeper(registry(), address_flapping=detector)
    host = "192.0.2.9"
    for i in range(15):
        assert gate.admit_connection(float(i), host) is None
        gate.record_hello_aborted(host, float(i), reason)
    # Fifteen within a minute is the most allowed ...
    assert gate.admit_connection(15.0, host) is None
    # ... the sixteenth bans the address for 5 minutes, before a byte of it is read.
    gate.record_hello_aborted(host, 15.0, reason)
    banned = Refusal(CloseReason.FLAPPING, "address banned")
    assert gate.admit_connection(15.0, host) == banned
    assert gate.admit_connection(314.999, host) == banned
    assert gate.admit_connection(15.0, "192.0.2.10") is None
    assert detector.stats(15.0) == FlappingStats(tracked=0, active_bans=1, total_bans=1)
    assert gate.admit_connection(315.0, host) is None


@pytest.mark.parametrize("reason", [CloseReason.OVERLOADED, CloseReason.SHUTDOWN], ids=str)
def test_hellos_the_server_cut_short_do_not_count(reason: CloseReason) -> None:
    detector = AddressFlappingDetector(AddressFlappingConfig(enabled=True, max_aborted=1))
    gate = Gatekeeper(registry(), address_flapping=detector)
    for i in range(100):
        gate.record_hello_aborted("192.0.2.9", i / 10, reason)
    assert gate.admit_connection(10.0, "192.0.2.9") is None
    assert detector.stats(10.0) == FlappingStats(tracked=0, active_bans=0, total_bans=0)


def test_the_address_detector_is_off_by_default() -> None:
    gate = Gatekeeper(registry(), address_flapping=AddressFlappingDetector())
    for i in range(100):
        gate.record_hello_aborted("192.0.2.9", i / 10, CloseReason.HELLO_TIMEOUT)
    assert gate.admit_connection(10.0, "192.0.2.9") is None


def test_a_banned_address_is_refused_before_it_takes_a_token() -> None:
    admission = AdmissionController(AdmissionConfig(accept_rate=1.0, accept_burst=1))
    detector = AddressFlappingDetector(AddressFlappingConfig(enabled=True, max_aborted=1))
    gate = Gatekeeper(registry(), admission, address_flapping=detector)
    gate.record_hello_aborted("bad", 0.0, CloseReason.HELLO_TIMEOUT)
    gate.record_hello_aborted("bad", 0.0, CloseReason.HELLO_TIMEOUT)
    assert gate.admit_connection(0.0, "bad") == Refusal(CloseReason.FLAPPING, "address banned")
    stats = admission.stats(0.0)
    assert (stats.admitted, stats.tokens) == (0, 1.0)
    assert gate.admit_connection(0.0, "good") is None


def test_the_accept_rate_refuses_with_a_booked_retry_after_hint() -> None:
    config = AdmissionConfig(accept_rate=4.0, accept_burst=2, retry_after_jitter=0.0)
    admission = AdmissionController(config)
    gate = Gatekeeper(registry(), admission)
    host = "10.0.0.1"
    assert gate.admit_connection(0.0, host) is None
    assert gate.admit_connection(0.0, host) is None
    # The bucket is empty. Its next token comes at 0.25 s, but no hint is below the 1 s
    # minimum; each further refusal is booked one token (1 / rate) after the one before, so a
    # crowd that obeys comes back spread over the time the bucket needs.
    refusals = [gate.admit_connection(0.0, host) for _ in range(3)]
    assert refusals == [
        Refusal(CloseReason.OVERLOADED, "accept_rate", 1.0),
        Refusal(CloseReason.OVERLOADED, "accept_rate", 1.25),
        Refusal(CloseReason.OVERLOADED, "accept_rate", 1.5),
    ]
    # A refusal takes no token: the one refilled by 0.25 s is there.
    assert gate.admit_connection(0.25, host) is None
    # The bookings stand: the next one refused is told to come back at 1.75 s, after the
    # three before it.
    assert gate.admit_connection(0.25, host) == Refusal(CloseReason.OVERLOADED, "accept_rate", 1.5)
    stats = admission.stats(0.25)
    assert (stats.admitted, stats.refused["accept_rate"]) == (3, 4)


def test_with_the_defaults_a_burst_of_3000_is_admitted_and_the_next_told_to_wait() -> None:
    admission = AdmissionController(rng=random.Random(1))
    gate = Gatekeeper(registry(), admission)
    assert all(gate.admit_connection(0.0, "10.0.0.1") is None for _ in range(3000))
    refusal = gate.admit_connection(0.0, "10.0.0.1")
    assert isinstance(refusal, Refusal)
    assert (refusal.reason, refusal.detail, refusal.duplicate) == (
        CloseReason.OVERLOADED,
        "accept_rate",
        None,
    )
    # The 1 s minimum, jittered by +/- 10 % and clamped to [1, 30]: the same draw, same seed.
    assert refusal.retry_after == max(1.0, 1.0 + random.Random(1).uniform(-0.1, 0.1))

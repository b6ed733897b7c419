"""The stale-hello rule of the Gatekeeper, with explicit accept orders and times."""

from __future__ import annotations

import attrs

from keepconn import CloseReason, SessionRegistry
from keepconn._core.opening import Gatekeeper, Opening, Refusal


@attrs.frozen
class Conn:
    order: int
    host: str = "10.0.0.1"


def test_an_older_connection_never_takes_over_a_newer_ones_session() -> None:
    gate = Gatekeeper(SessionRegistry(timeout=30))
    newer = gate.open_session(1.0, "dev", Conn(order=2))
    assert isinstance(newer, Opening) and newer.displaced is None
    stale = gate.open_session(2.0, "dev", Conn(order=1))
    assert isinstance(stale, Refusal)
    assert stale.reason is CloseReason.STALE_HELLO
    assert "newer connection" in stale.detail
    assert gate.registry.get("dev") is newer.session and newer.session.open
    assert (gate.stale, gate.takeovers) == (1, 0)


def test_a_newer_connection_takes_over_whatever_the_timing() -> None:
    gate = Gatekeeper(SessionRegistry(timeout=30))
    first = gate.open_session(5.0, "dev", Conn(order=7))
    assert isinstance(first, Opening)
    # Read earlier or later, it makes no difference: only the accept order counts.
    second = gate.open_session(4.0, "dev", Conn(order=8))
    assert isinstance(second, Opening) and second.displaced is first.session
    assert first.session.reason is CloseReason.TAKEN_OVER
    assert (gate.stale, gate.takeovers) == (0, 1)


def test_the_rule_is_per_identity() -> None:
    gate = Gatekeeper(SessionRegistry(timeout=30))
    assert isinstance(gate.open_session(0.0, "a", Conn(order=5)), Opening)
    # An older connection of another identity opens its own session as usual.
    assert isinstance(gate.open_session(0.0, "b", Conn(order=1)), Opening)
    assert len(gate.registry) == 2


def test_takes_over_says_when_the_adapter_must_first_hear_from_the_peer() -> None:
    gate = Gatekeeper(SessionRegistry(timeout=30))
    # No live session: nothing to displace, no round trip needed.
    assert not gate.takes_over("dev", Conn(order=3))
    assert isinstance(gate.open_session(1.0, "dev", Conn(order=3)), Opening)
    # A newer connection would displace it; an older one is refused by accept order anyway.
    assert gate.takes_over("dev", Conn(order=4))
    assert not gate.takes_over("dev", Conn(order=2))
    assert not gate.takes_over("other", Conn(order=9))
    # The peer answered its welcome with a reset: refused as stale, counted with the others.
    refusal = gate.refuse_stale("reset on its welcome")
    assert refusal.reason is CloseReason.STALE_HELLO and refusal.detail == "reset on its welcome"
    assert (gate.stale, gate.takeovers) == (1, 0)
    assert gate.registry.get("dev") is not None and len(gate.registry) == 1

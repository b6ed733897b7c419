"""Hypothesis drives the registry in random order against a plain reference model."""

from __future__ import annotations

import os
from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from keepconn import CloseReason, Session, SessionRegistry

KEYS = st.integers(min_value=0, max_value=12)
TIMEOUTS = st.one_of(st.none(), st.sampled_from([0.3, 1.0, 2.5, 7.0]), st.floats(0.05, 20.0))
CLOSE_REASONS = st.sampled_from(
    [r for r in CloseReason if r not in (CloseReason.IDLE_TIMEOUT, CloseReason.TAKEN_OVER)]
)


class RegistryMachine(RuleBasedStateMachine):
    """The model: key -> (session, last, timeout). Time only moves forward, by at most one
    resolution between reaps, so every reap promise can be checked exactly."""

    @initialize(
        timeout=st.floats(0.5, 10.0),
        resolution_fraction=st.floats(0.01, 1.0),
        start=st.floats(-1e4, 1e6),
    )
    def setup(self, timeout: float, resolution_fraction: float, start: float) -> None:
        self.resolution = timeout * resolution_fraction
        self.registry = SessionRegistry(timeout=timeout, resolution=self.resolution)
        self.default_timeout = timeout
        self.now = start
        self.model: dict[int, tuple[Session, float, float]] = {}
        self.closed: Counter[CloseReason] = Counter()
        self.opened = 0
        self.seen_closed: set[Session] = set()

    @rule(key=KEYS, timeout=TIMEOUTS)
    def open(self, key: int, timeout: float | None) -> None:
        old = self.model.get(key)
        session = self.registry.open(key, now=self.now, timeout=timeout)
        self.opened += 1
        if old is not None:
            assert old[0].reason is CloseReason.TAKEN_OVER
            self.closed[CloseReason.TAKEN_OVER] += 1
        used = self.default_timeout if timeout is None else timeout
        self.model[key] = (session, self.now, used)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def touch(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        session, _, timeout = self.model[key]
        session.touch(self.now)
        self.model[key] = (session, self.now, timeout)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), reason=CLOSE_REASONS)
    def close(self, data: st.DataObject, reason: CloseReason) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        session = self.model.pop(key)[0]
        assert self.registry.close(session, reason) is True
        assert self.registry.close(session, CloseReason.SHUTDOWN) is False
        self.closed[reason] += 1

    @rule(fraction=st.floats(0.0, 1.0), limit=st.one_of(st.none(), st.integers(1, 4)))
    def advance_and_reap(self, fraction: float, limit: int | None) -> None:
        self.now += fraction * self.resolution
        reaped: list[Session] = []
        while True:
            batch = self.registry.reap(self.now, limit=limit)
            if limit is not None:
                assert len(batch) <= limit
            reaped += batch
            wake = self.registry.next_deadline()
            if limit is None or wake is None or wake > self.now:
                break
        for session in reaped:
            key = session.key
            assert isinstance(key, int)
            model_session, last, timeout = self.model.pop(key)
            assert model_session is session
            assert session.reason is CloseReason.IDLE_TIMEOUT
            assert session not in self.seen_closed
            self.seen_closed.add(session)
            # Never early.
            assert last + timeout <= self.now
            self.closed[CloseReason.IDLE_TIMEOUT] += 1

    @invariant()
    def nothing_overdue_survives(self) -> None:
        # Reaps happen at least every resolution and each one takes everything due, so a live
        # session is never more than one resolution past its deadline.
        for session, last, timeout in self.model.values():
            assert session.open
            assert self.now <= last + timeout + self.resolution * (1 + 1e-9) + 1e-9

    @invariant()
    def one_live_session_per_key(self) -> None:
        assert len(self.registry) == len(self.model)
        for key, (session, _, _) in self.model.items():
            assert self.registry.get(key) is session
        assert {s.key for s in self.registry} == set(self.model)

    @invariant()
    def next_deadline_is_never_after_a_due_time_plus_resolution(self) -> None:
        wake = self.registry.next_deadline()
        if not self.model:
            return
        assert wake is not None
        earliest = min(last + timeout for _, last, timeout in self.model.values())
        assert wake <= earliest + self.resolution * (1 + 1e-9) + 1e-9

    @invariant()
    def statistics_add_up(self) -> None:
        stats = self.registry.stats()
        assert stats.live == len(self.model)
        assert stats.opened == self.opened
        assert stats.opened == stats.live + stats.total_closed
        for reason in CloseReason:
            assert stats.closed[reason] == self.closed[reason], reason


EXAMPLES = int(os.environ.get("KEEPCONN_HYPOTHESIS_EXAMPLES", "300"))
RegistryMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=60, deadline=None
)
TestRegistryMachine = RegistryMachine.TestCase

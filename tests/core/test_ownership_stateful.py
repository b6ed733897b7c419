"""Hypothesis drives three nodes' ownership cores against a model of the store, with notices
lost and reordered, replies reordered, nodes restarted, and a store that loses its data.

The store model does what the Lua scripts do (epochs ``max(previous + 1, clock)``, the claimer
tells the previous owner, epoch-checked release, reassert-if-missing); the machine plays the
server's glue (one claim per identity in flight per node, the local session displaced only by
a claim that won, close what the core says). Claims may be refused (flapping cluster-wide) and
devices may give up while their claim is in flight. Checked:

* at quiescence (nothing in flight, every node reconciled since its last lost notice) at most
  one node has a confirmed session per identity -- but for a node that has not renewed since
  the store lost its data, which learns it at its next renewal -- and once every node has
  renewed, the one left is the store's owner;
* a confirmed session never has a lower epoch than another node's confirmed one once their
  notices are delivered (highest epoch wins);
* a node whose lease could have expired serves nothing once its core has been asked (no
  double ownership beyond the lease while cut off from the store).
"""

from __future__ import annotations

import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from keepconn._core.ownership import ClusterConfig, Ownership

NODES = ("a", "b", "c")
KEYS = ("x", "y")
TTL = 3.0


class Conn:
    """A connection of the model (the core only keeps it and hands it back)."""

    ids = itertools.count()

    def __init__(self, node: str, key: str) -> None:
        self.node, self.key, self.id = node, key, next(self.ids)
        self.closed = False

    def __repr__(self) -> str:
        return f"{self.node}:{self.key}#{self.id}"


class ClusterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.clock = 1000  # the store's epoch clock (microseconds, say)
        self.store: dict[str, tuple[int, str]] = {}
        self.leases: dict[str, float] = {}
        self.cores = {n: self._new_core(n) for n in NODES}
        # node -> key -> its live local connection (the Gatekeeper's registry).
        self.local: dict[str, dict[str, Conn]] = {n: {} for n in NODES}
        # Claims sent, not yet run by the store; replies and notices not yet delivered.
        self.requests: list[Conn] = []
        self.replies: list[tuple[Conn, int, str | None]] = []
        self.notices: list[tuple[str, str, int]] = []
        self.unreconciled: set[str] = set()
        self.cut_off: set[str] = set()
        # Nodes that have not renewed since the store lost its data: they learn of the loss
        # at their next renewal (within renew_interval), and until then may hold a session
        # that another node has claimed afresh (no record, so nobody to tell).
        self.unaware: set[str] = set()

    def _new_core(self, name: str) -> Ownership:
        core = Ownership(ClusterConfig(node_id=name, node_ttl=TTL), self.now)
        core.renewed(self.now, existed=False)
        self.leases[name] = self.now + TTL
        return core

    def _in_flight(self, node: str, key: str) -> bool:
        return any(c.node == node and c.key == key for c in self.requests) or any(
            c.node == node and c.key == key for c, _, _ in self.replies
        )

    def _close(self, conn: Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        if self.local[conn.node].get(conn.key) is conn:
            del self.local[conn.node][conn.key]
        release = self.cores[conn.node].closed(conn.key, conn)
        if release is not None:
            self._release(conn.node, conn.key, release)

    def _release(self, node: str, key: str, epoch: int) -> None:
        if node not in self.cut_off and self.store.get(key) == (epoch, node):
            del self.store[key]

    # -- devices and the server glue

    @rule(node=st.sampled_from(NODES), key=st.sampled_from(KEYS))
    def hello(self, node: str, key: str) -> None:
        core = self.cores[node]
        if not core.admit(self.now) or self._in_flight(node, key):
            return  # refused, or (as the glue does) waiting for the claim in flight
        conn = Conn(node, key)
        core.claim_sent(key, conn)
        self.requests.append(conn)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def device_gives_up_while_claiming(self, data: st.DataObject) -> None:
        # Its connection closes (a shutdown, say) while the claim is in flight: the glue
        # still opens it if the claim wins, and its close then releases the claim.
        data.draw(st.sampled_from(self.requests)).closed = True

    @precondition(lambda self: any(self.local.values()))
    @rule(data=st.data())
    def device_leaves(self, data: st.DataObject) -> None:
        conns = [c for per in self.local.values() for c in per.values()]
        self._close(data.draw(st.sampled_from(conns)))

    # -- the store

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), flapping=st.booleans())
    def store_runs_a_claim(self, data: st.DataObject, flapping: bool = False) -> None:
        conn = self.requests.pop(data.draw(st.integers(0, len(self.requests) - 1)))
        if conn.node in self.cut_off:
            self.replies.append((conn, 0, None))  # the call fails at the node
            return
        if flapping:
            self.replies.append((conn, -1, None))  # refused: nothing claimed, nobody told
            return
        self.clock += data.draw(st.integers(1, 3))  # the store's clock moves on
        previous = self.store.get(conn.key)
        epoch = max(self.clock, previous[0] + 1 if previous else 0)
        self.clock = max(self.clock, epoch)
        self.store[conn.key] = (epoch, conn.node)
        prev_node = previous[1] if previous else None
        if prev_node is not None and prev_node != conn.node:
            self.notices.append((prev_node, conn.key, epoch))
        self.replies.append((conn, epoch, prev_node))

    @precondition(lambda self: self.replies)
    @rule(data=st.data())
    def deliver_a_reply(self, data: st.DataObject) -> None:
        conn, epoch, prev = self.replies.pop(data.draw(st.integers(0, len(self.replies) - 1)))
        core = self.cores[conn.node]
        if epoch <= 0:
            release = core.claim_failed(conn.key, conn, refused=epoch < 0)
            if release is not None:
                self._release(conn.node, conn.key, release)
            self._close(conn)  # OVERLOADED or FLAPPING: the local session stays
            return
        outcome = core.claimed(
            conn.key, conn, epoch, remote=prev not in (None, conn.node), now=self.now
        )
        if outcome.release is not None:
            self._release(conn.node, conn.key, outcome.release)
        if not outcome.won:
            self._close(conn)  # TAKEN_OVER
            return
        # The Gatekeeper's open: the claim won, so the local session is displaced.
        gave_up, conn.closed = conn.closed, False
        old = self.local[conn.node].get(conn.key)
        self.local[conn.node][conn.key] = conn
        if old is not None:
            self._close(old)
        if outcome.reassert:
            self._reassert(conn.node, [(conn.key, epoch, conn)])
        if gave_up:
            self._close(conn)

    @precondition(lambda self: self.notices)
    @rule(data=st.data(), lose=st.booleans())
    def deliver_a_notice(self, data: st.DataObject, lose: bool) -> None:
        node, key, epoch = self.notices.pop(data.draw(st.integers(0, len(self.notices) - 1)))
        if lose:
            self.unreconciled.add(node)  # the subscription dropped; the node reconciles
            return
        conn = self.cores[node].notice(key, epoch)
        if conn is not None:
            assert isinstance(conn, Conn)
            self._close(conn)

    @precondition(lambda self: self.unreconciled - self.cut_off)
    @rule(data=st.data())
    def reconcile(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from(sorted(self.unreconciled - self.cut_off)))
        core = self.cores[node]
        for key, epoch, conn in core.held():
            record = self.store.get(key)
            if record is None:
                self.store[key] = (epoch, node)  # reassert
            elif record[1] != node and core.lost(key, conn):
                assert isinstance(conn, Conn)
                self._close(conn)
        self.unreconciled.discard(node)

    @rule()
    def store_loses_its_data(self) -> None:
        self.store.clear()
        self.unaware = set(NODES)
        self.leases = dict.fromkeys(self.leases, -1.0)

    # -- time, leases, nodes

    @rule(dt=st.sampled_from([0.05, 0.1, 0.4, 1.0, 2.0]))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        for core in self.cores.values():
            for conn in core.due(self.now):
                assert isinstance(conn, Conn)
                self._close(conn)  # OWNERSHIP_LOST

    @rule(node=st.sampled_from(NODES))
    def renew(self, node: str) -> None:
        core = self.cores[node]
        if node in self.cut_off:
            core.store_failed()
            return
        existed = self.leases[node] > self.now
        self.leases[node] = self.now + TTL
        self.unaware.discard(node)
        self._reassert(node, core.renewed(self.now, existed))

    def _reassert(self, node: str, held: list[tuple[str, int, object]]) -> None:
        core = self.cores[node]
        for key, epoch, conn in held:
            record = self.store.get(key)
            if record is None:
                self.store[key] = (epoch, node)
            elif record[1] != node and core.lost(key, conn):  # type: ignore[arg-type]
                assert isinstance(conn, Conn)
                self._close(conn)

    @rule(node=st.sampled_from(NODES))
    def cut_off_or_reconnect(self, node: str) -> None:
        if node in self.cut_off:
            self.cut_off.discard(node)
            self.unreconciled.add(node)  # it resubscribes, hence reconciles
        else:
            self.cut_off.add(node)

    @rule(node=st.sampled_from(NODES))
    def node_restarts(self, node: str) -> None:
        # Its process dies: its connections vanish with it (no release), its lease stays in
        # the store until it expires, its claims in flight are lost.
        for conn in self.local[node].values():
            conn.closed = True
        self.local[node] = {}
        self.requests = [c for c in self.requests if c.node != node]
        self.replies = [r for r in self.replies if r[0].node != node]
        self.notices = [n for n in self.notices if n[0] != node]
        self.unreconciled.discard(node)
        self.cores[node] = self._new_core(node)
        self.unaware.discard(node)

    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        """Everything in flight arrives (in any order, nothing lost), every node reconnects,
        renews (as it does within renew_interval: a node whose lease the store lost learns
        it so) and reconciles; then one owner per identity must be left."""
        for node in sorted(self.cut_off):
            self.cut_off_or_reconnect(node)
        self._drain(data)
        for node in NODES:
            self.renew(node)
        self._drain(data)
        for node in sorted(self.unreconciled):
            self.unreconciled = {node}
            self.reconcile(data)
        self._drain(data)
        self._settled()

    def _drain(self, data: st.DataObject) -> None:
        for _ in range(500):
            steps = []
            if self.requests:
                steps.append(lambda d: self.store_runs_a_claim(d, flapping=False))
            if self.replies:
                steps.append(self.deliver_a_reply)
            if self.notices:
                steps.append(lambda d: self.deliver_a_notice(d, lose=False))
            if not steps:
                return
            data.draw(st.sampled_from(steps))(data)

    # -- what must hold

    def _confirmed(self) -> dict[str, list[tuple[str, int]]]:
        found: dict[str, list[tuple[str, int]]] = {}
        for node, core in self.cores.items():
            for key, epoch, conn in core.held():
                assert isinstance(conn, Conn) and not conn.closed
                assert self.local[node].get(key) is conn
                found.setdefault(key, []).append((node, epoch))
        return found

    @invariant()
    def the_core_tracks_exactly_the_live_connections(self) -> None:
        for node, core in self.cores.items():
            for key, conn in self.local[node].items():
                assert core.live(key) is conn

    @invariant()
    def one_owner_at_quiescence(self) -> None:
        if self.requests or self.replies or self.notices or self.unreconciled or self.cut_off:
            return
        for key, holders in self._confirmed().items():
            aware = [(node, epoch) for node, epoch in holders if node not in self.unaware]
            assert len(aware) <= 1, (key, holders, self.store)

    def _settled(self) -> None:
        """After settle: one owner, and the store names it (a node that finds another's
        record at its renewal gives the session up, even to a claim of a node since dead)."""
        self.one_owner_at_quiescence()
        for key, holders in self._confirmed().items():
            node, _ = holders[0]
            record = self.store.get(key)
            assert record is None or record[1] == node, (key, holders, record)

    @invariant()
    def no_service_past_the_lease(self) -> None:
        for node, core in self.cores.items():
            # The store cannot have let the lease expire before the node stops trusting it...
            if self.leases[node] >= 0:
                assert core.valid_until <= self.leases[node] + 1e-9
            # ...and once past it (time_passes asks the core), the node serves nothing.
            if self.now >= core.valid_until:
                assert not self.local[node], (node, self.local[node])


TestCluster = ClusterMachine.TestCase
TestCluster.settings = settings(max_examples=600, stateful_step_count=40, deadline=None)

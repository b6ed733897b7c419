"""The server's side of a cluster: claims in the hello path, notices, the lease, the store-down
policy. The rules are the core's :class:`Ownership`; this module runs them on anyio and speaks
to the store through :class:`ClusterStore`, a small protocol that ``keepconn.cluster``'s Redis
adapter implements (so nothing here imports a Redis client).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol, TypeVar

import anyio
import anyio.abc
import attrs

from .._core.errors import StoreUnavailable
from .._core.events import ServerEvent, SessionTakenOver
from .._core.flapping import FlappingConfig
from .._core.ownership import Claim, ClusterConfig, ClusterStats, Ownership
from .._core.reasons import CloseReason
from .connection import Connection

__all__ = ["ClusterNode", "ClusterStore"]

logger = logging.getLogger("keepconn.cluster")

T = TypeVar("T")

#: Reconciliation checks this many sessions per store round trip.
_CHECK_BATCH = 500
#: While the store is unreachable, the lease renewal is retried this often (seconds).
_RETRY = 0.1
#: Close details of hellos whose claim did not win.
_UNREACHABLE = "cluster store unreachable"
_LATER = "a later claim on another node won"


async def _cancel_with(scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` when this task is cancelled (see :meth:`ClusterNode.run`)."""
    try:
        await anyio.sleep_forever()
    finally:
        scope.cancel()


class ClusterStore(Protocol):
    """What a Server needs of a cluster store. Every call may raise StoreUnavailable; the
    caller bounds each one with ``config.store_timeout``."""

    @property
    def config(self) -> ClusterConfig:
        """The node's configuration."""
        ...

    def connected(self) -> AbstractAsyncContextManager[None]:
        """Hold the store's client open for the server's life."""
        ...

    async def renew(self) -> bool:
        """Renew this node's lease; False if it was gone (and has been made anew)."""
        ...

    async def claim(
        self,
        key: str,
        host: str,
        limit: tuple[int, float] | None = None,
        duplicates: tuple[int, float, float] | None = None,
    ) -> Claim:
        """Claim ``key`` for this node; the store tells the previous owner. ``limit``: most
        claims of the identity cluster-wide per window (seconds), else refused as flapping.
        ``duplicates``: most claims from a host other than the owner's per window, and how
        long the identity is then held for its owner (seconds), else refused as a duplicate."""
        ...

    async def release(self, held: Sequence[tuple[str, int]]) -> None:
        """Delete each ``(key, epoch)`` record that is still this node's claim with that
        epoch, in one round trip."""
        ...

    async def owners(self, keys: Sequence[str]) -> list[str | None]:
        """The node holding each key (None: no record), in one round trip."""
        ...

    async def reassert(self, held: Sequence[tuple[str, int]]) -> list[bool]:
        """Recreate missing records of ``(key, epoch)``; False where another node holds it."""
        ...

    async def listen(
        self, on_notice: Callable[[str, int, str], None], on_subscribed: Callable[[], None]
    ) -> None:
        """Receive this node's eviction notices ``(key, epoch, by_node)`` for ever,
        resubscribing after any loss of the subscription; ``on_subscribed`` after each
        (re)subscription (notices sent meanwhile are lost: the node reconciles)."""
        ...

    async def collect(self) -> int | None:
        """One step of the collector of dead nodes' owner records, if it is this node's turn:
        the number deleted (None: not its turn, or collection is off)."""
        ...

    async def leave(self) -> None:
        """Give up this node's lease (a clean shutdown)."""
        ...

    def attach(self, stats: Callable[[], ClusterStats | None]) -> None:
        """Called by the server so the store object can report the node's stats."""
        ...


class ClusterNode:
    """One server's membership of a cluster (the server makes it from a ClusterStore)."""

    def __init__(
        self,
        store: ClusterStore,
        emit: Callable[[ServerEvent], None],
        flapping: FlappingConfig | None = None,
    ) -> None:
        self.store = store
        # Flapping counted cluster-wide by the claim script: a device bouncing between nodes
        # is caught as one bouncing on one node is (each node's detector sees only its part).
        self._limit = (
            (flapping.max_hellos, flapping.window)
            if flapping is not None and flapping.enabled
            else None
        )
        # Duplicate identities too: the store counts takeovers that move an identity between
        # hosts, on any nodes (two devices fighting over it across nodes are caught so).
        self._duplicates = (
            (flapping.duplicate_takeovers, flapping.duplicate_window, flapping.duplicate_hold)
            if flapping is not None and flapping.detect_duplicates
            else None
        )
        #: Hellos refused as flapping cluster-wide.
        self.flapping_refused = 0
        #: Hellos refused as a duplicate identity cluster-wide.
        self.duplicates_refused = 0
        self.config = store.config
        self._emit = emit
        self.core: Ownership | None = None
        self._releases: list[tuple[str, int]] = []
        self._release_wanted = anyio.Event()
        self._reconcile_wanted = anyio.Event()
        self._woken = anyio.Event()
        self._inflight: dict[str, anyio.Event] = {}
        self._running = False
        store.attach(self.stats)

    def stats(self) -> ClusterStats | None:
        """The node's snapshot; None before the server runs it."""
        if self.core is None:
            return None
        stats = self.core.stats(anyio.current_time())
        return attrs.evolve(
            stats,
            flapping_refused=self.flapping_refused,
            duplicates_refused=self.duplicates_refused,
        )

    # -- running

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Connect the store and run the lease, notices, reconciliation and the store-down
        policy until cancelled; then give up the lease and this node's records. Started
        before the server accepts."""
        self.core = Ownership(self.config, anyio.current_time())
        work = anyio.CancelScope()
        async with anyio.create_task_group() as guard:
            # The store client lives in a shielded scope: its connections run in tasks of
            # the client's own task group, and a cancellation that reached them would cut
            # the very connection the lease must be given up on ("leave: ConnectionError").
            # The guard task takes the cancellation in the client's stead and passes it on
            # to the node's own tasks (``work``); the client closes after the leave.
            guard.start_soon(_cancel_with, work, name="keepconn cluster guard")
            with anyio.CancelScope(shield=True):
                async with self.store.connected():
                    try:
                        with work:
                            await self._work(task_status)
                    finally:
                        self._running = False
                        # The node's tasks have all ended (none renews the lease after it
                        # is deleted); what is left is bounded by store_timeout per call.
                        await self._leave()
            guard.cancel_scope.cancel()

    async def _work(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._renew_forever, name="keepconn cluster lease")
            tasks.start_soon(self._listen_forever, name="keepconn cluster notices")
            tasks.start_soon(self._reconcile_forever, name="keepconn cluster reconcile")
            tasks.start_soon(self._expire_forever, name="keepconn cluster ownership")
            tasks.start_soon(self._release_forever, name="keepconn cluster release")
            if self.config.collect_interval is not None:
                tasks.start_soon(
                    self._collect_forever, self.config.collect_interval, name="keepconn cluster gc"
                )
            self._running = True
            task_status.started()
            await anyio.sleep_forever()

    async def _leave(self) -> None:
        # The sessions are closed by now (the server drains first): release their records,
        # then drop the lease, each bounded like every store call.
        await self._flush_releases()
        try:
            with anyio.fail_after(self.config.store_timeout):
                await self.store.leave()
        except (TimeoutError, StoreUnavailable) as exc:
            logger.info("cluster: lease not given up at shutdown: %s", exc)

    async def _call(self, call: Callable[..., Awaitable[T]], *args: Any) -> T:
        """One store call, bounded by store_timeout (TimeoutError past it)."""
        with anyio.fail_after(self.config.store_timeout):
            return await call(*args)

    async def _renew_forever(self) -> None:
        core = self._core()
        while True:
            sent = anyio.current_time()
            try:
                existed = await self._call(self.store.renew)
            except (TimeoutError, StoreUnavailable) as exc:
                if core.healthy:
                    logger.warning("cluster: store unreachable (%s); refusing new hellos", exc)
                core.store_failed()
                self._woken.set()
                await anyio.sleep(_RETRY)
                continue
            recovered = core.errors > 0 and not core.healthy
            reassert = core.renewed(sent, existed)
            if recovered:
                logger.warning("cluster: store reachable again")
            self._woken.set()
            if reassert:
                logger.warning("cluster: lease was gone; reasserting %d sessions", len(reassert))
                await self._reassert(reassert)
            for key, conn in core.unclaimed():
                await self._claim_kept(key, conn)
            await anyio.sleep(max(0.0, sent + self.config.renew_interval - anyio.current_time()))

    async def _listen_forever(self) -> None:
        await self.store.listen(self._on_notice, self._want_reconcile)

    def _want_reconcile(self) -> None:
        # Looked up at each call: the event is replaced after every reconciliation.
        self._reconcile_wanted.set()

    def _on_notice(self, key: str, epoch: int, by: str) -> None:
        conn = self._core().notice(key, epoch)
        if conn is not None:
            self._taken(conn, by)

    def _taken(self, conn: Hashable, by: str) -> None:
        assert isinstance(conn, Connection)
        conn.close(CloseReason.TAKEN_OVER, f"by node {by}")
        self._emit(SessionTakenOver(conn.identity, conn.peer, by))

    async def _reconcile_forever(self) -> None:
        interval = self.config.reconcile_interval
        while True:
            with anyio.move_on_after(math.inf if interval is None else interval):
                await self._reconcile_wanted.wait()
            self._reconcile_wanted = anyio.Event()
            try:
                await self._reconcile()
            except (TimeoutError, StoreUnavailable) as exc:
                self._core().store_failed()
                logger.info("cluster: reconciliation failed (%s); retrying", exc)
                await anyio.sleep(_RETRY)
                self._reconcile_wanted.set()

    async def _reconcile(self) -> None:
        """Check every confirmed local session against the store: one another node holds is
        closed TAKEN_OVER (its notice was lost); one with no record is reasserted."""
        core = self._core()
        held = core.held()
        for start in range(0, len(held), _CHECK_BATCH):
            batch = held[start : start + _CHECK_BATCH]
            owners = await self._call(self.store.owners, [k for k, _, _ in batch])
            core.store_ok()
            missing = []
            for (key, epoch, conn), owner in zip(batch, owners, strict=True):
                if owner is None:
                    missing.append((key, epoch, conn))
                elif owner != self.config.node_id and core.lost(key, conn):
                    self._taken(conn, owner)
            if missing:
                await self._reassert(missing)

    async def _reassert(self, held: Sequence[tuple[str, int, Hashable]]) -> None:
        core = self._core()
        for start in range(0, len(held), _CHECK_BATCH):
            batch = held[start : start + _CHECK_BATCH]
            pairs = [(key, epoch) for key, epoch, _ in batch]
            try:
                kept = await self._call(self.store.reassert, pairs)
            except (TimeoutError, StoreUnavailable):
                core.store_failed()
                self._reconcile_wanted.set()  # try again with the next reconciliation
                return
            core.store_ok()
            for (key, _, conn), ok in zip(batch, kept, strict=True):
                if not ok and core.lost(key, conn):
                    self._taken(conn, "another node (reasserted)")

    async def _expire_forever(self) -> None:
        core = self._core()
        while True:
            now = anyio.current_time()
            for conn in core.due(now):
                assert isinstance(conn, Connection)
                conn.close(CloseReason.OWNERSHIP_LOST, "cluster store unreachable for the lease")
            deadline = core.next_deadline()
            wait = 0.25 if deadline is None else min(0.25, max(0.0, deadline - now))
            with anyio.move_on_after(wait):
                await self._woken.wait()
            self._woken = anyio.Event()

    async def _collect_forever(self, interval: float) -> None:
        # Every node asks once per interval and the store lets one of them do a step: the
        # collector's traffic grows with nodes, its work is one batch per interval.
        core = self._core()
        while True:
            await anyio.sleep(interval)
            try:
                deleted = await self._call(self.store.collect)
            except (TimeoutError, StoreUnavailable) as exc:
                core.store_failed()
                logger.info("cluster: collector step failed (%s)", exc)
                continue
            core.collected(deleted or 0)
            if deleted:
                logger.info("cluster: collected %d owner records of nodes gone", deleted)

    async def _release_forever(self) -> None:
        while True:
            await self._release_wanted.wait()
            self._release_wanted = anyio.Event()
            await self._flush_releases()

    async def _flush_releases(self) -> None:
        core = self._core()
        while self._releases:
            batch = self._releases[-_CHECK_BATCH:]
            del self._releases[-_CHECK_BATCH:]
            try:
                # Shielded (and bounded by store_timeout): a batch taken off the queue is
                # sent, even when the node is being stopped meanwhile (the shutdown's closes
                # are released by this task, then by the leave).
                with anyio.CancelScope(shield=True):
                    await self._call(self.store.release, batch)
                core.store_ok()
            except (TimeoutError, StoreUnavailable):
                # The batch is not retried: a record left behind points at this node, and
                # the next claim of the identity overwrites it (epochs still increase), or
                # the collector deletes it once this node's lease is gone. The rest waits
                # for the next flush: one failure costs one store_timeout, not one per batch
                # (a shutdown with the store gone stays bounded).
                core.store_failed()
                return

    def _release(self, key: str, epoch: int | None) -> None:
        if epoch is not None:
            self._releases.append((key, epoch))
            self._release_wanted.set()

    def _core(self) -> Ownership:
        assert self.core is not None, "the cluster node is not running"
        return self.core

    # -- the hello path (called by the connection's own task)

    def admit(self) -> float | None:
        """None if a hello may be claimed now; else the retry hint of its refusal."""
        core = self.core
        if core is None or not self._running:
            return self.config.retry_after
        return None if core.admit(anyio.current_time()) else self.config.retry_after

    @asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[None]:
        """Hold this node's turn for ``key``: from the Gatekeeper's checks through the claim to
        the local open, one hello per identity at a time. The store then orders this node's
        claims as they were sent, so the latest local session always holds the node's
        highest epoch, and a claim refused or failed leaves the local session as it was.
        (Claimed concurrently, an older hello's claim could land last and win for a
        connection already displaced here, leaving no winner at all.)"""
        while (busy := self._inflight.get(key)) is not None:
            await busy.wait()
        done = self._inflight[key] = anyio.Event()
        try:
            yield
        finally:
            del self._inflight[key]
            done.set()

    async def claim(self, key: str, conn: Connection[Any]) -> tuple[CloseReason, str] | None:
        """Claim the identity ``key`` for ``conn``, in the caller's :meth:`turn`. None: it won
        (open the session now, displacing any local one); else the reason and detail to close
        it with (OVERLOADED: store unreachable; TAKEN_OVER: a later claim won; FLAPPING:
        refused cluster-wide, as flapping or as a duplicate identity)."""
        return await self._claim(self._core(), key, conn)

    async def _claim(
        self, core: Ownership, key: str, conn: Connection[Any]
    ) -> tuple[CloseReason, str] | None:
        core.claim_sent(key, conn)
        self._woken.set()
        try:
            # Shielded: a claim that reached the store must have its reply accounted for,
            # even if the connection is closed (taken over locally, say) meanwhile.
            with anyio.CancelScope(shield=True):
                claim: Claim = await self._call(
                    self.store.claim, key, str(conn.host), self._limit, self._duplicates
                )
        except (TimeoutError, StoreUnavailable) as exc:
            self._release(key, core.claim_failed(key, conn))
            if self.config.mode == "available":
                logger.info("cluster: %r kept unclaimed: %s", key, exc)
                return None
            return CloseReason.OVERLOADED, _UNREACHABLE
        if claim.flapping or claim.duplicate:
            self._release(key, core.claim_failed(key, conn, refused=True))
            if claim.flapping:
                self.flapping_refused += 1
                return CloseReason.FLAPPING, "flapping across the cluster"
            self.duplicates_refused += 1
            logger.warning(
                "duplicate identity %r across the cluster: hosts %s and %s keep taking it from "
                "each other; refusing the newcomer",
                key,
                claim.previous_host,
                conn.host,
            )
            return CloseReason.FLAPPING, "duplicate identity across the cluster"
        remote = claim.previous_node not in (None, self.config.node_id)
        outcome = core.claimed(key, conn, claim.epoch, remote, anyio.current_time())
        if outcome.lease_gone:
            self._release(key, outcome.release)
            return CloseReason.OVERLOADED, "the node's lease could have expired"
        if not outcome.won:
            return CloseReason.TAKEN_OVER, _LATER
        if outcome.reassert:
            with anyio.CancelScope(shield=True):
                await self._reassert([(key, claim.epoch, conn)])
            if core.live(key) is not conn:
                return CloseReason.TAKEN_OVER, _LATER
        return None

    async def _claim_kept(self, key: str, conn: Hashable) -> None:
        """Available mode: claim a session kept while the store was unreachable."""
        assert isinstance(conn, Connection)
        async with self.turn(key):
            if self._core().live(key) is not conn:
                return  # closed or displaced while it waited for its turn
            outcome = await self.claim(key, conn)
        if outcome is None:
            return
        reason, detail = outcome
        if reason is CloseReason.TAKEN_OVER:
            self._taken(conn, "another node")
        elif reason is CloseReason.FLAPPING:
            conn.close(reason, detail)

    def closed(self, conn: Connection[Any]) -> None:
        """``conn``'s session ended: release its claim when nothing else here holds it."""
        core = self.core
        if core is not None:
            self._release(str(conn.identity), core.closed(str(conn.identity), conn))

"""Cluster ownership rules: which node serves an identity, and what to do when the store is gone.

Sans-I/O: the adapter (``keepconn._anyio.cluster``) does the store calls and the closes; this
module decides, with an explicit ``now`` everywhere. The rules, and why:

* **Fencing epochs.** Every claim gets an epoch from the store, strictly increasing per identity
  (the store's claim script makes it ``max(previous + 1, store time in microseconds)``, so it
  keeps increasing after the store lost its data). Of two claims for one identity the higher
  epoch is the later one and wins, whatever order the replies and notices arrive in here.
* **Highest epoch seen.** The claimer tells the previous owner "identity, new epoch" (an
  eviction notice). That notice can arrive before this node's own claim reply; the node keeps
  the highest notice epoch per identity it has a claim in flight for, and the late reply with a
  lower epoch loses (its connection is closed TAKEN_OVER before it is welcomed).
* **The store first, then the local takeover.** A hello that passed the Gatekeeper's checks
  claims the identity (one claim per identity in flight per node, so the store orders this
  node's claims as they were sent); only a claim that won opens the session and displaces the
  local one. Until then the local session keeps the identity: a claim refused (flapping
  cluster-wide) or failed (store unreachable) leaves it serving, instead of leaving no winner.
  Ownership is per node: the store records which node holds an identity and the highest epoch
  it got; locally the Gatekeeper's live session is the one. A release (on close) is sent only
  when no local session and no claim in flight is left for the identity, and carries the
  node's highest epoch, so it never deletes a newer owner's record.
* **One lease per node.** The node renews one lease key (renewals grow with nodes, not
  devices). ``valid_until`` is the send time of the last renewal that succeeded plus
  ``node_ttl``: the store cannot have let the lease expire before then.
* **Store down** (``mode="consistent"``, the default): a hello is refused (OVERLOADED, with a
  retry hint) as soon as a store call has failed and none has succeeded since; live sessions
  are kept until the lease could have expired and are closed OWNERSHIP_LOST over the last
  ``spread`` seconds before ``valid_until``. A node cut off from the store therefore serves
  nothing past its lease, which is when another node's claim may have gone unnoticed.
  ``mode="available"`` keeps every session and admits hellos unclaimed; they are claimed
  (reasserted) when the store is back, and a conflict then ends with one winner.
* **The store came back empty** (its lease was gone at a renewal): every live session is
  reasserted with its epoch: set when the record is missing, lost (TAKEN_OVER) when another
  node has claimed it since.
* **Dead nodes' records** (no lease) are deleted by the store's collector script, one batch
  per ``collect_interval`` cluster-wide.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Literal

import attrs

from .validate import number

__all__ = ["Claim", "ClaimOutcome", "ClusterConfig", "ClusterStats", "Ownership"]

Mode = Literal["consistent", "available"]


def _node_id(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    from .errors import ConfigError

    if not isinstance(value, str) or not value or len(value) > 200:
        raise ConfigError(f"{attribute.name} must be a non-empty string of at most 200 characters")
    if any(ch.isspace() for ch in value):
        raise ConfigError(f"{attribute.name} must not contain whitespace, got {value!r}")


def _mode(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    from .errors import ConfigError

    if value not in ("consistent", "available"):
        raise ConfigError(f"{attribute.name} must be 'consistent' or 'available', got {value!r}")


def _key_prefix(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    from .errors import ConfigError

    if not isinstance(value, str) or not value or any(ch.isspace() for ch in value):
        raise ConfigError(f"{attribute.name} must be a non-empty string without whitespace")


@attrs.frozen
class ClusterConfig:
    """How one node takes part in a cluster. Validated when built.

    :param node_id: this node's name, unique in the cluster (the gateway derives one from the
        host name and pid).
    :param node_ttl: seconds the node's lease lives without a renewal: the longest a node cut
        off from the store keeps serving, and how long after a node's death its lease is gone.
    :param store_timeout: seconds every store call may take before it counts as failed.
    :param mode: ``"consistent"`` (default): refuse hellos while the store is unreachable and
        close sessions OWNERSHIP_LOST when the lease could have expired; ``"available"``: keep
        serving and reassert when the store is back.
    :param reconcile_interval: seconds between full checks of every local session against the
        store (besides the one after each (re)subscription); None: only after subscribing.
    :param key_prefix: prefix of every key and channel (several clusters may share a store).
    :param retry_after: the retry hint (seconds) given to hellos refused while the store is down.
    :param collect_interval: seconds between two steps of the collector of dead nodes' owner
        records, cluster-wide (one step per interval, whatever the number of nodes); None:
        never (a dead node's record then stays until its identity is claimed again).
    :param collect_batch: keys one collector step scans (``SCAN ... COUNT``): a full pass over
        N keys takes about ``N / collect_batch`` intervals.
    """

    node_id: str = attrs.field(validator=_node_id)
    node_ttl: float = attrs.field(default=10.0, validator=number(minimum=0.1, min_inclusive=True))
    store_timeout: float = attrs.field(default=0.5, validator=number(maximum=60.0))
    mode: Mode = attrs.field(default="consistent", validator=_mode)
    reconcile_interval: float | None = attrs.field(
        default=60.0, validator=number(minimum=0.1, min_inclusive=True, optional=True)
    )
    key_prefix: str = attrs.field(default="keepconn", validator=_key_prefix)
    retry_after: float = attrs.field(default=2.0, validator=number(min_inclusive=True))
    collect_interval: float | None = attrs.field(
        default=1.0, validator=number(minimum=0.1, min_inclusive=True, optional=True)
    )
    collect_batch: int = attrs.field(
        default=1000, validator=number(minimum=1, maximum=1e5, min_inclusive=True, integer=True)
    )

    def __attrs_post_init__(self) -> None:
        from .errors import ConfigError

        if self.store_timeout * 2 >= self.node_ttl:
            raise ConfigError(
                f"store_timeout ({self.store_timeout:g}) must be under half of node_ttl "
                f"({self.node_ttl:g}): a renewal must be able to fail and be retried in time"
            )

    @property
    def renew_interval(self) -> float:
        """Seconds between lease renewals: an eighth of the lease, so a stall of most of the
        lease (2 s of a 3 s lease) passes without a session being closed."""
        return self.node_ttl / 8

    @property
    def spread(self) -> float:
        """Seconds over which sessions are closed OWNERSHIP_LOST, ending when the lease could
        have expired: about a second, a tenth of a short lease."""
        return min(1.0, self.node_ttl / 10)


@attrs.frozen
class ClusterStats:
    """A snapshot of one node's cluster state (part of ``ServerStats.cluster``)."""

    #: This node's id.
    node_id: str
    #: Whether the last store call succeeded.
    store_healthy: bool
    #: Sessions of this node with a claim the store confirmed.
    owned: int
    #: Claims in flight.
    claiming: int
    #: Claims since start that took an identity over from another node.
    took_from_remote: int
    #: Sessions here closed because another node claimed their identity (notice or check).
    remote_takeovers: int
    #: Sessions closed OWNERSHIP_LOST since start.
    ownership_lost: int
    #: Hellos refused because the store was unreachable.
    refused: int
    #: Store calls (scripts, pipelines) completed and failed since start.
    store_round_trips: int
    store_errors: int
    #: Times the node found its lease gone (the store lost it) and reasserted its sessions.
    lease_lost: int
    #: Seconds the lease is still known valid (0 or less: could have expired).
    lease_left: float
    #: Hellos refused by the store as flapping, and as a duplicate identity, cluster-wide.
    flapping_refused: int = 0
    duplicates_refused: int = 0
    #: Owner records of dead nodes (no lease) this node's collector steps deleted.
    records_collected: int = 0


@attrs.frozen
class Claim:
    """The store's answer to a claim."""

    #: The claim's fencing epoch.
    epoch: int
    #: The node that held the identity before (None: nobody, or the record was gone).
    previous_node: str | None = None
    #: The host the previous owner's device connected from.
    previous_host: str | None = None
    #: Claims of this identity cluster-wide within the store's recent window (this one too).
    recent: int = 1
    #: Refused: the identity is flapping cluster-wide (``recent`` over the limit). Nothing was
    #: claimed and nobody was told.
    flapping: bool = False
    #: Refused: the identity is held as duplicated (devices on two hosts keep taking it from
    #: each other, on any nodes); ``previous_host`` is the owner's. Nothing was claimed.
    duplicate: bool = False


@attrs.frozen
class ClaimOutcome:
    """What a claim reply means for its connection."""

    #: False: a later claim by another node already won (close the connection TAKEN_OVER),
    #: or with ``lease_gone`` the node's lease could have expired meanwhile.
    won: bool
    #: The reply came after the node's lease could have expired: the connection is refused
    #: as if the store were unreachable (OVERLOADED) and ``release`` is to be sent.
    lease_gone: bool = False
    #: An epoch to release now.
    release: int | None = None
    #: The store lost its data while this claim was in flight (the lease was found gone in
    #: between): its record may be gone with it, so the adapter reasserts it before trusting
    #: it, as it did for the sessions it held when it found the lease gone.
    reassert: bool = False


@attrs.define(slots=True, eq=False)
class _Entry:
    # The local live session (the adapter's connection), None when there is none.
    live: Hashable | None = None
    # Its claim's epoch; None while its claim is in flight (or unclaimed, in available mode).
    live_epoch: int | None = None
    # The highest epoch this node got for the identity (what a release must carry).
    epoch: int = 0
    # The highest epoch of an eviction notice (another node's later claim).
    seen: int = 0
    # Claims in flight.
    pending: int = 0
    # The node's lease generation when the last claim was sent.
    generation: int = 0


class Ownership:
    """One node's view of which identities it owns, and its lease. See the module docstring."""

    def __init__(self, config: ClusterConfig, now: float) -> None:
        self.config = config
        self._entries: dict[str, _Entry] = {}
        # Known valid until then; a node starts without a lease (the first renewal makes one).
        self.valid_until = now
        self.healthy = False
        self._joined = False
        # Sessions being closed OWNERSHIP_LOST, in order, with the time the schedule began.
        self._losing: list[tuple[str, Hashable]] | None = None
        self._losing_total = 0
        self.took_from_remote = 0
        self.remote_takeovers = 0
        self.ownership_lost = 0
        self.refused = 0
        self.round_trips = 0
        self.errors = 0
        self.lease_lost = 0
        self.records_collected = 0

    # -- the store's health and the lease

    def store_ok(self) -> None:
        """A store call succeeded."""
        self.round_trips += 1
        self.healthy = True

    def store_failed(self) -> None:
        """A store call failed or timed out: hellos are refused until one succeeds."""
        self.errors += 1
        self.healthy = False

    def collected(self, records: int) -> None:
        """A collector step succeeded and deleted ``records`` owner records of dead nodes."""
        self.store_ok()
        self.records_collected += records

    def renewed(self, sent_at: float, existed: bool) -> list[tuple[str, int, Hashable]]:
        """A lease renewal sent at ``sent_at`` succeeded; ``existed`` says whether the store
        still had the lease. Returns the sessions (as :meth:`held`) to reassert (the store lost the
        lease: it may have lost their records too) -- empty when the lease was there."""
        self.store_ok()
        self.valid_until = max(self.valid_until, sent_at + self.config.node_ttl)
        self._losing = None
        joined, self._joined = self._joined, True
        if existed or not joined:
            return []  # a node's first renewal makes its lease
        self.lease_lost += 1
        return self.held()

    def admit(self, now: float) -> bool:
        """May a hello be claimed now? False: refuse it (OVERLOADED, ``config.retry_after``)."""
        if self.config.mode == "available":
            return True
        if self.healthy and now < self.valid_until:
            return True
        self.refused += 1
        return False

    # -- claims, notices, closes

    def claim_sent(self, key: str, conn: Hashable) -> None:
        """A hello on ``conn`` for ``key`` passed the Gatekeeper; its claim is being sent. The
        identity's local session, if any, keeps it until the claim wins."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
        entry.pending += 1
        entry.generation = self.lease_lost

    def claimed(
        self, key: str, conn: Hashable, epoch: int, remote: bool, now: float
    ) -> ClaimOutcome:
        """``conn``'s claim got ``epoch``; ``remote``: it took the identity from another node.
        Won: ``conn`` is the identity's local session from now on (the adapter opens it,
        displacing the one before, even if ``conn`` was closed meanwhile: its close then
        releases the claim)."""
        self.store_ok()
        entry = self._entries[key]
        entry.pending -= 1
        entry.epoch = max(entry.epoch, epoch)
        if remote:
            self.took_from_remote += 1
        if entry.seen > epoch:
            # Another node claimed after us and told us before our reply came back (the
            # notice closed any older local session already).
            self.remote_takeovers += 1
            self._forget_if_idle(key, entry)
            return ClaimOutcome(False)
        if self.config.mode == "consistent" and now >= self.valid_until:
            # A node whose lease could have expired serves nothing, not even what it has just
            # claimed (a reply can be that late when renewals are failing meanwhile).
            self.refused += 1
            return ClaimOutcome(False, lease_gone=True, release=self._release_if_idle(key, entry))
        entry.live = conn
        entry.live_epoch = epoch
        return ClaimOutcome(True, reassert=entry.generation != self.lease_lost)

    def claim_failed(self, key: str, conn: Hashable, *, refused: bool = False) -> int | None:
        """``conn``'s claim failed (the adapter closes it, or opens it unclaimed in available
        mode), or with ``refused`` the store refused it (flapping: the adapter closes it).
        The identity's local session, if any, keeps it. Returns an epoch to release, if the
        identity is left with nothing here."""
        if refused:
            self.store_ok()
        else:
            self.store_failed()
        entry = self._entries[key]
        entry.pending -= 1
        if self.config.mode == "available" and not refused:
            # Kept, unclaimed: reasserted when the store is back.
            entry.live = conn
            entry.live_epoch = None
            return None
        return self._release_if_idle(key, entry)

    def notice(self, key: str, epoch: int) -> Hashable | None:
        """Another node claimed ``key`` with ``epoch``. Returns the local connection to close
        with TAKEN_OVER, if ours is older."""
        entry = self._entries.get(key)
        if entry is None:
            return None  # nothing here (a late or duplicated notice)
        if entry.pending:
            entry.seen = max(entry.seen, epoch)
        if entry.live is None or entry.live_epoch is None or entry.live_epoch >= epoch:
            return None
        conn = entry.live
        entry.live = None
        self.remote_takeovers += 1
        self._forget_if_idle(key, entry)
        return conn

    def lost(self, key: str, conn: Hashable) -> bool:
        """A check found ``key`` owned by another node: True if ``conn`` is still our live
        session for it (the adapter closes it TAKEN_OVER)."""
        entry = self._entries.get(key)
        if entry is None or entry.live is not conn:
            return False
        entry.live = None
        self.remote_takeovers += 1
        self._forget_if_idle(key, entry)
        return True

    def closed(self, key: str, conn: Hashable) -> int | None:
        """``conn``'s session for ``key`` ended. Returns the epoch to release, if any."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.live is conn:
            entry.live = None
            entry.live_epoch = None
        elif entry.live is not None:
            return None  # displaced locally: the identity's newer session holds it
        return self._release_if_idle(key, entry)

    def _release_if_idle(self, key: str, entry: _Entry) -> int | None:
        if entry.live is not None or entry.pending:
            return None
        del self._entries[key]
        if entry.seen > entry.epoch or entry.epoch == 0:
            return None  # another node owns it now (or nothing was ever claimed)
        return entry.epoch

    def _forget_if_idle(self, key: str, entry: _Entry) -> None:
        if entry.live is None and not entry.pending:
            del self._entries[key]

    # -- what the store is asked to check

    def held(self) -> list[tuple[str, int, Hashable]]:
        """(key, epoch, connection) of every local session whose claim the store confirmed."""
        return [
            (key, e.epoch, e.live)
            for key, e in self._entries.items()
            if e.live is not None and e.live_epoch is not None
        ]

    def unclaimed(self) -> list[tuple[str, Hashable]]:
        """Local sessions with no confirmed claim and none in flight (available mode, store
        down): the adapter claims them when the store is back."""
        return [
            (key, e.live)
            for key, e in self._entries.items()
            if e.live is not None and e.live_epoch is None and not e.pending
        ]

    def live(self, key: str) -> Hashable | None:
        """The local live session for ``key``, if any."""
        entry = self._entries.get(key)
        return None if entry is None else entry.live

    def owned(self) -> int:
        """Sessions with a confirmed claim."""
        return sum(
            1 for e in self._entries.values() if e.live is not None and e.live_epoch is not None
        )

    def claiming(self) -> int:
        """Claims in flight."""
        return sum(e.pending for e in self._entries.values())

    # -- the store-down policy

    def due(self, now: float) -> list[Hashable]:
        """The connections to close OWNERSHIP_LOST now (consistent mode, lease running out)."""
        if self.config.mode == "available":
            return []
        spread = self.config.spread
        start = self.valid_until - spread
        if now < start:
            return []
        if self._losing is None:
            self._losing = [(k, e.live) for k, e in self._entries.items() if e.live is not None]
            self._losing.reverse()  # popped from the end: oldest first
            self._losing_total = len(self._losing)
        done = 1.0 if now >= self.valid_until else (now - start) / spread
        # Of the sessions there were when the schedule began, this share is closed by now.
        keep = self._losing_total - int(done * self._losing_total + 1e-9)
        out: list[Hashable] = []
        while len(self._losing) > keep:
            key, conn = self._losing.pop()
            entry = self._entries.get(key)
            if entry is None or entry.live is not conn:
                continue
            entry.live = None
            self.ownership_lost += 1
            out.append(conn)
            self._release_if_idle(key, entry)
        # Sessions opened while the store was down (available mode never gets here) or
        # admitted just before: anything still live after the lease is closed too.
        if now >= self.valid_until:
            for key, entry in list(self._entries.items()):
                if entry.live is not None:
                    out.append(entry.live)
                    entry.live = None
                    self.ownership_lost += 1
                    self._release_if_idle(key, entry)
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`due` next has work (None: nothing to close, ever, as things stand)."""
        if self.config.mode == "available" or not any(self._iter_live()):
            return None
        spread = self.config.spread
        start = self.valid_until - spread
        if self._losing is None or not self._losing_total:
            return start
        step = spread / max(1, self._losing_total)
        return min(self.valid_until, start + step * (self._losing_total - len(self._losing) + 1))

    def _iter_live(self) -> Iterator[Hashable]:
        return (e.live for e in self._entries.values() if e.live is not None)

    def stats(self, now: float) -> ClusterStats:
        """A snapshot of the counters."""
        return ClusterStats(
            node_id=self.config.node_id,
            store_healthy=self.healthy,
            owned=self.owned(),
            claiming=self.claiming(),
            took_from_remote=self.took_from_remote,
            remote_takeovers=self.remote_takeovers,
            ownership_lost=self.ownership_lost,
            refused=self.refused,
            store_round_trips=self.round_trips,
            store_errors=self.errors,
            lease_lost=self.lease_lost,
            lease_left=self.valid_until - now,
            records_collected=self.records_collected,
        )

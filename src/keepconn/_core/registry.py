"""The session registry: every peer's last-seen time, and reaping of the dead on time.

Sans-I/O: nothing here reads a clock or touches a socket. Every call that needs the time takes
``now`` (monotonic seconds, from whatever clock the adapter uses) and :meth:`next_deadline` says
when the adapter should call :meth:`SessionRegistry.reap` again.

How it stays cheap at a million sessions
-----------------------------------------
A touch is the hot path (every inbound frame), so it only stores ``now`` in one slot: it does not
push onto a heap, cancel a timer or reorder a list. Deadlines are instead re-filed lazily:

* Each open session sits in exactly one *slot* of a timing wheel: a dict from slot number
  ``floor(deadline / resolution)`` to a plain list. The deadline used for filing may be stale (the
  peer has been touched since), but it is never later than the real one, because touches only
  move deadlines forward.
* When a slot comes up, each entry is checked against its real deadline: expired ones are
  reaped, touched ones are filed again under their new deadline. A session touched constantly is
  therefore re-filed once per timeout, not once per touch.
* The slot numbers in use are kept in a small heap, so finding the next slot is O(1) and a sweep
  with nothing due is O(1) whatever the number of sessions.
* Sessions may pick their own timeouts (MQTT clients each choose a keepalive): the slot is keyed
  by the deadline, so any mix of timeouts costs the same.
* If reap is called while ``now`` lies *inside* a slot (not just at its end), that slot is
  scanned: due entries are reaped, the rest stay, and the smallest deadline among them is
  remembered, so calls before it cost O(1) and a session is still reaped by the first call at or
  after its deadline. This keeps the promise "never later than deadline + resolution" for callers
  that reap every ``resolution`` at arbitrary phases. The adapter sleeps until
  :meth:`next_deadline` (a slot's end) and so rarely scans a slot twice.
* Closed sessions are left in their slot and skipped when it comes up (lazy deletion).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

import attrs

from .errors import ConfigError
from .reasons import CloseReason
from .validate import check_number

__all__ = ["RegistryStats", "Session", "SessionRegistry"]

_REASONS = tuple(CloseReason)
_REASON_INDEX = {reason: i for i, reason in enumerate(_REASONS)}
_IDLE_INDEX = _REASON_INDEX[CloseReason.IDLE_TIMEOUT]
_TAKEN_OVER_INDEX = _REASON_INDEX[CloseReason.TAKEN_OVER]


@attrs.define(eq=False, slots=True, weakref_slot=False, repr=False)
class Session:
    """One live peer identity, bound to at most one connection.

    Created by :meth:`SessionRegistry.open`; sessions compare by identity. ``conn`` is an opaque
    slot for the caller's transport (the adapter keeps its connection object there).
    """

    key: Hashable
    conn: Any
    _last: float
    _timeout: float
    #: None while the session is open; the one :class:`CloseReason` once it has ended.
    reason: CloseReason | None = None

    def touch(self, now: float) -> None:
        """Record that the peer showed life at ``now``.

        O(1) and allocation-free: the registry re-files the deadline lazily. Touching a closed
        session is a harmless no-op (nothing reads the value again).
        """
        self._last = now

    @property
    def last_seen(self) -> float:
        """The time of the last touch (or of the open)."""
        return self._last

    @property
    def timeout(self) -> float:
        """This session's idle timeout in seconds."""
        return self._timeout

    @property
    def deadline(self) -> float:
        """Last activity + timeout: the session is reaped at or after this time, never before."""
        return self._last + self._timeout

    @property
    def open(self) -> bool:
        """True until the session has been closed, reaped or taken over."""
        return self.reason is None

    def __repr__(self) -> str:
        state = "open" if self.reason is None else self.reason.name
        return f"<Session {self.key!r} {state} deadline={self.deadline:.3f}>"


@attrs.frozen
class RegistryStats:
    """A snapshot of a registry's counters. ``opened == live + sum(closed.values())`` always."""

    #: Sessions open now.
    live: int
    #: Sessions ever opened.
    opened: int
    #: Sessions ended, by reason (every reason present, zero when unused).
    closed: Mapping[CloseReason, int]

    @property
    def total_closed(self) -> int:
        """Sessions ended for any reason."""
        return sum(self.closed.values())


class SessionRegistry:
    """Tracks every peer's last-seen time and reaps expired sessions on time.

    :param timeout: default idle timeout in seconds, for sessions opened without their own;
        a number in (0, inf).
    :param resolution: reaping granularity in seconds: a session is reaped no earlier than its
        deadline and no later than deadline + resolution, provided :meth:`reap` is called at
        least every ``resolution`` (or at :meth:`next_deadline`). A number in (0, timeout];
        defaults to ``min(1.0, timeout / 10)``.
    :raises keepconn.ConfigError: ``timeout`` or ``resolution`` is out of range.

    Exactly one session per key is live at a time. Times are monotonic seconds supplied by the
    caller; they must not go backwards.

    >>> registry = SessionRegistry(timeout=30.0, resolution=1.0)
    >>> session = registry.open("device-1", now=0.0)
    >>> session.touch(10.0)
    >>> session.deadline
    40.0
    >>> registry.reap(40.5)
    [<Session 'device-1' IDLE_TIMEOUT deadline=40.000>]
    >>> SessionRegistry(timeout=0)
    Traceback (most recent call last):
    ...
    keepconn.ConfigError: timeout must be in (0, inf), got 0
    """

    __slots__ = (
        "_timeout",
        "_resolution",
        "_live",
        "_wheel",
        "_slots",
        "_scan_slot",
        "_scan_rest",
        "_scan_min",
        "_scan_floor",
        "_opened",
        "_closed",
    )

    def __init__(self, *, timeout: float, resolution: float | None = None) -> None:
        check_number("timeout", timeout)
        if resolution is None:
            resolution = min(1.0, timeout / 10)
        check_number("resolution", resolution, maximum=timeout)
        self._timeout = float(timeout)
        self._resolution = float(resolution)
        self._live: dict[Hashable, Session] = {}
        # slot number -> sessions filed there; _slots is a heap of the slot numbers in _wheel.
        self._wheel: dict[int, list[Session]] = {}
        self._slots: list[int] = []
        # The slot that reap() found `now` inside, as an exact heap; see the module docstring.
        # The slot `now` fell inside when reap() was last called (see the module docstring):
        # entries of the current pass not yet due, their smallest deadline, and the smallest
        # deadline of the slot's bucket once a pass is complete (-inf while one is unfinished).
        self._scan_slot: int | None = None
        self._scan_rest: list[Session] = []
        self._scan_min = math.inf
        self._scan_floor = -math.inf
        self._opened = 0
        self._closed = [0] * len(_REASONS)

    # -- configuration -------------------------------------------------------------------------

    @property
    def timeout(self) -> float:
        """The default idle timeout in seconds."""
        return self._timeout

    @property
    def resolution(self) -> float:
        """The reaping granularity in seconds."""
        return self._resolution

    # -- sessions ------------------------------------------------------------------------------

    def open(
        self, key: Hashable, *, now: float, timeout: float | None = None, conn: Any = None
    ) -> Session:
        """Register a live session for ``key`` and return it.

        If ``key`` already has a live session, that one ends with ``CloseReason.TAKEN_OVER``
        (fetch it with :meth:`get` first to close its transport). ``timeout`` overrides the
        registry's default for this session.
        """
        if timeout is None:
            timeout = self._timeout
        else:
            check_number("timeout", timeout)
        if not math.isfinite(now):
            raise ConfigError(f"now must be a finite time, got {now!r}")
        old = self._live.get(key)
        if old is not None:
            old.reason = CloseReason.TAKEN_OVER
            self._closed[_TAKEN_OVER_INDEX] += 1
        session = Session(key, conn, now, timeout)
        self._live[key] = session
        self._opened += 1
        self._file(session, now + timeout)
        return session

    def close(self, session: Session, reason: CloseReason) -> bool:
        """End ``session`` with ``reason``. Idempotent: returns False if it had already ended."""
        if not isinstance(reason, CloseReason):
            raise TypeError(f"reason must be a CloseReason, got {reason!r}")
        if session.reason is not None:
            return False
        if self._live.get(session.key) is not session:
            raise ValueError(f"{session!r} does not belong to this registry")
        del self._live[session.key]
        session.reason = reason
        self._closed[_REASON_INDEX[reason]] += 1
        # The wheel still holds it; it is skipped when its slot comes up.
        return True

    def get(self, key: Hashable) -> Session | None:
        """The live session for ``key``, or None."""
        return self._live.get(key)

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def __iter__(self) -> Iterator[Session]:
        """Iterate over a snapshot of the live sessions (closing them meanwhile is safe)."""
        return iter(tuple(self._live.values()))

    # -- reaping -------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`reap` should next be called, or None when no session is open.

        Calling it later than this delays reaping; calling it earlier is harmless. A returned
        time at or before ``now`` means work is due (for example after a reap with ``limit``).
        """
        if not self._slots:
            return None
        slot = self._slots[0]
        if slot == self._scan_slot and self._scan_floor == -math.inf:
            # A scan of this slot stopped at its limit: the rest may be due already.
            return slot * self._resolution
        return (slot + 1) * self._resolution

    def reap(
        self,
        now: float,
        limit: int | None = None,
        *,
        spare: Callable[[Session], bool] | None = None,
    ) -> list[Session]:
        """Remove and return the sessions whose deadline has passed, closed with IDLE_TIMEOUT.

        With ``limit``, at most that many are returned (and at most twice that many wheel
        entries examined), so one call stays short however many sessions expire together; the
        rest stay due for the next call.

        ``spare`` is asked about each session that is due; True keeps it open as if touched at
        ``now``. The adapter uses it to ask the kernel whether the peer did send something that
        the application has not read yet (the server is behind, the peer is not dead): the
        registry itself stays free of I/O.
        """
        reaped = self._reap(now, limit, spare)
        # Counted once per call rather than per session on the hot loop.
        self._closed[_IDLE_INDEX] += len(reaped)
        return reaped

    def _reap(
        self, now: float, limit: int | None, spare: Callable[[Session], bool] | None
    ) -> list[Session]:
        if limit is None:
            budget = math.inf
            cap = math.inf
        else:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ConfigError(f"limit must be a whole number >= 1, got {limit!r}")
            budget = limit
            cap = 2 * limit
        reaped: list[Session] = []
        examined = 0
        res = self._resolution
        wheel = self._wheel
        slots = self._slots
        live = self._live
        get = wheel.get
        while slots and len(reaped) < budget and examined < cap:
            slot = slots[0]
            if slot * res > now:
                break
            bucket = wheel[slot]
            passed = (slot + 1) * res <= now
            if slot == self._scan_slot:
                if passed:
                    # The slot is over: whatever an earlier scan kept goes through the full
                    # pass below with the rest of the bucket.
                    bucket.extend(self._scan_rest)
                    self._end_scan()
                elif self._scan_floor != -math.inf:
                    if now < self._scan_floor:
                        break  # the last scan found nothing due before _scan_floor
                    self._scan_floor = -math.inf  # start another pass over what was kept
            elif not passed:
                self._scan_slot = slot
                self._scan_floor = -math.inf
            # Each entry is expired, was touched since it was filed here, or (inside the slot)
            # is not due yet. This is the adapter's usual path, so expiry and re-filing are
            # inlined rather than calls.
            while bucket:
                if len(reaped) >= budget or examined >= cap:
                    return reaped
                session = bucket.pop()
                examined += 1
                if session.reason is not None:
                    continue
                deadline = session._last + session._timeout
                if deadline <= now:
                    if spare is None or not spare(session):
                        del live[session.key]
                        session.reason = CloseReason.IDLE_TIMEOUT
                        reaped.append(session)
                        continue
                    session._last = now
                    deadline = now + session._timeout
                later = int(deadline // res)
                if later <= slot:
                    if not passed:
                        self._scan_rest.append(session)
                        if deadline < self._scan_min:
                            self._scan_min = deadline
                        continue
                    later = slot + 1  # float rounding put a later deadline in this slot
                target = get(later)
                if target is None:
                    wheel[later] = [session]
                    heapq.heappush(slots, later)
                else:
                    target.append(session)
            if passed or not self._scan_rest:
                del wheel[slot]
                heapq.heappop(slots)
                if not passed:
                    self._end_scan()
            else:
                # A pass inside the slot is complete: keep what is not due, remember its floor.
                wheel[slot] = self._scan_rest
                self._scan_floor = self._scan_min
                self._scan_rest = []
                self._scan_min = math.inf
        return reaped

    def _file(self, session: Session, deadline: float) -> None:
        slot = int(deadline // self._resolution)
        if slot == self._scan_slot and deadline < self._scan_floor:
            # Lands in a slot that a finished scan believed had nothing due before its floor.
            self._scan_floor = deadline
        bucket = self._wheel.get(slot)
        if bucket is None:
            self._wheel[slot] = [session]
            heapq.heappush(self._slots, slot)
        else:
            bucket.append(session)

    def _end_scan(self) -> None:
        self._scan_slot = None
        self._scan_rest = []
        self._scan_min = math.inf
        self._scan_floor = -math.inf

    # -- statistics ----------------------------------------------------------------------------

    def stats(self) -> RegistryStats:
        """A frozen snapshot of the counters."""
        return RegistryStats(
            live=len(self._live),
            opened=self._opened,
            closed=dict(zip(_REASONS, self._closed, strict=True)),
        )

"""Admission control: how many connections the server takes on, and how fast.

Sans-I/O: nothing here reads a clock or touches a socket; every call that needs the time takes
``now`` (monotonic seconds). The adapter asks before it reads a byte of a new connection and
enforces the answer.

Five limits, applied where each is cheapest and cannot hurt a live session:

* **Accept delay** (load shedding on the listen queue's delay, as CoDel judges a queue by
  its sojourn time): a connection that waited in the kernel's listen queue longer than
  ``max_accept_delay`` is refused at accept, before the hello (and under TLS, before the
  handshake). When the server accepts more slowly than devices connect, the queue fills, and a
  full queue of 4,096 served at a few hundred a second makes every connection wait as long as
  a device's connect timeout: the server then spends its handshakes on devices that give up
  before the answer. Refusing the stale ones at once keeps what is served fresh, and tells their
  devices to retry now rather than after their whole timeout. The adapter reads the wait from
  the kernel (the time since the peer was last heard, at accept).
* **Event-loop lag** (load shedding, :class:`~keepconn._core.lag.LagGauge`): while the loop runs
  more than ``max_loop_lag`` behind its schedule, new connections are refused at accept,
  before the hello (and under TLS, before the handshake). The loop's time is what a storm
  exhausts on one process, whatever spends it; refusing at once, cheaply, keeps the work
  admitted within what the loop can do, instead of leaving the kernel's listen queue to drop
  the excess silently (clients then wait out SYN retransmissions, and the server still hand-
  shakes connections whose clients have given up).
* **Accept rate** (a token bucket): checked at accept, before the hello is parsed. A refused
  connection costs one accept and one close.
* **Concurrent hellos**: connections accepted but not yet through their hello. When the cap is
  reached the *oldest* pending hello is shed (see :class:`AdmissionConfig` for why) unless the
  configuration asks for refusing the newcomer instead.
* **Live sessions**: checked when a hello has completed and the identity is known
  (:meth:`AdmissionController.admit_session`), because only then can a takeover be told from a new
  session. A device reconnecting while its old (possibly phantom) session is still open replaces
  it and does not add to the count, so it must never be refused for a full house: refusing it
  would keep the phantom and lock the device out until the phantom is reaped.

Refusals carry a retry-after suggestion. For rate refusals it is a *booking*: the k-th device
refused is told to come back when the bucket will have refilled for it, so a crowd that honours
the hints returns spread over exactly the time the bucket needs to admit it, instead of all at
once after a fixed pause.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Mapping
from typing import Literal

import attrs

from .errors import ConfigError
from .lag import LagGauge
from .reasons import CloseReason
from .validate import check_number, number

__all__ = [
    "Admission",
    "AdmissionConfig",
    "AdmissionController",
    "AdmissionStats",
    "Limit",
    "TokenBucket",
]

#: Which limit refused a connection (or shed a pending hello).
Limit = Literal["accept_delay", "loop_lag", "accept_rate", "max_pending_hellos", "max_sessions"]
_LIMITS: tuple[Limit, ...] = (
    "accept_delay",
    "loop_lag",
    "accept_rate",
    "max_pending_hellos",
    "max_sessions",
)


@attrs.define(slots=True)
class TokenBucket:
    """A token bucket refilled at ``rate`` tokens per second, holding at most ``burst``.

    Over any interval of length ``d`` it grants at most ``rate * d + burst`` tokens. It starts
    full. Implemented as GCRA (the generic cell rate algorithm): the state is the time at which
    the bucket would be full again, kept as an anchor time plus the tokens taken since, so a
    take is a comparison and an addition, and times computed from it round once instead of
    drifting with every take. :meth:`retry_after` is exact: :meth:`try_take` at
    ``now + retry_after(now)`` succeeds (barring takes in between).

    A clock stepping back never grants extra tokens; it only delays the next ones.
    """

    #: Tokens added per second.
    rate: float = attrs.field(validator=number())
    #: The most tokens the bucket holds (and grants at once after a quiet spell).
    burst: int = attrs.field(validator=number(minimum=1, min_inclusive=True, integer=True))
    # The bucket is full again at _anchor + _taken / rate; (-inf, 0) means "full at any time".
    _anchor: float = attrs.field(default=-math.inf, init=False, repr=False)
    _taken: int = attrs.field(default=0, init=False, repr=False)

    def _ready_at(self, n: int) -> float:
        # n tokens are available once the bucket is within (burst - n) tokens of full.
        return self._anchor + (self._taken + n - self.burst) / self.rate

    def _check_n(self, n: int) -> None:
        check_number("n", n, minimum=1, min_inclusive=True, maximum=self.burst, integer=True)

    def try_take(self, now: float, n: int = 1) -> bool:
        """Take ``n`` tokens if available at ``now``; return whether they were taken.

        ``n`` must be a whole number in [1, burst]: more could never be granted at once.
        """
        self._check_n(n)
        if now < self._ready_at(n):
            return False
        if now >= self._anchor + self._taken / self.rate:
            # The bucket is full: start a new anchor, forgetting the (long repaid) history.
            self._anchor = now
            self._taken = n
        else:
            self._taken += n
        return True

    def retry_after(self, now: float, n: int = 1) -> float:
        """Seconds from ``now`` until ``n`` tokens are available (0.0 if they are now)."""
        self._check_n(n)
        ready = self._ready_at(n)
        if now >= ready:
            return 0.0
        wait = ready - now
        # Float rounding can make now + (ready - now) land just short of ready; step up until
        # it does not, so the promise "a take at now + retry_after succeeds" holds exactly.
        while now + wait < ready:
            wait = math.nextafter(wait, math.inf)
        return wait

    def available(self, now: float) -> float:
        """Tokens available at ``now`` (fractional: the bucket refills continuously)."""
        deficit = self._anchor + self._taken / self.rate - now
        if deficit <= 0.0:
            return float(self.burst)
        return max(0.0, self.burst - deficit * self.rate)


@attrs.frozen
class AdmissionConfig:
    """Admission limits. Every field is validated when built; ``None`` switches a limit off.

    The defaults protect a small server without throttling a healthy restart. They were chosen
    for the reference setup (2 CPUs, 20,000 descriptors per process, 15,000 devices):

    * ``accept_rate=1000`` per second, ``accept_burst=3000``: a fleet of 15,000 devices retrying
      at a fixed short interval is back in about (15,000 - 3,000) / 1,000 = 12 s, well within the
      30 s target, while the event loop spends only a fraction of its time on accepts and hellos.
      The burst is larger than ``rate x`` a typical naive retry interval (1-2 s), so tokens that
      refill between two waves of retries are not lost to the cap; and 2,000 connections opened
      at once (a slowloris test) still leave tokens for a real device right behind them.
    * ``max_pending_hellos=4096`` with ``shed_oldest_hello=True``. Refusing newcomers at a hello
      cap hands the server to whoever holds the cap: N hello-less connections lock every real
      device out until their hello timeout. Shedding the *oldest* pending hello instead keeps the
      door open for a newcomer, and the oldest is almost always an attacker (a real device sends
      its hello within one round trip). To push a real device out, an attacker must open
      ``max_pending_hellos`` connections within that device's hello round trip, which the accept
      rate forbids (4,096 > burst + rate x 1 s). The cap is above the burst so that a legitimate
      storm never sheds its own hellos, and above the 2,000 slowloris connections of the
      server's tests; it stays bounded so 15,000 sessions plus pending hellos fit in the
      20,000-descriptor limit.
    * ``max_accept_delay=2.0`` s: a server that keeps up accepts within milliseconds, so two
      seconds in the listen queue only happen when it is far behind; devices commonly give up
      on a connection after 10 to 30 s, and one that waited 2 s still has time for its
      handshake and hello. Measured: a TLS storm of 15,000 devices (10 s connect timeout) on
      2 cores accepted 78,463 connections to bring 14,998 back, most of them for devices that
      had given up, while the event loop's lag stayed at 1.4 ms p50.
    * ``max_loop_lag=1.0`` s, sampled at least every 0.25 s: a healthy server's loop runs
      milliseconds behind (the design target is tens of milliseconds at 15,000 connections),
      so a second is never reached in ordinary operation; in a storm it is (a TLS storm of
      15,000 devices on 2 cores measured 9.7 s at p99 without it), and then each connection
      admitted only adds to every live session's delay. Refusing while behind is what Node's
      ``toobusy`` and fastify's ``under-pressure`` (``maxEventLoopDelay``) do for HTTP. Under
      TLS it is also the handshake limit: handshake CPU is what makes the loop fall behind,
      and unlike a cap on handshakes in progress it needs no number per machine or key type,
      and never holds the door for stalled handshakes (which cost no CPU). The samples are
      the wake-ups of the server's one timer, which wakes for the reaper anyway (every 0.25 s
      by default): a quarter of the limit between two samples, and a stall longer than that
      is counted while it lasts (see LagGauge.lag).
    * ``max_sessions=None``: no cap fits every deployment, and the descriptor limit (which the
      accept loop survives) is the natural one. Set it to keep headroom below that limit.
    * Retry-after hints between 1 s and 30 s, jittered by 10 %: long enough that a refused device
      does not hammer, short enough that one that honours hints is not slower than a naive one.
    """

    #: Refuse at accept a connection that waited longer than this many seconds in the listen
    #: queue (load shedding); None: never.
    max_accept_delay: float | None = attrs.field(default=2.0, validator=number(optional=True))
    #: Refuse new connections at accept while the event loop is more than this many seconds
    #: behind its schedule (load shedding); None: never.
    max_loop_lag: float | None = attrs.field(default=1.0, validator=number(optional=True))
    #: Longest gap in seconds between two samples of the loop's lag (taken only with
    #: max_loop_lag), at the wake-ups of the server's timer; the default is the reaper's.
    lag_probe_interval: float = attrs.field(default=0.25, validator=number(maximum=10.0))
    #: Most live sessions; new identities beyond it are refused (takeovers never are).
    max_sessions: int | None = attrs.field(
        default=None, validator=number(minimum=1, min_inclusive=True, integer=True, optional=True)
    )
    #: Accepted connections per second, sustained (token bucket rate); None: unlimited.
    accept_rate: float | None = attrs.field(default=1000.0, validator=number(optional=True))
    #: Connections accepted at once after a quiet spell (token bucket size).
    accept_burst: int = attrs.field(
        default=3000, validator=number(minimum=1, min_inclusive=True, integer=True)
    )
    #: Most connections accepted but not yet through their hello; None: unlimited.
    max_pending_hellos: int | None = attrs.field(
        default=4096, validator=number(minimum=1, min_inclusive=True, integer=True, optional=True)
    )
    #: At the hello cap, shed the oldest pending hello (True) or refuse the newcomer (False).
    shed_oldest_hello: bool = attrs.field(
        default=True, validator=attrs.validators.instance_of(bool)
    )
    #: Smallest retry-after suggested to a refused connection, in seconds.
    retry_after_min: float = attrs.field(default=1.0, validator=number())
    #: Largest retry-after suggested, in seconds.
    retry_after_max: float = attrs.field(default=30.0, validator=number())
    #: Relative jitter (+/-) applied to retry-after suggestions, in [0, 1).
    retry_after_jitter: float = attrs.field(
        default=0.1, validator=number(min_inclusive=True, maximum=0.999)
    )

    def __attrs_post_init__(self) -> None:
        if self.max_loop_lag is not None and self.lag_probe_interval > self.max_loop_lag:
            # A probe slower than the limit sees the loop fall behind too late to act on it.
            raise ConfigError(
                f"lag_probe_interval must be <= max_loop_lag ({self.max_loop_lag:g}), "
                f"got {self.lag_probe_interval!r}"
            )
        if self.retry_after_max < self.retry_after_min:
            raise ConfigError(
                f"retry_after_max must be >= retry_after_min ({self.retry_after_min:g}), "
                f"got {self.retry_after_max!r}"
            )

    @classmethod
    def unlimited(cls) -> AdmissionConfig:
        """A configuration that admits everything (for comparisons and benchmarks)."""
        return cls(
            max_sessions=None,
            accept_rate=None,
            max_pending_hellos=None,
            max_loop_lag=None,
            max_accept_delay=None,
        )


@attrs.frozen
class Admission:
    """The decision on one connection (or one session), from :class:`AdmissionController`."""

    #: True if the connection may proceed.
    admitted: bool
    #: ``CloseReason.OVERLOADED`` when refused, else None.
    reason: CloseReason | None = None
    #: Which limit refused it, when refused.
    limit: Limit | None = None
    #: Suggested seconds before the peer retries (already jittered), when refused.
    retry_after: float | None = None

    @property
    def detail(self) -> str | None:
        """A short human-readable account of a refusal, for logs and close details."""
        if self.admitted:
            return None
        return f"{self.limit} limit reached, retry after {self.retry_after:.1f} s"


_ADMITTED = Admission(True)


@attrs.frozen
class AdmissionStats:
    """A snapshot of an :class:`AdmissionController`'s counters."""

    #: Connections admitted at accept.
    admitted: int
    #: Connections refused, by limit (every limit present, zero when unused); includes sessions
    #: refused by :meth:`AdmissionController.admit_session`, not hellos shed.
    refused: Mapping[Limit, int]
    #: Pending hellos shed to make room for newer connections.
    shed_hellos: int
    #: Connections accepted and not yet through their hello, now.
    pending_hellos: int
    #: Tokens in the accept bucket at the time of the snapshot (inf when the rate is unlimited).
    tokens: float
    #: The event loop's lag at the time of the snapshot, in seconds (0 when not probed).
    loop_lag: float = 0.0
    #: The highest loop lag the probe measured since start, in seconds.
    loop_lag_peak: float = 0.0

    @property
    def total_refused(self) -> int:
        """Refusals for any limit."""
        return sum(self.refused.values())


class AdmissionController:
    """Decides which connections the server takes on; see the module docstring.

    Usage by the adapter, per connection::

        decision = controller.admit(now)              # at accept, before reading anything
        if not decision.admitted: send hint, close with decision.reason
        victim = controller.hello_started(conn)       # may return an older conn to shed
        if victim is not None: close victim with CloseReason.OVERLOADED
        ... read and check the hello ...
        controller.hello_finished(conn)               # whatever the outcome (idempotent)
        decision = controller.admit_session(now, len(registry), takeover=key in registry)

    :param rng: source of jitter for retry-after hints; inject a seeded one for tests.
    """

    __slots__ = (
        "_config",
        "_bucket",
        "_rng",
        "_pending",
        "_booked",
        "_admitted",
        "_refused",
        "_shed",
        "_lag",
    )

    def __init__(
        self, config: AdmissionConfig | None = None, *, rng: random.Random | None = None
    ) -> None:
        if config is None:
            config = AdmissionConfig()
        if not isinstance(config, AdmissionConfig):
            raise TypeError(f"config must be an AdmissionConfig, got {config!r}")
        self._config = config
        self._bucket = (
            None
            if config.accept_rate is None
            else TokenBucket(config.accept_rate, config.accept_burst)
        )
        self._rng = rng if rng is not None else random.Random()
        # Insertion-ordered, so the first key is the oldest pending hello; O(1) removal.
        self._pending: dict[Hashable, None] = {}
        # The time up to which retry-after hints have handed out the bucket's future tokens.
        self._booked = -math.inf
        self._admitted = 0
        self._refused = dict.fromkeys(_LIMITS, 0)
        self._shed = 0
        self._lag = None if config.max_loop_lag is None else LagGauge(config.lag_probe_interval)

    @property
    def config(self) -> AdmissionConfig:
        """The configuration this controller enforces."""
        return self._config

    @property
    def lag_gauge(self) -> LagGauge | None:
        """The loop-lag gauge the adapter's probe feeds (None when ``max_loop_lag`` is off)."""
        return self._lag

    def admit(self, now: float, waited: float = 0.0) -> Admission:
        """Decide on a newly accepted connection, before its hello is read; ``waited`` is how
        long it waited in the listen queue, in seconds.

        Refuses (``CloseReason.OVERLOADED``) a connection that waited more than
        ``max_accept_delay``, while the event loop lags more than ``max_loop_lag``, when the
        accept rate is exceeded, or when the hello cap is reached and ``shed_oldest_hello`` is
        False. A refusal takes no token.
        """
        cfg = self._config
        if cfg.max_accept_delay is not None and waited > cfg.max_accept_delay:
            # A queue that kept one waiting this long needs about as long to drain.
            return self._refuse("accept_delay", waited)
        gauge = self._lag
        if gauge is not None and cfg.max_loop_lag is not None:
            lag = gauge.lag(now)
            if lag > cfg.max_loop_lag:
                # A loop that is this far behind needs about as long again to catch up.
                return self._refuse("loop_lag", lag)
        if (
            not cfg.shed_oldest_hello
            and cfg.max_pending_hellos is not None
            and len(self._pending) >= cfg.max_pending_hellos
        ):
            return self._refuse("max_pending_hellos", cfg.retry_after_min)
        bucket = self._bucket
        if bucket is not None and not bucket.try_take(now):
            return self._refuse("accept_rate", self._book(bucket, now))
        self._admitted += 1
        return _ADMITTED

    def admit_session(self, now: float, live_sessions: int, *, takeover: bool) -> Admission:
        """Decide on a connection whose hello has completed, now that its identity is known.

        ``live_sessions`` is the number of sessions open now; ``takeover`` says whether the
        identity already has one (which this connection would replace). Takeovers are always
        admitted: they do not add a session, and refusing them would keep a phantom alive.
        """
        del now  # Part of the signature so a future time-based session limit is not a break.
        limit = self._config.max_sessions
        if takeover or limit is None or live_sessions < limit:
            return _ADMITTED
        # A full house does not drain at a known rate, so suggest the longest wait.
        return self._refuse("max_sessions", self._config.retry_after_max)

    def hello_started(self, conn: Hashable) -> Hashable | None:
        """Record that ``conn`` (any hashable handle) now awaits its hello.

        Returns a pending connection the adapter must close with ``CloseReason.OVERLOADED`` to
        stay within ``max_pending_hellos`` (the oldest one), or None.
        """
        pending = self._pending
        pending[conn] = None
        cap = self._config.max_pending_hellos
        if cap is None or len(pending) <= cap:
            return None
        victim = next(iter(pending))
        del pending[victim]
        self._shed += 1
        return victim

    def hello_finished(self, conn: Hashable) -> bool:
        """Record that ``conn``'s hello is over (completed, failed or the connection ended).

        Idempotent: returns False if ``conn`` was not pending (already finished or shed).
        """
        return self._pending.pop(conn, _MISSING) is not _MISSING

    @property
    def pending_hellos(self) -> int:
        """Connections awaiting their hello now."""
        return len(self._pending)

    def stats(self, now: float) -> AdmissionStats:
        """A frozen snapshot of the counters (``now`` is used for the bucket's level)."""
        bucket = self._bucket
        return AdmissionStats(
            admitted=self._admitted,
            refused=dict(self._refused),
            shed_hellos=self._shed,
            pending_hellos=len(self._pending),
            tokens=math.inf if bucket is None else bucket.available(now),
            loop_lag=0.0 if self._lag is None else self._lag.lag(now),
            loop_lag_peak=0.0 if self._lag is None else self._lag.peak,
        )

    def _refuse(self, limit: Limit, base: float) -> Admission:
        self._refused[limit] += 1
        cfg = self._config
        spread = base * cfg.retry_after_jitter
        hint = base + self._rng.uniform(-spread, spread)
        hint = min(max(hint, cfg.retry_after_min), cfg.retry_after_max)
        return Admission(False, CloseReason.OVERLOADED, limit, hint)

    def _book(self, bucket: TokenBucket, now: float) -> float:
        # Hand the refused connection the next unbooked future token, no sooner than the minimum
        # hint, and never book beyond the maximum (past it every hint is clamped anyway).
        cfg = self._config
        start = max(self._booked, now + max(cfg.retry_after_min, bucket.retry_after(now)))
        self._booked = min(start + 1.0 / bucket.rate, now + cfg.retry_after_max)
        return start - now


_MISSING = object()

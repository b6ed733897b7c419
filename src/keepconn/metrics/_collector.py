"""The collector behind :mod:`keepconn.metrics` (see its docstring)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn, get_args

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Histogram
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError:
    # Name the extra to install, rather than leave a bare "No module named" to puzzle over.
    from .._extras import MissingExtra

    raise MissingExtra(
        "keepconn.metrics needs prometheus_client: pip install 'keepconn[prometheus]'",
        extra="prometheus",
        name="prometheus_client",
    ) from None

from .._anyio.probes import audit_forever, sample_lag_forever
from .._anyio.server import Server
from .._core.admission import Limit
from .._core.errors import ConfigError
from .._core.events import (
    ConnectionClosed,
    RoundTrip,
    ServerEvent,
    ServerStats,
    SessionReaped,
    SocketAudit,
)
from .._core.ownership import ClusterStats
from .._core.reasons import CloseReason

__all__ = [
    "DURATION_BUCKETS",
    "LAG_BUCKETS",
    "LATENESS_BUCKETS",
    "REASON_CLASSES",
    "RTT_BUCKETS",
    "ServerCollector",
    "instrument",
]

#: The coarse class of each close reason, the ``reason_class`` label of
#: ``keepconn_session_duration_seconds``: "dead" (the peer is believed gone), "peer" (it closed,
#: reset or misbehaved), "replaced" (its own newer connection took the session over),
#: "refused" (turned away before or at its hello: it never had a session), "server" (the
#: server's or the application's decision).
REASON_CLASSES: Mapping[CloseReason, str] = {
    CloseReason.IDLE_TIMEOUT: "dead",
    CloseReason.HEARTBEAT_TIMEOUT: "dead",
    CloseReason.KEEPALIVE_TIMEOUT: "dead",
    CloseReason.PEER_CLOSED: "peer",
    CloseReason.PEER_RESET: "peer",
    CloseReason.PROTOCOL_ERROR: "peer",
    CloseReason.TOO_MANY_PINGS: "peer",
    CloseReason.TAKEN_OVER: "replaced",
    CloseReason.HELLO_TIMEOUT: "refused",
    CloseReason.AUTH_FAILED: "refused",
    CloseReason.STALE_HELLO: "refused",
    CloseReason.TLS_FAILED: "refused",
    CloseReason.OVERLOADED: "refused",
    CloseReason.FLAPPING: "refused",
    CloseReason.MAX_AGE: "server",
    CloseReason.SHUTDOWN: "server",
    CloseReason.APPLICATION: "server",
    CloseReason.OWNERSHIP_LOST: "server",
}

#: Buckets of ``keepconn_reap_lateness_seconds``, in seconds; the server's reap resolution is
#: added, so "reaped within one resolution step" (the registry's promise) is a bucket boundary.
LATENESS_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
#: Buckets of ``keepconn_session_duration_seconds``: from a refused hello (milliseconds) to a
#: device that stays a week.
DURATION_BUCKETS: tuple[float, ...] = (
    0.01, 0.1, 1, 10, 60, 300, 1800, 3600, 4 * 3600, 24 * 3600, 7 * 24 * 3600
)  # fmt: skip
#: Buckets of ``keepconn_rtt_seconds``: loopback to a congested cellular link.
RTT_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10
)  # fmt: skip
#: Buckets of ``keepconn_event_loop_lag_seconds``.
LAG_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5
)  # fmt: skip

_PHASES = ("hello", "session", "closing")
_CLASSES = tuple(dict.fromkeys(REASON_CLASSES.values()))
_LIMITS: tuple[Limit, ...] = get_args(Limit)


class ServerCollector:
    """A prometheus_client collector of one :class:`keepconn.Server`'s metrics.

    Built, it listens to the server's events at once (for the histograms); registered on a
    ``CollectorRegistry`` (``registry=`` here, or ``registry.register(collector)`` later), it
    reports at every scrape. Metric names start with ``namespace`` and an underscore (none
    with ``namespace=""``): give each server its own namespace or registry. :meth:`close`
    detaches it from both.

    Two opt-in tasks add metrics once started: :meth:`probe_loop_lag` and :meth:`audit_every`.
    """

    def __init__(
        self,
        server: Server[Any],
        *,
        namespace: str = "keepconn",
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._server = server
        self._prefix = f"{namespace}_" if namespace else ""
        self._resolution = server.registry.resolution
        lateness = sorted({*LATENESS_BUCKETS, self._resolution})

        def histogram(
            name: str, doc: str, buckets: Sequence[float], labels: Sequence[str] = ()
        ) -> Histogram:
            # Not registered anywhere: collect() hands their samples to the registry itself,
            # so the whole server's metrics come and go with this one collector.
            return Histogram(
                name, doc, labels, namespace, unit="seconds", registry=None, buckets=buckets
            )

        self._lateness = histogram(
            "reap_lateness",
            "Time from each reaped session's deadline to the reaper closing it.",
            lateness,
        )
        durations = histogram(
            "session_duration",
            "Connection lifetimes, from accept to close, by class of close reason.",
            DURATION_BUCKETS,
            ["reason_class"],
        )
        # Resolved once: a close then costs one dict lookup and one observe.
        self._durations = {
            reason: durations.labels(reason_class=REASON_CLASSES[reason]) for reason in CloseReason
        }
        self._durations_family = durations
        self._rtt = histogram(
            "rtt", "Round-trip times of the server's pings, as their answers arrive.", RTT_BUCKETS
        )
        self._lag = histogram(
            "event_loop_lag",
            "How late the lag probe's 'sleep' woke up: the event loop's delay to every task.",
            LAG_BUCKETS,
        )
        self._last_lag: float | None = None
        # (the audit, when it finished by time.monotonic()); replaced whole, read by scrapes.
        self._audit: tuple[SocketAudit, float] | None = None
        self._registry = registry
        if registry is not None:
            registry.register(self)  # first: a refused clash leaves nothing attached
        server.add_listener(self._on_event)
        self._listening = True

    # -- fed by the server

    def _on_event(self, event: ServerEvent) -> None:
        # Runs inline on the event loop for every event: a type test and one observe.
        if isinstance(event, ConnectionClosed):
            self._durations[event.reason].observe(event.duration)
        elif isinstance(event, SessionReaped):
            self._lateness.observe(event.lateness)
        elif isinstance(event, RoundTrip):
            self._rtt.observe(event.rtt)

    def record_audit(self, audit: SocketAudit) -> None:
        """Report ``audit`` (from :meth:`Server.audit`) as the ``*_audit_*`` gauges from now on,
        its age counted from now. :meth:`audit_every` calls it; so may a program that audits
        for its own reasons (a status page), keeping the gauges fresh at no extra cost."""
        self._audit = (audit, time.monotonic())

    def _record_lag(self, lag: float) -> None:
        self._lag.observe(lag)
        self._last_lag = lag

    async def probe_loop_lag(self, interval: float = 0.02) -> NoReturn:
        """Measure the event loop's lag until cancelled: sleep ``interval`` seconds in a loop and
        record each overshoot (``*_event_loop_lag_seconds``, ``*_event_loop_last_lag_seconds``).

        Run it as a task of the server's event loop. One wake-up per interval is its whole
        cost (50 a second by default).
        """
        if not interval > 0:
            raise ConfigError(f"interval must be > 0, got {interval!r}")
        await sample_lag_forever(self._record_lag, interval)

    async def audit_every(self, interval: float = 30.0) -> None:
        """Audit the server's sockets (:meth:`Server.audit`) every ``interval`` seconds until
        cancelled and report the latest as the ``*_audit_*`` gauges, with its age.

        The kernel's table is read in a worker thread: a scrape never waits for it, it reports
        the last audit. Linux only; elsewhere this logs one warning and returns.
        """
        if not interval > 0:
            raise ConfigError(f"interval must be > 0, got {interval!r}")
        await audit_forever(self._server.audit, self.record_audit, interval)

    def close(self) -> None:
        """Stop listening to the server and leave the registry given at construction."""
        if self._listening:
            self._listening = False
            self._server.remove_listener(self._on_event)
            if self._registry is not None:
                self._registry.unregister(self)

    # -- read by prometheus_client

    def collect(self) -> Iterator[Metric]:
        """Every metric, read now (the collector protocol of prometheus_client)."""
        yield from self._families(self._server.stats())

    def describe(self) -> Iterator[Metric]:
        """The metrics' names and types without values: lets a registry refuse a clash."""
        yield from self._families(None)

    def _families(self, stats: ServerStats | None) -> Iterator[Metric]:
        p = self._prefix

        def gauge(name: str, doc: str, value: float | None, unit: str = "") -> Metric:
            return GaugeMetricFamily(p + name, doc, value=value, unit=unit)

        def counter(name: str, doc: str, value: int | None) -> Metric:
            return CounterMetricFamily(p + name, doc, value=value)

        def by_label(
            family: GaugeMetricFamily | CounterMetricFamily, values: Mapping[str, float]
        ) -> Metric:
            if stats is not None:
                for label, value in values.items():
                    family.add_metric([label], value)
            return family

        s = stats
        yield gauge("sessions", "Live sessions.", None if s is None else s.registry.live)
        phases: dict[str, float] = {}
        if s is not None:
            # Every open socket is in its hello, holds a live session, or is being closed
            # (including the instant it is being admitted).
            live = s.registry.live
            closing = max(0, s.connections - s.pending_hellos - live)
            phases = {"hello": s.pending_hellos, "session": live, "closing": closing}
        yield by_label(
            GaugeMetricFamily(p + "connections", "Open connections by phase.", labels=["phase"]),
            phases,
        )
        yield counter(
            "connections_accepted",
            "Connections accepted (admitted or not).",
            None if s is None else s.accepted,
        )
        yield counter(
            "accept_errors",
            "accept() failures for lack of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM).",
            None if s is None else s.accept_errors,
        )
        yield counter(
            "sessions_opened", "Sessions opened.", None if s is None else s.registry.opened
        )
        yield by_label(
            CounterMetricFamily(
                p + "connections_closed",
                "Connections closed, by close reason (every reason present).",
                labels=["reason"],
            ),
            {} if s is None else {reason.name: s.closed[reason] for reason in CloseReason},
        )
        yield counter(
            "takeovers",
            "Sessions taken over by a newer connection of the same identity.",
            None if s is None else s.takeovers,
        )
        yield counter(
            "spared",
            "Due sessions kept open because their peer's bytes waited unread (server behind).",
            None if s is None else s.spared,
        )
        admission = None if s is None else s.admission
        refused: Mapping[str, int] = {}
        if s is not None:
            counts = {} if admission is None else admission.refused
            refused = {limit: counts.get(limit, 0) for limit in _LIMITS}
        yield by_label(
            CounterMetricFamily(
                p + "admission_refused",
                "Connections refused by admission control, by limit (zero when it is off).",
                labels=["limit"],
            ),
            refused,
        )
        yield counter(
            "admission_shed_hellos",
            "Pending hellos shed to make room for newer connections.",
            None if s is None else 0 if admission is None else admission.shed_hellos,
        )
        flapping = None if s is None else s.flapping
        yield counter(
            "flapping_bans",
            "Identities banned for reconnecting too often (zero when flapping bans are off).",
            None if s is None else 0 if flapping is None else flapping.total_bans,
        )
        yield gauge(
            "reap_resolution",
            "The reaper's granularity: a session is reaped at most this long after its deadline.",
            None if s is None else self._resolution,
            "seconds",
        )
        cluster = None if s is None else s.cluster
        if s is None or cluster is not None:
            yield from _cluster_families(gauge, counter, cluster)
        yield from _read(self._lateness, s)
        yield from _read(self._durations_family, s)
        yield from _read(self._rtt, s)
        last_lag = self._last_lag
        if s is None or last_lag is not None:
            yield from _read(self._lag, s)
            yield gauge(
                "event_loop_last_lag",
                "The lag probe's latest measurement.",
                last_lag,
                "seconds",
            )
        audited = self._audit
        if s is None or audited is not None:
            audit, taken = audited if audited is not None else (None, 0.0)
            yield gauge(
                "audit_age",
                "Seconds since the socket audit reported by the audit_* gauges finished.",
                None if audit is None else time.monotonic() - taken,
                "seconds",
            )
            for name, doc, key in (
                ("audit_established_sockets", "Server-side ESTABLISHED sockets.", "established"),
                (
                    "audit_phantom_sockets",
                    "ESTABLISHED sockets on the server's ports owned by none of its connections.",
                    "phantoms",
                ),
                (
                    "audit_unaccepted_sockets",
                    "ESTABLISHED sockets still in the kernel's accept queue.",
                    "unaccepted",
                ),
                (
                    "audit_close_wait_sockets",
                    "CLOSE_WAIT sockets on the server's ports (a peer's FIN not yet answered).",
                    "close_wait",
                ),
            ):
                yield gauge(name, doc, None if audit is None else getattr(audit, key))


def _cluster_families(
    gauge: Callable[[str, str, float | None], Metric],
    counter: Callable[[str, str, int | None], Metric],
    c: ClusterStats | None,
) -> Iterator[Metric]:
    """The node's cluster metrics (keepconn.cluster), when the server is a cluster node."""
    yield gauge(
        "cluster_store_healthy",
        "1 if the node's last store call succeeded, else 0.",
        None if c is None else float(c.store_healthy),
    )
    yield gauge(
        "cluster_owned_sessions",
        "Sessions whose claim the store confirmed.",
        None if c is None else c.owned,
    )
    yield gauge(
        "cluster_lease_left_seconds",
        "Seconds the node's lease is still known valid.",
        None if c is None else c.lease_left,
    )
    for name, doc, key in (
        (
            "cluster_took_from_remote",
            "Claims that took an identity from another node.",
            "took_from_remote",
        ),
        (
            "cluster_remote_takeovers",
            "Sessions here taken over by another node's claim.",
            "remote_takeovers",
        ),
        (
            "cluster_ownership_lost",
            "Sessions closed OWNERSHIP_LOST (store gone past the lease).",
            "ownership_lost",
        ),
        ("cluster_refused", "Hellos refused because the store was unreachable.", "refused"),
        ("cluster_store_round_trips", "Store calls completed.", "store_round_trips"),
        ("cluster_store_errors", "Store calls failed or timed out.", "store_errors"),
        ("cluster_lease_lost", "Times the node found its lease gone and reasserted.", "lease_lost"),
        (
            "cluster_flapping_refused",
            "Hellos refused as flapping by the cluster-wide count.",
            "flapping_refused",
        ),
        (
            "cluster_duplicates_refused",
            "Hellos refused as a duplicate identity across the cluster.",
            "duplicates_refused",
        ),
        (
            "cluster_records_collected",
            "Owner records of dead nodes deleted by this node's collector steps.",
            "records_collected",
        ),
    ):
        yield counter(name, doc, None if c is None else getattr(c, key))


def _read(histogram: Histogram, stats: ServerStats | None) -> Iterator[Metric]:
    # A description carries no samples; a scrape carries them all.
    yield from histogram.describe() if stats is None else histogram.collect()


def instrument(
    server: Server[Any],
    *,
    registry: CollectorRegistry = REGISTRY,
    namespace: str = "keepconn",
) -> ServerCollector:
    """Collect ``server``'s metrics on ``registry`` (prometheus_client's default one unless
    given) and return the :class:`ServerCollector`, for its probes and its ``close()``.

    :param server: the :class:`keepconn.Server` to observe (serving or not yet).
    :param registry: the prometheus_client registry to register on.
    :param namespace: the prefix of every metric name (``keepconn_sessions``, ...).
    :raises ValueError: from prometheus_client, when ``registry`` already holds metrics of
        those names (two servers on one registry need two namespaces).
    """
    return ServerCollector(server, namespace=namespace, registry=registry)

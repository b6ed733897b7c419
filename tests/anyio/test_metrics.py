"""keepconn.metrics against a real server: scraped over real HTTP, parsed as Prometheus parses.

The scrapes go through prometheus_client's own HTTP server, which runs in a thread of its own:
the same path a deployment takes, and the one where ``Server.stats()`` must hop to the event
loop. Every async test runs on asyncio, uvloop and trio.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from keepconn import (
    ActiveHeartbeat,
    AdmissionConfig,
    CloseReason,
    ConnectionClosed,
    RoundTrip,
    ServerConfig,
    ServerEvent,
    SessionReaped,
)
from keepconn.metrics import REASON_CLASSES, ServerCollector, instrument
from tests.lineapp import Client, closes, make_server, serving, wait_for
from tests.timing import slack

#: (sample name, its labels) -> value, for one scrape.
Samples = Mapping[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


@contextlib.contextmanager
def exposed(registry: CollectorRegistry) -> Iterator[int]:
    """prometheus_client's HTTP exposition of ``registry`` on a free loopback port."""
    httpd, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield httpd.server_port
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


async def scrape(port: int) -> Samples:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            text: str = page.read().decode()
            return text

    return parse(await anyio.to_thread.run_sync(get))


def cumulative(samples: Samples) -> Samples:
    """The series that may never go down: counters and every part of a histogram."""
    return {
        key: v
        for key, v in samples.items()
        if key[0].endswith(("_total", "_bucket", "_count", "_sum"))
    }


# ----------------------------------------------------------------------------------------------
# The scripted sequence.


@pytest.mark.anyio
async def test_counters_and_histograms_agree_with_stats_and_with_what_was_done() -> None:
    resolution = 0.05
    config = ServerConfig(
        idle_timeout=30,
        resolution=resolution,
        admission=AdmissionConfig(max_sessions=4),
        flapping=None,
    )
    events: list[ServerEvent] = []
    async with serving(config, events=events) as (server, port):
        registry = CollectorRegistry()
        instrument(server, registry=registry)
        with exposed(registry) as metrics_port:
            alive = await Client.connect(port)
            assert await alive.hello("alive") == b"OK"
            old = await Client.connect(port)
            assert await old.hello("rebooted") == b"OK"
            new = await Client.connect(port)
            assert await new.hello("rebooted") == b"OK"  # takes the session over
            assert await old.closed_by_server()
            silent_timeout = slack(0.5)
            silent = [await Client.connect(port) for _ in range(2)]
            for n, client in enumerate(silent):
                assert await client.hello(f"silent-{n}", timeout=silent_timeout) == b"OK"
            # Four live sessions: a fifth identity is refused by the session cap.
            refused = await Client.connect(port)
            assert await refused.hello("fifth") == b"BUSY"
            assert await refused.closed_by_server()
            await wait_for(lambda: server.stats().closed[CloseReason.OVERLOADED] == 1)
            first = await scrape(metrics_port)

            for client in silent:
                assert await client.closed_by_server(timeout=silent_timeout + slack(2))
            intruder = await Client.connect(port)
            assert await intruder.hello("alive", password=b"guess") == b"DENIED"
            assert await intruder.closed_by_server()
            expected = {
                CloseReason.TAKEN_OVER: 1,
                CloseReason.OVERLOADED: 1,
                CloseReason.IDLE_TIMEOUT: 2,
                CloseReason.AUTH_FAILED: 1,
            }
            await wait_for(lambda: all(server.stats().closed[r] == n for r, n in expected.items()))
            second = await scrape(metrics_port)
            stats = server.stats()  # nothing happens between the scrape and this
            for client in (alive, old, new, *silent, refused, intruder):
                await client.aclose()

    for key, before in cumulative(first).items():
        assert second[key] >= before, (key, before, second[key])

    assert value(second, "keepconn_sessions") == stats.registry.live == 2
    phases = {p: value(second, "keepconn_connections", phase=p) for p in ("hello", "session")}
    assert phases == {"hello": 0, "session": 2}
    assert value(second, "keepconn_connections", phase="closing") == 0
    assert value(second, "keepconn_connections_accepted_total") == stats.accepted == 7
    assert value(second, "keepconn_sessions_opened_total") == stats.registry.opened == 5
    for reason in CloseReason:
        scraped = value(second, "keepconn_connections_closed_total", reason=reason.name)
        assert scraped == stats.closed[reason] == expected.get(reason, 0), reason
    assert value(second, "keepconn_takeovers_total") == stats.takeovers == 1
    assert stats.admission is not None
    for limit, count in stats.admission.refused.items():
        scraped = value(second, "keepconn_admission_refused_total", limit=limit)
        assert scraped == count == (1 if limit == "max_sessions" else 0), limit
    assert value(second, "keepconn_flapping_bans_total") == 0
    assert value(second, "keepconn_spared_total") == stats.spared == 0
    assert value(second, "keepconn_reap_resolution_seconds") == resolution

    # One observation per reaped session, each at or after its deadline and not much later.
    reaped = [e.lateness for e in events if isinstance(e, SessionReaped)]
    assert len(reaped) == 2
    assert all(0 <= late <= resolution + slack(0.05) for late in reaped), reaped
    assert value(first, "keepconn_reap_lateness_seconds_count") == 0
    assert value(second, "keepconn_reap_lateness_seconds_count") == 2
    assert value(second, "keepconn_reap_lateness_seconds_sum") == pytest.approx(sum(reaped))
    assert value(second, "keepconn_reap_lateness_seconds_bucket", le="+Inf") == 2

    durations = {
        cls: value(second, "keepconn_session_duration_seconds_count", reason_class=cls)
        for cls in set(REASON_CLASSES.values())
    }
    assert durations == {"dead": 2, "peer": 0, "replaced": 1, "refused": 2, "server": 0}
    assert value(second, "keepconn_session_duration_seconds_sum", reason_class="dead") >= (
        2 * silent_timeout
    )
    assert value(second, "keepconn_rtt_seconds_count") == 0
    # The opt-in probes were not started: their metrics are not made up.
    assert not {n for n in names(second) if "event_loop" in n or "audit" in n}


# ----------------------------------------------------------------------------------------------
# Round trips, listeners, the lag probe, the audit.


@pytest.mark.anyio
async def test_rtt_histogram_counts_every_round_trip_beside_other_listeners() -> None:
    beat = ActiveHeartbeat(interval=0.1, timeout=0.08)
    events: list[ServerEvent] = []
    config = ServerConfig(idle_timeout=30, heartbeat=beat, admission=None, flapping=None)
    async with serving(config, events=events) as (server, port):
        registry = CollectorRegistry()
        collector = ServerCollector(server, registry=registry)
        seen: list[ServerEvent] = []

        def broken(event: ServerEvent) -> None:
            raise RuntimeError("a listener's bug must not cost the others their events")

        server.add_listener(broken)
        server.add_listener(seen.append)
        client = await Client.connect(port)
        assert await client.hello("pinged") == b"OK"
        for _ in range(3):
            assert await client.line() == b"PING"
            await client.send(b"PONG")
        await wait_for(lambda: sum(isinstance(e, RoundTrip) for e in seen) >= 3)
        # Scraped on the event loop itself (a status page does this): no thread hop.
        samples = parse(generate_latest(registry).decode())
        trips = [e for e in seen if isinstance(e, RoundTrip)]
        assert value(samples, "keepconn_rtt_seconds_count") == len(trips)
        assert value(samples, "keepconn_rtt_seconds_sum") == pytest.approx(
            sum(e.rtt for e in trips)
        )
        # on_event, the failing listener's neighbour and the collector all saw the same events.
        assert [e for e in events if isinstance(e, RoundTrip)] == trips

        collector.close()
        server.remove_listener(broken)
        assert generate_latest(registry) == b""
        with pytest.raises(ValueError):
            server.remove_listener(broken)
        await client.aclose()
        await wait_for(lambda: bool(closes(seen, CloseReason.PEER_CLOSED)))


@pytest.mark.anyio
async def test_lag_probe_sees_the_event_loop_blocked() -> None:
    async with serving(ServerConfig(admission=None, flapping=None)) as (server, _):
        registry = CollectorRegistry()
        collector = instrument(server, registry=registry)
        assert "keepconn_event_loop_lag_seconds_count" not in names(
            parse(generate_latest(registry).decode())
        )
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(collector.probe_loop_lag, 0.02)
            await anyio.sleep(0.1)
            time.sleep(0.1)  # noqa: ASYNC251 - blocking the loop is the point
            await anyio.sleep(0.1)
            samples = parse(generate_latest(registry).decode())
            tasks.cancel_scope.cancel()
    count = value(samples, "keepconn_event_loop_lag_seconds_count")
    assert count >= 5
    # The wake-up due during the block came at least 0.1 - 0.02 s late.
    assert value(samples, "keepconn_event_loop_lag_seconds_bucket", le="0.05") < count
    assert value(samples, "keepconn_event_loop_lag_seconds_sum") >= 0.08
    assert value(samples, "keepconn_event_loop_last_lag_seconds") >= 0


@pytest.mark.anyio
async def test_audit_gauges_report_the_last_audit_and_its_age() -> None:
    async with serving(ServerConfig(admission=None, flapping=None)) as (server, port):
        registry = CollectorRegistry()
        collector = instrument(server, registry=registry)
        client = await Client.connect(port)
        assert await client.hello("audited") == b"OK"
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(collector.audit_every, 0.05)
            with exposed(registry) as metrics_port:
                await wait_for(
                    lambda: (
                        "keepconn_audit_age_seconds"
                        in names(parse(generate_latest(registry).decode()))
                    )
                )
                samples = await scrape(metrics_port)
            tasks.cancel_scope.cancel()
        await client.aclose()
    assert value(samples, "keepconn_audit_established_sockets") == 1
    assert value(samples, "keepconn_audit_phantom_sockets") == 0
    assert value(samples, "keepconn_audit_close_wait_sockets") == 0
    assert 0 <= value(samples, "keepconn_audit_age_seconds") < slack(1)


# ----------------------------------------------------------------------------------------------
# The collector itself.


def test_every_close_reason_has_one_documented_class() -> None:
    assert set(REASON_CLASSES) == set(CloseReason)
    assert set(REASON_CLASSES.values()) == {"dead", "peer", "replaced", "refused", "server"}
    assert {r for r, c in REASON_CLASSES.items() if c == "dead"} == {
        r for r in CloseReason if r.dead
    }


@pytest.mark.anyio
async def test_a_registry_refuses_two_collectors_with_the_same_names() -> None:
    server = make_server(ServerConfig(admission=None, flapping=None))
    registry = CollectorRegistry()
    first = instrument(server, registry=registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        instrument(server, registry=registry)
    other = instrument(server, registry=registry, namespace="gateway2")
    described = {m.name for m in first.describe()}
    assert {
        "keepconn_sessions",
        "keepconn_connections_closed",
        "keepconn_reap_lateness_seconds",
    } <= described
    first.close()
    first.close()  # idempotent
    instrument(server, registry=registry)  # the names are free again
    other.close()


def test_without_prometheus_client_the_import_error_names_the_extra() -> None:
    code = "import sys; sys.modules['prometheus_client'] = None; import keepconn.metrics"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("keepconn.MissingExtra: ") and "keepconn[prometheus]" in last, last


@pytest.mark.anyio
async def test_reaped_event_carries_lateness() -> None:
    events: list[ServerEvent] = []
    config = ServerConfig(resolution=0.05, admission=None, flapping=None)
    async with serving(config, events=events) as (server, port):
        client = await Client.connect(port)
        assert await client.hello("quiet", timeout=0.2) == b"OK"
        await wait_for(lambda: bool(closes(events, CloseReason.IDLE_TIMEOUT)))
        await client.aclose()
    [reaped] = [e for e in events if isinstance(e, SessionReaped)]
    [closed] = [e for e in events if isinstance(e, ConnectionClosed)]
    assert (reaped.identity, reaped.peer) == ("quiet", closed.peer)
    assert events.index(reaped) < events.index(closed)
    assert 0 <= reaped.lateness <= 0.05 + slack(0.05)

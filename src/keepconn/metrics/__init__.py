"""Prometheus metrics for a keepconn Server: the numbers that show liveness is managed on time.

Needs the ``prometheus`` extra (``pip install 'keepconn[prometheus]'``)::

    from prometheus_client import start_http_server
    from keepconn.metrics import instrument

    collector = instrument(server)               # on prometheus_client's default REGISTRY
    start_http_server(9100, addr="127.0.0.1")    # or any exposition of that registry
    # optional, in the program's task group (asyncio task, trio nursery):
    tasks.start_soon(collector.probe_loop_lag)   # keepconn_event_loop_lag_seconds
    tasks.start_soon(collector.audit_every, 30)  # keepconn_audit_* (Linux)

Counters and gauges are read from :meth:`Server.stats` when Prometheus scrapes, so nothing is
added to a connection's path; the histograms are fed by the server's events (a close, a reap, a
ping answered), which the collector receives as a listener (:meth:`Server.add_listener`). A
scrape may come from any thread: ``Server.stats()`` takes its snapshot on the event loop.
Every metric is described in docs/topics/metrics.md.
"""

from __future__ import annotations

from .._public import claim as _claim
from ._collector import DURATION_BUCKETS as DURATION_BUCKETS
from ._collector import LAG_BUCKETS as LAG_BUCKETS
from ._collector import LATENESS_BUCKETS as LATENESS_BUCKETS
from ._collector import REASON_CLASSES as REASON_CLASSES
from ._collector import RTT_BUCKETS as RTT_BUCKETS
from ._collector import ServerCollector as ServerCollector
from ._collector import instrument as instrument

__all__ = [
    "DURATION_BUCKETS",
    "LAG_BUCKETS",
    "LATENESS_BUCKETS",
    "REASON_CLASSES",
    "RTT_BUCKETS",
    "ServerCollector",
    "instrument",
]

_claim(__name__, __all__, globals())

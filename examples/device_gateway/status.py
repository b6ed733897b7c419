"""The gateway's status page: a tiny GET-only HTTP server on loopback, written on anyio streams.

``GET /status`` answers the JSON snapshot (the contract other programs poll: the fleet simulator
and ``make demo``); ``GET /`` answers the same numbers as a page a human can read, refreshing
itself; ``GET /metrics`` answers keepconn's Prometheus metrics (when the gateway has them).
Nothing else is served. It binds 127.0.0.1 only: the page shows who is connected and carries no
authentication, so it must never face the network. :func:`serve_metrics` serves ``/metrics``
alone, for a port a Prometheus server may reach: the metrics name no device.

Deliberately minimal, because a status page must not become the weak spot of a server built to
survive hostile peers: one request per connection (``Connection: close``), a request head of at
most 8 KiB that must arrive within 5 seconds, and no request bodies.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

if TYPE_CHECKING:
    from keepconn.cluster import RedisCluster

__all__ = [
    "MAX_HEAD",
    "cluster_status",
    "READ_TIMEOUT",
    "Metrics",
    "Snapshot",
    "render_html",
    "serve_metrics",
    "serve_status",
]

logger = logging.getLogger("gateway.status")

#: Largest request head accepted (request line and headers), in bytes.
MAX_HEAD = 8192
#: Seconds a client has to send its whole request head.
READ_TIMEOUT = 5.0

Snapshot = Callable[[], Awaitable[Mapping[str, Any]]]
#: The request's Accept header -> (the exposition, its content type): prometheus_client's
#: content negotiation (OpenMetrics or the Prometheus text format), done by the caller.
Metrics = Callable[[str], tuple[bytes, str]]
#: What a page answers: the request's headers (lower-case names) -> (body, content type).
Page = Callable[[Mapping[str, str]], Awaitable[tuple[bytes, str]]]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
}


async def serve_status(
    snapshot: Snapshot,
    listener: anyio.abc.SocketListener,
    *,
    metrics: Metrics | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the status page on ``listener`` until cancelled (then close it); with ``metrics``,
    ``/metrics`` too.

    The caller binds the listener (one of ``anyio.create_tcp_listener(local_host="127.0.0.1",
    ...).listeners``), so a port already in use is reported before anything starts.
    """

    async def status(headers: Mapping[str, str]) -> tuple[bytes, str]:
        return json.dumps(dict(await snapshot()), indent=1).encode() + b"\n", "application/json"

    async def page(headers: Mapping[str, str]) -> tuple[bytes, str]:
        return render_html(await snapshot()).encode(), "text/html; charset=utf-8"

    pages: dict[str, Page] = {"/": page, "/status": status}
    if metrics is not None:
        pages["/metrics"] = partial(_metrics_page, metrics)
    await _serve(pages, listener, task_status)


async def serve_metrics(
    metrics: Metrics,
    listener: anyio.abc.SocketListener,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` alone on ``listener`` until cancelled (then close it)."""
    await _serve({"/metrics": partial(_metrics_page, metrics)}, listener, task_status)


async def _metrics_page(metrics: Metrics, headers: Mapping[str, str]) -> tuple[bytes, str]:
    # Rendered on the event loop: the counters are read from memory and the audit gauges from
    # the collector's cache, so this costs a fraction of a millisecond (docs/topics/metrics.md).
    return metrics(headers.get("accept", ""))


async def _serve(
    pages: Mapping[str, Page],
    listener: anyio.abc.SocketListener,
    task_status: anyio.abc.TaskStatus[None],
) -> None:
    async with listener:
        task_status.started()

        async def handle(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                try:
                    await _serve_one(stream, pages)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass  # the client went away; nothing to tell it
                except Exception:
                    logger.exception("status request failed")

        async with anyio.create_task_group() as tasks:
            while True:
                try:
                    stream = await listener.accept()
                except (anyio.BrokenResourceError, OSError) as exc:
                    # Out of descriptors, say: the status page waits; the gateway must not die
                    # because its dashboard could not accept (anyio's serve() would raise here).
                    logger.warning("status accept failed: %s", exc)
                    await anyio.sleep(0.1)
                    continue
                tasks.start_soon(handle, stream)


async def _read_head(stream: anyio.abc.SocketStream) -> bytes | int:
    """The request head, or an HTTP status code saying why there is none."""
    buffer = b""
    with anyio.move_on_after(READ_TIMEOUT):
        while b"\r\n\r\n" not in buffer:
            if len(buffer) > MAX_HEAD:
                return 431
            try:
                buffer += await stream.receive(4096)
            except anyio.EndOfStream:
                return 400
        return buffer.split(b"\r\n\r\n", 1)[0]
    return 408


async def _serve_one(stream: anyio.abc.SocketStream, pages: Mapping[str, Page]) -> None:
    head = await _read_head(stream)
    if isinstance(head, int):
        await _respond(stream, head, "text/plain", _REASONS[head].encode() + b"\n")
        return
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        await _respond(stream, 400, "text/plain", b"Bad Request\n")
        return
    method, target, _ = parts
    if method not in ("GET", "HEAD"):
        await _respond(stream, 405, "text/plain", b"only GET\n", extra=(("Allow", "GET, HEAD"),))
        return
    page = pages.get(target.split("?", 1)[0])
    if page is None:
        listed = " or ".join(pages)
        await _respond(stream, 404, "text/plain", f"Not Found: try {listed}\n".encode())
        return
    headers: dict[str, str] = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    body, content_type = await page(headers)
    await _respond(stream, 200, content_type, body, head_only=method == "HEAD")


async def _respond(
    stream: anyio.abc.SocketStream,
    code: int,
    content_type: str,
    body: bytes,
    *,
    extra: tuple[tuple[str, str], ...] = (),
    head_only: bool = False,
) -> None:
    lines = [
        f"HTTP/1.1 {code} {_REASONS[code]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in extra),
    ]
    await stream.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if not head_only:
        await stream.send(body)


def cluster_status(cluster: RedisCluster, local_takeovers: int) -> dict[str, Any]:
    """The node's part of the status page: who it is, whether it can reach the store, what it
    owns, and takeovers by where the two connections were."""
    stats = cluster.stats()
    if stats is None:  # the server has not started the adapter yet
        return {"node_id": cluster.node_id, "store_healthy": False, "owned": 0}
    return {
        "node_id": stats.node_id,
        "store": cluster.url,
        "store_healthy": stats.store_healthy,
        "owned": stats.owned,
        "claiming": stats.claiming,
        # Both connections on this node.
        "local_takeovers": local_takeovers,
        # A device that was on another node connected here: this node claimed it and told the
        # other one to reset the old connection.
        "took_from_remote": stats.took_from_remote,
        # A device that was here connected to another node: its connection here was reset.
        "remote_takeovers": stats.remote_takeovers,
        "ownership_lost": stats.ownership_lost,
        "refused_store_down": stats.refused,
        "store_round_trips": stats.store_round_trips,
        "store_errors": stats.store_errors,
        "lease_lost": stats.lease_lost,
        "flapping_refused": stats.flapping_refused,
        "duplicates_refused": stats.duplicates_refused,
        # Owner records of dead nodes (lease gone) this node's collector steps deleted.
        "records_collected": stats.records_collected,
        "lease_left": None if stats.lease_left is None else round(stats.lease_left, 3),
    }


def render_html(status: Mapping[str, Any]) -> str:
    """The status snapshot as a small self-refreshing HTML page."""

    def table(title: str, rows: Mapping[str, Any]) -> str:
        cells = "".join(
            f"<tr><td>{html.escape(str(key))}</td><td class=n>{html.escape(str(value))}</td></tr>"
            for key, value in rows.items()
        )
        return f"<h2>{html.escape(title)}</h2><table>{cells}</table>"

    scalars = {k: v for k, v in status.items() if not isinstance(v, Mapping)}
    sections = [table("gateway", scalars)]
    closed = status.get("closed", {})
    sections.append(table("closes by reason", {k: v for k, v in closed.items() if v} or {"-": 0}))
    for key, title in (
        ("cluster", "cluster node"),
        ("census", "kernel sockets on the gateway port"),
        ("phantoms", "phantoms"),
    ):
        if isinstance(status.get(key), Mapping):
            sections.append(table(title, status[key]))
    return (
        "<!doctype html><html><head><meta charset=utf-8>"
        '<meta http-equiv="refresh" content="2"><title>keepconn device gateway</title>'
        "<style>body{font-family:monospace}td{padding:0 1em}.n{text-align:right}</style>"
        "</head><body>"
        "<h1>keepconn device gateway</h1>"
        + "".join(sections)
        + "<p>JSON: <a href=/status>/status</a></p>"
        "</body></html>\n"
    )

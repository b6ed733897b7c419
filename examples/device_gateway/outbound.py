"""What the gateway keeps about each live connection, and how messages published by one device
reach the others without a task, a queue or a lock per idle connection.

A device's own replies (CONNACK, PUBACK, PINGRESP, ...) are sent inline by its connection's
task. A message delivered to it by another connection's task must not make that publisher
wait on a subscriber that reads slowly, so it is queued: the queue (:attr:`Device.backlog`)
and the short-lived task that drains it exist only while something waits to be sent, and a
subscriber whose queue is full misses messages. keepconn's ``Connection.send`` holds a lock,
so the drainer's frames and the device's own replies never interleave mid-frame.
"""

from __future__ import annotations

import logging
from collections import deque

import anyio
import anyio.abc
import attrs

from device_gateway.mqtt_codec import Packet, Will
from keepconn import CloseReason, Connection, SessionClosed

__all__ = ["Device", "Outbound"]

logger = logging.getLogger("gateway")


@attrs.define(eq=False)
class Device:
    """What the gateway keeps about one live MQTT connection (``conn.context``)."""

    conn: Connection[Packet] = attrs.field(repr=False)
    username: str
    client_id: str
    keepalive: int
    will: Will | None
    #: Topic filter -> granted QoS (None until the first SUBSCRIBE: most devices never do).
    subscriptions: dict[str, int] | None = None
    #: Set by DISCONNECT: the client left cleanly, so its will is discarded (MQTT-3.14.4-3).
    disconnected: bool = False
    #: Deliveries not sent yet, oldest first; None whenever there are none.
    backlog: deque[bytes] | None = None
    #: The scope of the task draining :attr:`backlog`, while it runs.
    drainer: anyio.CancelScope | None = None
    #: Set once the session has ended: nothing is queued for it any more.
    gone: bool = False
    _next_id: int = 0

    def packet_id(self) -> int:
        """The next packet identifier for a QoS 1 delivery (1..65535, wrapping)."""
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def end(self) -> None:
        """The session is over: stop sending it deliveries (what is queued is moot)."""
        self.gone = True
        if self.drainer is not None:
            self.drainer.cancel()


class Outbound:
    """Sends deliveries to subscribers, in order per subscriber, never making a publisher wait.

    Run :meth:`run` for the life of the gateway: the drainers are its children.
    """

    def __init__(self, limit: int) -> None:
        #: Messages queued for one device before deliveries to it are dropped.
        self.limit = limit
        self._drainers: anyio.abc.TaskGroup | None = None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Host the drainers until cancelled (start it before serving, cancel it after the
        server's shutdown). Without it nothing is delivered: :meth:`queue` says False."""
        try:
            async with anyio.create_task_group() as tasks:
                self._drainers = tasks
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._drainers = None

    def queue(self, device: Device, data: bytes) -> bool:
        """Queue ``data`` for ``device``, starting a drainer if none runs; never waits. False
        if it was dropped (the device's backlog is full, or :meth:`run` is not running)."""
        if device.gone:
            return True  # its session is ending: as good as sent to a closing socket
        backlog = device.backlog
        if backlog is None:
            drainers = self._drainers
            if drainers is None:
                return False
            backlog = device.backlog = deque()
            drainers.start_soon(self._drain, device)
        elif len(backlog) >= self.limit:
            return False
        backlog.append(data)
        return True

    async def _drain(self, device: Device) -> None:
        """Send ``device``'s backlog until it is empty (then the deque and this task go), the
        session ends, or a send fails."""
        conn = device.conn
        backlog = device.backlog
        assert backlog is not None
        with anyio.CancelScope() as scope:
            device.drainer = scope
            try:
                while backlog and not device.gone:
                    await conn.send(backlog.popleft())
            except SessionClosed:
                pass  # closing gracefully: its own task ends the session
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                conn.close(CloseReason.PEER_RESET, f"send failed: {exc!r}")
            except Exception as exc:
                # Not the network's doing (uvloop's RuntimeError on a transport closed under
                # it, a bug): it ends this session, never the task group every drainer shares.
                logger.exception("delivery to %r failed", conn)
                conn.close(CloseReason.APPLICATION, f"delivery failed: {exc!r}")
            finally:
                device.drainer = None
                device.backlog = None

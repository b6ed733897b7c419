"""An MQTT 3.1.1 device gateway built on keepconn: it never accumulates dead connections.

Run it::

    python examples/device_gateway/gateway.py --host 127.0.0.1 --port 1883 \\
        --users users.txt --data telemetry.sqlite3 --hello-timeout 10 --status-port 8080

It prints ``listening on HOST:PORT`` once bound (``--port 0`` picks a free port and prints it)
and stops cleanly on SIGINT or SIGTERM. ``python gateway.py --help`` lists every option.

What it does with each connection (the MQTT parts are in this file; keepconn does the rest):

* **Hello** (:meth:`Gateway.identify`): the first packet must be CONNECT, within
  ``--hello-timeout``. Credentials are checked against ``--users`` (``username:password`` per
  line): a wrong password gets CONNACK 4, no username CONNACK 5, and the connection is closed
  with AUTH_FAILED; a device already connected with that client id is never disturbed. The
  session identity is ``(username, client id)``, so one user can never take over another
  user's device. An empty client id (clean session) gets one assigned.
* **Liveness**: each session's timeout is 1.5 x its CONNECT keepalive (MQTT-3.1.2-24), the
  keepalive first capped at ``--max-keepalive``; keepalive 0 means ``--idle-timeout``. Any
  complete packet counts as life, a trickle of partial bytes does not. TCP keepalive is set on
  every socket for devices that vanish while keepalive 0 lets them stay silent.
* **Session** (:meth:`Gateway.handler`): CONNACK 0 is sent once keepconn has opened the session
  (``Hello.welcome``: a takeover has already happened and admission/flapping checks have passed,
  so no client is welcomed and then refused). PUBLISH QoS
  0/1 goes to the telemetry sink (SQLite by default); a QoS 1 PUBLISH is acknowledged only once
  stored. Every PUBLISH is also delivered to the same user's sessions whose subscriptions match:
  that is how commands reach devices (a device subscribes to ``devices/<id>/commands/#`` and
  anyone logged in as that user publishes there). SUBSCRIBE is granted at most QoS 1.
  PINGREQ gets PINGRESP. DISCONNECT closes cleanly and discards the will; any other end (a
  dead, silent or misbehaving device) publishes the will to subscribers.
* **Refusals the client can see**: admission control (accept rate, ``--max-sessions``) answers
  CONNACK 3 (server unavailable) and closes; so does a CONNECT for a client id banned for
  flapping or held as a duplicate (``Hello.refusal``).
* **Status**: with ``--status-port`` a loopback HTTP page (``GET /status`` JSON, ``GET /`` for
  humans) shows sessions, closes by reason, takeovers and the kernel's census of the port.
* **Metrics**: keepconn's Prometheus metrics (``keepconn.metrics``, the ``prometheus`` extra) at
  ``GET /metrics`` on the status page and, with ``--metrics-port``, on a port of their own
  (loopback unless ``--metrics-host`` says otherwise).

Sibling modules: ``mqtt_codec`` (the sans-I/O protocol), ``sink`` (where telemetry goes),
``status`` (the HTTP page). They are imported by plain name because this script's directory
is on ``sys.path`` when it runs.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import secrets
import signal
import sys
import time
import weakref
from collections.abc import Hashable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.abc
import attrs
from anyio.abc import SocketAttribute
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mqtt_codec import (
    DEFAULT_MAX_REMAINING_LENGTH,
    PROTOCOL_MAX_REMAINING_LENGTH,
    Connack,
    ConnackCode,
    Connect,
    Decoder,
    Disconnect,
    MQTTProtocolError,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Role,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    Will,
    encode,
)
from sink import Recorder, SinkError, SQLiteSink, Telemetry, now_wall
from status import Metrics, serve_metrics, serve_status

from keepconn import (
    AdmissionConfig,
    CloseReason,
    Connection,
    FlappingConfig,
    Hello,
    HelloRejected,
    ProtocolError,
    Server,
    ServerConfig,
)
from keepconn.tcp import TcpKeepalive, TcpState
from topics import SubscriptionIndex, topic_matches

if TYPE_CHECKING:
    from keepconn.metrics import ServerCollector

__all__ = ["Gateway", "Users", "UsersFileError", "build_parser", "main", "topic_matches"]

logger = logging.getLogger("gateway")

#: Highest QoS the gateway grants or delivers (QoS 2 is refused by the codec; see its docstring).
MAX_QOS = 1
#: Messages queued for one connection before deliveries to it are dropped: a subscriber that does
#: not read must not make publishers wait, nor grow the gateway's memory.
OUTBOX_SIZE = 1000
#: Seconds a closing session may spend sending what is queued for it (a last PUBACK).
FLUSH_TIMEOUT = 1.0
_CONNACK_OK = encode(Connack())
_CONNACK_UNAVAILABLE = encode(Connack(return_code=ConnackCode.SERVER_UNAVAILABLE))
#: Seconds between the socket audits behind the keepconn_audit_* metrics (each reads the
#: kernel's table in a worker thread; /status requests refresh them in between).
METRICS_AUDIT_INTERVAL = 15.0
#: Prefix of client ids assigned to clients that sent an empty one (MQTT-3.1.3-6).
ASSIGNED_ID_PREFIX = "auto-"


# ----------------------------------------------------------------------------------------------
# Users.


class UsersFileError(ValueError):
    """The users file cannot be used; the message names the file and line."""


class Users:
    """The ``username:password`` table, checked in constant time per password."""

    def __init__(self, table: Mapping[str, bytes]) -> None:
        self._table = dict(table)
        # Compared against when the user is unknown, so "no such user" and "wrong password"
        # take the same time and an attacker cannot enumerate usernames.
        self._dummy = secrets.token_bytes(16)

    @classmethod
    def load(cls, path: str | Path) -> Users:
        """Read a users file: one ``username:password`` a line; blank lines and ``#`` comments
        are ignored; the password is everything after the first colon."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsersFileError(f"users file {path}: cannot read it: {exc}") from exc
        table: dict[str, bytes] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            user, colon, password = line.partition(":")
            where = f"users file {path}, line {number}"
            if not colon or not user or not password:
                raise UsersFileError(f"{where}: expected 'username:password', got {line!r}")
            if user in table:
                raise UsersFileError(f"{where}: user {user!r} is listed twice")
            table[user] = password.encode()
        if not table:
            raise UsersFileError(f"users file {path}: no users (one 'username:password' a line)")
        return cls(table)

    def check(self, username: str, password: bytes) -> bool:
        """True when ``password`` is ``username``'s."""
        expected = self._table.get(username)
        ok = hmac.compare_digest(password, self._dummy if expected is None else expected)
        return ok and expected is not None

    def __len__(self) -> int:
        return len(self._table)


# ----------------------------------------------------------------------------------------------
# Topics and per-connection state.


@attrs.define(eq=False)
class Device:
    """What the gateway keeps about one live MQTT connection (``conn.context``)."""

    username: str
    client_id: str
    keepalive: int
    will: Will | None
    #: Topic filter -> granted QoS.
    subscriptions: dict[str, int] = attrs.field(factory=dict)
    #: Set by DISCONNECT: the client left cleanly, so its will is discarded (MQTT-3.14.4-3).
    disconnected: bool = False
    _next_id: int = 0
    # Everything sent to this connection goes through one queue and one writer task, so sends
    # from other connections' tasks (deliveries) never interleave with its own replies.
    outbox: MemoryObjectSendStream[bytes] = attrs.field(init=False)
    inbox: MemoryObjectReceiveStream[bytes] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.outbox, self.inbox = anyio.create_memory_object_stream[bytes](OUTBOX_SIZE)

    def packet_id(self) -> int:
        """The next packet identifier for a QoS 1 delivery (1..65535, wrapping)."""
        self._next_id = self._next_id % 65535 + 1
        return self._next_id


# ----------------------------------------------------------------------------------------------
# The gateway.


@attrs.frozen
class Options:
    """The MQTT-level settings (keepconn's own are in ServerConfig)."""

    max_keepalive: int = 1800
    max_packet: int = DEFAULT_MAX_REMAINING_LENGTH


class Gateway:
    """The MQTT side of the gateway: keepconn's identify, handler and refuse callbacks.

    Build it, then run ``gateway.server.serve(...)`` and ``gateway.recorder.run()``; see
    :func:`run`. Replace the sink by passing another :class:`sink.Recorder`.
    """

    def __init__(
        self,
        users: Users,
        recorder: Recorder,
        config: ServerConfig,
        options: Options | None = None,
    ) -> None:
        self.users = users
        self.recorder = recorder
        self.options = options if options is not None else Options()
        self.server: Server[Packet] = Server(
            identify=self.identify,
            handler=self.handler,
            framer=self.framer,
            config=config,
            refuse=self.refuse,
        )
        #: Live sessions by username: deliveries never cross users.
        self._devices: dict[str, set[Device]] = {}
        #: Each user's subscriptions, indexed by topic filter.
        self._subscriptions: dict[str, SubscriptionIndex[Device]] = {}
        self.started = time.monotonic()
        self.port: int | None = None
        #: Messages delivered to subscribers, and those dropped because the subscriber lagged.
        self.delivered = 0
        self.dropped = 0
        self.wills = 0
        # Streams whose CONNECT was accepted, so that refuse() can tell a refusal after identify
        # (answered by Hello.refusal) from one at accept time. Weak: entries go with the streams.
        self._identified: weakref.WeakSet[anyio.abc.SocketStream] = weakref.WeakSet()
        #: keepconn's Prometheus collector, once :meth:`enable_metrics` has made it.
        self.metrics: ServerCollector | None = None

    def enable_metrics(self) -> Metrics:
        """Collect keepconn's metrics on a registry of the gateway's own; return the function
        that renders them for an Accept header (OpenMetrics or Prometheus text).

        Raises ImportError (naming the extra to install) without prometheus_client.
        """
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import choose_encoder

        from keepconn.metrics import instrument

        registry = CollectorRegistry()
        self.metrics = instrument(self.server, registry=registry)

        def render(accept: str) -> tuple[bytes, str]:
            encoder, content_type = choose_encoder(accept)
            return encoder(registry), content_type

        return render

    # -- keepconn callbacks

    def framer(self) -> Decoder:
        """One codec per connection: keepconn feeds it bytes and gets whole packets."""
        return Decoder(Role.SERVER, max_remaining_length=self.options.max_packet)

    async def identify(self, conn: Connection[Packet]) -> Hello:
        """Read CONNECT, authenticate, and return the session identity and its timeout."""
        try:
            connect = await conn.receive()
        except MQTTProtocolError as exc:
            # Some broken CONNECTs are answered before closing (e.g. MQTT 5: CONNACK 1).
            if exc.connack_code is not None:
                await _send_quietly(conn, encode(Connack(return_code=exc.connack_code)))
            raise
        if not isinstance(connect, Connect):  # the decoder already refuses this
            raise MQTTProtocolError(f"first packet must be CONNECT, got {connect!r}")
        username, password = connect.username, connect.password
        if username is None or password is None:
            await _send_quietly(conn, encode(Connack(return_code=ConnackCode.NOT_AUTHORIZED)))
            raise HelloRejected(f"no credentials (client id {connect.client_id!r})")
        if not self.users.check(username, password):
            code = ConnackCode.BAD_USERNAME_OR_PASSWORD
            await _send_quietly(conn, encode(Connack(return_code=code)))
            raise HelloRejected(f"bad password for user {username!r}")

        client_id = connect.client_id or ASSIGNED_ID_PREFIX + secrets.token_hex(8)
        identity: Hashable = (username, client_id)
        keepalive = connect.keepalive
        timeout = None if keepalive == 0 else 1.5 * min(keepalive, self.options.max_keepalive)
        conn.context = Device(username, client_id, keepalive, connect.will)
        self._identified.add(conn.stream)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("CONNECT %r keepalive=%d from %s", identity, keepalive, conn.peer)
        # keepconn sends the CONNACK once the session is open, or CONNACK 3 if it refuses the
        # session after all (session cap, flapping ban, duplicate identity).
        return Hello(identity, timeout=timeout, welcome=_CONNACK_OK, refusal=_CONNACK_UNAVAILABLE)

    async def refuse(self, stream: anyio.abc.SocketStream, retry_after: float) -> None:
        """Admission control refused the connection: CONNACK 3, "server unavailable".

        At the accept-rate limit this goes out before the client's CONNECT has been read; MQTT
        clients read it as the answer to their CONNECT, which is the point. MQTT 3.1.1 cannot
        carry ``retry_after``; clients fall back on their own reconnect backoff.
        """
        del retry_after
        if stream in self._identified:
            # Refused after identify (the session cap): keepconn sends Hello.refusal as well,
            # and one CONNACK is all a client may get.
            return
        await stream.send(_CONNACK_UNAVAILABLE)

    async def handler(self, conn: Connection[Packet]) -> None:
        """Serve one authenticated session until it ends, for whatever reason."""
        device: Device = conn.context
        users_devices = self._devices.setdefault(device.username, set())
        users_devices.add(device)
        failure: Exception | None = None
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._write_loop, conn, device)
                try:
                    await self._read_loop(conn, device)
                except anyio.EndOfStream:
                    pass  # the peer closed: keepconn records PEER_CLOSED
                except Exception as exc:
                    # Raised again below, outside the task group, so keepconn sees the
                    # exception itself (PROTOCOL_ERROR and its reason), not an ExceptionGroup.
                    failure = exc
                device.outbox.close()
                # Let the writer send what is queued (the PUBACKs of what the device sent
                # correctly before a malformed packet among them), but never wait long on a
                # peer that stopped reading, and not at all once the connection has broken.
                broken = failure is not None and not isinstance(failure, ProtocolError)
                tasks.cancel_scope.deadline = anyio.current_time() + (
                    0 if broken else FLUSH_TIMEOUT
                )
        finally:
            users_devices.discard(device)
            index = self._subscriptions.get(device.username)
            if index is not None:
                for topic_filter in device.subscriptions:
                    index.remove(device, topic_filter)
            if not users_devices:
                self._devices.pop(device.username, None)
                self._subscriptions.pop(device.username, None)
            self._publish_will(conn, device)
        if failure is not None:
            raise failure

    # -- inside a session

    async def _read_loop(self, conn: Connection[Packet], device: Device) -> None:
        async for packet in conn:
            if isinstance(packet, Publish):
                await self._on_publish(conn, device, packet)
            elif isinstance(packet, Pingreq):
                conn.ping_received()  # enforces a ping-rate limit when one is configured
                await device.outbox.send(encode(Pingresp()))
            elif isinstance(packet, Subscribe):
                granted = []
                index = self._subscriptions.setdefault(device.username, SubscriptionIndex())
                for topic_filter, qos in packet.topics:
                    device.subscriptions[topic_filter] = min(qos, MAX_QOS)
                    index.add(device, topic_filter, min(qos, MAX_QOS))
                    granted.append(min(qos, MAX_QOS))
                await device.outbox.send(encode(Suback(packet.packet_id, granted)))
            elif isinstance(packet, Unsubscribe):
                for topic_filter in packet.topic_filters:
                    if device.subscriptions.pop(topic_filter, None) is not None:
                        self._subscriptions[device.username].remove(device, topic_filter)
                await device.outbox.send(encode(Unsuback(packet.packet_id)))
            elif isinstance(packet, Puback):
                # The device acknowledges a QoS 1 delivery. Sessions are not persisted, so there
                # is nothing to redeliver and nothing to track.
                pass
            elif isinstance(packet, Disconnect):
                device.disconnected = True
                conn.close(CloseReason.PEER_CLOSED, "DISCONNECT")
                return
            else:  # the codec never yields anything else to a server
                raise MQTTProtocolError(f"unexpected {type(packet).__name__} from a client")

    async def _on_publish(self, conn: Connection[Packet], device: Device, packet: Publish) -> None:
        record = Telemetry(
            received=now_wall(),
            username=device.username,
            client_id=device.client_id,
            topic=packet.topic,
            payload=packet.payload,
            qos=packet.qos,
            retain=packet.retain,
        )
        if packet.qos == 0:
            await self.recorder.append(record)
            self._deliver(device.username, packet.topic, packet.payload, 0)
            return
        try:
            await self.recorder.store(record)
        except SinkError as exc:
            # MQTT 3.1.1 has no negative PUBACK: dropping the connection is the only way to say
            # "not stored". The client keeps the message and sends it again when it reconnects.
            # (The recorder has logged the sink's traceback.)
            conn.close(CloseReason.APPLICATION, str(exc))
            return
        self._deliver(device.username, packet.topic, packet.payload, packet.qos)
        assert packet.packet_id is not None  # the codec guarantees one at QoS 1
        await device.outbox.send(encode(Puback(packet.packet_id)))

    def _deliver(self, username: str, topic: str, payload: bytes, qos: int) -> None:
        """Send a message to every session of ``username`` subscribed to ``topic``. Never waits:
        a subscriber whose queue is full misses the message (counted in ``dropped``)."""
        index = self._subscriptions.get(username)
        if index is None:
            return
        for device, granted in index.match(topic).items():
            out_qos = min(qos, granted)
            packet = Publish(
                topic, payload, qos=out_qos, packet_id=device.packet_id() if out_qos else None
            )
            try:
                device.outbox.send_nowait(encode(packet))
            except anyio.WouldBlock:
                self.dropped += 1
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass  # that session is ending
            else:
                self.delivered += 1

    def _publish_will(self, conn: Connection[Packet], device: Device) -> None:
        """Publish the will of a device that vanished (MQTT-3.1.2-8), but not of one that said
        DISCONNECT, replaced its own connection (it is online) or is being shut down with the
        gateway (it has not failed)."""
        will = device.will
        if will is None or device.disconnected:
            return
        if conn.reason in (CloseReason.TAKEN_OVER, CloseReason.SHUTDOWN):
            return
        self.wills += 1
        qos = min(will.qos, MAX_QOS)
        self.recorder.append_nowait(
            Telemetry(now_wall(), device.username, device.client_id, will.topic, will.message, qos)
        )
        self._deliver(device.username, will.topic, will.message, qos)

    async def _write_loop(self, conn: Connection[Packet], device: Device) -> None:
        try:
            async with device.inbox:
                async for data in device.inbox:
                    await conn.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            conn.close(CloseReason.PEER_RESET, f"send failed: {exc!r}")

    # -- status

    async def snapshot(self) -> dict[str, Any]:
        """The status contract (``GET /status``): the keys listed in README.md."""
        port = self.port
        counts: dict[str, int] = {state.name: 0 for state in TcpState}
        census_error = None
        audit = None
        if port is not None:
            try:
                # Every server-side ESTABLISHED socket matched by inode to a session, a hello,
                # a closing connection or the accept queue; read off the event loop.
                audit = await self.server.audit()
            except OSError as exc:
                census_error = str(exc)
            else:
                counts.update(audit.counts)
                if self.metrics is not None:
                    self.metrics.record_audit(audit)  # fresher audit gauges, for free
        stats = self.server.stats()
        sessions = len(self.server.registry)
        status: dict[str, Any] = {
            "sessions": sessions,
            "connections": stats.connections,
            "pending_hellos": stats.pending_hellos,
            "accepted": stats.accepted,
            "takeovers": stats.takeovers,
            "closed": {reason.name: count for reason, count in stats.closed.items()},
            "census": counts,
            "phantoms": {
                # Owned by no connection of the server at all (closing ones, a transient, are
                # in "audit").
                "established_without_session": 0 if audit is None else audit.phantoms,
                "close_wait": counts.get("CLOSE_WAIT", 0),
                "unaccepted": 0 if audit is None else audit.unaccepted,
            },
            # Where every server-side ESTABLISHED socket stands (Server.audit()).
            "audit": {
                key: getattr(audit, key)
                for key in (
                    "established",
                    "with_session",
                    "in_hello",
                    "closing",
                    "unaccepted",
                    "phantoms",
                )
            }
            if audit is not None
            else {},
            "telemetry_stored": self.recorder.stored,
            "subscriptions": sum(len(index) for index in self._subscriptions.values()),
            "telemetry_failed": self.recorder.failed,
            "delivered": self.delivered,
            "dropped": self.dropped,
            "wills": self.wills,
            "accept_errors": stats.accept_errors,
            "port": port,
            "uptime": round(time.monotonic() - self.started, 3),
        }
        if census_error is not None:
            status["census_error"] = census_error
        return status


async def _send_quietly(conn: Connection[Packet], data: bytes) -> None:
    """Send a last word to a peer about to be closed; if it is already gone, so be it."""
    try:
        await conn.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass


# ----------------------------------------------------------------------------------------------
# Command line.


def _positive(kind: type[float] | type[int]) -> Any:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line (every option has a default except --users)."""
    p = argparse.ArgumentParser(
        prog="gateway.py",
        description="MQTT 3.1.1 device gateway on keepconn.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    pos_f, pos_i = _positive(float), _positive(int)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on ('' for all)")
    p.add_argument("--port", type=int, default=1883, help="MQTT port (0: pick a free one)")
    p.add_argument("--users", required=True, help="file of username:password lines")
    p.add_argument("--data", default="telemetry.sqlite3", help="SQLite file for telemetry")
    p.add_argument("--hello-timeout", type=pos_f, default=10.0, help="seconds to send CONNECT")
    p.add_argument(
        "--max-keepalive",
        type=pos_i,
        default=1800,
        help="largest client keepalive honoured, seconds (larger ones are capped to it)",
    )
    p.add_argument(
        "--idle-timeout", type=pos_f, default=300.0, help="timeout of keepalive-0 clients, s"
    )
    p.add_argument(
        "--resolution",
        type=pos_f,
        default=None,
        help="reaping granularity, s (None: min(1, idle-timeout/10))",
    )
    p.add_argument(
        "--max-packet", type=pos_i, default=DEFAULT_MAX_REMAINING_LENGTH, help="bytes per packet"
    )
    p.add_argument("--tcp-keepalive-idle", type=pos_i, default=60, help="TCP_KEEPIDLE, s")
    p.add_argument("--tcp-keepalive-interval", type=pos_i, default=10, help="TCP_KEEPINTVL, s")
    p.add_argument("--tcp-keepalive-count", type=pos_i, default=6, help="TCP_KEEPCNT")
    p.add_argument("--no-tcp-keepalive", action="store_true", help="leave the kernel's setting")
    p.add_argument("--accept-rate", type=pos_f, default=1000.0, help="connections/s sustained")
    p.add_argument("--accept-burst", type=pos_i, default=3000, help="connections at once")
    p.add_argument("--max-pending-hellos", type=pos_i, default=4096, help="CONNECTs awaited")
    p.add_argument("--max-sessions", type=pos_i, default=None, help="live sessions (None: no cap)")
    p.add_argument("--no-admission", action="store_true", help="admit every connection")
    p.add_argument("--flap-max-hellos", type=pos_i, default=15, help="CONNECTs per window")
    p.add_argument("--flap-window", type=pos_f, default=60.0, help="flapping window, s")
    p.add_argument("--flap-ban", type=pos_f, default=300.0, help="flapping ban, s")
    p.add_argument("--no-flapping", action="store_true", help="no flapping bans")
    p.add_argument("--shutdown-grace", type=pos_f, default=5.0, help="seconds to drain on exit")
    p.add_argument(
        "--status-port", type=int, default=0, help="loopback HTTP status page port (0: off)"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="Prometheus /metrics port (0: off; /metrics is on the status page too)",
    )
    p.add_argument(
        "--metrics-host", default="127.0.0.1", help="address for --metrics-port ('' for all)"
    )
    p.add_argument(
        "--backend", choices=("asyncio", "uvloop", "trio"), default="asyncio", help="event loop"
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        type=str.lower,
        help="stderr logging; info logs one line per close",
    )
    return p


def server_config(args: argparse.Namespace) -> ServerConfig:
    """keepconn's configuration from the command line."""
    keepalive = None
    if not args.no_tcp_keepalive:
        keepalive = TcpKeepalive(
            idle=args.tcp_keepalive_idle,
            interval=args.tcp_keepalive_interval,
            count=args.tcp_keepalive_count,
        )
    admission = None
    if not args.no_admission:
        admission = AdmissionConfig(
            accept_rate=args.accept_rate,
            accept_burst=args.accept_burst,
            max_pending_hellos=args.max_pending_hellos,
            max_sessions=args.max_sessions,
        )
    flapping = None
    if not args.no_flapping:
        flapping = FlappingConfig(
            max_hellos=args.flap_max_hellos, window=args.flap_window, ban=args.flap_ban
        )
    return ServerConfig(
        idle_timeout=args.idle_timeout,
        resolution=args.resolution,
        hello_timeout=args.hello_timeout,
        keepalive=keepalive,
        admission=admission,
        flapping=flapping,
        shutdown_grace=args.shutdown_grace,
    )


def _format_address(address: Sequence[Any]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


async def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; return the exit status."""
    gateway = Gateway(
        Users.load(args.users),
        Recorder(SQLiteSink(args.data)),
        server_config(args),
        Options(max_keepalive=args.max_keepalive, max_packet=args.max_packet),
    )
    metrics: Metrics | None = None
    try:
        metrics = gateway.enable_metrics()
    except ImportError as exc:
        # main() has refused --metrics-port without prometheus_client; the page does without.
        logger.info("no /metrics: %s", exc)
    # Installed before "listening on" is printed, so a signal sent the moment a supervisor
    # sees that line is a clean shutdown, not a KeyboardInterrupt traceback.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            listener = await anyio.create_tcp_listener(
                local_host=args.host or None, local_port=args.port, backlog=4096
            )
            status_listener = None
            if args.status_port:
                # Loopback only: the page has no authentication.
                status_listener = (
                    await anyio.create_tcp_listener(
                        local_host="127.0.0.1", local_port=args.status_port
                    )
                ).listeners[0]
            metrics_listeners: list[anyio.abc.SocketListener] = []
            if args.metrics_port:
                # '' binds every interface: IPv4 and IPv6, one listener each.
                multi = await anyio.create_tcp_listener(
                    local_host=args.metrics_host or None, local_port=args.metrics_port
                )
                metrics_listeners = cast("list[anyio.abc.SocketListener]", multi.listeners)
        except OSError as exc:
            print(f"gateway: cannot listen: {exc}", file=sys.stderr)
            gateway.recorder.sink.close()
            return 1
        first = listener.listeners[0]
        address = first.extra(SocketAttribute.local_address)
        gateway.port = first.extra(SocketAttribute.local_port)
        async with anyio.create_task_group() as outer:
            await outer.start(gateway.recorder.run)
            async with anyio.create_task_group() as tasks:
                # serve() takes the SocketListeners themselves, not anyio's MultiListener.
                sockets = cast("list[anyio.abc.SocketListener]", list(listener.listeners))
                await tasks.start(gateway.server.serve, sockets)
                if status_listener is not None:
                    await tasks.start(
                        partial(serve_status, metrics=metrics), gateway.snapshot, status_listener
                    )
                    status_port = status_listener.extra(SocketAttribute.local_port)
                    print(f"status on http://127.0.0.1:{status_port}/", flush=True)
                if metrics is not None and metrics_listeners:
                    for one in metrics_listeners:
                        await tasks.start(serve_metrics, metrics, one)
                    bound = metrics_listeners[0].extra(SocketAttribute.local_address)
                    print(f"metrics on http://{_format_address(bound)}/metrics", flush=True)
                if gateway.metrics is not None and metrics_listeners:
                    # The opt-in probes of keepconn.metrics, run only when a Prometheus server
                    # is expected (so the gateway's default load is what it always was): 50
                    # sleeps a second for the loop's lag, and an audit of the kernel's table
                    # now and then (in a worker thread).
                    tasks.start_soon(gateway.metrics.probe_loop_lag)
                    tasks.start_soon(gateway.metrics.audit_every, METRICS_AUDIT_INTERVAL)
                print(f"listening on {_format_address(address)}", flush=True)
                async for signum in signals:
                    logger.warning("%s: shutting down", signal.Signals(signum).name)
                    break
                await gateway.server.shutdown()
                tasks.cancel_scope.cancel()  # the status page
            # Every connection has ended: write what they queued, then stop.
            await gateway.recorder.aclose()
    gateway.recorder.sink.close()
    stats = gateway.server.stats()
    logger.info(
        "stopped: %d connections accepted, %d telemetry records stored",
        stats.accepted,
        gateway.recorder.stored,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the gateway on the chosen backend."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        Users.load(args.users)  # fail before binding anything, with the file's own message
        if args.max_packet > PROTOCOL_MAX_REMAINING_LENGTH:
            raise ValueError(f"--max-packet must be at most {PROTOCOL_MAX_REMAINING_LENGTH}")
        server_config(args)
        if args.metrics_port:
            import keepconn.metrics  # noqa: F401 - fails, naming the extra, without it
    except (ValueError, ImportError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    backend = "trio" if args.backend == "trio" else "asyncio"
    options: dict[str, Any] = {"use_uvloop": True} if args.backend == "uvloop" else {}
    result: int = anyio.run(run, args, backend=backend, backend_options=options)
    return result


if __name__ == "__main__":
    raise SystemExit(main())

"""The MQTT side of the example gateway, on keepconn: what is kept about each live connection,
and :class:`Gateway`, keepconn's callbacks (``framer``, ``identify``, ``handler``, ``refuse``)
plus the snapshot behind the status page. The users table is :mod:`device_gateway.users`.

The program around it (command line, keepconn's configuration, listeners, signals) is
``gateway.py``; what the gateway does with each connection is in that module's docstring.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import attrs

from device_gateway.mqtt_codec import (
    DEFAULT_MAX_REMAINING_LENGTH,
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
    encode,
)
from device_gateway.outbound import Device, Outbound
from device_gateway.sink import Recorder, SinkError, Telemetry, now_wall
from device_gateway.status import cluster_status
from device_gateway.topics import SubscriptionIndex
from device_gateway.users import Users, UsersFileError
from keepconn import (
    CloseReason,
    Connection,
    Hello,
    HelloRejected,
    Server,
    ServerConfig,
)
from keepconn.tcp import TcpState

if TYPE_CHECKING:
    from device_gateway.status import Metrics
    from keepconn.cluster import RedisCluster
    from keepconn.metrics import ServerCollector

__all__ = ["Device", "Gateway", "Options", "Users", "UsersFileError", "certificate_cn"]

# The program's logger (gateway.py logs as "gateway" too): one name for every line it writes.
logger = logging.getLogger("gateway")

#: Highest QoS the gateway grants or delivers (QoS 2 is refused by the codec; see its docstring).
MAX_QOS = 1
#: Messages queued for one connection before deliveries to it are dropped: a subscriber that does
#: not read must not make publishers wait, nor grow the gateway's memory.
OUTBOX_SIZE = 1000
_CONNACK_OK = encode(Connack())
_CONNACK_UNAVAILABLE = encode(Connack(return_code=ConnackCode.SERVER_UNAVAILABLE))
_PINGRESP = encode(Pingresp())
#: Prefix of client ids assigned to clients that sent an empty one (MQTT-3.1.3-6).
ASSIGNED_ID_PREFIX = "auto-"


# ----------------------------------------------------------------------------------------------
# The gateway.


@attrs.frozen
class Options:
    """The MQTT-level settings (keepconn's own are in ServerConfig)."""

    max_keepalive: int = 1800
    max_packet: int = DEFAULT_MAX_REMAINING_LENGTH
    #: The user is the client certificate's CN and no password is asked (the TLS context must
    #: require client certificates: ``--require-client-cert``).
    certificate_users: bool = False


class Gateway:
    """The MQTT side of the gateway: keepconn's identify, handler and refuse callbacks.

    Build it, then run ``gateway.recorder.run()``, ``gateway.outbound.run()`` and
    ``gateway.server.serve(...)``; see
    :func:`device_gateway.gateway.run`. Replace the sink by passing another
    :class:`~device_gateway.sink.Recorder`.
    """

    def __init__(
        self,
        users: Users | None,
        recorder: Recorder,
        config: ServerConfig,
        options: Options | None = None,
        *,
        cluster: RedisCluster | None = None,
    ) -> None:
        self.options = options if options is not None else Options()
        if users is None and not self.options.certificate_users:
            raise ValueError("a users table is needed unless users come from certificates")
        self.users = users
        self.recorder = recorder
        self.server: Server[Packet] = Server(
            identify=self.identify,
            handler=self.handler,
            framer=self.framer,
            config=config,
            refuse=self.refuse,
            cluster=cluster,
            on_frame=self.on_frame,
        )
        #: The cluster store adapter when the gateway is one node of several (``--cluster``).
        self.cluster = cluster
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
        #: keepconn's Prometheus collector, once :meth:`enable_metrics` has made it.
        self.metrics: ServerCollector | None = None
        #: Sends what is delivered to subscribers (run it: :meth:`Outbound.run`).
        self.outbound = Outbound(OUTBOX_SIZE)

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
        username = await self._authenticate(conn, connect)

        client_id = connect.client_id or ASSIGNED_ID_PREFIX + secrets.token_hex(8)
        identity: Hashable = (username, client_id)
        keepalive = connect.keepalive
        timeout = None if keepalive == 0 else 1.5 * min(keepalive, self.options.max_keepalive)
        conn.context = Device(conn, username, client_id, keepalive, connect.will)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("CONNECT %r keepalive=%d from %s", identity, keepalive, conn.peer)
        # keepconn sends the CONNACK once the session is open, or CONNACK 3 if it refuses the
        # session after all (session cap, flapping ban, duplicate identity).
        return Hello(identity, timeout=timeout, welcome=_CONNACK_OK, refusal=_CONNACK_UNAVAILABLE)

    async def _authenticate(self, conn: Connection[Packet], connect: Connect) -> str:
        """The user the CONNECT logs in as; CONNACK 4 or 5 and HelloRejected if it may not."""
        if self.options.certificate_users:
            # TLS has verified the certificate against --tls-ca; its CN is the user, whatever
            # the CONNECT says (mosquitto's use_identity_as_username does the same).
            name = certificate_cn(conn.peer_certificate)
            if name is None:
                await _send_quietly(conn, encode(Connack(return_code=ConnackCode.NOT_AUTHORIZED)))
                raise HelloRejected("client certificate without a CN")
            return name
        username, password = connect.username, connect.password
        if username is None or password is None:
            await _send_quietly(conn, encode(Connack(return_code=ConnackCode.NOT_AUTHORIZED)))
            raise HelloRejected(f"no credentials (client id {connect.client_id!r})")
        assert self.users is not None
        if not await self.users.authenticate(username, password):
            code = ConnackCode.BAD_USERNAME_OR_PASSWORD
            await _send_quietly(conn, encode(Connack(return_code=code)))
            raise HelloRejected(f"bad password for user {username!r}")
        return username

    async def refuse(self, stream: anyio.abc.ByteStream, retry_after: float) -> None:
        """Admission control refused the connection: CONNACK 3, "server unavailable".

        At the accept-rate limit this goes out before the client's CONNECT has been read; MQTT
        clients read it as the answer to their CONNECT, which is the point. MQTT 3.1.1 cannot
        carry ``retry_after``; clients fall back on their own reconnect backoff. Under TLS
        keepconn does not call this before the handshake: such a connection is just closed.
        Nor after a CONNECT was accepted: a session refused then (the session cap, a flapping
        ban) gets ``Hello.refusal``, the same CONNACK 3, and only that one.
        """
        del retry_after
        await stream.send(_CONNACK_UNAVAILABLE)

    def on_frame(self, conn: Connection[Packet], packet: Packet) -> bool:
        """Answer a PINGREQ where it is read, when the transport allows (keepconn's native
        one on asyncio and uvloop): an idle device's every packet then costs no task step.
        Anything else, and every packet on other transports, goes to :meth:`handler`."""
        if not isinstance(packet, Pingreq) or not conn.send_nowait(_PINGRESP):
            return False
        # After the answer, not before it as in the handler: a device pinging too often gets
        # this PINGRESP, then the close.
        conn.ping_received()
        return True

    async def handler(self, conn: Connection[Packet]) -> None:
        """Serve one authenticated session until it ends, for whatever reason.

        One task per connection: this one reads and answers; deliveries from other sessions
        reach it through :meth:`_deliver`, which never waits.
        """
        device: Device = conn.context
        users_devices = self._devices.setdefault(device.username, set())
        users_devices.add(device)
        try:
            # Read right here, not in a coroutine of its own: what an idle connection holds is
            # this frame and keepconn's receive, nothing else of the gateway's.
            async for packet in conn:
                if isinstance(packet, Pingreq):  # the common case, answered without a call
                    conn.ping_received()  # enforces a ping-rate limit when one is configured
                    await conn.send(_PINGRESP)
                elif not await self._on_packet(conn, device, packet):
                    return
        finally:
            device.end()
            users_devices.discard(device)
            index = self._subscriptions.get(device.username)
            if index is not None and device.subscriptions:
                for topic_filter in device.subscriptions:
                    index.remove(device, topic_filter)
            if not users_devices:
                self._devices.pop(device.username, None)
                self._subscriptions.pop(device.username, None)
            self._publish_will(conn, device)

    # -- inside a session

    async def _on_packet(self, conn: Connection[Packet], device: Device, packet: Packet) -> bool:
        """Act on one packet from the device; False once the session is over (DISCONNECT)."""
        if isinstance(packet, Publish):
            await self._on_publish(conn, device, packet)
        elif isinstance(packet, Pingreq):
            conn.ping_received()  # enforces a ping-rate limit when one is configured
            await conn.send(_PINGRESP)
        elif isinstance(packet, Subscribe):
            granted = []
            index = self._subscriptions.setdefault(device.username, SubscriptionIndex())
            if device.subscriptions is None:
                device.subscriptions = {}
            for topic_filter, qos in packet.topics:
                device.subscriptions[topic_filter] = min(qos, MAX_QOS)
                index.add(device, topic_filter, min(qos, MAX_QOS))
                granted.append(min(qos, MAX_QOS))
            await conn.send(encode(Suback(packet.packet_id, granted)))
        elif isinstance(packet, Unsubscribe):
            for topic_filter in packet.topic_filters:
                subscriptions = device.subscriptions or {}
                if subscriptions.pop(topic_filter, None) is not None:
                    self._subscriptions[device.username].remove(device, topic_filter)
            await conn.send(encode(Unsuback(packet.packet_id)))
        elif isinstance(packet, Puback):
            # The device acknowledges a QoS 1 delivery. Sessions are not persisted, so there
            # is nothing to redeliver and nothing to track.
            pass
        elif isinstance(packet, Disconnect):
            device.disconnected = True
            conn.close(CloseReason.PEER_CLOSED, "DISCONNECT")
            return False
        else:  # the codec never yields anything else to a server
            raise MQTTProtocolError(f"unexpected {type(packet).__name__} from a client")
        return True

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
        await conn.send(encode(Puback(packet.packet_id)))

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
            if self.outbound.queue(device, encode(packet)):
                self.delivered += 1
            else:
                self.dropped += 1

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
        if self.cluster is not None:
            status["node_id"] = self.cluster.node_id
            status["cluster"] = cluster_status(self.cluster, stats.takeovers)
        return status


def certificate_cn(cert: dict[str, Any] | None) -> str | None:
    """The subject's common name of a certificate as ``getpeercert()`` decodes it."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value:
                return str(value)
    return None


async def _send_quietly(conn: Connection[Packet], data: bytes) -> None:
    """Send a last word to a peer about to be closed; if it is already gone, so be it."""
    try:
        await conn.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass

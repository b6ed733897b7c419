"""One simulated MQTT device: how every device behaves (:class:`DeviceProfile`), what happened to
one (:class:`DeviceRecord`) and its protocol loop (:class:`Device`): connect, heartbeat, publish,
die when its worker strikes it, come back.

Devices are non-blocking sockets driven by anyio inside a worker process
(:mod:`device_gateway.fleet_worker`), and speak MQTT 3.1.1 with the gateway's own codec, over
TLS when the worker has a context (an ``ssl.SSLSocket`` is still the socket every fault acts on:
its descriptor is what is aborted, abandoned or blackholed).
"""

from __future__ import annotations

import errno
import json
import random
import socket
import ssl
import struct
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from device_gateway.mqtt_codec import (
    Connack,
    Connect,
    Decoder,
    Disconnect,
    MQTTProtocolError,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Role,
    Subscribe,
    encode,
)
from keepconn import Backoff

if TYPE_CHECKING:
    from device_gateway.fleet_worker import Worker

__all__ = ["Device", "DeviceProfile", "DeviceRecord", "abort"]


def _check_positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _check_non_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen
class DeviceProfile:
    """How every device in the fleet behaves. Rates are per device per minute."""

    #: CONNECT keepalive in seconds; the device sends PINGREQ after this long without sending.
    keepalive: int = attrs.field(default=10, validator=_check_positive)
    #: Mean seconds between telemetry publishes (jittered +/- 30 %).
    telemetry_interval: float = attrs.field(default=2.0, validator=_check_positive)
    #: Fraction of publishes sent at QoS 1 (acknowledged once stored); the rest are QoS 0.
    qos1_fraction: float = attrs.field(default=0.5, validator=_check_non_negative)
    #: Reboots per device per minute: vanish without FIN, reconnect after ``boot_time``.
    reboot_rate: float = attrs.field(default=0.0, validator=_check_non_negative)
    #: Half-open losses per device per minute: vanish without FIN, stay dark ``loss_offline``.
    loss_rate: float = attrs.field(default=0.0, validator=_check_non_negative)
    #: Mean seconds a rebooting device takes before it reconnects.
    boot_time: float = attrs.field(default=1.0, validator=_check_non_negative)
    #: Seconds a lost device stays dark; None means 1.5 x keepalive + 3 s, so the gateway must
    #: reap the old connection before the device returns.
    loss_offline: float | None = None
    #: Seconds a connect (TCP + CONNECT/CONNACK) may take before it counts as failed.
    connect_timeout: float = attrs.field(default=10.0, validator=_check_positive)
    #: Subscribe to ``devices/<id>/commands`` after connecting, as command-taking devices do.
    subscribe: bool = True

    @property
    def dark_seconds(self) -> float:
        """How long a lost device stays offline."""
        if self.loss_offline is not None:
            return self.loss_offline
        return 1.5 * self.keepalive + 3.0

    @property
    def retire_after(self) -> float:
        """Seconds an abandoned socket is kept (silent) before it is closed for good: long after
        any correct gateway has reaped it, so closing it can never hide a phantom."""
        return 3.0 * 1.5 * self.keepalive + 10.0


@attrs.define
class DeviceRecord:
    """What happened to one device."""

    client_id: str
    connects: int = 0
    connect_ms: list[float] = attrs.Factory(list)
    takeover_ms: list[float] = attrs.Factory(list)
    #: When each takeover began (``time.monotonic()``, one clock for every process of the
    #: machine): tells a benchmark whether its slow takeovers came together, and when.
    takeover_at: list[float] = attrs.Factory(list)
    #: Whether each takeover followed a strike of a burst (Worker.burst) rather than the
    #: steady churn.
    takeover_burst: list[bool] = attrs.Factory(list)
    disconnects: Counter[str] = attrs.Factory(Counter)
    failures: Counter[str] = attrs.Factory(Counter)
    refused: Counter[int] = attrs.Factory(Counter)
    qos0: int = 0
    qos1: int = 0
    acked: int = 0
    pings: int = 0
    commands: int = 0
    #: Reconnects that went to a different gateway node than the last connection (a cluster's
    #: fleet moves on every reboot; see Worker.endpoints).
    moves: int = 0
    #: The endpoint (index into the worker's list) of the latest connection.
    node: int = 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (latencies rounded to 0.1 ms)."""
        return {
            "id": self.client_id,
            "connects": self.connects,
            "connect_ms": [round(x, 1) for x in self.connect_ms],
            "takeover_ms": [round(x, 1) for x in self.takeover_ms],
            "takeover_at": [round(x, 3) for x in self.takeover_at],
            "takeover_burst": self.takeover_burst,
            "disconnects": dict(self.disconnects),
            "failures": dict(self.failures),
            "refused": {str(k): v for k, v in self.refused.items()},
            "qos0": self.qos0,
            "qos1": self.qos1,
            "acked": self.acked,
            "pings": self.pings,
            "commands": self.commands,
            "moves": self.moves,
            "node": self.node,
        }


class _Closed(Exception):
    """The connection ended; ``args[0]`` names why (a disconnect reason)."""


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except (BlockingIOError, ssl.SSLWantWriteError):
            await anyio.wait_writable(sock)
            continue
        except ssl.SSLWantReadError:  # TLS needs the peer's bytes first (a key update)
            await anyio.wait_readable(sock)
            continue
        except OSError as exc:
            gone = exc.errno in (errno.ECONNRESET, errno.EPIPE)
            raise _Closed("reset" if gone else "error") from None
        view = view[sent:]


class Device:
    """One simulated MQTT device: connect, heartbeat, publish; die and return on command."""

    def __init__(self, worker: Worker, index: int, username: str, password: str) -> None:
        self.worker = worker
        self.record = DeviceRecord(f"{worker.id_prefix}-{index:06d}")
        self.username = username
        self.password = password.encode()
        self.rng = random.Random(worker.seed * 1_000_003 + index)
        self.state = "offline"
        #: Set by the worker to make the device die: "reboot", "loss" or "storm".
        self.fault: str | None = None
        #: Whether the current fault came with a burst (see DeviceRecord.takeover_burst).
        self.burst = False
        self._wait: anyio.CancelScope | None = None
        self._packet_id = 0
        # Which gateway node it talks to: spread by index, and a different one after each
        # reboot or storm (devices behind a balancer land anywhere; here always elsewhere, the
        # case a cluster exists for).
        self.record.node = index % len(worker.endpoints)

    def strike(self, fault: str, *, burst: bool = False) -> bool:
        """Make an online device die now (returns False if it is not online)."""
        if self.state != "online" or self.fault is not None:
            return False
        self.fault = fault
        self.burst = burst
        if self._wait is not None:
            self._wait.cancel()
        return True

    async def run(self) -> None:
        """Connect, stay online, come back after every death, until the worker quits."""
        profile = self.worker.profile
        await self.worker.nap(self.rng.uniform(0, self.worker.ramp))
        backoff = Backoff(initial=0.5, max_delay=8.0).delays(self.rng)
        returning = False  # the previous connection may still be half-open on the server
        while not self.worker.quitting:
            await self.worker.storm_gate.wait()
            self.state = "connecting"
            started = time.monotonic()
            try:
                sock, decoder, early = await self._connect()
            except _Closed as exc:
                self.record.failures[exc.args[0]] += 1
                self.state = "offline"
                await self.worker.nap(backoff.next_delay())
                continue
            latency = (time.monotonic() - started) * 1000.0
            backoff.reset()
            self.record.connects += 1
            if returning:
                self.record.takeover_ms.append(latency)
                self.record.takeover_at.append(started)
                self.record.takeover_burst.append(self.burst)
            else:
                self.record.connect_ms.append(latency)
            self.burst = False
            self.state = "online"
            reason = await self._session(sock, decoder, early)
            self.record.disconnects[reason] += 1
            self.fault = None
            returning = reason in ("reboot", "storm", "loss")
            if returning and len(self.worker.endpoints) > 1:
                hop = 1 + self.rng.randrange(len(self.worker.endpoints) - 1)
                self.record.node = (self.record.node + hop) % len(self.worker.endpoints)
                self.record.moves += 1
            if reason == "quit":
                break
            self.state = "dark" if returning else "offline"
            if reason == "reboot":
                await self.worker.nap(self.rng.uniform(0.5, 1.5) * profile.boot_time)
            elif reason == "loss":
                # Back only after the gateway had to reap the old connection by itself.
                returning = False
                await self.worker.nap(profile.dark_seconds)
            elif reason == "storm":
                pass  # the storm gate holds everyone until the cell's link is back
            else:
                await self.worker.nap(backoff.next_delay())
        self.state = "offline"

    async def _connect(self) -> tuple[socket.socket, Decoder, list[Any]]:
        worker = self.worker
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            with anyio.fail_after(worker.profile.connect_timeout):
                err = sock.connect_ex(worker.endpoints[self.record.node])
                if err not in (0, errno.EINPROGRESS):
                    raise _Closed(f"connect_{errno.errorcode.get(err, err)}")
                await anyio.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise _Closed(f"connect_{errno.errorcode.get(err, err)}")
                if worker.tls is not None:
                    sock = await _handshake(worker.tls, sock, worker.tls_hostname)
                hello = Connect(
                    client_id=self.record.client_id,
                    clean_session=True,
                    keepalive=worker.profile.keepalive,
                    username=self.username,
                    password=self.password,
                )
                await _send_all(sock, encode(hello))
                decoder = Decoder(role=Role.CLIENT)
                packets: list[Any] = []
                while not packets:
                    await anyio.wait_readable(sock)
                    packets = self._receive(sock, decoder)
        except TimeoutError:
            abort(sock)
            raise _Closed("connect_timeout") from None
        except _Closed as exc:
            abort(sock)
            # A close before CONNACK is how an overloaded or banning server says no.
            raise _Closed(
                "closed_before_connack"
                if exc.args[0] in ("server_closed", "reset")
                else exc.args[0]
            ) from None
        except BaseException:
            abort(sock)
            raise
        first, rest = packets[0], packets[1:]
        if not isinstance(first, Connack) or first.return_code != 0:
            abort(sock)
            code = first.return_code if isinstance(first, Connack) else -1
            self.record.refused[code] += 1
            raise _Closed(f"connack_{code}")
        return sock, decoder, rest

    def _receive(self, sock: socket.socket, decoder: Decoder) -> list[Any]:
        try:
            data = sock.recv(65536)
            # TLS hands over one record per call; the rest of one partly read waits in TLS,
            # where the socket's readiness would never show it.
            while data and isinstance(sock, ssl.SSLSocket) and sock.pending():
                data += sock.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return []
        except OSError as exc:
            raise _Closed("reset" if exc.errno == errno.ECONNRESET else "error") from None
        if not data:
            raise _Closed("server_closed")
        try:
            return decoder.feed(data)
        except MQTTProtocolError:
            raise _Closed("protocol_error") from None

    def _next_id(self) -> int:
        self._packet_id = self._packet_id % 65535 + 1
        return self._packet_id

    async def _session(self, sock: socket.socket, decoder: Decoder, early: list[Any]) -> str:
        """Run one connection until it ends; return the reason. The socket is gone after."""
        profile = self.worker.profile
        keepalive = float(profile.keepalive)
        now = time.monotonic()
        last_sent = now
        ping_sent: float | None = None
        next_publish = now + self.rng.uniform(0, profile.telemetry_interval)
        inflight: set[int] = set()
        pending = list(early)
        try:
            if profile.subscribe:
                topic = f"devices/{self.record.client_id}/commands"
                await _send_all(sock, encode(Subscribe(self._next_id(), [(topic, 1)])))
                last_sent = time.monotonic()
            while True:
                for packet in pending:
                    if isinstance(packet, Pingresp):
                        ping_sent = None
                    elif isinstance(packet, Puback):
                        if packet.packet_id in inflight:
                            inflight.discard(packet.packet_id)
                            self.record.acked += 1
                    elif isinstance(packet, Publish):
                        self.record.commands += 1
                        if packet.qos == 1 and packet.packet_id is not None:
                            await _send_all(sock, encode(Puback(packet.packet_id)))
                pending = []
                if self.worker.quitting:
                    await _send_all(sock, encode(Disconnect()))
                    _close_gracefully(sock)
                    return "quit"
                if self.fault is not None:
                    await self.worker.abandon(sock, self.fault, self.record.client_id)
                    return self.fault
                now = time.monotonic()
                if ping_sent is not None and now - ping_sent > keepalive:
                    abort(sock)
                    return "ping_timeout"
                if now >= next_publish:
                    qos = 1 if self.rng.random() < profile.qos1_fraction else 0
                    packet_id = self._next_id() if qos else None
                    payload = json.dumps({"t": round(time.time(), 3), "v": self.rng.random()})
                    topic = f"telemetry/{self.record.client_id}"
                    await _send_all(
                        sock, encode(Publish(topic, payload.encode(), qos=qos, packet_id=packet_id))
                    )
                    if packet_id is not None:
                        inflight.add(packet_id)
                        self.record.qos1 += 1
                    else:
                        self.record.qos0 += 1
                    last_sent = now
                    next_publish = now + profile.telemetry_interval * self.rng.uniform(0.7, 1.3)
                if now - last_sent >= keepalive and ping_sent is None:
                    await _send_all(sock, encode(Pingreq()))
                    self.record.pings += 1
                    ping_sent = last_sent = now
                wake = min(next_publish, last_sent + keepalive)
                if ping_sent is not None:
                    wake = min(wake, ping_sent + keepalive)
                with anyio.move_on_after(max(0.0, wake - time.monotonic())) as scope:
                    self._wait = scope
                    if self.fault is None and not self.worker.quitting:
                        await anyio.wait_readable(sock)
                        pending = self._receive(sock, decoder)
                self._wait = None
        except _Closed as exc:
            abort(sock)
            return str(exc.args[0])
        except BaseException:
            abort(sock)
            raise


async def _handshake(context: ssl.SSLContext, sock: socket.socket, hostname: str) -> socket.socket:
    """TLS over the connected non-blocking ``sock``; the TLS socket (the same descriptor)."""
    tls = context.wrap_socket(sock, server_hostname=hostname, do_handshake_on_connect=False)
    while True:
        try:
            tls.do_handshake()
            return tls
        except ssl.SSLWantReadError:
            await anyio.wait_readable(tls)
        except ssl.SSLWantWriteError:
            await anyio.wait_writable(tls)
        except ssl.SSLError:
            abort(tls)
            raise _Closed("tls_failed") from None
        except OSError as exc:
            abort(tls)
            raise _Closed("reset" if exc.errno == errno.ECONNRESET else "error") from None
        except BaseException:
            # A connect timeout or the worker quitting: the caller only holds the plain socket,
            # which wrap_socket has emptied, so this one is closed here.
            abort(tls)
            raise


def abort(sock: socket.socket) -> None:
    # Linger 0: close without FIN_WAIT leftovers on the device side (sends an RST if routable).
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _close_gracefully(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()

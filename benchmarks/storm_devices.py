"""One worker process of the storm benchmark's device fleet (started by benchmarks/storm.py).

Each device is a minimal MQTT 3.1.1 client: CONNECT, wait for CONNACK, then PINGREQ every
keepalive seconds and nothing else, so the server's work is connections and liveness, not
telemetry. Devices are asyncio protocols on uvloop: a worker holds thousands of them on a
fraction of a CPU, which matters because the fleet shares the machine with the server it
measures.

Two client policies, as the benchmark compares them:

* ``jitter``: exponential backoff with full jitter (``keepconn.Backoff`` defaults: gRPC's
  1 s, x1.6, cap 120 s), drawn before the first reconnect after a cut too, and reset once
  connected. It would obey a retry-after hint, but the example gateway cannot send one over
  MQTT 3.1.1 (see docs/benchmarks.md), so every refusal falls back on the backoff.
* ``naive``: reconnect at once after a cut, and retry every 1 s after a failed attempt.

A *cut* makes every online device vanish the way a device behind a failed cell tower does: it
stops sending on its connection but keeps the socket open, so no FIN or RST reaches the server
(on loopback the kernel still ACKs: the server sees a hung peer, not a truly half-open one).
Then it reconnects with the same client id. Only when the server closes the old connection
does the device close its end, so an old connection stays open exactly as long as the server
keeps it: that count is the benchmark's device-side phantom figure.

With ``"tls": {"ca": PEM}`` in the spec every connection is MQTT over TLS, verified against that
CA; the handshake is part of the connect (inside ``connect_timeout``), with no session
resumption, so every reconnect costs the server a full handshake.

A device whose session the server closes records its side of it (storm_trace.py): CONNECT,
CONNACK and PINGREQ times, and the worst stall of its worker's loop meanwhile. The ``final``
line carries those records and the worker's loop-lag summary.

Protocol with the coordinator: the spec is one JSON argument; stdin takes ``cut T`` (T is the
coordinator's time.monotonic(), which is system-wide on Linux) and ``quit``; stdout carries a
``tick`` JSON line every 0.25 s and one ``final`` line before exit.
"""

from __future__ import annotations

import asyncio
import errno
import json
import random
import resource
import socket
import ssl
import sys
import threading
import time
from collections import Counter
from typing import Any, cast

from device_gateway.mqtt_codec import (
    Connack,
    Connect,
    Decoder,
    Disconnect,
    MQTTProtocolError,
    Pingreq,
    Role,
    encode,
)
from keepconn import Backoff
from storm_trace import PINGS_KEPT, LagMonitor, drop_record, local_address

#: Linux's IP_BIND_ADDRESS_NO_PORT (Python exposes it from 3.12 only): bind() picks the source
#: address, connect() picks the port against the full 4-tuple, so each source address brings
#: its own ephemeral range instead of sharing one per-address bind() range.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
TICK = 0.25
NAIVE_RETRY = 1.0
_PINGREQ = encode(Pingreq())
_DISCONNECT = encode(Disconnect())


class Link(asyncio.Protocol):
    """One TCP connection of a device: CONNECT out, CONNACK in, then pings until it ends."""

    def __init__(self, device: Device, hello: bytes) -> None:
        self.device = device
        self.hello = hello
        self.decoder = Decoder(role=Role.CLIENT)
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[int] = loop.create_future()
        #: Resolved when the connection is gone (whoever closed it).
        self.lost: asyncio.Future[None] = loop.create_future()
        #: Set once the device has walked away from this connection in a cut.
        self.abandoned = False
        # The device's view of this connection, for a drop's evidence (storm_trace.py).
        self.local = ""
        self.hello_sent_at: float | None = None
        self.connack_at: float | None = None
        self.pings: list[tuple[float, float]] = []
        self.lost_at: float | None = None
        self.lost_by = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it. Under TLS
        # this is called once the handshake is done.
        self.transport = cast(asyncio.Transport, transport)
        self.device.worker.handshakes += 1
        host, port = transport.get_extra_info("sockname")[:2]
        self.local = f"{host}:{port}"
        self.hello_sent_at = time.monotonic()
        self.transport.write(self.hello)

    def data_received(self, data: bytes) -> None:
        try:
            packets = self.decoder.feed(data)
        except MQTTProtocolError:
            self.abort()
            return
        for packet in packets:
            if isinstance(packet, Connack) and not self.connack.done():
                self.connack_at = time.monotonic()
                self.connack.set_result(packet.return_code)
            # PINGRESP and anything else: the server is alive; nothing to do.

    def eof_received(self) -> bool:
        # The server closed: let asyncio close our end too (no half-closed leftovers).
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_at = time.monotonic()
        self.lost_by = "EOF" if exc is None else type(exc).__name__
        if not self.connack.done():
            self.connack.set_exception(ConnectionResetError("closed before CONNACK"))
            # Nobody awaits it any more once the attempt has timed out: mark it retrieved, so
            # asyncio does not log "exception was never retrieved" (an await still raises it).
            self.connack.exception()
        if not self.lost.done():
            self.lost.set_result(None)
        if self.abandoned:
            # The server has finally let go of a connection the device left in a cut.
            self.device.worker.abandoned_open -= 1

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Device:
    """One simulated device and its reconnect policy."""

    __slots__ = (
        "worker",
        "client_id",
        "hello",
        "source",
        "rng",
        "backoff",
        "state",
        "link",
        "wake",
        "cut_at",
        "back_at",
        "left_sent_at",
        "attempts",
        "ping_timer",
        "history",
        "trying",
    )

    def __init__(self, worker: Worker, index: int) -> None:
        self.worker = worker
        spec = worker.spec
        username, password = spec["users"][index % len(spec["users"])]
        self.client_id = f"storm-{index:06d}"
        self.hello = encode(
            Connect(
                client_id=self.client_id,
                keepalive=spec["keepalive"],
                username=username,
                password=password.encode(),
            )
        )
        sources = spec["sources"]
        # A fixed source address per device: a takeover comes from the host the old connection
        # came from, as a rebooted device's would (no duplicate-identity alarm).
        self.source: str = sources[index % len(sources)]
        self.rng = random.Random(spec["seed"] * 1_000_003 + index)
        self.backoff = Backoff().delays(self.rng)
        self.state = "offline"
        self.link: Link | None = None
        self.wake: asyncio.Future[str] | None = None
        self.cut_at: float | None = None
        self.back_at: float | None = None
        #: When the device last sent anything on the connection it left in the cut.
        self.left_sent_at: float | None = None
        self.attempts = 0
        self.ping_timer: asyncio.TimerHandle | None = None
        #: The last few attempts: [started, local address, stage reached, outcome, ended].
        self.history: list[list[Any]] = []
        #: The attempt in progress: [local address, stage] ("tcp", "link", "connack").
        self.trying: list[str] = ["", "tcp"]

    # -- one attempt

    async def attempt(self) -> str:
        """Connect and wait for CONNACK; return "ok" or why it failed."""
        worker = self.worker
        self.attempts += 1
        self.state = "connecting"
        started = time.monotonic()
        self.trying = ["", "tcp"]
        outcome = "connect_timeout"
        try:
            outcome = await asyncio.wait_for(self._connect(), worker.spec["connect_timeout"])
            return outcome
        except asyncio.TimeoutError:
            return outcome
        finally:
            if self.state == "connecting":
                self.state = "offline"
            # Which connection was which, should the server drop a session of this device.
            ended = round(time.monotonic(), 4)
            self.history.append([round(started, 4), *self.trying, outcome, ended])
            if len(self.history) > 8:
                del self.history[0]

    async def _connect(self) -> str:
        loop = asyncio.get_running_loop()
        worker = self.worker
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        link: Link | None = None
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.source, 0))
            sock.setblocking(False)
            await loop.sock_connect(sock, (worker.host, worker.port))
            self.trying = [local_address(sock), "link"]
            worker.awaiting += 1
            try:
                # Under TLS the handshake is part of the connect, inside connect_timeout.
                tls = worker.tls
                _, link = await loop.create_connection(
                    lambda: Link(self, self.hello),
                    sock=sock,
                    ssl=tls,
                    server_hostname=None if tls is None else worker.host,
                    ssl_handshake_timeout=None if tls is None else worker.spec["connect_timeout"],
                )
                self.trying[1] = "connack"
                code = await link.connack
            finally:
                worker.awaiting -= 1
        except OSError as exc:
            self.trying[0] = self.trying[0] or local_address(sock)
            if link is not None:
                link.abort()
            else:
                sock.close()
            if isinstance(exc, ConnectionResetError) and link is not None:
                return "closed_before_connack"
            if isinstance(exc, ssl.SSLError):
                # SSLError's errno is OpenSSL's, not an errno: name what TLS said instead.
                return f"tls_{(exc.reason or 'error').lower()}"
            if link is None and worker.tls is not None and isinstance(exc, ConnectionError):
                # The server closed or reset while the TLS handshake ran (after sock_connect):
                # asyncio reports a connection error with no TLS alert.
                return "tls_closed_in_handshake"
            return f"connect_{errno.errorcode.get(exc.errno or 0, 'error')}"
        except BaseException:
            # Timed out (cancelled by wait_for) or quitting: never leave a socket behind.
            self.trying[0] = self.trying[0] or local_address(sock)
            if link is not None:
                link.abort()
            else:
                sock.close()
            raise
        if code != 0:
            link.abort()
            return f"connack_{code}"
        self.link = link
        self.state = "online"
        return "ok"

    # -- one session

    def _ping(self, due: float) -> None:
        link = self.link
        if link is None or link.transport is None or link.abandoned:
            return
        now = time.monotonic()
        link.pings.append((due, now))
        if len(link.pings) > PINGS_KEPT:
            del link.pings[0]
        link.transport.write(_PINGREQ)
        keepalive = self.worker.spec["keepalive"]
        self.ping_timer = asyncio.get_running_loop().call_later(
            keepalive, self._ping, now + keepalive
        )

    async def serve(self) -> str:
        """Stay online until a cut, a server close or quit; return which."""
        link = self.link
        assert link is not None
        loop = asyncio.get_running_loop()
        self.wake = wake = loop.create_future()
        link.lost.add_done_callback(lambda _: wake.done() or wake.set_result("dropped"))
        # The device sends nothing but pings, so one every keepalive is exactly MQTT's rule.
        keepalive = self.worker.spec["keepalive"]
        self.ping_timer = loop.call_later(keepalive, self._ping, time.monotonic() + keepalive)
        try:
            return await wake
        finally:
            self.wake = None
            if self.ping_timer is not None:
                self.ping_timer.cancel()
                self.ping_timer = None
            self.state = "offline"

    def strike(self) -> None:
        """The cut: walk away from the current connection without a word (see module doc)."""
        if self.wake is not None and not self.wake.done():
            self.wake.set_result("cut")

    async def run(self) -> None:
        worker = self.worker
        await worker.nap(self.rng.uniform(0.0, worker.spec["ramp"]))
        naive = worker.spec["mode"] == "naive"
        while not worker.quitting:
            outcome = await self.attempt()
            if outcome != "ok":
                worker.failures[outcome] += 1
                await worker.nap(NAIVE_RETRY if naive else self.backoff.next_delay())
                continue
            worker.connacks += 1
            self.backoff.reset()
            # A CONNACK that lands while the fleet shuts down (the server freed descriptors as
            # devices left) is not a recovery from the storm.
            if self.cut_at is not None and self.back_at is None and not worker.quitting:
                self.back_at = time.monotonic()
                worker.back += 1
            ended = await self.serve()
            link, self.link = self.link, None
            assert link is not None
            if ended == "quit":
                if link.transport is not None and not link.transport.is_closing():
                    link.transport.write(_DISCONNECT)
                    link.transport.close()
                return
            if ended == "cut":
                link.abandoned = True
                self.left_sent_at = link.pings[-1][1] if link.pings else link.hello_sent_at
                worker.abandoned_open += 1
                worker.abandoned.append(link)
                if not naive:
                    await worker.nap(self.backoff.next_delay())
            else:
                # The server closed a session this device kept alive on schedule: a false
                # reap (the device never stopped pinging), or a takeover it did not ask for,
                # unless the device itself fell behind: its evidence goes to the coordinator.
                worker.live_drops += 1
                worker.drops.append(drop_record(self.client_id, link, worker.lag, self.history))
                await worker.nap(NAIVE_RETRY if naive else self.backoff.next_delay())


class Worker:
    """A process's share of the fleet."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.host: str = spec["host"]
        self.port: int = spec["port"]
        self.quitting = False
        self.quit_event = asyncio.Event()
        self.awaiting = 0
        self.connacks = 0
        self.back = 0
        self.live_drops = 0
        self.abandoned_open = 0
        self.abandoned: list[Link] = []
        self.failures: Counter[str] = Counter()
        #: Connections made (under TLS: handshakes completed).
        self.handshakes = 0
        self.drops: list[dict[str, Any]] = []
        self.lag = LagMonitor()
        self.cut_at: float | None = None
        tls = spec.get("tls")
        self.tls: ssl.SSLContext | None = None
        if tls is not None:
            self.tls = ssl.create_default_context(cafile=tls["ca"])
        first = spec["first"]
        self.devices = [Device(self, i) for i in range(first, first + spec["count"])]

    async def nap(self, seconds: float) -> None:
        """Sleep, but wake at once on quit."""
        if seconds <= 0:
            return
        try:
            await asyncio.wait_for(self.quit_event.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def cut(self, at: float) -> None:
        self.cut_at = at
        for device in self.devices:
            device.cut_at = at
            device.back_at = None
            device.left_sent_at = None
        self.back = 0
        for device in self.devices:
            device.strike()

    def quit(self) -> None:
        self.quitting = True
        self.quit_event.set()
        for device in self.devices:
            if device.wake is not None and not device.wake.done():
                device.wake.set_result("quit")

    def tick(self) -> dict[str, Any]:
        states = Counter(d.state for d in self.devices)
        return {
            "kind": "tick",
            "t": time.monotonic(),
            "online": states["online"],
            "awaiting": self.awaiting,
            "back": self.back,
            "connacks": self.connacks,
            "handshakes": self.handshakes,
            "abandoned_open": self.abandoned_open,
            "live_drops": self.live_drops,
            "failures": dict(self.failures),
        }

    def final(self) -> dict[str, Any]:
        return {
            "kind": "final",
            "back_after": [
                None if d.back_at is None or d.cut_at is None else d.back_at - d.cut_at
                for d in self.devices
            ],
            # Per device back, how long its old connection had been silent when the new
            # session was up: an upper bound of the silence the server saw when the new
            # CONNECT replaced the old one (the server read the last packet no earlier than it
            # was sent, and answered the CONNECT before the CONNACK arrived).
            "back_idle": [
                d.back_at - d.left_sent_at
                for d in self.devices
                if d.back_at is not None and d.left_sent_at is not None
            ],
            "attempts": sum(d.attempts for d in self.devices),
            "live_drops": self.live_drops,
            "drops": self.drops,
            "lag": self.lag.summary(self.cut_at),
            "abandoned_open": self.abandoned_open,
            "failures": dict(self.failures),
        }


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def _main(spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    worker = Worker(spec)
    commands: asyncio.Queue[str] = asyncio.Queue()

    def read_stdin() -> None:
        # A thread, because stdin is a pipe the event loop should not block on; EOF means the
        # coordinator is gone, which is a quit too.
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line.strip())
        loop.call_soon_threadsafe(commands.put_nowait, "quit")

    threading.Thread(target=read_stdin, daemon=True).start()

    async def report() -> None:
        while True:
            _emit(worker.tick())
            await asyncio.sleep(TICK)

    reporter = asyncio.create_task(report())
    lag_task = asyncio.create_task(worker.lag.run())
    runs = [asyncio.create_task(d.run()) for d in worker.devices]
    while True:
        word, _, arg = (await commands.get()).partition(" ")
        if word == "cut":
            worker.cut(float(arg))
        elif word == "quit":
            break
    worker.quit()
    # Devices notice quit within one loop turn; a device stuck in connect gets its timeout.
    await asyncio.wait(runs, timeout=spec["connect_timeout"] + 2.0)
    for task in runs:
        task.cancel()
    for link in worker.abandoned:
        link.abort()
    reporter.cancel()
    lag_task.cancel()
    _emit(worker.tick())
    _emit(worker.final())


def main() -> None:
    spec = json.loads(sys.argv[1])
    # Old and new connections of every device, plus slack; the hard limit is the ceiling.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop
    except ImportError:  # the benchmark still runs, a little heavier on the CPU
        asyncio.run(_main(spec))
    else:
        uvloop.run(_main(spec))


if __name__ == "__main__":
    main()

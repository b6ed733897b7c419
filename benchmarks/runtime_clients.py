"""One client process of the runtime benchmark: idle connections that ping, on uvloop.

Started by benchmarks/runtime.py with a JSON spec as its one argument; several run at once so
that no process holds more than a few thousand of its 20,000 descriptors. Each connection is an
``asyncio.Protocol`` (cheap: the clients share two cores with the server they measure):

* ``line``: sends ``HELLO <id>\\n`` and a first ``PING\\n``; it is up at the first ``PONG\\n``;
* ``mqtt``: sends CONNECT (clean session, the spec's keepalive and credentials); it is up at
  CONNACK 0 (any other CONNACK is a refusal, retried later).

Once up, a connection pings every ``interval`` seconds (``PING\\n`` or PINGREQ) at a random
phase: one scheduler task walks ``interval / TICK`` buckets, one bucket per tick. Each reply
is counted (by bytes: ``PONG\\n`` and PINGRESP are the only replies) and the first one after a
ping gives that ping's round trip.

Commands, one JSON object per line on stdin; each is answered by one JSON line on stdout:

* ``{"cmd": "grow", "to": N}``: open connections until N are up (at ``rate`` per second, at
  most ``ATTEMPTS`` tries each); ``{"kind": "grown", "up", "failed", "lost"}``;
* ``{"cmd": "mark"}``: start a window (reply and ping counts and round trips from zero);
* ``{"cmd": "count"}``: ``{"kind": "count", "replies", "pings", "rtt_ms": [...], "up",
  "lost"}`` for the window;
* ``{"cmd": "reboot", "count": K, "at": T, "step": S}``: K devices "reboot", the j-th at
  time.monotonic() == T + j * S (system-wide on Linux, so the coordinator schedules every
  process on one clock): its old connection falls silent and stays open, and a new connection
  sends CONNECT with the same client id; ``{"kind": "rebooted", "connack_ms": [...],
  "connect_ms": [...], "failed", "old_closed"}`` (CONNECT written to CONNACK; TCP connect);
* ``{"cmd": "quit"}``: exit.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import sys
import threading
import time
from typing import Any, cast

from device_gateway.mqtt_codec import Connect, Pingreq, encode

TICK = 0.05
ATTEMPTS = 5
RETRY_PAUSE = 1.0
MAX_PENDING = 256
MAX_RTT = 200_000
#: Bound on the scheduler and the command loop: longer than any run.
LIFETIME = 6 * 3600.0
MAX_COMMANDS = 10_000
clock = time.monotonic


class Device(asyncio.Protocol):
    """One connection of one device id."""

    __slots__ = (
        "fleet",
        "ident",
        "transport",
        "up",
        "buffer",
        "sent_at",
        "silent",
        "closed",
        "hello_at",
        "up_at",
        "ready",
    )

    def __init__(self, fleet: Fleet, ident: int) -> None:
        self.fleet = fleet
        self.ident = ident
        self.transport: asyncio.Transport | None = None
        self.up = False
        self.buffer = b""
        self.sent_at = 0.0
        self.silent = False
        self.closed = False
        self.hello_at = 0.0
        self.up_at = 0.0
        self.ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.hello_at = clock()
        self.transport.write(self.fleet.hello(self.ident))

    def data_received(self, data: bytes) -> None:
        now = clock()
        fleet = self.fleet
        if not self.up:
            self.buffer += data
            need = len(fleet.welcome)
            if len(self.buffer) < need:
                return
            head, data = self.buffer[:need], self.buffer[need:]
            self.buffer = b""
            if not fleet.accepts(head):
                self._resolve(False)
                self.abort()
                return
            self.up = True
            self.up_at = now
            self._resolve(True)
            if not data:
                return
        fleet.reply_bytes += len(data)
        if self.sent_at:
            if len(fleet.rtt) < MAX_RTT:
                fleet.rtt.append(now - self.sent_at)
            self.sent_at = 0.0

    def eof_received(self) -> bool:
        return False  # let the transport close our end too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._resolve(False)
        if self.up and not self.silent:
            self.fleet.lost += 1

    def _resolve(self, ok: bool) -> None:
        if not self.ready.done():
            self.ready.set_result(ok)

    def ping(self, now: float) -> None:
        if self.transport is None or self.closed:
            return
        if not self.sent_at:
            self.sent_at = now
        self.transport.write(self.fleet.ping_bytes)
        self.fleet.pings += 1

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Fleet:
    """The devices of this process and their ping schedule."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.rng = random.Random(spec["seed"])
        self.line = spec["proto"] == "line"
        self.ping_bytes = b"PING\n" if self.line else encode(Pingreq())
        self.welcome = b"PONG\n" if self.line else b"\x20\x02\x00\x00"
        self.reply_len = 5 if self.line else 2
        self.devices: list[Device] = []
        self.buckets: list[list[Device]] = [
            [] for _ in range(max(1, round(spec["interval"] / TICK)))
        ]
        self.reply_bytes = 0
        self.pings = 0
        self.rtt: list[float] = []
        self.lost = 0
        self.failed = 0
        self.pending = asyncio.Semaphore(MAX_PENDING)

    def hello(self, ident: int) -> bytes:
        name = f"{self.spec['prefix']}-{ident:06d}"
        if self.line:
            return f"HELLO {name}\nPING\n".encode()
        user, password = self.spec["user"]
        keepalive = self.spec["keepalive"]
        return encode(Connect(name, keepalive=keepalive, username=user, password=password.encode()))

    def accepts(self, head: bytes) -> bool:
        # CONNACK: 0x20, length 2, session-present flags, return code 0.
        return head == self.welcome if self.line else head[0] == 0x20 and head[3] == 0

    async def open(self, ident: int) -> Device | None:
        """One device's connection, up, or None after ATTEMPTS failed tries."""
        loop = asyncio.get_running_loop()
        timeout = self.spec["connect_timeout"]
        for _ in range(ATTEMPTS):
            device = Device(self, ident)
            async with self.pending:
                try:
                    await asyncio.wait_for(
                        loop.create_connection(
                            lambda d=device: d, self.spec["host"], self.spec["port"]
                        ),
                        timeout,
                    )
                    ok = await asyncio.wait_for(asyncio.shield(device.ready), timeout)
                except (OSError, asyncio.TimeoutError):
                    ok = False
            if ok:
                self.buckets[self.rng.randrange(len(self.buckets))].append(device)
                return device
            device.abort()
            await asyncio.sleep(RETRY_PAUSE)
        self.failed += 1
        return None

    async def grow(self, to: int) -> dict[str, Any]:
        first = self.spec["first"]
        start = clock()
        step = 1.0 / self.spec["rate"]
        tasks = []
        for i, ident in enumerate(
            range(first + len(self.devices), first + min(to, self.spec["count"]))
        ):
            pause = start + i * step - clock()
            if pause > 0:
                await asyncio.sleep(pause)
            tasks.append(asyncio.create_task(self.open(ident)))
        for device in await asyncio.gather(*tasks):
            if device is not None:
                self.devices.append(device)
        up = sum(1 for d in self.devices if d.up and not d.closed)
        return {"kind": "grown", "up": up, "failed": self.failed, "lost": self.lost}

    async def schedule(self) -> None:
        """Ping the devices of one bucket per tick, for ever (for LIFETIME)."""
        due = clock()
        end = due + LIFETIME
        index = 0
        while due < end:
            due += TICK
            pause = due - clock()
            if pause > 0:
                await asyncio.sleep(pause)
            elif pause < -5.0:
                due = clock()  # far behind (starved): catch up without a burst of buckets
            slot = index % len(self.buckets)
            index += 1
            now = clock()
            live = [d for d in self.buckets[slot] if not d.closed]
            self.buckets[slot] = live
            for device in live:
                if not device.silent:
                    device.ping(now)

    def mark(self) -> dict[str, Any]:
        self.reply_bytes = 0
        self.pings = 0
        self.rtt = []
        return {"kind": "marked"}

    def count(self) -> dict[str, Any]:
        return {
            "kind": "count",
            "replies": self.reply_bytes // self.reply_len,
            "pings": self.pings,
            "rtt_ms": [round(1000.0 * r, 3) for r in self.rtt],
            "up": sum(1 for d in self.devices if d.up and not d.closed),
            "lost": self.lost,
        }

    async def reboot(self, count: int, at: float, step: float) -> dict[str, Any]:
        victims = [d for d in self.devices if d.up and not d.closed and not d.silent][:count]
        tasks = []
        for j, old in enumerate(victims):
            pause = at + j * step - clock()
            if pause > 0:
                await asyncio.sleep(pause)
            old.silent = True  # a rebooted device says nothing more on its old connection
            tasks.append(asyncio.create_task(self._reconnect(old)))
        results = await asyncio.gather(*tasks)
        connack = [r[0] for r in results if r is not None]
        connect = [r[1] for r in results if r is not None]
        # The server closes a taken-over connection at once, or never: a moment is enough.
        await asyncio.sleep(1.0)
        return {
            "kind": "rebooted",
            "connack_ms": connack,
            "connect_ms": connect,
            "failed": sum(1 for r in results if r is None),
            "old_closed": sum(1 for d in victims if d.closed),
        }

    async def _reconnect(self, old: Device) -> tuple[float, float] | None:
        loop = asyncio.get_running_loop()
        timeout = self.spec["connect_timeout"]
        device = Device(self, old.ident)
        started = clock()
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: device, self.spec["host"], self.spec["port"]),
                timeout,
            )
            ok = await asyncio.wait_for(asyncio.shield(device.ready), timeout)
        except (OSError, asyncio.TimeoutError):
            ok = False
        if not ok:
            device.abort()
            return None
        self.devices[self.devices.index(old)] = device
        self.buckets[self.rng.randrange(len(self.buckets))].append(device)
        connack_ms = 1000.0 * (device.up_at - device.hello_at)
        connect_ms = 1000.0 * (device.hello_at - started)
        return round(connack_ms, 3), round(connect_ms, 3)


def _stdin_reader(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str]) -> None:
    for line in sys.stdin:
        loop.call_soon_threadsafe(queue.put_nowait, line)
    loop.call_soon_threadsafe(queue.put_nowait, "")


def _say(message: dict[str, Any]) -> None:
    print(json.dumps(message, separators=(",", ":")), flush=True)


async def _main(spec: dict[str, Any]) -> None:
    fleet = Fleet(spec)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str] = asyncio.Queue()
    threading.Thread(target=_stdin_reader, args=(loop, queue), daemon=True).start()
    scheduler = asyncio.create_task(fleet.schedule())
    _say({"kind": "ready"})
    try:
        for _ in range(MAX_COMMANDS):
            line = await queue.get()
            if not line:
                break
            command = json.loads(line)
            cmd = command["cmd"]
            if cmd == "grow":
                _say(await fleet.grow(int(command["to"])))
            elif cmd == "mark":
                _say(fleet.mark())
            elif cmd == "count":
                _say(fleet.count())
            elif cmd == "reboot":
                at, step = float(command["at"]), float(command["step"])
                _say(await fleet.reboot(int(command["count"]), at, step))
            elif cmd == "quit":
                break
    finally:
        scheduler.cancel()
        for device in fleet.devices:
            device.abort()


def main() -> None:
    spec = json.loads(sys.argv[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import uvloop

    uvloop.run(_main(spec))


if __name__ == "__main__":
    main()

"""One device process of the cluster benchmark (benchmarks/cluster.py): raw MQTT 3.1.1 devices
on asyncio that connect to the gateway nodes, heartbeat, and reboot onto another node.

Started as ``python cluster_devices.py SPEC_JSON``; JSON lines on stdout, commands on stdin:

* at start every device connects to node ``index % nodes`` and keeps pinging every keepalive;
  ``{"kind": "ready", "online": N, "failed": F}`` once all have tried;
* ``reboot COUNT RATE``: COUNT devices, RATE a second, each walks away from its connection
  without a FIN (the socket stays open and silent: a hung peer, which the kernel on loopback
  still ACKs) and connects with the same client id to another node. Per trial: ``connack_ms``
  (CONNECT written on the new node to CONNACK 0) and ``gone_ms`` (CONNECT written to the RST of
  the old node's socket arriving on the abandoned one: keepconn closes a taken-over socket
  with SO_LINGER 0, which drops it from the kernel's table as the RST leaves, and loopback
  delivers it within microseconds), or None when the old socket was not reset within
  ``watch`` seconds. ``{"kind": "trials", "results": [...]}`` when done;
* ``ports``: ``{"kind": "ports", "devices": {client_id: [[address, port, node port, role],
  ...]}, "history": {client_id: [[node, local port, outcome, seconds], ...]}}`` for each open
  socket, the abandoned ones included (role ``"live"`` or ``"abandoned"``), to match against
  the nodes' kernel tables, and every connect attempt of each device (outcome: the CONNACK's
  return code, ``"timeout"`` or ``"error"``; seconds since the process started);
* ``quit``: close everything and exit.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import socket
import sys
import time
from typing import Any

from device_gateway import mqtt_codec as mq

#: Linux's IP_BIND_ADDRESS_NO_PORT (Python names it from 3.12): the source port is chosen at
#: connect() time by the whole 4-tuple, so one source address serves every node's port.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
CONNECT_TIMEOUT = 10.0
STARTED = time.monotonic()


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class Device:
    """One device: its client id, its node, its live socket and the ones it abandoned."""

    def __init__(self, pool: Pool, index: int) -> None:
        self.pool = pool
        self.client_id = f"{pool.prefix}-{index:06d}"
        self.user, self.password = pool.users[index % len(pool.users)]
        self.node = index % len(pool.endpoints)
        self.source = pool.sources[index % len(pool.sources)]
        self.writer: asyncio.StreamWriter | None = None
        self.reader: asyncio.StreamReader | None = None
        #: When the latest CONNECT was written (time.monotonic()).
        self.sent = 0.0
        self.heartbeat: asyncio.Task[None] | None = None
        self.abandoned: list[asyncio.StreamWriter] = []
        #: [node, local port, outcome, seconds since start] of every connect attempt.
        self.history: list[list[Any]] = []

    async def connect(self) -> tuple[float, asyncio.StreamReader] | None:
        """Connect to the current node; (ms from CONNECT written to CONNACK 0, reader), or
        None if refused. The CONNECT's write time is ``self.sent``."""
        host, port = self.pool.endpoints[self.node]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((self.source, 0))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        attempt: list[Any] = [self.node, None, "error", round(time.monotonic() - STARTED, 3)]
        self.history.append(attempt)
        try:
            head, reader, writer = await asyncio.wait_for(
                self._hello(loop, sock, host, port, attempt), CONNECT_TIMEOUT
            )
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            if isinstance(exc, asyncio.TimeoutError):
                attempt[2] = "timeout"
            sock.close()
            return None
        attempt[2] = head[3] if head[0] == 0x20 else f"packet {head[0]:#x}"
        if head[0] != 0x20 or head[3] != 0:
            writer.transport.abort()
            return None
        self.writer = writer
        return (time.monotonic() - self.sent) * 1000.0, reader

    async def _hello(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        host: str,
        port: int,
        attempt: list[Any],
    ) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
        await loop.sock_connect(sock, (host, port))
        attempt[1] = sock.getsockname()[1]
        reader, writer = await asyncio.open_connection(sock=sock)
        hello = mq.Connect(
            self.client_id,
            keepalive=self.pool.keepalive,
            username=self.user,
            password=self.password.encode(),
        )
        writer.write(mq.encode(hello))
        self.sent = time.monotonic()
        return await reader.readexactly(4), reader, writer

    async def keep_alive(self, reader: asyncio.StreamReader) -> None:
        """PINGREQ after every keepalive without sending; read (and drop) what comes back."""
        assert self.writer is not None
        ping = mq.encode(mq.Pingreq())
        interval = self.pool.keepalive * self.pool.rng.uniform(0.8, 0.95)
        try:
            while True:
                try:
                    if not await asyncio.wait_for(reader.read(4096), interval):
                        return
                except asyncio.TimeoutError:
                    self.writer.write(ping)
        except OSError:
            return

    async def start(self) -> bool:
        connected = await self.connect()
        if connected is None:
            return False
        self.reader = connected[1]
        self.heartbeat = asyncio.create_task(self.keep_alive(connected[1]))
        return True

    async def reboot(self, watch: float) -> dict[str, Any]:
        """Walk away from the connection, connect to another node, time both ends."""
        assert self.writer is not None and self.heartbeat is not None
        self.heartbeat.cancel()
        # Its read must be over before another task reads the same stream.
        await asyncio.gather(self.heartbeat, return_exceptions=True)
        old = self.writer
        self.abandoned.append(old)
        old_reader = self.reader
        assert old_reader is not None

        async def reset() -> float:
            # The reader sees the RST as ConnectionResetError (or, were it a FIN, an EOF):
            # either way the old node has let go of the connection.
            try:
                while await old_reader.read(65536):
                    pass
            except OSError:
                pass
            return time.monotonic()

        watcher = asyncio.create_task(reset())
        hops = 1 + self.pool.rng.randrange(len(self.pool.endpoints) - 1)
        self.node = (self.node + hops) % len(self.pool.endpoints)
        connected = await self.connect()
        result: dict[str, Any] = {"id": self.client_id, "connack_ms": None, "gone_ms": None}
        if connected is None:
            watcher.cancel()
            return result
        result["connack_ms"] = round(connected[0], 3)
        self.reader = connected[1]
        self.heartbeat = asyncio.create_task(self.keep_alive(connected[1]))
        try:
            reset_at = await asyncio.wait_for(watcher, watch)
        except asyncio.TimeoutError:
            return result  # still open on the old node (wait_for has cancelled the watcher)
        result["gone_ms"] = round((reset_at - self.sent) * 1000.0, 3)
        return result

    def ports(self) -> list[tuple[str, int, int, str]]:
        writers = [(w, "abandoned") for w in self.abandoned]
        if self.writer is not None:
            writers.append((self.writer, "live"))
        ports = []
        for writer, role in writers:
            sock = writer.get_extra_info("socket")
            if sock is not None and sock.fileno() >= 0:
                # The node's port too: with IP_BIND_ADDRESS_NO_PORT one (address, port) serves
                # a connection to each node, so only the triple names one socket.
                try:
                    ports.append((*sock.getsockname()[:2], sock.getpeername()[1], role))
                except OSError:
                    continue  # reset since: the kernel's table no longer lists it either
        return ports


class Pool:
    """This process's devices."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.endpoints = [tuple(e) for e in spec["endpoints"]]
        self.users = [tuple(u) for u in spec["users"]]
        self.sources: list[str] = spec["sources"]
        self.keepalive: int = spec["keepalive"]
        self.prefix: str = spec["prefix"]
        self.watch: float = spec["watch"]
        self.rng = random.Random(spec["seed"])
        self.devices = [
            Device(self, i) for i in range(spec["first"], spec["first"] + spec["count"])
        ]

    async def start(self, concurrency: int = 100) -> None:
        gate = asyncio.Semaphore(concurrency)
        failed = 0

        async def one(device: Device) -> None:
            nonlocal failed
            async with gate:
                for attempt in range(5):
                    if await device.start():
                        return
                    await asyncio.sleep(0.2 * (attempt + 1))
                failed += 1

        await asyncio.gather(*(one(d) for d in self.devices))
        online = sum(1 for d in self.devices if d.writer is not None)
        emit({"kind": "ready", "online": online, "failed": failed})

    async def reboots(self, count: int, rate: float) -> None:
        online = [d for d in self.devices if d.writer is not None]
        chosen = self.rng.sample(online, min(count, len(online)))
        tasks = []
        for device in chosen:
            tasks.append(asyncio.create_task(device.reboot(self.watch)))
            await asyncio.sleep(1.0 / rate)
        results = await asyncio.gather(*tasks)
        emit({"kind": "trials", "results": results})

    async def control(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := (await reader.readline()).decode().split():
            if line[0] == "reboot":
                await self.reboots(int(line[1]), float(line[2]))
            elif line[0] == "ports":
                emit(
                    {
                        "kind": "ports",
                        "devices": {d.client_id: d.ports() for d in self.devices},
                        "history": {d.client_id: d.history for d in self.devices},
                    }
                )
            elif line[0] == "quit":
                break
        for device in self.devices:
            for writer in [*device.abandoned, *([device.writer] if device.writer else [])]:
                writer.transport.abort()


async def main(spec: dict[str, Any]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pool = Pool(spec)
    await pool.start()
    await pool.control()


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))

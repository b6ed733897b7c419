"""A naive asyncio MQTT 3.1.1 gateway, written the way tutorials write one.

This is the baseline the churn and storm benchmarks compare keepconn with: what a competent
developer ships after reading the asyncio docs and an MQTT tutorial, without a library for
connection liveness. It is deliberately *not* broken on purpose; each of its choices is the
common one, and each is listed here so the benchmark's figures can be read against them.

Liveness (the part the benchmarks measure)
------------------------------------------
* ``asyncio.start_server`` and one task per connection that loops on ``reader.read()``.
* Last-seen times in a dict keyed by client id, refreshed by every packet, and a sweeper task
  that wakes every ``--sweep-interval`` seconds (5 by default) and closes every connection idle
  for longer than 1.5 x its CONNECT keepalive (MQTT-3.1.2-24). A silent peer therefore goes
  between 1.5 x keepalive and 1.5 x keepalive + the sweep interval after its last packet.
  Keepalive 0 means the connection is never swept.
* No TCP keepalive tuning (no SO_KEEPALIVE at all: asyncio does not set it) and no hello
  timeout: a connection that never sends CONNECT waits forever, as in the tutorials.
* Client-id "takeover" is the common tutorial one: ``clients[client_id] = writer``. The new
  connection replaces the old one in the dict, and the old socket is *not* closed. Nothing
  refers to it any more, the sweeper cannot see it, and if its peer vanished without a FIN
  (the reboot case) its task waits on ``read()`` forever: a phantom ESTABLISHED socket that
  lasts until the process exits. (A connection whose peer later sends a FIN or RST does end.)
  One courtesy beyond the tutorials: when an old connection does end, it removes its dict entry
  only if the entry is still its own, so a late exit never unregisters the device's newer
  connection. That keeps the comparison about liveness, not about an unrelated bookkeeping bug.

The rest, kept small
--------------------
* Parsing uses the example gateway's sans-I/O codec (``examples/device_gateway/mqtt_codec.py``):
  framing is not what is being compared, and a hand-rolled parser would only add noise.
* Credentials from a ``username:password`` file (same format as the example gateway's);
  CONNACK 4 on a bad password.
* PUBLISH is "stored" by counting it per client and QoS in memory, and a QoS 1 PUBLISH is
  acknowledged after that; SUBSCRIBE gets a SUBACK (QoS at most 1) but nothing is routed;
  PINGREQ gets PINGRESP; DISCONNECT closes.

Command line (the shape of examples/device_gateway/gateway.py)::

    python benchmarks/naive_gateway.py --host 127.0.0.1 --port 1883 --users FILE \\
        [--status-port N] [--sweep-interval 5] [--backlog 100] [--tls-cert PEM --tls-key PEM]

With ``--tls-cert`` and ``--tls-key`` it speaks MQTT over TLS the tutorial way: an
``ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)`` with the pair loaded, passed as
``asyncio.start_server(..., ssl=context)``, so asyncio runs each handshake (with its default
60 s handshake timeout) before the connection's task starts.

It prints ``listening on HOST:PORT`` once it accepts connections (``--port 0`` picks a free
port). With ``--status-port`` it serves, on 127.0.0.1 only, ``GET /status`` (JSON counters:
``connections``, ``sessions``, ``accepted``, ``swept``, ``telemetry_stored``, ``qos1_stored``,
``uptime``) and ``GET /telemetry`` (JSON ``{client_id: [qos0, qos1]}``, messages stored per
client). SIGINT/SIGTERM close the listener and every connection and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from device_gateway.mqtt_codec import (
    Connack,
    ConnackCode,
    Connect,
    Decoder,
    Disconnect,
    MQTTProtocolError,
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

#: asyncio.start_server's own default backlog, which is what tutorial code ends up with.
DEFAULT_BACKLOG = 100
DEFAULT_SWEEP_INTERVAL = 5.0


def load_users(path: str) -> dict[str, str]:
    """Read ``username:password`` lines (blank lines and ``#`` comments skipped)."""
    users = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, password = line.partition(":")
        if not sep or not name:
            raise ValueError(f"{path}:{number}: expected username:password")
        users[name] = password
    return users


class NaiveGateway:
    """The dict-and-sweeper gateway. State is three dicts and some counters."""

    def __init__(self, users: dict[str, str], sweep_interval: float) -> None:
        self.users = users
        self.sweep_interval = sweep_interval
        # client id -> the connection currently registered for it (see the module doc).
        self.clients: dict[str, asyncio.StreamWriter] = {}
        # client id -> (last time a packet arrived, 1.5 x keepalive or None for "never").
        self.last_seen: dict[str, tuple[float, float | None]] = {}
        # client id -> [QoS 0 messages stored, QoS 1 messages stored].
        self.stored: dict[str, list[int]] = {}
        self.open_connections = 0
        self.accepted = 0
        self.swept = 0
        self.telemetry_stored = 0
        self.qos1_stored = 0
        self.started = time.monotonic()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One task per connection: read, decode, answer, until EOF or an error."""
        self.accepted += 1
        self.open_connections += 1
        decoder = Decoder(Role.SERVER)
        client_id: str | None = None
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                for packet in decoder.feed(data):
                    if isinstance(packet, Connect):
                        client_id = self._connect(packet, writer)
                        if client_id is None:
                            return
                        continue
                    assert client_id is not None  # the decoder insists on CONNECT first
                    seen = self.last_seen.get(client_id)
                    if seen is not None and self.clients.get(client_id) is writer:
                        self.last_seen[client_id] = (time.monotonic(), seen[1])
                    if isinstance(packet, Publish):
                        counts = self.stored.setdefault(client_id, [0, 0])
                        counts[min(packet.qos, 1)] += 1
                        self.telemetry_stored += 1
                        if packet.qos:
                            self.qos1_stored += 1
                            assert packet.packet_id is not None
                            writer.write(encode(Puback(packet.packet_id)))
                    elif isinstance(packet, Pingreq):
                        writer.write(encode(Pingresp()))
                    elif isinstance(packet, Subscribe):
                        granted = [min(qos, 1) for _, qos in packet.topics]
                        writer.write(encode(Suback(packet.packet_id, granted)))
                    elif isinstance(packet, Unsubscribe):
                        writer.write(encode(Unsuback(packet.packet_id)))
                    elif isinstance(packet, Disconnect):
                        return
                await writer.drain()
        except (ConnectionError, MQTTProtocolError, OSError):
            pass
        finally:
            self.open_connections -= 1
            if client_id is not None and self.clients.get(client_id) is writer:
                del self.clients[client_id]
                self.last_seen.pop(client_id, None)
            writer.close()

    def _connect(self, packet: Connect, writer: asyncio.StreamWriter) -> str | None:
        password = packet.password.decode("utf-8", "replace") if packet.password else None
        if packet.username is None or self.users.get(packet.username) != password:
            writer.write(encode(Connack(return_code=ConnackCode.BAD_USERNAME_OR_PASSWORD)))
            return None
        client_id = packet.client_id or f"anon-{id(writer):x}"
        # The tutorial "takeover": the newer connection simply replaces the dict entry. The old
        # socket is neither closed nor tracked any more (see the module docstring).
        self.clients[client_id] = writer
        timeout = 1.5 * packet.keepalive if packet.keepalive else None
        self.last_seen[client_id] = (time.monotonic(), timeout)
        writer.write(encode(Connack()))
        return client_id

    async def sweeper(self) -> None:
        """Every sweep interval, close the registered connections idle past 1.5 x keepalive."""
        while True:
            await asyncio.sleep(self.sweep_interval)
            now = time.monotonic()
            for client_id, (seen, timeout) in list(self.last_seen.items()):
                if timeout is not None and now - seen > timeout:
                    writer = self.clients.pop(client_id, None)
                    del self.last_seen[client_id]
                    if writer is not None:
                        self.swept += 1
                        writer.close()

    def status(self) -> dict[str, Any]:
        """Counters for ``GET /status``."""
        return {
            "connections": self.open_connections,
            "sessions": len(self.clients),
            "accepted": self.accepted,
            "swept": self.swept,
            "telemetry_stored": self.telemetry_stored,
            "qos1_stored": self.qos1_stored,
            "uptime": round(time.monotonic() - self.started, 3),
        }

    async def serve_status(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A one-request HTTP/1.0 answer: enough for urllib and curl."""
        try:
            request = await asyncio.wait_for(reader.readline(), 5.0)
            # Drain the headers; nothing in them matters here.
            while (await asyncio.wait_for(reader.readline(), 5.0)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else "/"
            if path == "/telemetry":
                body, code = json.dumps(self.stored), "200 OK"
            elif path in ("/", "/status"):
                body, code = json.dumps(self.status()), "200 OK"
            else:
                body, code = json.dumps({"error": "not found"}), "404 Not Found"
            data = body.encode()
            writer.write(
                f"HTTP/1.0 {code}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


def build_parser() -> argparse.ArgumentParser:
    """The command line (kept stable: benchmarks/churn.py and benchmarks/storm.py use it)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=1883, help="MQTT port (0: pick a free one)")
    p.add_argument("--users", required=True, help="file of username:password lines")
    p.add_argument("--status-port", type=int, default=0, help="loopback JSON status page (0: off)")
    p.add_argument(
        "--sweep-interval",
        type=float,
        default=DEFAULT_SWEEP_INTERVAL,
        help="seconds between sweeps of the last-seen dict",
    )
    p.add_argument("--backlog", type=int, default=DEFAULT_BACKLOG, help="listen backlog")
    p.add_argument("--tls-cert", help="PEM certificate (chain): serve MQTT over TLS")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    return p


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The server's TLS context, or None for plain TCP."""
    if args.tls_cert is None and args.tls_key is None:
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.tls_cert, args.tls_key)
    return context


async def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM."""
    gateway = NaiveGateway(load_users(args.users), args.sweep_interval)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        server = await asyncio.start_server(
            gateway.handle,
            args.host or None,
            args.port,
            backlog=args.backlog,
            ssl=tls_context(args),
        )
    except OSError as exc:
        print(f"naive_gateway: cannot listen: {exc}", file=sys.stderr)
        return 1
    status_server = None
    if args.status_port:
        status_server = await asyncio.start_server(
            gateway.serve_status, "127.0.0.1", args.status_port
        )
        print(f"status on http://127.0.0.1:{args.status_port}/", flush=True)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
    sweeper = asyncio.create_task(gateway.sweeper())
    try:
        await stop.wait()
    finally:
        sweeper.cancel()
        server.close()
        if status_server is not None:
            status_server.close()
        # Close every connection the process still holds, orphans included, so that exit is
        # clean; the tasks then see EOF or an error and finish.
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()
        for writer in list(gateway.clients.values()):
            writer.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and serve."""
    args = build_parser().parse_args(argv)
    try:
        load_users(args.users)
        tls_context(args)
    except (OSError, ValueError) as exc:
        print(f"naive_gateway: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())

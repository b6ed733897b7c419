"""The example device gateway, started from its documented command line, against real clients.

Clients nobody here wrote (paho-mqtt, Debian's mosquitto_pub and mosquitto_sub) check that the
gateway speaks MQTT as deployed devices do; raw sockets check what no well-behaved client will
do (fall silent, never say hello, send garbage) and the kernel's socket table checks that
nothing is left behind. Every gateway runs as a subprocess and is ended by its pid.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families

from device_gateway import gateway as gateway_app
from device_gateway import mqtt_codec as mq
from device_gateway.sink import Recorder
from device_gateway.users import hash_password
from keepconn import ServerConfig
from keepconn.tcp import census
from keepconn.testing.pytest_plugin import REQUIRE_ENV
from tests.timing import not_before, slack

ROOT = Path(__file__).resolve().parents[2]
# Started as the README says, by path; the tests build raw packets with the gateway's own codec.
GATEWAY = ROOT / "examples" / "device_gateway" / "gateway.py"

paho = pytest.importorskip("paho.mqtt.client")

USERS = {"alice": "s3cret", "bob": "hunter2"}
RESOLUTION = 0.1
HELLO_TIMEOUT = 1.0
STATUS_KEYS = {
    "sessions",
    "connections",
    "pending_hellos",
    "accepted",
    "takeovers",
    "closed",
    "census",
    "phantoms",
    "telemetry_stored",
}

pytestmark = pytest.mark.timeout(90)

# Measured figures (reap timing, settle times) go here; see them with --log-cli-level=INFO.
log = logging.getLogger("tests.gateway")


# ----------------------------------------------------------------------------------------------
# Running the gateway.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RunningGateway:
    """A gateway subprocess: its ports, files and status page."""

    def __init__(
        self, proc: subprocess.Popen[str], port: int, status_port: int, data: Path, log: Path
    ):
        self.proc = proc
        self.port = port
        self.status_port = status_port
        self.data = data
        #: The gateway's stderr: keepconn logs one line per closed connection there.
        self.log = log

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.status_port}/status"
        with urllib.request.urlopen(url, timeout=5) as response:
            result: dict[str, Any] = json.load(response)
        return result

    def wait_status(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if predicate(status):
                return status
            assert time.monotonic() < deadline, f"status never matched: {status}"
            time.sleep(0.05)

    def rows(self) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.data)) as db:
            return db.execute(
                "SELECT username, client_id, topic, qos, payload FROM telemetry ORDER BY id"
            ).fetchall()


def _read_lines(stream: Any, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 15) -> int:
    """End the gateway by its pid: the signal first, SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
    return proc.wait(timeout)


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users.txt"
    # Hashed, as the gateway requires (device_gateway.users).
    path.write_text(
        "# test users\n" + "".join(f"{u}:{hash_password(p)}\n" for u, p in USERS.items())
    )
    return path


@pytest.fixture
def start_gateway(tmp_path: Path, users_file: Path) -> Iterator[Callable[..., RunningGateway]]:
    """Start gateways from the documented command; each is stopped by pid when the test ends."""
    procs: list[subprocess.Popen[str]] = []

    def start(*extra: str, backend: str = "asyncio", users: bool = True) -> RunningGateway:
        n = len(procs)
        data = tmp_path / f"telemetry{n}.sqlite3"
        status_port = free_port()
        argv = [
            sys.executable,
            str(GATEWAY),
            "--host", "127.0.0.1",
            "--port", "0",
            *(["--users", str(users_file)] if users else []),
            "--data", str(data),
            "--hello-timeout", str(HELLO_TIMEOUT),
            "--resolution", str(RESOLUTION),
            "--status-port", str(status_port),
            "--backend", backend,
            *extra,
        ]  # fmt: skip
        log = open(tmp_path / f"gateway{n}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()  # the child has its own descriptor
        procs.append(proc)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
        deadline = time.monotonic() + 20
        while True:
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                line = ""
            if line.startswith("listening on "):
                port = int(line.rsplit(":", 1)[1])
                return RunningGateway(proc, port, status_port, data, tmp_path / f"gateway{n}.log")
            if proc.poll() is not None or time.monotonic() > deadline:
                log_text = (tmp_path / f"gateway{n}.log").read_text()
                pytest.fail(f"gateway did not start (rc={proc.poll()}):\n{log_text}")

    try:
        yield start
    finally:
        for proc in procs:
            _stop(proc)


# ----------------------------------------------------------------------------------------------
# Clients.


class RawClient:
    """MQTT over a bare socket (TLS over it with ``tls``), for what real clients never do."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="127.0.0.1")
        self.decoder = mq.Decoder(mq.Role.CLIENT)
        self.packets: list[mq.Packet] = []

    def send(self, data: bytes | mq.Packet) -> None:
        self.sock.sendall(data if isinstance(data, bytes) else mq.encode(data))

    def packet(self, timeout: float = 5) -> mq.Packet:
        self.sock.settimeout(timeout)
        while not self.packets:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("gateway closed the connection")
            self.packets.extend(self.decoder.feed(data))
        return self.packets.pop(0)

    def connect(
        self,
        client_id: str,
        user: str | None = "alice",
        password: str | None = None,
        keepalive: int = 60,
        will: mq.Will | None = None,
    ) -> int:
        """Send CONNECT; return the CONNACK's return code."""
        if password is None and user is not None:
            password = USERS[user]
        self.send(
            mq.Connect(
                client_id,
                keepalive=keepalive,
                username=user,
                password=None if password is None else password.encode(),
                will=will,
            )
        )
        connack = self.packet()
        assert isinstance(connack, mq.Connack), connack
        return connack.return_code

    def closed_by_gateway(self, timeout: float = 5) -> float:
        """Wait until the gateway closes (EOF or RST); return the monotonic time it happened."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return time.monotonic()

    def close(self) -> None:
        self.sock.close()


class Device:
    """A paho-mqtt client on its own loop thread, with events for what the tests wait on."""

    def __init__(
        self,
        port: int,
        client_id: str,
        user: str | None = "alice",
        keepalive: int = 60,
        tls: ssl.SSLContext | None = None,
        password: str | None = None,
    ):
        self.connacks: queue.Queue[Any] = queue.Queue()
        self.messages: queue.Queue[Any] = queue.Queue()
        self.disconnected = threading.Event()
        self.subscribed = threading.Event()
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        if user is not None:
            client.username_pw_set(user, password if password is not None else USERS[user])
        if tls is not None:
            client.tls_set_context(tls)
        # A device the gateway took over must not come straight back and take over in turn.
        client.reconnect_delay_set(min_delay=60, max_delay=60)
        client.on_connect = lambda c, u, flags, reason, props: self.connacks.put(reason)
        client.on_disconnect = lambda c, u, flags, reason, props: self.disconnected.set()
        client.on_subscribe = lambda c, u, mid, codes, props: self.subscribed.set()
        client.on_message = lambda c, u, msg: self.messages.put(msg)
        self.client = client
        self.port = port
        self.keepalive = keepalive

    def start(self) -> Any:
        """Connect and return the CONNACK reason."""
        self.client.connect("127.0.0.1", self.port, keepalive=self.keepalive)
        self.client.loop_start()
        return self.connacks.get(timeout=10)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout=10)
        assert info.is_published()

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic_filter, qos=qos)
        assert self.subscribed.wait(10), "no SUBACK"

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def devices(*made: Device) -> Iterator[None]:
    try:
        yield
    finally:
        for device in made:
            device.stop()


def require_tools(*names: str) -> None:
    """Skip when a tool is missing, unless we are root (who can install it with `make setup`)
    or the environment requires every test to run (CI), in which case fail."""
    missing = [name for name in names if shutil.which(name) is None]
    if not missing:
        return
    why = f"{', '.join(missing)} not installed; `make setup` installs them (as root, with apt)"
    if os.geteuid() == 0 or os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(why)
    pytest.skip(why)


# ----------------------------------------------------------------------------------------------
# paho-mqtt.


@pytest.mark.parametrize("backend", ["asyncio", "uvloop", "trio"])
def test_paho_device_publishes_listens_for_commands_and_stays_up_on_pings(
    start_gateway: Callable[..., RunningGateway], backend: str
) -> None:
    gw = start_gateway(backend=backend)
    device = Device(gw.port, "sensor-1", keepalive=1)
    operator = Device(gw.port, "operator")
    with devices(device, operator):
        assert str(device.start()) == "Success"
        device.publish("devices/sensor-1/temperature", b"21.5", qos=1)
        # PUBACK came only after the row was committed, so it is there now.
        assert ("alice", "sensor-1", "devices/sensor-1/temperature", 1, b"21.5") in gw.rows()

        device.subscribe("devices/sensor-1/commands/#")
        assert str(operator.start()) == "Success"
        operator.publish("devices/sensor-1/commands/reboot", b"now", qos=1)
        message = device.messages.get(timeout=5)
        assert (message.topic, message.payload, message.qos) == (
            "devices/sensor-1/commands/reboot",
            b"now",
            1,
        )

        # keepalive=1: the gateway allows 1.5 s of silence; paho pings every second. Three
        # intervals of nothing but pings must not lose the device.
        time.sleep(3.5)
        assert not device.disconnected.is_set()
        status = gw.status()
        assert status["sessions"] == 2
        assert status["closed"]["IDLE_TIMEOUT"] == 0
        assert status["telemetry_stored"] == 2
        device.publish("devices/sensor-1/temperature", b"21.7", qos=1)


def test_paho_takeover_by_the_same_id_and_credentials_is_immediate(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway()
    first = Device(gw.port, "sensor-2")
    second = Device(gw.port, "sensor-2")
    with devices(first, second):
        assert str(first.start()) == "Success"
        started = time.monotonic()
        assert str(second.start()) == "Success"
        assert first.disconnected.wait(2), "the old connection was not closed"
        took = time.monotonic() - started
        assert took < 1.0, took
        status = gw.wait_status(lambda s: s["closed"]["TAKEN_OVER"] == 1)
        assert status["takeovers"] == 1
        assert status["sessions"] == 1
        second.publish("devices/sensor-2/t", b"1")


def test_wrong_credentials_get_connack_4_or_5_and_never_disturb_the_device(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway()
    device = Device(gw.port, "sensor-3")
    with devices(device):
        assert str(device.start()) == "Success"
        attempts = [
            ("alice", "wrong", mq.ConnackCode.BAD_USERNAME_OR_PASSWORD),
            ("mallory", "s3cret", mq.ConnackCode.BAD_USERNAME_OR_PASSWORD),
            (None, None, mq.ConnackCode.NOT_AUTHORIZED),
        ]
        for user, password, expected in attempts:
            intruder = RawClient(gw.port)
            try:
                assert intruder.connect("sensor-3", user, password) == expected
                intruder.closed_by_gateway()
            finally:
                intruder.close()
        status = gw.wait_status(lambda s: s["closed"]["AUTH_FAILED"] == 3)
        assert status["takeovers"] == 0
        assert status["sessions"] == 1
        assert not device.disconnected.is_set()
        device.publish("devices/sensor-3/t", b"still here")


def test_another_user_with_the_same_client_id_is_a_different_device(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway()
    alices = Device(gw.port, "sensor-4", user="alice")
    bobs = Device(gw.port, "sensor-4", user="bob")
    with devices(alices, bobs):
        assert str(alices.start()) == "Success"
        assert str(bobs.start()) == "Success"
        alices.subscribe("devices/#")
        bobs.publish("devices/sensor-4/t", b"bob's")
        status = gw.wait_status(lambda s: s["telemetry_stored"] == 1)
        assert status["sessions"] == 2
        assert status["takeovers"] == 0
        assert not alices.disconnected.is_set()
        # Deliveries never cross users either.
        with pytest.raises(queue.Empty):
            alices.messages.get(timeout=0.3)


# ----------------------------------------------------------------------------------------------
# Raw sockets: silence, hello-less peers, garbage.


def test_silent_device_is_reaped_at_one_and_a_half_keepalives(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway()
    clients = [RawClient(gw.port) for _ in range(3)]
    try:
        sent = []
        for n, client in enumerate(clients):
            sent.append(time.monotonic())
            assert client.connect(f"silent-{n}", keepalive=1) == 0
        waited = [c.closed_by_gateway(timeout=5) - t for c, t in zip(clients, sent, strict=True)]
    finally:
        for client in clients:
            client.close()
    for w in waited:
        assert 1.5 <= w <= 1.5 + RESOLUTION + 0.5, waited
    status = gw.wait_status(lambda s: s["closed"]["IDLE_TIMEOUT"] == 3)
    assert status["sessions"] == 0
    log.info("reaped after %s s (keepalive 1 s: bound 1.5 s)", [round(w, 3) for w in waited])


def test_keepalive_zero_uses_the_idle_timeout_and_large_keepalives_are_capped(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway("--idle-timeout", "1", "--max-keepalive", "1")
    zero, huge = RawClient(gw.port), RawClient(gw.port)
    try:
        t0 = time.monotonic()
        assert zero.connect("ka-zero", keepalive=0) == 0
        t1 = time.monotonic()
        assert huge.connect("ka-huge", keepalive=3600) == 0
        waited_zero = zero.closed_by_gateway() - t0
        waited_huge = huge.closed_by_gateway() - t1
    finally:
        zero.close()
        huge.close()
    assert not_before(1.0) <= waited_zero <= 1.0 + RESOLUTION + slack(0.5), waited_zero
    assert not_before(1.5) <= waited_huge <= 1.5 + RESOLUTION + slack(0.5), waited_huge


def server_side(port: int, state: str) -> int:
    # The gateway's own sockets: it listens on 127.0.0.1, and another process's socket on the
    # same port number at another address (a benchmark's devices on 127.0.1.x) is not its.
    return sum(
        1
        for row in census(port).sockets
        if row.state == state and row.local_port == port and row.local_address == "127.0.0.1"
    )


def test_no_close_wait_after_200_clients_close(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway()
    clients = [RawClient(gw.port) for _ in range(200)]
    try:
        for n, client in enumerate(clients):
            assert client.connect(f"closer-{n}") == 0
        gw.wait_status(lambda s: s["sessions"] == 200)
        # Half leave politely, half just close: neither may leave a CLOSE_WAIT behind.
        for n, client in enumerate(clients):
            if n % 2:
                client.send(mq.Disconnect())
            client.close()
        closed_at = time.monotonic()
        while server_side(gw.port, "CLOSE_WAIT") or server_side(gw.port, "ESTABLISHED"):
            assert time.monotonic() - closed_at < slack(2.0), census(gw.port).counts
            time.sleep(0.01)
        settled = time.monotonic() - closed_at
    finally:
        for client in clients:
            client.close()
    assert settled < slack(0.5), settled
    status = gw.wait_status(lambda s: s["closed"]["PEER_CLOSED"] == 200)
    assert status["sessions"] == 0
    assert status["census"]["CLOSE_WAIT"] == 0
    assert status["phantoms"] == {
        "established_without_session": 0,
        "close_wait": 0,
        "unaccepted": 0,
    }
    log.info("200 closes: no CLOSE_WAIT or ESTABLISHED left after %.0f ms", settled * 1000)


def test_slowloris_connections_are_closed_at_the_hello_timeout(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway()
    silent = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(300)]
    # Trickled partial CONNECTs: bytes keep coming, but no complete packet ever does.
    tricklers = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(50)]
    opened = time.monotonic()
    try:
        for sock in tricklers:
            sock.sendall(b"\x10\x7f")  # CONNECT, 127 bytes to follow
        real = RawClient(gw.port)
        try:
            t = time.monotonic()
            assert real.connect("real-device") == 0
            assert time.monotonic() - t < 0.5
            status = gw.status()
            assert status["pending_hellos"] >= 300
            while time.monotonic() - opened < HELLO_TIMEOUT + slack(1.5):
                for sock in tricklers:
                    with contextlib.suppress(OSError):
                        sock.sendall(b"\x00")
                time.sleep(0.2)
                status = gw.status()
                if status["closed"]["HELLO_TIMEOUT"] == 350:
                    break
            assert status["closed"]["HELLO_TIMEOUT"] == 350, status
            # Each one closed at the hello timeout of its own accept, by the gateway's clock
            # (keepconn logs every close with its duration): never before, at most a little
            # after, however slow this test's own polling was.
            durations = [
                float(m.group(1))
                for m in re.finditer(r"reason=HELLO_TIMEOUT after ([0-9.]+) s", gw.log.read_text())
            ]
            assert len(durations) == 350
            assert HELLO_TIMEOUT <= min(durations) <= max(durations) <= HELLO_TIMEOUT + slack(0.5)
            assert status["pending_hellos"] == 0
            assert status["sessions"] == 1
            real.send(mq.Pingreq())
            assert isinstance(real.packet(), mq.Pingresp)
        finally:
            real.close()
    finally:
        for sock in silent + tricklers:
            sock.close()
    log.info("350 hello-less connections closed at the hello timeout")


def test_malformed_input_closes_only_that_connection(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway("--max-packet", "1024")
    good = RawClient(gw.port)
    bad = [RawClient(gw.port) for _ in range(4)]
    try:
        assert good.connect("good-device") == 0
        assert bad[0].connect("bad-0") == 0
        bad[0].send(b"\x30\xff\xff\xff\xff\x01")  # a remaining length in five bytes
        bad[1].send(b"\x10\xff\xff\xff\xff\x7f")  # the same, as the first packet
        assert bad[2].connect("bad-2") == 0
        bad[3].send(b"\x30\x80\x80\x40")  # PUBLISH declaring 1 MiB, over --max-packet
        bad[2].send(mq.Connect("again", username="alice", password=b"s3cret"))  # a 2nd CONNECT
        for client in bad:
            client.closed_by_gateway(timeout=2)
        status = gw.wait_status(lambda s: s["closed"]["PROTOCOL_ERROR"] == 4)
        assert status["sessions"] == 1
        good.send(mq.Pingreq())
        assert isinstance(good.packet(), mq.Pingresp)
    finally:
        for client in [good, *bad]:
            client.close()


def test_unsupported_protocol_version_gets_connack_1(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway()
    client = RawClient(gw.port)
    try:
        # CONNECT for MQTT 5 (level 5), otherwise like a 3.1.1 one.
        body = b"\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x00\x02v5"
        client.send(b"\x10" + bytes((len(body),)) + body)
        connack = client.packet()
        assert connack == mq.Connack(return_code=mq.ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION)
        client.closed_by_gateway()
    finally:
        client.close()
    gw.wait_status(lambda s: s["closed"]["PROTOCOL_ERROR"] == 1)


def test_will_is_published_when_a_device_vanishes_but_not_after_disconnect(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway()
    watcher = Device(gw.port, "watcher")
    with devices(watcher):
        assert str(watcher.start()) == "Success"
        watcher.subscribe("devices/+/status")
        will = mq.Will("devices/polite/status", b"offline", qos=1)
        polite = RawClient(gw.port)
        assert polite.connect("polite", will=will) == 0
        polite.send(mq.Disconnect())
        polite.close()
        will = mq.Will("devices/vanished/status", b"offline", qos=1)
        vanished = RawClient(gw.port)
        assert vanished.connect("vanished", will=will) == 0
        vanished.close()  # no DISCONNECT
        message = watcher.messages.get(timeout=5)
        assert (message.topic, message.payload) == ("devices/vanished/status", b"offline")
        with pytest.raises(queue.Empty):
            watcher.messages.get(timeout=0.3)
        assert gw.status()["wills"] == 1


def test_admission_and_flapping_refusals_answer_connack_3(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway("--flap-max-hellos", "2", "--accept-rate", "1000", "--accept-burst", "50")
    codes = []
    for _ in range(4):
        client = RawClient(gw.port)
        try:
            codes.append(client.connect("flapper"))
            if codes[-1] == 0:
                client.send(mq.Disconnect())
            client.closed_by_gateway()
        finally:
            client.close()
    # The third CONNECT triggers the ban, the fourth meets it: both are told CONNACK 3.
    assert codes == [0, 0, 3, 3]
    gw.wait_status(lambda s: s["closed"]["FLAPPING"] == 2)

    limited = start_gateway("--accept-rate", "0.1", "--accept-burst", "1")
    first, second = RawClient(limited.port), RawClient(limited.port)
    try:
        assert first.connect("one") == 0
        assert second.connect("two") == mq.ConnackCode.SERVER_UNAVAILABLE
    finally:
        first.close()
        second.close()
    limited.wait_status(lambda s: s["closed"]["OVERLOADED"] == 1)

    capped = start_gateway("--max-sessions", "1")
    first, second = RawClient(capped.port), RawClient(capped.port)
    try:
        assert first.connect("one") == 0
        assert second.connect("two") == mq.ConnackCode.SERVER_UNAVAILABLE
        with pytest.raises(EOFError):
            second.packet()  # exactly one CONNACK, then the close
        first.send(mq.Pingreq())
        assert isinstance(first.packet(), mq.Pingresp)
    finally:
        first.close()
        second.close()
    capped.wait_status(lambda s: s["closed"]["OVERLOADED"] == 1)


# ----------------------------------------------------------------------------------------------
# mosquitto's command-line clients.


def test_mosquitto_pub_and_sub(start_gateway: Callable[..., RunningGateway]) -> None:
    require_tools("mosquitto_pub", "mosquitto_sub")
    gw = start_gateway()
    common = ["-h", "127.0.0.1", "-p", str(gw.port), "-V", "mqttv311"]
    alice = ["-u", "alice", "-P", USERS["alice"]]
    sub = subprocess.Popen(
        ["mosquitto_sub", *common, *alice, "-i", "pump-7", "-q", "1", "-C", "1", "-d",
         "-t", "devices/pump-7/commands/#"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        # mosquitto_sub's stdout is block-buffered into a pipe: watch the gateway instead.
        gw.wait_status(lambda s: s["subscriptions"] == 1, timeout=10)
        pub = subprocess.run(
            ["mosquitto_pub", *common, *alice, "-q", "1", "-t", "devices/pump-7/commands/start",
             "-m", "flow=3"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        assert pub.returncode == 0, pub.stderr
        output, _ = sub.communicate(timeout=10)  # -C 1: it exits after one message
        assert sub.returncode == 0, output
        assert "flow=3" in output.splitlines(), output
    finally:
        _stop(sub)
    [row] = [r for r in gw.rows() if r[2] == "devices/pump-7/commands/start"]
    assert (row[0], row[3], row[4]) == ("alice", 1, b"flow=3")

    denied = subprocess.run(
        ["mosquitto_pub", *common, "-u", "alice", "-P", "nope", "-t", "x", "-m", "1"],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert denied.returncode != 0
    assert "bad user name or password" in (denied.stdout + denied.stderr).lower()


# ----------------------------------------------------------------------------------------------
# The process itself: status page, signals, configuration errors.


def test_status_page(start_gateway: Callable[..., RunningGateway]) -> None:
    gw = start_gateway()
    device = RawClient(gw.port)
    try:
        assert device.connect("status-device") == 0
        status = gw.wait_status(lambda s: s["sessions"] == 1)
        assert STATUS_KEYS <= status.keys()
        assert set(status["closed"]) >= {"IDLE_TIMEOUT", "TAKEN_OVER", "HELLO_TIMEOUT"}
        assert status["census"]["ESTABLISHED"] == 1
        assert status["census"]["LISTEN"] == 1
        assert status["phantoms"] == {
            "established_without_session": 0,
            "close_wait": 0,
            "unaccepted": 0,
        }
        base = f"http://127.0.0.1:{gw.status_port}"
        with urllib.request.urlopen(base + "/", timeout=5) as response:
            assert response.headers["Content-Type"].startswith("text/html")
            assert b"sessions" in response.read()
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(base + "/nope", timeout=5)
        assert missing.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as post:
            urllib.request.urlopen(base + "/status", data=b"x", timeout=5)
        assert post.value.code == 405
    finally:
        device.close()


def scrape(url: str, accept: str | None = None) -> tuple[str, dict[tuple[str, str], float]]:
    """GET a /metrics page; its content type, and each sample as (name, labels) -> value, the
    labels written ``k=v,...`` (sorted)."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=5) as response:
        content_type, text = response.headers["Content-Type"], response.read().decode()
    parser = (
        openmetrics_parser.text_string_to_metric_families
        if content_type.startswith("application/openmetrics-text")
        else text_string_to_metric_families
    )
    samples = {
        (s.name, ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))): s.value
        for family in parser(text)
        for s in family.samples
    }
    return content_type, samples


def test_metrics_port_serves_keepconn_metrics_for_a_reap_a_takeover_and_a_bad_password(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    metrics_port = free_port()
    gw = start_gateway("--metrics-port", str(metrics_port))
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    silent, old, new, intruder = (RawClient(gw.port) for _ in range(4))
    try:
        assert silent.connect("goes-silent", keepalive=1) == 0  # reaped 1.5 s after this
        assert old.connect("reboots") == 0
        assert new.connect("reboots") == 0
        old.closed_by_gateway()
        code = intruder.connect("goes-silent", password="wrong")
        assert code == mq.ConnackCode.BAD_USERNAME_OR_PASSWORD
        intruder.closed_by_gateway()
        silent.closed_by_gateway(timeout=1.5 + slack(3))
        closed = "keepconn_connections_closed_total"
        wanted = {f"reason={r}": 1 for r in ("IDLE_TIMEOUT", "TAKEN_OVER", "AUTH_FAILED")}
        deadline = time.monotonic() + slack(5)
        while True:
            _, samples = scrape(url)
            if all(samples[(closed, labels)] == n for labels, n in wanted.items()):
                break
            assert time.monotonic() < deadline, samples
            time.sleep(0.05)
        assert samples[("keepconn_sessions", "")] == 1
        assert samples[("keepconn_connections", "phase=session")] == 1
        assert samples[("keepconn_takeovers_total", "")] == 1
        others = {k: v for k, v in samples.items() if k[0] == closed and k[1] not in wanted}
        assert set(others.values()) == {0}, others
        assert samples[("keepconn_reap_lateness_seconds_count", "")] == 1
        lateness = samples[("keepconn_reap_lateness_seconds_sum", "")]
        assert 0 <= lateness <= RESOLUTION + slack(0.1), lateness
        assert samples[("keepconn_reap_resolution_seconds", "")] == RESOLUTION
        # The gateway audits the kernel's table at start (and on every /status request).
        assert samples[("keepconn_audit_phantom_sockets", "")] == 0
        assert samples[("keepconn_event_loop_lag_seconds_count", "")] > 0
        log.info("gateway: one reap, %.1f ms after its deadline", lateness * 1000)

        # The status page serves the same, in OpenMetrics when asked for it.
        accept = "application/openmetrics-text; version=1.0.0"
        content_type, page = scrape(f"http://127.0.0.1:{gw.status_port}/metrics", accept)
        assert content_type.startswith("application/openmetrics-text")
        for labels, n in wanted.items():
            assert page[(closed, labels)] == n
        assert page[("keepconn_takeovers_total", "")] == 1
        # The metrics port shows the metrics alone: who is connected stays on loopback.
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/status", timeout=5)
        assert missing.value.code == 404
    finally:
        for client in (silent, old, new, intruder):
            client.close()


def test_metrics_port_without_prometheus_client_is_a_clear_error(
    tmp_path: Path, users_file: Path
) -> None:
    # The gateway run as its documented command, in an interpreter where the import fails.
    code = (
        "import runpy, sys; sys.modules['prometheus_client'] = None; "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    argv = [sys.executable, "-c", code, str(GATEWAY), "--port", "0", "--users", str(users_file)]
    argv += ["--data", str(tmp_path / "t.sqlite3"), "--metrics-port", str(free_port())]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "keepconn[prometheus]" in result.stderr
    assert "listening" not in result.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_shuts_down_cleanly(start_gateway: Callable[..., RunningGateway], sig: int) -> None:
    gw = start_gateway("--shutdown-grace", "1")
    device = RawClient(gw.port)
    try:
        assert device.connect("bye-device") == 0
        started = time.monotonic()
        os.kill(gw.proc.pid, sig)
        device.closed_by_gateway(timeout=5)
        assert gw.proc.wait(10) == 0
        assert time.monotonic() - started < 5
    finally:
        device.close()


def test_malformed_users_file_is_a_clear_error(tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    users.write_text("alice:s3cret\nbob\n")
    argv = [sys.executable, str(GATEWAY), "--port", "0", "--users", str(users)]
    argv += ["--data", str(tmp_path / "t.sqlite3")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "line 2" in result.stderr and "username:password" in result.stderr
    assert "listening" not in result.stdout


# ----------------------------------------------------------------------------------------------
# In process: the Gateway class with a sink of the user's own (the README's "swap the sink").


class MemorySink:
    """A replacement sink: keeps records in a list, or fails on demand."""

    def __init__(self) -> None:
        self.records: list[Any] = []
        self.fail = False

    def write(self, records: Any) -> None:
        if self.fail:
            raise OSError("disk full")
        self.records.extend(records)

    def close(self) -> None:
        pass


@pytest.mark.anyio
async def test_a_replacement_sink_gets_every_message_and_a_failure_withholds_puback() -> None:
    memory = MemorySink()
    gateway = gateway_app.Gateway(
        gateway_app.Users({"alice": b"s3cret"}),
        Recorder(memory),
        ServerConfig(admission=None, flapping=None),
    )

    async def packet(stream: Any, decoder: mq.Decoder) -> mq.Packet:
        with anyio.fail_after(5):
            while not (packets := decoder.feed(await stream.receive())):
                pass
        [one] = packets
        return one

    async with anyio.create_task_group() as tasks:
        await tasks.start(gateway.recorder.run)
        [(host, port)] = await tasks.start(gateway.server.serve_tcp, "127.0.0.1", 0)
        async with await anyio.connect_tcp(host, port) as stream:
            decoder = mq.Decoder(mq.Role.CLIENT)
            await stream.send(mq.encode(mq.Connect("mem-1", username="alice", password=b"s3cret")))
            assert await packet(stream, decoder) == mq.Connack()
            await stream.send(mq.encode(mq.Publish("t/1", b"a", qos=0)))
            await stream.send(mq.encode(mq.Publish("t/2", b"b", qos=1, packet_id=5)))
            assert await packet(stream, decoder) == mq.Puback(5)
            assert [(r.topic, r.payload) for r in memory.records] == [("t/1", b"a"), ("t/2", b"b")]

            memory.fail = True
            await stream.send(mq.encode(mq.Publish("t/3", b"c", qos=1, packet_id=6)))
            with anyio.fail_after(5), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await packet(stream, decoder)  # closed, and no PUBACK came first
        assert gateway.recorder.failed == 1
        await gateway.server.shutdown()
        await gateway.recorder.aclose()


# A QoS 2 PUBLISH (refused by this gateway by design) for topic "t", packet id 5, payload "x".
QOS2_PUBLISH = b"\x34\x06\x00\x01t\x00\x05x"


def test_publishes_before_a_malformed_packet_in_one_segment_are_all_kept(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway()
    client = RawClient(gw.port)
    bystander = RawClient(gw.port)
    try:
        assert bystander.connect("bystander") == 0
        assert client.connect("burst") == 0
        # A QoS 0 and a QoS 1 message, then a packet the codec refuses, in one write.
        client.send(
            mq.encode(mq.Publish("devices/burst/a", b"zero", qos=0))
            + mq.encode(mq.Publish("devices/burst/b", b"one", qos=1, packet_id=7))
            + QOS2_PUBLISH
        )
        puback = client.packet()
        assert isinstance(puback, mq.Puback) and puback.packet_id == 7
        client.closed_by_gateway()
        status = gw.wait_status(lambda s: s["closed"]["PROTOCOL_ERROR"] == 1)
        assert status["sessions"] == 1
        stored = [(topic, qos, bytes(payload)) for _, _, topic, qos, payload in gw.rows()]
        assert stored == [("devices/burst/a", 0, b"zero"), ("devices/burst/b", 1, b"one")]
        bystander.send(mq.Pingreq())
        assert isinstance(bystander.packet(), mq.Pingresp)
    finally:
        client.close()
        bystander.close()


def test_a_stale_connect_never_displaces_the_session_of_a_newer_connection(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway()
    older = RawClient(gw.port)  # accepted first; its CONNECT is read only later
    newer = RawClient(gw.port)
    try:
        assert newer.connect("pump-9") == 0
        older.send(mq.Connect("pump-9", keepalive=60, username="alice", password=b"s3cret"))
        refusal = older.packet()
        assert isinstance(refusal, mq.Connack) and refusal.return_code == 3
        older.closed_by_gateway()
        status = gw.wait_status(lambda s: s["closed"]["STALE_HELLO"] == 1)
        assert status["sessions"] == 1 and status["closed"]["TAKEN_OVER"] == 0
        for _ in range(3):
            newer.send(mq.Pingreq())
            assert isinstance(newer.packet(), mq.Pingresp)
        # A rebooted device's newer connection still takes over at once.
        rebooted = RawClient(gw.port)
        assert rebooted.connect("pump-9") == 0
        newer.closed_by_gateway()
        gw.wait_status(lambda s: s["closed"]["TAKEN_OVER"] == 1 and s["sessions"] == 1)
        rebooted.close()
    finally:
        older.close()
        newer.close()

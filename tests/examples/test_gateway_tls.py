"""The example gateway over TLS, against TLS clients nobody here wrote.

mosquitto_pub/mosquitto_sub (``--cafile``, ``--cert``/``--key``) and paho-mqtt (``tls_set``)
check that devices as deployed can use it, and refuse it when its certificate is expired, from
an unknown CA or for another host; raw sockets do what no real client does (plaintext on the TLS
port, a TCP connect that never sends a ClientHello). Certificates come from tests/tlscerts.py,
made with the openssl command. Every gateway runs as a subprocess, ended by its pid.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from device_gateway import mqtt_codec as mq
from device_gateway.users import hash_password
from tests.examples import test_gateway as plain
from tests.examples.test_gateway import (
    GATEWAY,
    HELLO_TIMEOUT,
    RESOLUTION,
    USERS,
    Device,
    RawClient,
    RunningGateway,
    _stop,
    devices,
    require_tools,
    server_side,
)
from tests.timing import not_before, slack
from tests.tlscerts import Pair, Pki

pytestmark = pytest.mark.timeout(120)

# The plain gateway tests' fixtures, used here as they are: the same users file (hashed) and
# the same documented command line, TLS options added by each test.
users_file = plain.users_file
start_gateway = plain.start_gateway


def tls_args(pki: Pki, pair: Pair | None = None, *extra: str) -> tuple[str, ...]:
    """The gateway's TLS options: a server certificate (default: the good one), the CA of
    client certificates (optional ones), and ``extra``."""
    chosen = pair if pair is not None else pki.server
    return ("--tls-cert", str(chosen.cert), "--tls-key", str(chosen.key),
            "--tls-ca", str(pki.ca), *extra)  # fmt: skip


def mosquitto(tool: str, gw: RunningGateway, pki: Pki, *args: str) -> list[str]:
    return [tool, "-h", "127.0.0.1", "-p", str(gw.port), "-V", "mqttv311",
            "--cafile", str(pki.ca), *args]  # fmt: skip


def test_mosquitto_clients_over_tls_with_and_without_a_client_certificate(
    start_gateway: Callable[..., RunningGateway], pki: Pki
) -> None:
    require_tools("mosquitto_pub", "mosquitto_sub")
    gw = start_gateway(*tls_args(pki))
    alice = ["-u", "alice", "-P", USERS["alice"]]
    sub = subprocess.Popen(
        mosquitto("mosquitto_sub", gw, pki, *alice, "-i", "valve-3", "-q", "1", "-C", "1",
                  "-t", "devices/valve-3/commands/#"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        gw.wait_status(lambda s: s["subscriptions"] == 1, timeout=10)
        # The publisher also presents a client certificate (optional on this gateway).
        pub = subprocess.run(
            mosquitto("mosquitto_pub", gw, pki, *alice, "--cert", str(pki.alice.cert),
                      "--key", str(pki.alice.key), "-q", "1",
                      "-t", "devices/valve-3/commands/open", "-m", "50%"),
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        assert pub.returncode == 0, pub.stderr
        output, _ = sub.communicate(timeout=10)
        assert sub.returncode == 0, output
        assert "50%" in output.splitlines(), output
    finally:
        _stop(sub)
    [row] = [r for r in gw.rows() if r[2] == "devices/valve-3/commands/open"]
    assert (row[0], row[3], row[4]) == ("alice", 1, b"50%")
    # A client certificate from a CA the gateway does not trust is refused in the handshake.
    rogue = subprocess.run(
        mosquitto("mosquitto_pub", gw, pki, *alice, "--cert", str(pki.rogue_alice.cert),
                  "--key", str(pki.rogue_alice.key), "-t", "x", "-m", "1"),
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert rogue.returncode != 0
    status = gw.wait_status(lambda s: s["closed"]["TLS_FAILED"] == 1)
    assert status["closed"]["AUTH_FAILED"] == 0


@pytest.mark.parametrize("which", ["expired_server", "rogue_server", "wrong_host_server"])
def test_clients_refuse_an_untrustworthy_gateway_certificate(
    start_gateway: Callable[..., RunningGateway], pki: Pki, which: str
) -> None:
    require_tools("mosquitto_pub")
    gw = start_gateway(*tls_args(pki, getattr(pki, which)))
    alice = ["-u", "alice", "-P", USERS["alice"]]
    pub = subprocess.run(
        mosquitto("mosquitto_pub", gw, pki, *alice, "-t", "x", "-m", "secret"),
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert pub.returncode != 0, pub.stdout
    device = Device(gw.port, "careful", tls=pki.client_context())
    with pytest.raises(ssl.SSLCertVerificationError) as refused:
        device.client.connect("127.0.0.1", gw.port, keepalive=60)
    words = {
        "expired_server": "certificate has expired",
        "rogue_server": "unable to get local issuer certificate",
        "wrong_host_server": "mismatch",
    }[which]
    assert words in str(refused.value), refused.value
    # No credentials went out: the gateway saw two failed handshakes (with the clients' alerts).
    status = gw.wait_status(lambda s: s["closed"]["TLS_FAILED"] == 2)
    assert status["closed"]["AUTH_FAILED"] == 0 and status["sessions"] == 0
    assert gw.rows() == []


def test_plaintext_mqtt_on_the_tls_port_is_closed_at_once_and_the_device_stays(
    start_gateway: Callable[..., RunningGateway], pki: Pki
) -> None:
    gw = start_gateway(*tls_args(pki))
    device = Device(gw.port, "pump-1", tls=pki.client_context())
    with devices(device):
        assert str(device.start()) == "Success"
        plain = RawClient(gw.port)
        try:
            started = time.monotonic()
            plain.send(mq.Connect("pump-1", username="alice", password=USERS["alice"].encode()))
            closed = plain.closed_by_gateway(timeout=slack(2))
        finally:
            plain.close()
        assert closed - started < slack(0.5)
        status = gw.wait_status(lambda s: s["closed"]["TLS_FAILED"] == 1)
        assert status["sessions"] == 1 and status["takeovers"] == 0
        assert not device.disconnected.is_set()
        device.publish("devices/pump-1/t", b"still here")


def test_300_stalled_handshakes_time_out_while_a_tls_device_connects_at_once(
    start_gateway: Callable[..., RunningGateway], pki: Pki
) -> None:
    gw = start_gateway(*tls_args(pki))
    # TCP connects that never send a ClientHello.
    silent = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(300)]
    opened = time.monotonic()
    try:
        t = time.monotonic()
        real = RawClient(gw.port, tls=pki.client_context())
        try:
            assert real.connect("real-device") == 0
            assert time.monotonic() - t < slack(0.5)
            assert gw.status()["pending_hellos"] >= 300
            status = gw.wait_status(
                lambda s: s["closed"]["HELLO_TIMEOUT"] == 300, timeout=HELLO_TIMEOUT + slack(3)
            )
            elapsed = time.monotonic() - opened
            assert elapsed <= HELLO_TIMEOUT + slack(1.0), elapsed
            assert status["pending_hellos"] == 0 and status["sessions"] == 1
            real.send(mq.Pingreq())
            assert isinstance(real.packet(), mq.Pingresp)
        finally:
            real.close()
    finally:
        for sock in silent:
            sock.close()


def test_wrong_password_over_tls_gets_connack_4_and_never_disturbs_the_device(
    start_gateway: Callable[..., RunningGateway], pki: Pki
) -> None:
    require_tools("mosquitto_pub")
    gw = start_gateway(*tls_args(pki))
    device = Device(gw.port, "meter-9", tls=pki.client_context())
    intruder = Device(gw.port, "meter-9", tls=pki.client_context(), password="guess")
    with devices(device, intruder):
        assert str(device.start()) == "Success"
        assert str(intruder.start()) == "Bad user name or password"
        raw = RawClient(gw.port, tls=pki.client_context())
        try:
            assert raw.connect("meter-9", "alice", "wrong") == 4
        finally:
            raw.close()
        denied = subprocess.run(
            mosquitto("mosquitto_pub", gw, pki, "-u", "alice", "-P", "nope", "-t", "x", "-m", "1"),
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        assert denied.returncode != 0
        assert "bad user name or password" in (denied.stdout + denied.stderr).lower()
        status = gw.wait_status(lambda s: s["closed"]["AUTH_FAILED"] >= 3)
        assert status["takeovers"] == 0 and status["sessions"] == 1
        assert not device.disconnected.is_set()
        device.publish("devices/meter-9/t", b"ok")


def test_takeover_and_reaping_of_a_silent_device_are_unchanged_under_tls(
    start_gateway: Callable[..., RunningGateway], pki: Pki
) -> None:
    gw = start_gateway(*tls_args(pki))
    first = Device(gw.port, "gate-4", tls=pki.client_context())
    second = Device(gw.port, "gate-4", tls=pki.client_context())
    with devices(first, second):
        assert str(first.start()) == "Success"
        started = time.monotonic()
        assert str(second.start()) == "Success"
        assert first.disconnected.wait(slack(2)), "the old connection was not closed"
        assert time.monotonic() - started < slack(1.0)
        status = gw.wait_status(lambda s: s["closed"]["TAKEN_OVER"] == 1)
        assert status["takeovers"] == 1 and status["sessions"] == 1
        second.publish("devices/gate-4/t", b"1")
    # A device that falls silent (the loopback stand-in for one gone half-open) is reaped at
    # 1.5 keepalives, with a RST: nothing lingers in FIN_WAIT1 on the gateway's side.
    silent = RawClient(gw.port, tls=pki.client_context())
    try:
        sent = time.monotonic()
        assert silent.connect("gate-5", keepalive=1) == 0
        waited = silent.closed_by_gateway(timeout=5) - sent
    finally:
        silent.close()
    assert not_before(1.5) <= waited <= 1.5 + RESOLUTION + slack(0.5), waited
    gw.wait_status(lambda s: s["closed"]["IDLE_TIMEOUT"] == 1)
    assert server_side(gw.port, "FIN_WAIT1") == 0


def test_required_client_certificates_make_the_cn_the_user(
    start_gateway: Callable[..., RunningGateway], pki: Pki
) -> None:
    gw = start_gateway(*tls_args(pki, None, "--require-client-cert"), users=False)
    alice = Device(gw.port, "lamp-1", user=None, tls=pki.client_context(pki.alice))
    bob = Device(gw.port, "lamp-1", user=None, tls=pki.client_context(pki.bob))
    with devices(alice, bob):
        # No username, no password: the certificate is the credential.
        assert str(alice.start()) == "Success"
        assert str(bob.start()) == "Success"  # another user's lamp-1: no takeover
        alice.publish("devices/lamp-1/t", b"a")
        bob.publish("devices/lamp-1/t", b"b")
        assert {(r[0], r[4]) for r in gw.rows()} == {("alice", b"a"), ("bob", b"b")}
        assert gw.status()["takeovers"] == 0
    for pair in (None, pki.rogue_alice, pki.expired_alice):
        with contextlib.suppress(ssl.SSLError, OSError, EOFError):
            stranger = RawClient(gw.port, tls=pki.client_context(pair))
            try:
                stranger.connect("lamp-1", user=None)
            finally:
                stranger.close()
    status = gw.wait_status(lambda s: s["closed"]["TLS_FAILED"] == 3)
    assert status["sessions"] == 0 and status["closed"]["AUTH_FAILED"] == 0


def test_tls_options_are_checked_before_anything_is_bound(pki: Pki, tmp_path: Path) -> None:
    cases = [
        (["--require-client-cert", "--tls-cert", str(pki.server.cert), "--tls-key",
          str(pki.server.key)], "--require-client-cert needs --tls-ca"),
        (["--users", "u", "--tls-cert", str(pki.server.cert)], "go together"),
        (["--users", "u", "--tls-ca", str(pki.ca)], "--tls-ca needs --tls-cert"),
        (["--users", "u", "--tls-cert", str(pki.alice.cert), "--tls-key",
          str(pki.server.key)], "--tls-cert"),
        ([], "--users is required"),
    ]  # fmt: skip
    (tmp_path / "u").write_text(f"alice:{hash_password('s3cret')}\n")
    for extra, words in cases:
        result = subprocess.run(
            [sys.executable, str(GATEWAY), "--port", "0", "--data", str(tmp_path / "t.db"),
             *extra],
            capture_output=True, text=True, timeout=30, cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 2, (extra, result.stderr)
        assert words in result.stderr, (extra, result.stderr)
        assert "listening" not in result.stdout

"""The storm benchmark's event-loop lag probe: one MQTT session that pings on a fixed schedule.

Measured from outside the server, so the same method fits all three servers compared (none
of which exposes its own loop lag): a PINGREQ leaves every ``interval`` seconds on a schedule
that does not wait for answers, and each PINGRESP is matched to its PINGREQ in order (TCP keeps
them in order and both gateways answer them in order). The lag of a ping is the time from its
send to its answer: a loopback round trip (tens of microseconds) plus however long the server's
event loop took to get to it. Sending on a schedule rather than after each answer means a
2-second stall shows as a hundred samples sliding from 2 s down, not as one sample: the
percentiles are time-weighted, free of coordinated omission.

Run by benchmarks/storm.py: ``storm_probe.py HOST PORT USERNAME PASSWORD INTERVAL [CA]``; with
CA (a PEM file) the session speaks TLS, trusting that CA. Prints ``{"kind": "ready"}`` once the
session is open, then, after ``quit`` (or EOF) on stdin, one line
``{"kind": "samples", "sent": [...], "lag": [...], "lost": bool}`` (sent times are
time.monotonic(), system-wide on Linux, so the coordinator can line them up with its own).

One thread both sends and receives (select() with the next send as its timeout): an SSL
socket must not be written by one thread while another reads it.
"""

from __future__ import annotations

import collections
import json
import select
import socket
import ssl
import sys
import threading
import time

from device_gateway.mqtt_codec import Connack, Connect, Decoder, Pingreq, Pingresp, Role, encode

CLIENT_ID = "storm-probe"
#: Longer than any run: the probe must never be the session a server reaps for silence.
KEEPALIVE = 600
_PINGREQ = encode(Pingreq())


def _connect(
    host: str, port: int, username: str, password: str, tls: ssl.SSLContext | None
) -> tuple[socket.socket, Decoder]:
    # A server under admission control may refuse at a bad moment; the probe starts before the
    # fleet, so a few tries are plenty.
    for _ in range(20):
        sock = socket.create_connection((host, port), timeout=10.0)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)
        secret = password.encode()
        hello = Connect(CLIENT_ID, keepalive=KEEPALIVE, username=username, password=secret)
        sock.sendall(encode(hello))
        decoder = Decoder(role=Role.CLIENT)
        packets: list[object] = []
        while not packets:
            data = sock.recv(4096)
            if not data:
                break
            packets = decoder.feed(data)
        if packets and isinstance(packets[0], Connack) and packets[0].return_code == 0:
            sock.settimeout(None)
            return sock, decoder
        sock.close()
        time.sleep(0.5)
    raise SystemExit("storm_probe: the server never accepted the probe")


def _readable(sock: socket.socket, timeout: float) -> bool:
    # Bytes TLS has already decrypted do not make the socket readable again.
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    return bool(select.select([sock], [], [], max(0.0, timeout))[0])


def main() -> None:
    host, port, username, password, interval = sys.argv[1:6]
    tls = None
    if len(sys.argv) > 6:
        tls = ssl.create_default_context(cafile=sys.argv[6])
    sock, decoder = _connect(host, int(port), username, password, tls)
    step = float(interval)
    outstanding: collections.deque[float] = collections.deque()
    sent: list[float] = []
    lag: list[float] = []
    stop = threading.Event()
    lost = False

    def wait_for_quit() -> None:
        for line in sys.stdin:
            if line.strip() == "quit":
                break
        stop.set()

    print(json.dumps({"kind": "ready"}), flush=True)
    threading.Thread(target=wait_for_quit, daemon=True).start()
    due = time.monotonic() + step
    # After quit, answers still in flight get a moment; pings the server never answered are
    # left out (the coordinator reports the probe as lost if the session died).
    drain_until: float | None = None
    while drain_until is None or time.monotonic() < drain_until:
        if drain_until is None and stop.is_set():
            drain_until = time.monotonic() + min(1.0, 20 * step)
        now = time.monotonic()
        wait = (due - now) if drain_until is None else (drain_until - now)
        if _readable(sock, min(wait, 0.1)):
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            got = time.monotonic()
            if not data:
                lost = drain_until is None
                break
            for packet in decoder.feed(data):
                if isinstance(packet, Pingresp) and outstanding:
                    t = outstanding.popleft()
                    sent.append(t)
                    lag.append(got - t)
        now = time.monotonic()
        if drain_until is None and now >= due:
            # Far behind (the probe itself was starved): skip ahead rather than burst.
            due = due + step if now - due < step else now + step
            # Recorded before the send so a send that blocks counts against the server.
            outstanding.append(time.monotonic())
            try:
                sock.sendall(_PINGREQ)
            except OSError:
                lost = True
                break
    try:
        sock.close()
    except OSError:
        pass
    n = len(lag)
    print(
        json.dumps(
            {"kind": "samples", "sent": sent[:n], "lag": lag[:n], "lost": lost},
            separators=(",", ":"),
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()

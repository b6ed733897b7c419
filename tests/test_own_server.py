"""The own-server how-to's programs (docs/howto/own_server_*.py) do what the page says.

Each runs as its own process, as a user would run it; the test is its clients, over real
sockets on loopback (websockets' own client for the websockets server). For each server:
a second hello takes a device's session over, a silent device is reaped with IDLE_TIMEOUT
(never before its timeout), both are reset (not sent a FIN), and a peer's FIN is answered with
the server's own and leaves no CLOSE_WAIT socket in the kernel's table.
"""

from __future__ import annotations

import base64
import contextlib
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from keepconn.tcp import census
from tests.timing import slack

HOWTO = Path(__file__).resolve().parent.parent / "docs" / "howto"
#: The idle timeout the servers run with (seconds).
IDLE = 1.0


class Program:
    """One how-to server process and the lines it prints."""

    def __init__(self, script: str, extra: list[str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HOWTO / script), "--port", "0", "--timeout", str(IDLE), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        _, first = self.expect(r"listening \S+ \d+", within=slack(20))
        self.port = int(first.split()[-1])

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put((time.monotonic(), line.rstrip("\n")))

    def expect(self, pattern: str, *, within: float) -> tuple[float, str]:
        """The first line (and when it came) matching ``pattern``, within ``within`` seconds."""
        end = time.monotonic() + within
        while (left := end - time.monotonic()) > 0:
            try:
                stamp, line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if re.fullmatch(pattern, line):
                return stamp, line
        raise AssertionError(f"no line {pattern!r} in {within:.1f} s; printed: {self.seen}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


class Client(Protocol):
    #: How the server ended the connection, once it has: "reset" or "fin".
    ended_by: str | None

    def say(self, text: str) -> None: ...
    def hear(self) -> str | None: ...
    def fin(self) -> None: ...
    def local_port(self) -> int: ...
    def close(self) -> None: ...


class LineClient:
    """A device of the line protocol on a plain socket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=slack(5))
        self.buffer = b""
        self.ended_by: str | None = None

    def say(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\n")

    def hear(self) -> str | None:
        """The next line; None once the server has closed (FIN or RST)."""
        while b"\n" not in self.buffer:
            try:
                data = self.sock.recv(4096)
            except ConnectionResetError:
                self.ended_by = "reset"
                return None
            if not data:
                self.ended_by = "fin"
                return None
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()

    def fin(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def local_port(self) -> int:
        return int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()


class WsClient:
    """A device of the same protocol over websockets (its own sync client)."""

    def __init__(self, port: int) -> None:
        self.ended_by: str | None = None
        self.stack = contextlib.ExitStack()
        self.ws: ClientConnection = self.stack.enter_context(
            connect(f"ws://127.0.0.1:{port}", open_timeout=slack(5), close_timeout=1)
        )

    def say(self, text: str) -> None:
        self.ws.send(text)

    def hear(self) -> str | None:
        try:
            return str(self.ws.recv(timeout=slack(5)))
        except ConnectionClosed as exc:
            # No close frame either way; the cause tells a reset from a bare FIN (EOF).
            if isinstance(exc.__cause__, ConnectionResetError):
                self.ended_by = "reset"
            elif isinstance(exc.__cause__, EOFError):
                self.ended_by = "fin"
            return None

    def fin(self) -> None:
        self.ws.socket.shutdown(socket.SHUT_WR)

    def local_port(self) -> int:
        return int(self.ws.socket.getsockname()[1])

    def close(self) -> None:
        self.ws.socket.close()  # no closing handshake: the server side is gone or half-closed
        self.stack.close()


CASES = [
    pytest.param(("own_server_asyncio.py", []), id="asyncio"),
    pytest.param(("own_server_trio.py", []), id="trio"),
    pytest.param(("own_server_websockets.py", []), id="websockets"),
    pytest.param(("own_server_websockets.py", ["--ws-ping", "0.2"]), id="websockets-ping"),
]


@pytest.fixture(params=CASES)
def program(request: pytest.FixtureRequest) -> Iterator[Program]:
    script, extra = request.param
    running = Program(script, extra)
    try:
        yield running
    finally:
        running.stop()


def client_of(program: Program) -> Client:
    if "websockets" in program.process.args[1]:  # type: ignore[index]
        return WsClient(program.port)
    return LineClient(program.port)


def hello(program: Program, device: str) -> Client:
    client = client_of(program)
    client.say(f"HELLO {device}")
    assert client.hear() == "WELCOME"
    return client


def test_takeover_reaping_and_no_close_wait(program: Program) -> None:
    clients: list[Client] = []
    try:
        # Takeover: the device comes back on a new connection; the old one is reset.
        first = hello(program, "dev-1")
        clients.append(first)
        second = hello(program, "dev-1")
        clients.append(second)
        program.expect("closed dev-1 TAKEN_OVER", within=slack(5))
        assert first.hear() is None
        assert first.ended_by == "reset"  # a displaced peer is reset, not sent a FIN
        second.say("PING")
        sent = time.monotonic()
        assert second.hear() == "PONG"

        # Reaping: silent from now on, the session is reaped at its deadline, never before.
        reaped, _ = program.expect("closed dev-1 IDLE_TIMEOUT", within=IDLE + slack(5))
        assert reaped - sent >= IDLE
        assert second.hear() is None
        assert second.ended_by == "reset"  # so is a dead one

        # The peer's FIN: the session ends with PEER_CLOSED and the server closes its side.
        third = hello(program, "dev-2")
        clients.append(third)
        port = third.local_port()
        third.fin()
        program.expect("closed dev-2 PEER_CLOSED", within=slack(5))
        assert third.hear() is None
        assert third.ended_by == "fin"  # a live peer that left gets a FIN back
        deadline = time.monotonic() + slack(5)
        while True:  # the kernel's table, until the server's side has left CLOSE_WAIT
            rows = [row for row in census(program.port).sockets if row.remote_port == port]
            if not any(row.state in ("CLOSE_WAIT", "ESTABLISHED") for row in rows):
                break
            assert time.monotonic() < deadline, rows
            time.sleep(0.02)
        assert census(program.port).count("CLOSE_WAIT") == 0
    finally:
        for client in clients:
            client.close()


def pingless_websocket(port: int, device: str) -> socket.socket:
    """A websocket client by hand, like a device whose websocket library ignores pings: the
    opening handshake and a hello, then it reads what comes and answers nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=slack(5))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    sock.sendall(request.encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        data = sock.recv(4096)
        assert data, answer
        answer += data
    assert answer.startswith(b"HTTP/1.1 101 "), answer
    payload, mask = f"HELLO {device}".encode(), os.urandom(4)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)  # one masked text frame
    return sock


def test_websockets_own_keepalive_closes_a_peer_that_never_answers_pings() -> None:
    # Pings every 0.2 s, 0.2 s to answer; keepconn's idle timeout (5 s here) is not what ends it.
    program = Program("own_server_websockets.py", ["--ws-ping", "0.2", "--timeout", "5"])
    try:
        sock = pingless_websocket(program.port, "dev-9")
        try:
            started = time.monotonic()
            received = b""
            while data := sock.recv(4096):  # WELCOME, pings, websockets' close frame, its FIN
                received += data
                assert time.monotonic() - started < slack(5), received
        finally:
            sock.close()  # the device's stack closes in turn
        assert b"keepalive ping timeout" in received  # the 1011 close frame says why
        stamp, _ = program.expect("closed dev-9 HEARTBEAT_TIMEOUT", within=slack(5))
        assert stamp - started < 5.0  # websockets' pings found it, not keepconn's reaper
    finally:
        program.stop()
